r"""Multi-process JAX: a solve and its gradient sharded across two processes on the loopback.

``examples/distributed_poisson.py`` runs as two local processes (``jax.distributed``, CPU,
JAX's gloo collectives, coordinator and gloo both on 127.0.0.1), each with two CPU devices:
one global 4-device mesh, the coefficient field ``c``, the source ``f`` and the observation
split into row blocks over it, each process building only its own blocks.
``jax.jit(jax.value_and_grad(loss))`` through ``pj.solve(po.DiffusionStencil(c), f, "cg")``
runs in the implicit and the unrolled adjoint modes, and process 0 writes the gathered
solution and gradients. The same computation in this (single, one-device) process, with
plain unsharded arrays, is the reference.

Tolerances
----------
The two runs do the same arithmetic except the order of the sums inside dot products
(each device sums its block, then the blocks are added; halo rows are copied, exactly) --
differences of about ``eps = 2.2e-16`` relative per dot product. How far they carry:

* Forward CG (``u``, both modes) and the implicit gradient (one more CG solve, ``A^T = A``,
  for ``lambda = grad_f``; ``grad_c`` is products of differences of ``lambda`` and ``u``):
  rounding perturbations of CG grow at most like ``eps * cond(A)`` per iteration (the gap
  between the recursively updated and the true residual, Greenbaum 1997, grows by
  ``O(eps ||A|| ||x||)`` per step; divided by the smallest eigenvalue that is ``eps cond(A)``
  relative), so ``||a - b|| / ||b|| <= C eps cond(A) K`` with ``K`` the iterations that ran:
  forward for ``u``, forward + adjoint for the gradient.
* The unrolled gradient differentiates the step sizes ``alpha_k = r_k.r_k / p_k.A p_k`` and
  ``beta_k``: each has relative condition up to ``cond(A)`` in its dot products (a Rayleigh
  quotient), and the reverse sweep carries those errors through ``K`` steps like the forward
  recursion does: ``C eps cond(A)^2 K``. That estimate is only good for few iterations on a
  coarse grid, which is why this test runs ``K = 20`` on ``16 x 16``. Beyond that the float64
  derivative of CG's iterations amplifies rounding far more: one vs two devices *in one
  process* differ by ``1e-9`` at ``n = 32, K = 20``, ``1.6e-3`` at ``n = 64, K = 10`` and
  O(1) at ``n = 32, K = 100``; plain ``jax.grad`` of a textbook CG loop does the same, and an
  80-bit extended-precision forward-mode evaluation shows the float64 value itself off by
  ``4e-3`` at ``n = 64, K = 10``. A property of unrolled CG in floating point, not of
  sharding or processes (see "Numerics" in the example's docstring).

``cond(A)`` is computed here exactly (dense eigenvalues of the 256 x 256 matrix) and checked
against the a-priori bound ``(c_max / c_min) / tan^2(pi h / 2)``. ``C = 10`` covers the
constants of those estimates. Measured when this test was written: implicit mode, errors
4e-13 (``u``) and 4e-13 (gradients) against tolerances 2.7e-11 and 5.1e-11 (``cond(A) =
157``, 76 forward iterations); unrolled mode, 3e-16 and 2e-14 against 7e-12 and 1.1e-9.

A sharding, gather or halo bug shows up as an O(1) difference, far above any of these
tolerances; the test also checks the layout (each process held half the rows, results stayed
on all four devices) and that the gathered ``c`` equals the one built here, bit for bit.

Skips when the installed JAX cannot provide gloo CPU collectives: the worker then exits with
status 77 and says why (that detection is tested on its own, quickly, below). Both processes
are killed after :data:`TIMEOUT_S` seconds. The two-process test takes 35-40 s on a loaded
2-core machine, mostly compilation, hence ``slow``.
"""

from __future__ import annotations

import importlib.util
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import prdp_ops as po  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "distributed_poisson.py"
#: Grid (n x n unknowns), CG iterations of the unrolled mode, rtol of the implicit mode.
N, K_UNROLLED, RTOL = 16, 20, 1e-10
PROCESSES, LOCAL_DEVICES = 2, 2
#: Wall-clock limit for the two worker processes together (they are killed after it).
TIMEOUT_S = 300
#: Safety factor over the rounding estimates (see the module docstring).
C = 10.0
EPS = float(np.finfo(np.float64).eps)


