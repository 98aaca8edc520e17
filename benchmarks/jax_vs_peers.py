"""prdp_ops' JAX backend against its peers, on a 2D Poisson problem.

The operator is the matrix-free 5-point stencil on an N x N grid (float64), scaled by a
coefficient ``c`` that receives a gradient, and every solver runs exactly K conjugate-gradient
iterations (rtol = atol = 0). In one process, with the runs of all contenders interleaved and
the median of the repeats reported:

* forward: ``pj.solve`` against ``lineax.linear_solve(..., lineax.CG)`` and
  ``jax.scipy.sparse.linalg.cg`` (all jitted);
* gradients of ``sum(x^2)`` w.r.t. ``(c, b)``: implicit and unrolled, against plain JAX
  autodiff of a ``lax.scan`` of the same K iterations;
* the bridge: ``pj.solve(..., backend="numpy")`` called from jitted code, against
  ``po.solve`` called directly on the same NumPy operator;
* memory: XLA's temporary-buffer estimate (``compiled.memory_analysis()``) of the gradient
  computations.

Targets (issue 3): forward / lineax <= 1.10, implicit grad / forward <= 2.1, unrolled grad /
forward <= 3.0, bridge / direct NumPy <= 1.3.

Run ``python benchmarks/jax_vs_peers.py`` (a few minutes) or with ``--quick`` (seconds).
lineax is a benchmark-only dependency, the ``bench`` extra: ``pip install -e ".[jax,bench]"``
(without it the script says so in one line and exits with status 1).
"""

from __future__ import annotations

import argparse
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


def poisson_matvec(N: int, c: Any) -> Callable[[Any], Any]:
    """``u -> c * (-Laplacian) u`` on an N x N grid with zero Dirichlet boundaries."""

    def matvec(u: Any) -> Any:
        v = jnp.pad(u.reshape(N, N), 1)
        lap = 4 * v[1:-1, 1:-1] - v[:-2, 1:-1] - v[2:, 1:-1] - v[1:-1, :-2] - v[1:-1, 2:]
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


def contenders(N: int, K: int) -> dict[str, Callable]:
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


def bridge_contenders(N: int, K: int) -> dict[str, Callable]:
    stencil = po.LaplacianStencil((N, N))
    bridged = jax.jit(lambda b: pj.solve(stencil, b, maxiter=K, rtol=0.0, backend="numpy"))
    return {
        "bridge (numpy, jit)": lambda b: jax.block_until_ready(bridged(b)),
        "direct numpy": lambda b: po.solve(stencil, np.asarray(b), maxiter=K, rtol=0.0).x,
    }


def temp_megabytes(fn: Callable, *args: Any) -> float:
    analysis = fn.lower(*args).compile().memory_analysis()
    return analysis.temp_size_in_bytes / 2**20 if analysis is not None else float("nan")


def interleaved_medians(fns: dict[str, Callable], args: tuple, repeats: int) -> dict[str, float]:
    for fn in fns.values():  # compile and warm up
        jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def run_case(N: int, K: int, repeats: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    b = jnp.asarray(rng.standard_normal(N * N))
    c = jnp.asarray(1.0)
    fns = contenders(N, K)
    t = interleaved_medians(fns, (c, b), repeats)
    t.update(interleaved_medians(bridge_contenders(N, K), (b,), repeats))
    t["mem implicit"] = temp_megabytes(fns["ours implicit grad"], c, b)
    t["mem unrolled"] = temp_megabytes(fns["ours unrolled grad"], c, b)
    t["mem scan"] = temp_megabytes(fns["scan autodiff grad"], c, b)
    return t


def table(rows: list[tuple[int, int, dict[str, float]]]) -> str:
    head = ("| N | K | ours fwd (ms) | lineax fwd (ms) | jax.scipy fwd (ms) | ours/lineax fwd "
            "| implicit grad/fwd | unrolled grad/fwd | scan-autodiff grad/fwd "
            "| lineax grad/its fwd | bridge/direct NumPy | temp MB implicit / unrolled / scan |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for N, K, t in rows:
        fwd = t["ours"]
        lines.append(
            f"| {N} | {K} | {1e3 * fwd:.1f} | {1e3 * t['lineax']:.1f} "
            f"| {1e3 * t['jax.scipy']:.1f} | {fwd / t['lineax']:.2f} "
            f"| {t['ours implicit grad'] / fwd:.2f} | {t['ours unrolled grad'] / fwd:.2f} "
            f"| {t['scan autodiff grad'] / fwd:.2f} | {t['lineax grad'] / t['lineax']:.2f} "
            f"| {t['bridge (numpy, jit)'] / t['direct numpy']:.2f} "
            f"| {t['mem implicit']:.0f} / {t['mem unrolled']:.0f} / {t['mem scan']:.0f} |")
    return "\n".join(lines)


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
                        help="comma-separated NxK pairs, e.g. 128x200,256x500")
    args = parser.parse_args(argv)
    lineax_or_exit()
    sizes = [(32, 20)] if args.quick else [(128, 200), (128, 500), (256, 200), (256, 500)]
    if args.sizes:
        sizes = [tuple(int(v) for v in pair.split("x")) for pair in args.sizes.split(",")]
    repeats = args.repeats or (3 if args.quick else 7)
    rows = []
    for N, K in sizes:
        rows.append((N, K, run_case(N, K, repeats)))
        print(f"done N={N} K={K}", flush=True)
    print(f"\njax {jax.__version__}, {jax.devices()[0].platform}, float64, median of "
          f"{repeats} interleaved runs\n")
    print(table(rows))


if __name__ == "__main__":
    main()
