"""The README cannot rot: every Python block in it runs, and its shell commands are real.

The rule (stated at the top of the README's tour): the ```python blocks run top to bottom in
one namespace, each using what the blocks before it defined. The training-loop sketch leaves
its model and data to the reader; the names it says are the reader's are filled here with
tiny, real objects (a two-layer MLP on one state, a 1D Laplacian stencil, two epochs of
``(u0, target)`` batches), so the sketch actually trains.

The ```bash blocks are not run (they install packages); instead the test command is checked
to be exactly what ``.ci/run`` runs, and the main job's script, flags and extras to exist.
"""

from __future__ import annotations

import ast
import contextlib
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
#: The sentence of the tour that names the sketch's free names.
SKETCH_RULE = "The training-loop sketch leaves its model and data to you:"
EPOCHS = 2


def fenced_blocks(text: str, language: str) -> list[str]:
    """The bodies of the ```language blocks of ``text``, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.S | re.M)


PYTHON_BLOCKS = fenced_blocks(README, "python")


def sketch_index() -> int:
    """Index of the training-loop sketch among the Python blocks (the one with the loop)."""
    found = [i for i, block in enumerate(PYTHON_BLOCKS)
             if "PRDPController(" in block and "for epoch in range(epochs)" in block]
    assert len(found) == 1, f"expected one training-loop sketch in README.md, found {found}"
    return found[0]


def declared_sketch_names() -> set[str]:
    """The names the README's tour says the sketch leaves to the reader."""
    paragraphs = [p for p in README.split("\n\n") if SKETCH_RULE in p]
    assert len(paragraphs) == 1, f"README.md's tour must state the rule: {SKETCH_RULE!r}"
    sentence = paragraphs[0].split(SKETCH_RULE, 1)[1].split("(", 1)[0]
    return set(re.findall(r"`([A-Za-z_]\w*)`", sentence))


def names_used(block: str) -> set[str]:
    """Every identifier a block reads."""
    return {node.id for node in ast.walk(ast.parse(block))
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}


# ---------------------------------------------------------------------------- the fixture


class SketchWorld:
    """The reader's side of the training-loop sketch, tiny and real, with what it observed."""

    n, width, batch = 16, 32, 4

    def __init__(self) -> None:
        import jax
        import jax.numpy as jnp

        import prdp_ops as po

        n, width = self.n, self.width
        # A: the 1D negative Laplacian (Dirichlet, unit spacing): diagonal 2, SPD, and
        # Jacobi contracts on it, so P_K approaches A^-1 as K grows.
        self.A = po.LaplacianStencil(n)
        dense = np.diag(2.0 * np.ones(n)) - np.diag(np.ones(n - 1), 1) - np.diag(
            np.ones(n - 1), -1)
        np.testing.assert_allclose(self.A.matmat(np.eye(n)), dense)
        rng = np.random.default_rng(0)
        # The task: P_K(net(u0)) should match A^-1 u0 (so the ideal network is the identity).
        u0 = rng.standard_normal((3 * self.batch, n))
        target = np.linalg.solve(dense, u0.T).T
        self.batches = [(jnp.asarray(u0[i:i + self.batch]), jnp.asarray(target[i:i + self.batch]))
                        for i in range(0, len(u0), self.batch)]
        val_u0 = rng.standard_normal((4, n))
        self.val_u0 = jnp.asarray(val_u0)
        self.val_target = jnp.asarray(np.linalg.solve(dense, val_u0.T).T)
        self.dense = jnp.asarray(dense)
        key1, key2 = jax.random.split(jax.random.PRNGKey(0))
        self.params0 = {"w1": jax.random.normal(key1, (n, width)) / np.sqrt(n),
                        "b1": jnp.zeros(width),
                        "w2": jax.random.normal(key2, (width, n)) / np.sqrt(width),
                        "b2": jnp.zeros(n)}
        self.states_seen: list[tuple[int, ...]] = []
        self.validation_errors: list[float] = []

    def apply_net(self, params: dict[str, Any], u: Any) -> Any:
        """A two-layer MLP on one state ``(n,)``, as the README's sketch says."""
        import jax.numpy as jnp

        self.states_seen.append(tuple(u.shape))
        hidden = jnp.tanh(u @ params["w1"] + params["b1"])
        return hidden @ params["w2"] + params["b2"]

    def validation_error(self, params: dict[str, Any]) -> float:
        """The converged (dense, exact) solve of the network's output against the targets:
        independent of the controller's K."""
        import jax
        import jax.numpy as jnp

        prediction = jax.vmap(self.apply_net, (None, 0))(params, self.val_u0)
        solved = jnp.linalg.solve(self.dense, prediction.T).T
        error = float(jnp.mean((solved - self.val_target) ** 2))
        self.validation_errors.append(error)
        return error

    def names(self) -> dict[str, Any]:
        """What the sketch leaves to the reader, by name."""
        return {"params": self.params0, "apply_net": self.apply_net, "A": self.A,
                "batches": self.batches, "epochs": EPOCHS,
                "validation_error": self.validation_error}