def load_example() -> ModuleType:
    """Import ``examples/distributed_poisson.py`` (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("prdp_example_distributed_poisson", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict[str, str]:
    """The workers' environment: CPU only, no device-count flags, no proxies."""
    env = {k: v for k, v in os.environ.items()
           if k != "XLA_FLAGS" and not k.lower().endswith("_proxy")}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def start_workers(out: Path, logs: Path) -> list[tuple[subprocess.Popen, Path]]:
    """Start the two processes of the example (coordinator and gloo on the loopback)."""
    port = free_port()
    workers = []
    for i in range(PROCESSES):
        log = logs / f"process{i}.log"
        command = [sys.executable, str(EXAMPLE), "--coordinator", f"127.0.0.1:{port}",
                   "--num-processes", str(PROCESSES), "--process-id", str(i),
                   "--gloo-hostname", "127.0.0.1", "--local-devices", str(LOCAL_DEVICES),
                   "--init-timeout", "60", "--n", str(N), "--rtol", str(RTOL),
                   "--unrolled-iterations", str(K_UNROLLED), "--check", str(out)]
        with open(log, "w") as stream:
            proc = subprocess.Popen(command, cwd=ROOT, env=worker_env(), stdout=stream,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        workers.append((proc, log))
    return workers


def stop(proc: subprocess.Popen) -> None:
    """Kill a worker (and anything it started) if it is still running."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_for(workers: list[tuple[subprocess.Popen, Path]], deadline: float,
             no_gloo_status: int) -> None:
    """Wait for every worker; kill them all at the deadline, or once one fails."""
    try:
        while any(proc.poll() is None for proc, _ in workers):
            failed = [proc for proc, _ in workers if proc.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for proc, _ in workers:
            stop(proc)
    codes = [proc.returncode for proc, _ in workers]
    text = "\n".join(f"--- process {i} (exit {proc.returncode}):\n{log.read_text()[-3000:]}"
                     for i, (proc, log) in enumerate(workers))
    if no_gloo_status in codes:
        reasons = [line for _, log in workers for line in log.read_text().splitlines()
                   if line.startswith("gloo CPU collectives unavailable")]
        pytest.skip(reasons[0] if reasons else "gloo CPU collectives unavailable")
    if time.monotonic() > deadline:
        pytest.fail(f"the worker processes did not finish within {TIMEOUT_S} s; killed\n{text}")
    assert codes == [0] * PROCESSES, text


def reference(example: ModuleType) -> dict[str, Any]:
    """The same losses and gradients in this process, on one device, unsharded."""
    with jax.enable_x64(True):  # as the workers; this process's setting is left alone
        return _reference(example)


def _reference(example: ModuleType) -> dict[str, Any]:
    x, y = example.grid_coordinates(N, np.arange(N * N))
    fields = {name: jnp.asarray(field(x, y)) for name, field in example.FIELDS.items()}
    out: dict[str, Any] = {"c": np.asarray(fields["c"])}
    for adjoint in example.ADJOINTS:
        adjoint_iterations: list[int] = []

        def record(result: Any, into: list[int] = adjoint_iterations) -> None:
            into.append(int(result.iterations))

        loss = example.make_loss(N, adjoint, RTOL, K_UNROLLED,
                                 adjoint_callback=record if adjoint == "implicit" else None)
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
        (value, (u, iterations)), (c_bar, f_bar) = step(fields["c"], fields["f"],
                                                        fields["u_obs"])
        jax.effects_barrier()  # the adjoint callback has run
        out[f"{adjoint}_loss"] = float(value)
        out[f"{adjoint}_iterations"] = int(iterations)
        if adjoint == "implicit":  # one gradient, one adjoint solve reported
            assert len(adjoint_iterations) == 1, adjoint_iterations
            out["implicit_adjoint_iterations"] = adjoint_iterations[0]
        out[f"{adjoint}_u"] = np.asarray(u)
        out[f"{adjoint}_grad_c"] = np.asarray(c_bar)
        out[f"{adjoint}_grad_f"] = np.asarray(f_bar)
    out["u_obs"] = np.asarray(fields["u_obs"])
    return out


def condition_number(c: np.ndarray) -> float:
    """``cond(A)`` of ``DiffusionStencil(c, spacing=h)``, exactly, checked against its bound.

    Face coefficients lie in ``[c_min, c_max]``, so ``c_min A(1) <= A(c) <= c_max A(1)``
    (Loewner order), and the 5-point Laplacian's extreme eigenvalues are ``8 sin^2(pi h/2)
    / h^2`` and ``8 cos^2(pi h/2) / h^2``: ``cond(A) <= (c_max/c_min) / tan^2(pi h/2)``.
    """
    h = 1.0 / (N + 1)
    matrix = po.DiffusionStencil(c.reshape(N, N), spacing=h).to_matrix().toarray()
    eigenvalues = np.linalg.eigvalsh(matrix)
    kappa = float(eigenvalues[-1] / eigenvalues[0])
    bound = (c.max() / c.min()) / math.tan(math.pi * h / 2) ** 2
    assert eigenvalues[0] > 0 and kappa <= bound * (1 + 1e-12), (kappa, bound)
    return kappa


def relative(a: np.ndarray, b: np.ndarray) -> float:
    """``||a - b|| / ||b||`` (2-norms)."""
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path: Path) -> None:
    example = load_example()
    out = tmp_path / "distributed.npz"
    deadline = time.monotonic() + TIMEOUT_S
    workers = start_workers(out, tmp_path)
    try:
        ref = reference(example)  # meanwhile, in this process
    finally:
        wait_for(workers, deadline, example.EXIT_NO_GLOO)
    got = dict(np.load(out))

    # The layout: 2 processes x 2 devices, each process held half the rows (its own).
    assert (int(got["processes"]), int(got["devices"]), int(got["local_devices"])) == (
        PROCESSES, PROCESSES * LOCAL_DEVICES, LOCAL_DEVICES)
    block = N // (PROCESSES * LOCAL_DEVICES)
    assert got["block_rows"].tolist() == [[0, block], [2 * block, 3 * block]]
    np.testing.assert_array_equal(got["c"], ref["c"])  # built per block, gathered: exact

    kappa = condition_number(ref["c"])
    for adjoint in example.ADJOINTS:
        assert int(got[f"{adjoint}_devices_per_result"]) == PROCESSES * LOCAL_DEVICES
        k_forward = ref[f"{adjoint}_iterations"]
        # Same stopping iteration: the implicit solve's last two residuals are 1.27 and 0.82
        # times rtol ||f||, which differences at the 1e-12 level cannot reorder.
        assert int(got[f"{adjoint}_iterations"]) == k_forward
        if adjoint == "implicit":
            k_total = k_forward + ref["implicit_adjoint_iterations"]
            tol_u = C * EPS * kappa * k_forward
            tol_grad = C * EPS * kappa * k_total
        else:
            assert k_forward == K_UNROLLED
            tol_u = C * EPS * kappa * K_UNROLLED
            tol_grad = C * EPS * kappa**2 * K_UNROLLED
        errors = {"u": relative(got[f"{adjoint}_u"], ref[f"{adjoint}_u"])}
        for name in ("grad_c", "grad_f"):
            assert np.linalg.norm(ref[f"{adjoint}_{name}"]) > 0, name
            errors[name] = relative(got[f"{adjoint}_{name}"], ref[f"{adjoint}_{name}"])
        report = (f"{adjoint}: errors {errors}, tolerances u {tol_u:.1e}, gradients "
                  f"{tol_grad:.1e} (cond {kappa:.0f}, iterations {k_forward})")
        assert errors["u"] <= tol_u, report
        assert errors["grad_c"] <= tol_grad and errors["grad_f"] <= tol_grad, report
        # L = h^2/2 ||u - u_obs||^2: |dL| <= h^2 ||u - u_obs|| ||du|| (+ second order).
        h = 1.0 / (N + 1)
        misfit = np.linalg.norm(ref[f"{adjoint}_u"] - ref["u_obs"])
        tol_loss = 1.01 * h**2 * misfit * tol_u * np.linalg.norm(ref[f"{adjoint}_u"])
        assert abs(float(got[f"{adjoint}_loss"]) - ref[f"{adjoint}_loss"]) <= tol_loss, report


@pytest.mark.parametrize("failure", ["no gloo option", "backend without gloo"])
def test_worker_exits_77_when_gloo_is_unavailable(failure: str, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    """What the two-process test skips on: the worker detects it and says why."""
    example = load_example()
    updates: list[tuple[str, Any]] = []

    def update(name: str, value: Any) -> None:  # records; this process's config stays
        if failure == "no gloo option" and name == "jax_cpu_collectives_implementation":
            raise AttributeError(f"Unrecognized config option: {name}")  # as an old JAX
        updates.append((name, value))

    monkeypatch.setattr(jax.config, "update", update)
    if failure == "backend without gloo":  # the CPU client fails to create its collectives

        def failing_devices(*args: Any) -> None:
            raise RuntimeError("make_gloo_tcp_collectives: this jaxlib was built without gloo")

        monkeypatch.setattr(jax, "devices", failing_devices)
    with pytest.raises(SystemExit) as exited:
        example.configure(example.parse_args([]))
    assert exited.value.code == example.EXIT_NO_GLOO
    reason = capsys.readouterr().err
    assert reason.startswith("gloo CPU collectives unavailable: jax "), reason
    cause = ("Unrecognized config option: jax_cpu_collectives_implementation"
             if failure == "no gloo option" else "this jaxlib was built without gloo")
    assert cause in reason, reason
    gloo_set = ("jax_cpu_collectives_implementation", "gloo") in updates
    assert gloo_set == (failure == "backend without gloo"), updates
