"""The examples' command lines, progress lines and plots, without training anything real.

Each example's ``main`` runs end to end here with its training problem replaced by a tiny
pure-Python one (the examples' own smoke runs are in test_examples.py): what is checked is
what a user sees -- every flag has help text, ``--help`` names the PNG the script writes
without ``--out``, the baseline's progress lines show no controller decision, gradient steps
are called steps, and the Navier-Stokes plot shows each solve's iteration count on integer
ticks.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TRAINING = ("heat_emulator", "navier_stokes_correction", "poisson_inverse", "custom_solver")
GPU = ("cupy_gpu_poisson", "cupy_gpu_training")
DECISIONS = ("refine", "hold", "stop")


def load(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as a module (examples/ is not a package)."""
    if name in TRAINING:
        pytest.importorskip("jax")
        pytest.importorskip("optax")
    sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"prdp_cli_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class ParserCapturedError(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__("parser captured")
        self.parser = parser


def parser_of(module: ModuleType, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The ``ArgumentParser`` an example builds, caught at its ``parse_args`` call."""
    def capture(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        raise ParserCapturedError(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    entry = getattr(module, "parse_args", None) or module.main
    with pytest.raises(ParserCapturedError) as caught:
        entry([])
    return caught.value.parser


def help_text(module: ModuleType, monkeypatch: pytest.MonkeyPatch) -> str:
    """``--help`` of an example, whitespace collapsed (argparse wraps lines)."""
    with monkeypatch.context() as patch:
        text = parser_of(module, patch).format_help()
    return " ".join(text.split())


# ---------------------------------------------------------------------------- flags


@pytest.mark.parametrize("name", TRAINING + GPU)
def test_every_flag_has_help_text(name, monkeypatch):
    parser = parser_of(load(name), monkeypatch)
    missing = [action.option_strings or action.dest for action in parser._actions
               if not action.help or action.help == argparse.SUPPRESS]
    assert not missing, f"examples/{name}.py: flags without help text: {missing}"
    assert len(parser._actions) > 2


# ---------------------------------------------------------------------------- a fake problem


class FakeProblem:
    """A training problem that is a few Python numbers: validation falls, then plateaus."""

    def __init__(self, params: Any, unit: str = "epoch", epochs: int = 8) -> None:
        import _common  # examples/_common.py, on sys.path once an example is loaded

        self.params = params
        self.trainer = _common.Trainer(
            init_state=lambda: (self.params, 0),
            run_epoch=lambda state, epoch, k, k_adjoint: (state[0], state[1] + 1),
            validate=lambda state: 1.0 / min(state[1], 3) if state[1] else 1.0,
            iterations_per_epoch=lambda k, k_adjoint: k + k_adjoint,
            epochs=epochs, unit=unit)


def progress_lines(stderr: str) -> dict[str, list[str]]:
    lines = stderr.splitlines()
    return {label: [line for line in lines if line.startswith(f"[{label}")]
            for label in ("baseline", "prdp")}


def check_progress(stderr: str, unit: str, epochs: int) -> None:
    """Baseline lines show no decision, PRDP lines one each; both count in ``unit``s."""
    lines = progress_lines(stderr)
    assert len(lines["baseline"]) == len(lines["prdp"]) == epochs
    for line in lines["baseline"]:
        assert not any(word in line.split() for word in DECISIONS), line
    for line in lines["prdp"]:
        assert sum(word in line.split() for word in DECISIONS) == 1, line
    other = "epoch" if unit == "step" else "step"
    for line in lines["baseline"] + lines["prdp"]:
        assert re.search(rf"\] {unit}\s+\d+/{epochs}\b", line), line
        assert other not in line, line


def written_png(tmp_path: Path) -> str:
    pngs = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png"))
    assert len(pngs) == 1, pngs
    return pngs[0]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty directory, with the examples' float64 switch left alone."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def no_x64(module: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(module._common, "enable_x64", lambda: None)


# ---------------------------------------------------------------------------- each example


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_heat_help_names_the_png_of_each_dim(dim, monkeypatch):
    heat = load("heat_emulator")
    text = help_text(heat, monkeypatch)
    written = heat.parse_args(["--dim", str(dim)]).out
    assert written == Path("out") / f"heat_emulator_{dim}d.png"
    assert written.as_posix() in text
    assert "heat_emulator.png" not in text


def test_heat_main_writes_the_named_png_and_quiet_baseline(in_tmp, monkeypatch, capsys):
    import jax.numpy as jnp

    heat = load("heat_emulator")
    no_x64(heat, monkeypatch)
    problem = FakeProblem(jnp.asarray(0.5))
    info = {"grid": (4,), "r": 0.9, "adjoint": "implicit", "epochs": 8, "size": "tiny",
            "k_converged": 12, "setting": heat.SETTINGS[1],
            "apply_net": lambda params, u: params * u,
            "val_trajectory": jnp.ones((2, 4, 4))}
    monkeypatch.setattr(heat, "build", lambda args: (problem.trainer, info))
    result = heat.main(["--dim", "1", "--rollout", "3"])
    assert written_png(in_tmp) == "out/heat_emulator_1d.png"
    assert "out/heat_emulator_1d.png" in help_text(heat, monkeypatch)
    check_progress(capsys.readouterr().err, "epoch", 8)
    assert result["example"] == "heat_emulator_1d"


@pytest.mark.parametrize("variant", ["1d", "2d"])
def test_poisson_help_names_the_png_of_each_variant(variant, monkeypatch):
    poisson = load("poisson_inverse")
    text = help_text(poisson, monkeypatch)
    written = poisson.parse_args(["--variant", variant]).out
    assert written == Path("out") / f"poisson_inverse_{variant}.png"
    assert written.as_posix() in text
    assert "poisson_inverse.png" not in text


def test_poisson_counts_gradient_steps(in_tmp, monkeypatch, capsys):
    poisson = load("poisson_inverse")
    no_x64(poisson, monkeypatch)
    assert poisson.parse_args(["--steps", "7"]).epochs == 7
    assert poisson.parse_args(["--epochs", "7"]).epochs == 7  # the alias
    text = help_text(poisson, monkeypatch)
    assert "gradient steps" in text and "--steps STEPS" in text
    problem = FakeProblem(np.array([2.0]), unit="step")
    monkeypatch.setattr(poisson, "make_trainer", lambda problem_, args: problem.trainer)
    recorded = record_figures(poisson, monkeypatch)
    poisson.main([])
    assert written_png(in_tmp) == "out/poisson_inverse_1d.png"
    check_progress(capsys.readouterr().err, "step", 8)
    assert [ax.get_xlabel() for ax in recorded[0]["axes"][:3]] == ["step"] * 3


def test_custom_solver_counts_gradient_steps(in_tmp, monkeypatch, capsys):
    custom = load("custom_solver")
    no_x64(custom, monkeypatch)
    problem = FakeProblem(np.array([2.0]), unit="step")
    monkeypatch.setattr(custom.poisson_inverse, "converged_count", lambda *a, **k: 110)
    monkeypatch.setattr(custom.poisson_inverse, "make_trainer",
                        lambda problem_, args: problem.trainer)
    custom.main([])
    assert written_png(in_tmp) == "out/custom_solver.png"
    assert "out/custom_solver.png" in help_text(custom, monkeypatch)
    check_progress(capsys.readouterr().err, "step", 8)


def record_figures(module: ModuleType, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Record the axes of every figure the example's plot helper makes."""
    import _report  # examples/_report.py: plot_runs looks make_figure up there, not in _common

    recorded: list[dict] = []
    make_figure = _report.make_figure

    def recording(*args: Any, **kwargs: Any) -> Any:
        fig = make_figure(*args, **kwargs)
        fig.canvas.draw()
        recorded.append({"axes": fig.axes})
        return fig

    monkeypatch.setattr(_report, "make_figure", recording)
    return recorded


def test_navier_stokes_plot_shows_each_solve_on_integer_ticks(in_tmp, monkeypatch, capsys):
    ns = load("navier_stokes_correction")
    no_x64(ns, monkeypatch)
    problem = FakeProblem(None)
    # Converged counts just above the controller's first K (8): a K axis spanning 8..10,
    # where matplotlib's default ticks would be fractional.
    info = {"n": 16, "size": "tiny", "k_advection": 9, "k_pressure": 10, "k_max": 10,
            "epochs": 8, "adjoint": "implicit", "windows": 40}
    monkeypatch.setattr(ns, "build", lambda args: (problem.trainer, info))
    recorded = record_figures(ns, monkeypatch)
    ns.main([])
    assert written_png(in_tmp) == "out/navier_stokes_correction.png"
    assert "out/navier_stokes_correction.png" in help_text(ns, monkeypatch)
    check_progress(capsys.readouterr().err, "epoch", 8)

    k_axis = recorded[0]["axes"][1]
    labels = {text.get_text() for text in k_axis.get_legend().get_texts()}
    assert labels == {f"{run}: {solve}" for run in ("baseline", "prdp")
                      for solve in ("GMRES (advection)", "CG (pressure)")}
    ticks = k_axis.get_yticks()
    assert len(ticks) >= 2 and np.all(ticks == np.round(ticks))
    # The baseline runs each solve at its own converged count.
    lines = {line.get_label(): line.get_ydata() for line in k_axis.get_lines()}
    assert set(lines["baseline: GMRES (advection)"]) == {9}
    assert set(lines["baseline: CG (pressure)"]) == {10}
    assert ns.solve_counts(8, 9, 12) == {"GMRES (advection)": 8, "CG (pressure)": 8}
    assert ns.solve_counts(16, 9, 12) == {"GMRES (advection)": 9, "CG (pressure)": 12}
