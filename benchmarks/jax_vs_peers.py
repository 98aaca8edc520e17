"""prdp_ops' JAX backend against its peers, on a Poisson problem (2D, and one 3D case).

The operator is the matrix-free 5-point (7-point in 3D) stencil on an N x N (N x N x N) grid
(float64), scaled by a coefficient ``c`` that receives a gradient, and every solver runs
exactly K conjugate-gradient iterations (rtol = atol = 0). In one process, with the runs of
all contenders interleaved and the median of the repeats reported:

* forward: ``pj.solve`` against ``lineax.linear_solve(..., lineax.CG)`` and
  ``jax.scipy.sparse.linalg.cg`` (all jitted);
* gradients of ``sum(x^2)`` w.r.t. ``(c, b)``: implicit and unrolled, against plain JAX
  autodiff of a ``lax.scan`` of the same K iterations;
* the bridge: ``pj.solve(..., backend="numpy")`` called from jitted code, against
  ``po.solve`` called directly on the same NumPy operator;
* memory: XLA's temporary-buffer estimate (``compiled.memory_analysis()``) of the gradient
  computations, and the unrolled one per iteration in n-vectors against the floor below.

Targets (issue 10): forward / lineax <= 1.05, implicit (forward + gradient) / forward <= 2.1,
unrolled (forward + gradient) / forward <= 3.0 (or within 15 % of the platform floor derived
below, where that is higher), bridge / direct NumPy <= 1.3.

The floor of the unrolled reverse (CG, unpreconditioned; n-vector reads + writes per step,
a fused stencil counted as one read of its input):

==========================  ==============  ==================================================
pass                        reads + writes  what
==========================  ==============  ==================================================
forward step                7 + 4           p = r + beta p_prev, q = A p, <p, q> |
                                            x, r update, <r, r>
tape (full)                 0 + 3           p, q = A p and r' (CG's record; the scalars rho,
                                            rho', <p, q> too, so the reverse recomputes no
                                            reduction)
reverse step, floor         12 + 2          <p_bar', p>, <x_bar, p> | r_bar, <r_bar, q> |
                                            p_bar with A^T q_bar inline
tape reads                  3 + 0           the record
parameter c (scalar)        2 + 0           <q_bar, dy/dc>, dy/dc = L p fused in
checkpoints (default on     11 + 3 again    every ceil(sqrt(K)) steps the state (r, p; not
CPU above 32 MiB)                           x: the records do not depend on it); each
                                            segment's steps run again, writing its records
==========================  ==============  ==================================================

So forward + gradient moves at least (11 + 3 + 17 + 2) / 11 = 3.0 forward steps' worth per
step with every record kept, and (11 + 11 + 3 + 17 + 2) / 11 = 4.0 checkpointed. Both in
warm memory: on CPU an executable's temporaries are one block allocated at every call, and
glibc serves a block above 32 MiB (its largest dynamic mmap threshold) from fresh pages,
whose first touch costs far more than the traffic (measured in the same process by
:func:`first_touch_seconds_per_byte`, 1.7-2.5 GB/s on the shared 2-core machine against
20-40 GB/s for warm memory: one n-vector per step faulted costs about one forward step). The
platform floor the table reports is therefore the smaller of

    full tape:     3.0 + T(3 K n-vectors) / t_forward
    checkpointed:  4.0 + T(min over s of (2 ceil(K / s) + 3 s) n-vectors) / t_forward

with T(bytes) = bytes x the measured first-touch seconds per byte when the block exceeds
32 MiB, else 0 (the least memory of each layout: the records of every step; r and p every s
steps and one segment's records). The JAX backend picks the checkpointed tape on CPU when
the full one exceeds 32 MiB, which is the smaller floor at every size of the sweep.

Run ``python benchmarks/jax_vs_peers.py`` (the size sweep, several minutes), with
``--sizes`` (``NxK`` for an N x N grid, ``NxNxNxK`` for 3D) or ``--quick`` (seconds);
``--clock cpu`` times the process's CPU time instead of wall time (steadier where other
jobs share the cores).
lineax is a benchmark-only dependency, the ``bench`` extra: ``pip install -e ".[jax,bench]"``
(without it the script says so in one line and exits with status 1).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from prdp_ops.backends import jax as pj

import prdp_ops as po

jax.config.update("jax_enable_x64", True)


def poisson_matvec(N: int | tuple[int, ...], c: Any) -> Callable[[Any], Any]:
    """``u -> c * (-Laplacian) u`` on an N x N grid (or the grid ``N``, a shape) with zero
    Dirichlet boundaries."""
    shape = (N, N) if isinstance(N, int) else tuple(N)
    inner = tuple(slice(1, -1) for _ in shape)

    def matvec(u: Any) -> Any:
        v = jnp.pad(u.reshape(shape), 1)
        lap = 2 * len(shape) * v[inner]
        for axis in range(len(shape)):
            for lo, hi in ((None, -2), (2, None)):
                index = list(inner)
                index[axis] = slice(lo, hi)
                lap = lap - v[tuple(index)]
        return c * lap.reshape(-1)

    return matvec


def scan_cg(matvec: Callable, b: Any, K: int) -> Any:
    """K plain CG iterations in a ``lax.scan`` (the autodiff baseline)."""

    def body(carry: tuple, _: Any) -> tuple:
        x, r, p, rho = carry
        q = matvec(p)
        alpha = rho / (p @ q)
        x, r = x + alpha * p, r - alpha * q
        rho_new = r @ r
        return (x, r, p * (rho_new / rho) + r, rho_new), None

    init = (jnp.zeros_like(b), b, b, b @ b)
    return jax.lax.scan(body, init, None, length=K)[0][0]


def contenders(N: tuple[int, ...], K: int) -> dict[str, Callable]:
    import lineax as lx

    def ours(c: Any, b: Any, **kw: Any) -> Any:
        # hermitian=True: the operator is symmetric, as lineax is told by its tags.
        return pj.solve(poisson_matvec(N, c), b, maxiter=K, rtol=0.0, hermitian=True, **kw)

    def lineax_cg(c: Any, b: Any) -> Any:
        op = lx.FunctionLinearOperator(poisson_matvec(N, c), jax.eval_shape(lambda: b),
                                       tags=[lx.symmetric_tag, lx.positive_semidefinite_tag])
        return lx.linear_solve(op, b, lx.CG(rtol=0.0, atol=0.0, max_steps=K),
                               throw=False).value

    def jax_scipy_cg(c: Any, b: Any) -> Any:
        return jax.scipy.sparse.linalg.cg(poisson_matvec(N, c), b, tol=0.0, atol=0.0,
                                          maxiter=K)[0]

    def loss_grad(solve: Callable) -> Callable:
        return jax.jit(jax.grad(lambda c, b: jnp.sum(solve(c, b) ** 2), argnums=(0, 1)))

    return {
        "ours": jax.jit(ours),
        "lineax": jax.jit(lineax_cg),
        "jax.scipy": jax.jit(jax_scipy_cg),
        "ours implicit grad": loss_grad(lambda c, b: ours(c, b, adjoint="implicit")),
        "ours unrolled grad": loss_grad(lambda c, b: ours(c, b, adjoint="unrolled")),
        "scan autodiff grad": loss_grad(lambda c, b: scan_cg(poisson_matvec(N, c), b, K)),
        "lineax grad": loss_grad(lineax_cg),
    }


def bridge_contenders(N: tuple[int, ...], K: int) -> dict[str, Callable]:
    stencil = po.LaplacianStencil(N)
    bridged = jax.jit(lambda b: pj.solve(stencil, b, maxiter=K, rtol=0.0, backend="numpy"))
    return {
        "bridge (numpy, jit)": lambda b: jax.block_until_ready(bridged(b)),
        "direct numpy": lambda b: po.solve(stencil, np.asarray(b), maxiter=K, rtol=0.0).x,
    }


def step_traffic(N: tuple[int, ...]) -> dict[str, float]:
    """What one CG step moves by XLA's own count (``cost_analysis()['bytes accessed']`` of
    the jitted step, in n-vectors of float64): the forward step, the reverse step from CG's
    ``step_vjp`` (what ``adjoint="unrolled"`` runs) and ``jax.vjp`` of the step (the fallback
    for solvers without one). XLA counts every operand of every fusion, so a stencil's
    shifted reads and the jit's own inputs and outputs count too: compare the rows with
    each other, and with the floor table's counts only as a ratio."""
    from prdp_ops.backends import _jax_unrolled as unrolled
    from prdp_ops.backends._jax_driver import materialized

    n = int(np.prod(N))
    solver, ops = po.get_solver("cg"), pj.OPS
    b, c = jnp.ones(n), jnp.asarray(1.0)

    def op(c: Any) -> po.LinearOperator:
        return po.FunctionOperator(poisson_matvec(N, c), n, hermitian=True)

    state = solver.step(ops, op(c), b, solver.init(ops, op(c), b, jnp.zeros_like(b), None), None)
    record = solver.record(ops, op(c), b, None, state, state)
    keys = ("x", "r", "p", "rho")
    bar = {k: state[k] for k in keys}

    def forward(c: Any, state: dict) -> dict:
        return solver.step(ops, materialized(op(c), jnp.int32(0)), b, state, None)

    def reverse(c: Any, record: Any, bar: dict) -> tuple:
        ctx = unrolled.ReverseContext(op(c), None, lambda p: op(p["c"]), {"c": c}, ("c",),
                                      jnp.zeros_like(b), {"c": jnp.zeros_like(c)}, jnp.int32(0))
        return solver.step_vjp(ops, op(c), b, None, record, bar, ctx), ctx.b_bar, ctx.params_bar

    def reverse_vjp(c: Any, state: dict, bar: dict) -> tuple:
        fixed = {k: v for k, v in state.items() if k not in keys}

        def step(d: dict, c: Any) -> dict:
            new = solver.step(ops, op(c), b, {**d, **fixed}, None)
            return {k: new[k] for k in d}

        return jax.vjp(step, {k: state[k] for k in keys}, c)[1](bar)

    out = {}
    cases = (("forward", forward, (c, state)), ("step_vjp", reverse, (c, record, bar)),
             ("vjp of step", reverse_vjp, (c, state, bar)))
    for name, fn, args in cases:
        cost = jax.jit(fn).lower(*args).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        out[name] = cost["bytes accessed"] / (8 * n)
    return out