@pytest.fixture
def sketch_world() -> SketchWorld:
    pytest.importorskip("jax")
    pytest.importorskip("optax")
    return SketchWorld()


# ---------------------------------------------------------------------------- python blocks


def test_readme_has_the_blocks_this_test_expects():
    assert len(PYTHON_BLOCKS) >= 3
    assert sketch_index() == len(PYTHON_BLOCKS) - 1, "the sketch is the tour's last block"
    for block in PYTHON_BLOCKS:
        ast.parse(block)  # a syntax error names the block in the failure


def test_the_sketch_names_are_declared_and_used(sketch_world):
    declared = declared_sketch_names()
    assert declared == set(sketch_world.names()), (
        "README.md's tour and this test's fixture must name the same free names of the "
        "training-loop sketch")
    unused = declared - names_used(PYTHON_BLOCKS[sketch_index()])
    assert not unused, f"README.md declares names the sketch does not use: {sorted(unused)}"


def test_every_python_block_runs_in_order(sketch_world):
    import jax
    import jax.numpy as jnp

    namespace: dict[str, Any] = {"__name__": "readme"}
    sketch = sketch_index()
    for i, block in enumerate(PYTHON_BLOCKS):
        if i == sketch:
            namespace.update(sketch_world.names())
        first_line = block.strip().splitlines()[0]
        code = compile(block, f"README.md python block {i + 1} ({first_line})", "exec")
        # optax's Adam computes its bias correction as `decay ** count` (a Python float and
        # an int32 step count), which JAX's strict promotion refuses: optax's code, not ours
        # (prdp_ops itself runs under strict promotion in test_jax_conventions), so the
        # sketch that trains with it runs under standard promotion.
        with jax.numpy_dtype_promotion("standard") if i == sketch else contextlib.nullcontext():
            exec(code, namespace)

    # The tour's results are what it says they are.
    assert namespace["result"].converged
    assert namespace["dc"].shape == (32, 32) and bool(jnp.all(jnp.isfinite(namespace["dc"])))

    # The sketch trained: every epoch ran and was checked, the network saw one state at a
    # time (the README vmaps), and the controller gave an iteration count it can use.
    controller = namespace["controller"]
    assert namespace["epoch"] == EPOCHS - 1
    assert len(sketch_world.validation_errors) == EPOCHS
    assert all(math.isfinite(e) for e in sketch_world.validation_errors)
    assert set(sketch_world.states_seen) == {(SketchWorld.n,)}
    assert namespace["decision"] in ("refine", "hold", "stop")
    assert isinstance(controller.k, int) and controller.k >= 1
    # The default rule's start search ran before the first step, fed by the sketch, and ended.
    assert not controller.starting and controller.k_start is not None
    params, params0 = namespace["params"], sketch_world.params0
    assert not np.allclose(params["w1"], params0["w1"]), "the loop did not update params"
    # The sketch's train_step descends: a few more steps on one batch, at the count the
    # controller chose (its start search picks it), lower its loss.
    u0, target = sketch_world.batches[0]
    opt_state = namespace["opt_state"]
    losses = []
    for _ in range(30):
        with jax.numpy_dtype_promotion("standard"):  # optax's Adam, as above
            params, opt_state, value = namespace["train_step"](params, opt_state, u0, target,
                                                               jnp.asarray(controller.k))
        losses.append(float(value))
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.9 * losses[0]
    jax.block_until_ready(params)


# ---------------------------------------------------------------------------- shell blocks


def two_commands_section() -> str:
    return README.split("## Two commands on a fresh machine", 1)[1].split("\n## ", 1)[0]


def bash_after(marker: str) -> str:
    """The first ```bash block after ``marker``, its lines joined by ``&&``."""
    section = two_commands_section()
    assert marker in section, f"README.md's two-commands section lost {marker!r}"
    block = fenced_blocks(section.split(marker, 1)[1], "bash")[0]
    return " && ".join(line.strip() for line in block.splitlines() if line.strip())


def ci_commands() -> list[str]:
    """What ``.ci/run`` runs, after its shell set-up (``set``, ``cd``, comments)."""
    lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines
            if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))]


def test_the_two_commands_section_has_two_commands():
    assert len(fenced_blocks(two_commands_section(), "bash")) == 2


def test_readme_test_command_is_exactly_what_ci_runs():
    readme = bash_after("this is exactly what CI runs")
    ci = " && ".join(ci_commands())
    assert readme == ci, (f"README.md's test command\n  {readme}\nand what .ci/run runs\n  {ci}\n"
                          "must agree")


def extras(command: str) -> set[str]:
    found = re.findall(r'pip install -q -e "\.\[([\w,]+)\]"', command)
    assert found, f"no pip install -e .[extras] in {command!r}"
    return set(found[0].split(","))


