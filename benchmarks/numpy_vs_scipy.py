"""prdp_ops on NumPy against scipy.sparse.linalg, in one process.

2D Poisson (5-point stencil, CSR), N x N grid, K CG iterations with zero tolerances (so every
run does exactly K iterations). Runs are interleaved (ours, theirs, ours, ...) and the medians
are compared, so machine noise hits both sides alike.

    python benchmarks/numpy_vs_scipy.py            # N = 128 and 256, K = 200
    python benchmarks/numpy_vs_scipy.py --quick    # N = 64, a smoke run

Ratios reported (targets in brackets):
- forward:            our CG / SciPy CG                                   [<= 1.10]
- implicit fwd + vjp: solve_vjp(adjoint="implicit") + vjp / our forward   [<= 2.2]
- unrolled fwd + vjp: solve_vjp(adjoint="unrolled") + vjp / our forward   [<= 3.0]
- peak memory of the unrolled run against the implicit one (tracemalloc).
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spl

import prdp_ops as po


def poisson_2d(n: int) -> sp.csr_matrix:
    t = sp.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(n, n))
    eye = sp.identity(n)
    return (sp.kron(t, eye) + sp.kron(eye, t)).tocsr()


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each function, the functions run in turn ``repeats`` times."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_bytes(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def bench(n: int, k: int, repeats: int) -> dict[str, float]:
    A = poisson_2d(n)
    rng = np.random.default_rng(0)
    b = rng.standard_normal(n * n)
    x_bar = rng.standard_normal(n * n)
    opts = {"rtol": 0.0, "atol": 0.0, "maxiter": k}

    def ours() -> None:
        po.solve(A, b, "cg", **opts)

    def scipy_cg() -> None:
        spl.cg(A, b, **opts)

    def implicit() -> None:
        _, vjp = po.solve_vjp(A, b, "cg", adjoint="implicit", **opts)
        vjp(x_bar)

    def unrolled() -> None:
        _, vjp = po.solve_vjp(A, b, "cg", adjoint="unrolled", **opts)
        vjp(x_bar)

    t = interleaved_medians({"ours": ours, "scipy": scipy_cg, "implicit": implicit,
                             "unrolled": unrolled}, repeats)
    return {
        "forward_ratio": t["ours"] / t["scipy"],
        "implicit_ratio": t["implicit"] / t["ours"],
        "unrolled_ratio": t["unrolled"] / t["ours"],
        "memory_ratio": peak_bytes(unrolled) / peak_bytes(implicit),
        "scipy_ms": 1e3 * t["scipy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 64, few repeats")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("-k", type=int, default=200, help="CG iterations")
    args = parser.parse_args()
    sizes = [64] if args.quick else [128, 256]
    repeats = 3 if args.quick else args.repeats
    print(f"2D Poisson, CSR, K = {args.k}, tolerances 0, medians of {repeats} interleaved runs")
    print("| N | SciPy CG (ms) | ours / SciPy fwd | implicit fwd+vjp / fwd "
          "| unrolled fwd+vjp / fwd | peak mem unrolled / implicit |")
    print("|---|---|---|---|---|---|")
    for n in sizes:
        r = bench(n, args.k, repeats)
        print(f"| {n}^2 | {r['scipy_ms']:.1f} | {r['forward_ratio']:.2f} "
              f"| {r['implicit_ratio']:.2f} | {r['unrolled_ratio']:.2f} "
              f"| {r['memory_ratio']:.1f}x |")


if __name__ == "__main__":
    main()