#: glibc serves a block above this from fresh pages at every call (its largest dynamic mmap
#: threshold); XLA:CPU allocates an executable's temporaries as one block per call.
FRESH_BYTES = 32 * 2**20
#: Traffic floors of CG's unrolled (forward + gradient) / forward, warm memory (docstring).
FLOOR_FULL, FLOOR_CHECKPOINTED = 33 / 11, 44 / 11


def first_touch_seconds_per_byte(megabytes: int = 64, repeats: int = 7) -> float:
    """Seconds per byte of touching fresh memory, measured in this process: a jitted
    ``x + 1`` into a fresh output block against the same into its donated input (warm
    memory), median of ``repeats``, on the benchmark's clock."""
    x = jnp.ones(megabytes * 2**20 // 8)
    y = jnp.ones_like(x)
    fresh = jax.jit(lambda v: v + 1.0)
    donated = jax.jit(lambda v: v + 1.0, donate_argnums=0)
    jax.block_until_ready(fresh(x))
    y = jax.block_until_ready(donated(y))
    cold, warm = [], []
    for _ in range(repeats):
        start = clock()
        out = jax.block_until_ready(fresh(x))
        cold.append(clock() - start)
        del out
        start = clock()
        y = jax.block_until_ready(donated(y))
        warm.append(clock() - start)
    delta = statistics.median(cold) - statistics.median(warm)
    return max(delta, 0.0) / (megabytes * 2**20)


def platform_floor(t: dict[str, float], n: int, K: int, touch: float) -> float:
    """The unrolled (forward + gradient) / forward the platform allows (docstring): the
    traffic floor plus the first touch of the least memory each layout needs, where that
    block exceeds :data:`FRESH_BYTES`, with the full tape or checkpointed, whichever is
    smaller. Full: the 3 records of every step. Checkpointed every s steps: r and p at
    each checkpoint and the 3 records of a segment, (2 ceil(K / s) + 3 s) n-vectors at the
    best s."""
    def fault(nbytes: float) -> float:
        return nbytes * touch / t["ours"] if nbytes > FRESH_BYTES else 0.0

    vector = 8 * n
    full_tape = 3 * K * vector
    checkpointed = min(2 * -(-K // s) + 3 * s for s in range(1, K + 1)) * vector
    return min(FLOOR_FULL + fault(full_tape), FLOOR_CHECKPOINTED + fault(checkpointed))


def temp_megabytes(fn: Callable, *args: Any) -> float:
    analysis = fn.lower(*args).compile().memory_analysis()
    return analysis.temp_size_in_bytes / 2**20 if analysis is not None else float("nan")


#: The clock: ``time.perf_counter`` (wall) or ``time.process_time`` (CPU time of all of the
#: process's threads: steadier on a machine shared with other jobs, which stretch wall time).
CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCK["wall"]


def interleaved_medians(fns: dict[str, Callable], args: tuple, repeats: int) -> dict[str, float]:
    for fn in fns.values():  # compile and warm up
        jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            jax.block_until_ready(fn(*args))
            times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def run_case(N: tuple[int, ...], K: int, repeats: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    b = jnp.asarray(rng.standard_normal(int(np.prod(N))))
    c = jnp.asarray(1.0)
    fns = contenders(N, K)
    t = interleaved_medians(fns, (c, b), repeats)
    t.update(interleaved_medians(bridge_contenders(N, K), (b,), repeats))
    t["mem implicit"] = temp_megabytes(fns["ours implicit grad"], c, b)
    t["mem unrolled"] = temp_megabytes(fns["ours unrolled grad"], c, b)
    t["mem scan"] = temp_megabytes(fns["scan autodiff grad"], c, b)
    # In n-vectors per iteration (the full tape's floor is CG's record: 3).
    t["vectors per iteration"] = t["mem unrolled"] * 2**20 / (b.size * b.dtype.itemsize * K)
    t.update({f"traffic {k}": v for k, v in step_traffic(N).items()})
    t["touch"] = first_touch_seconds_per_byte()
    t["floor"] = platform_floor(t, b.size, K, t["touch"])
    return t


def table(rows: list[tuple[tuple[int, ...], int, dict[str, float]]]) -> str:
    head = ("| grid | K | ours fwd (ms) | lineax fwd (ms) | jax.scipy fwd (ms) | ours/lineax fwd "
            "| implicit (fwd+grad)/fwd | unrolled (fwd+grad)/fwd | scan-autodiff /fwd "
            "| lineax grad/its fwd | bridge/direct NumPy | temp MB implicit / unrolled / scan "
            "| unrolled temp n-vectors/iteration (full tape: 3) | first touch GB/s "
            "| unrolled platform floor | unrolled / floor |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for N, K, t in rows:
        fwd = t["ours"]
        lines.append(
            f"| {'x'.join(map(str, N))} | {K} | {1e3 * fwd:.1f} | {1e3 * t['lineax']:.1f} "
            f"| {1e3 * t['jax.scipy']:.1f} | {fwd / t['lineax']:.2f} "
            f"| {t['ours implicit grad'] / fwd:.2f} | {t['ours unrolled grad'] / fwd:.2f} "
            f"| {t['scan autodiff grad'] / fwd:.2f} | {t['lineax grad'] / t['lineax']:.2f} "
            f"| {t['bridge (numpy, jit)'] / t['direct numpy']:.2f} "
            f"| {t['mem implicit']:.0f} / {t['mem unrolled']:.0f} / {t['mem scan']:.0f} "
            f"| {t['vectors per iteration']:.2f} | {1e-9 / max(t['touch'], 1e-30):.1f} "
            f"| {t['floor']:.2f} | {t['ours unrolled grad'] / fwd / t['floor']:.2f} |")
    lines += ["", "XLA cost analysis of one CG step, n-vectors moved (bytes accessed / 8n):", "",
              "| grid | forward step | reverse: step_vjp (ours) | reverse: jax.vjp of step |",
              "|---|---|---|---|"]
    for N, _, t in rows:
        lines.append(f"| {'x'.join(map(str, N))} | {t['traffic forward']:.1f} "
                     f"| {t['traffic step_vjp']:.1f} | {t['traffic vjp of step']:.1f} |")
    return "\n".join(lines)


def parse_size(spec: str) -> tuple[tuple[int, ...], int]:
    """``"NxK"`` (an N x N grid) or ``"N1xN2[xN3]xK"`` -> ``(grid shape, K)``."""
    numbers = [int(v) for v in spec.split("x")]
    if len(numbers) == 2:
        return (numbers[0], numbers[0]), numbers[1]
    if len(numbers) in (3, 4):
        return tuple(numbers[:-1]), numbers[-1]
    raise SystemExit(f"--sizes: {spec!r} is not NxK or N1xN2[xN3]xK")


#: The default sweep: K shrinks with the grid so that each case takes well under a minute.
SWEEP = "64x500,128x300,256x200,512x100,1024x30,64x64x64x100"


LINEAX_MISSING = ('jax_vs_peers.py needs lineax, a benchmark-only dependency: pip install -e '
                  '".[jax,bench]" (the bench extra)')


def lineax_or_exit() -> None:
    """Leave with one line on stderr (status 1), not a traceback, when lineax is missing."""
    try:
        import lineax  # noqa: F401
    except ImportError as err:
        sys.exit(f"{LINEAX_MISSING}; {type(err).__name__}: {err}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke run")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--sizes", default=None,
                        help=f"comma-separated NxK (2D) or NxNxNxK (3D), default {SWEEP}")
    parser.add_argument("--clock", choices=sorted(CLOCK), default="wall",
                        help="wall time, or the process's CPU time (on a shared machine)")
    args = parser.parse_args(argv)
    global clock
    clock = CLOCK[args.clock]
    lineax_or_exit()
    spec = args.sizes or ("32x20" if args.quick else SWEEP)
    sizes = [parse_size(pair) for pair in spec.split(",")]
    repeats = args.repeats or (3 if args.quick else 7)
    load = os.getloadavg()[0]
    rows = []
    for N, K in sizes:
        rows.append((N, K, run_case(N, K, repeats)))
        print(f"done grid={N} K={K}", flush=True)
    print(f"\njax {jax.__version__}, {jax.devices()[0].platform}, float64, median of "
          f"{repeats} interleaved runs, {args.clock} clock, load average {load:.2f} at the "
          f"start and {os.getloadavg()[0]:.2f} at the end on {os.cpu_count()} CPUs\n")
    print(table(rows))


if __name__ == "__main__":
    main()