def optional_dependencies() -> set[str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return set(pyproject["project"]["optional-dependencies"])


def test_readme_commands_install_extras_that_exist():
    for marker in ("Install and run the main job", "this is exactly what CI runs"):
        assert extras(bash_after(marker)) <= optional_dependencies()


def test_the_main_job_script_and_flags_exist():
    pytest.importorskip("jax")
    pytest.importorskip("optax")
    command = bash_after("Install and run the main job").split(" && ")[-1].split()
    assert command[0] == "python"
    script = ROOT / command[1]
    assert script.is_file(), f"README.md runs {command[1]}, which does not exist"
    sys.path.insert(0, str(script.parent))
    try:
        import importlib.util

        spec = importlib.util.spec_from_file_location("readme_main_job", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        args = module.parse_args(command[2:])  # an unknown flag exits with status 2
    finally:
        sys.path.remove(str(script.parent))
    # "writes a plot to out/"
    assert "writes a plot to `out/`" in two_commands_section()
    assert args.out.parent == Path("out")


# ---------------------------------------------------------------------------- public surface

#: The names DESIGN.md's "Public names" section promises on ``prdp_ops``.
CONTRACT_NAMES = {"LinearOperator", "aslinearoperator", "IterativeSolver", "register_solver",
                  "get_solver", "available_solvers", "solve", "solve_vjp", "PRDPController",
                  "SolveResult", "Cotangents"}


def test_all_lists_every_public_name_and_the_contract():
    import inspect

    import prdp_ops as po

    assert len(po.__all__) == len(set(po.__all__)), "duplicates in prdp_ops.__all__"
    missing = [name for name in po.__all__ if not hasattr(po, name)]
    assert not missing, f"prdp_ops.__all__ names what prdp_ops lacks: {missing}"
    public = {name for name in dir(po)
              if not name.startswith("_") and not inspect.ismodule(getattr(po, name))}
    assert public == set(po.__all__), (
        f"public names not in __all__: {sorted(public - set(po.__all__))}")
    assert set(po.__all__) >= CONTRACT_NAMES
    # Every po.<name> the README uses is exported.
    used = set(re.findall(r"\bpo\.([A-Za-z_]\w*)", README))
    assert used <= set(po.__all__), f"README.md uses {sorted(used - set(po.__all__))}"


def test_solve_result_repr_is_one_line_summary():
    import prdp_ops as po

    n = 2000
    A = np.diag(np.full(n, 2.0)) - np.diag(np.ones(n - 1), 1) - np.diag(np.ones(n - 1), -1)
    result = po.solve(A, np.ones(n), "cg", rtol=1e-8, maxiter=3)
    text = repr(result)
    assert "\n" not in text
    assert len(text) < 300, text
    assert text.startswith("SolveResult(")
    assert "iterations=3" in text and f"shape=({n},)" in text
    assert "..." not in text and "[" not in text  # no array printed, not even abbreviated


def test_help_of_solve_points_to_the_gradient_entry_points():
    import importlib
    import pydoc

    import prdp_ops as po

    text = pydoc.render_doc(po.solve, renderer=pydoc.plaintext)
    assert "prdp_ops.solve_vjp" in text
    assert "prdp_ops.backends.jax.solve" in text
    assert callable(po.solve_vjp)
    pytest.importorskip("jax")
    assert callable(importlib.import_module("prdp_ops.backends.jax").solve)


# ---------------------------------------------------------------------------- benchmarks

BENCHMARKS = ROOT / "benchmarks"


def needs_lineax(path: Path) -> bool:
    return bool(re.search(r"^\s*(import lineax|from lineax)", path.read_text(), flags=re.M))


def test_the_bench_extra_is_named_wherever_a_benchmark_needs_lineax():
    users = [path for path in sorted(BENCHMARKS.glob("*.py")) if needs_lineax(path)]
    assert users, "no benchmark imports lineax any more: drop this test and the bench extra"
    assert "bench" in optional_dependencies()
    for path in users:
        assert '".[jax,bench]"' in ast.get_docstring(ast.parse(path.read_text())), path.name
        mention = README.split(f"`benchmarks/{path.name}` also needs lineax", 1)
        assert len(mention) == 2, f"README.md does not say {path.name} needs lineax"
        assert '`pip install -e ".[jax,bench]"`' in mention[1].split("\n\n", 1)[0]


def test_jax_benchmark_without_lineax_says_so_in_one_line(tmp_path):
    import subprocess

    pytest.importorskip("jax")
    script = BENCHMARKS / "jax_vs_peers.py"
    # lineax blocked (a None entry in sys.modules makes its import fail), then the script.
    runner = ("import runpy, sys; sys.modules['lineax'] = None; "
              f"sys.argv = [{str(script)!r}, '--quick']; "
              f"runpy.run_path({str(script)!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", runner], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "needs lineax" in lines[0] and '".[jax,bench]"' in lines[0]
    assert "Traceback" not in done.stderr
