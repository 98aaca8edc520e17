"""Many right-hand sides: one block solve against k separate solves, in one process.

2D Poisson (5-point, CSR, float64) on an N x N grid, k right-hand sides. Runs are
interleaved (block, separate, SciPy, block, ...) and the medians compared:

* forward, a fixed count (K CG iterations, rtol = atol = 0): ``po.solve(A, B)`` with ``B`` of
  shape ``(n, k)`` against ``k`` calls ``po.solve(A, B[:, j])`` and ``k`` calls of
  ``scipy.sparse.linalg.cg``;
* forward with a tolerance (``rtol``): every column stops on its own (per-column status);
* forward + vjp, implicit and unrolled: ``po.solve_vjp`` on the block against ``k`` of them;
* the JAX bridge under ``jax.vmap`` (``backend="numpy"``): the batch handed to one block
  solve on the host, against the same call with the batch solved one problem at a time
  (``jax.lax.map``), forward + implicit gradient (only with ``--jax``).

Why a block wins: per iteration it reads A's entries once for k columns (a sparse matrix
times a dense block) instead of k times, and runs one Python-level step instead of k.

    python benchmarks/multi_rhs.py                # N = 128, k = 32, K = 200
    python benchmarks/multi_rhs.py --quick        # N = 32, k = 8, a smoke run
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import scipy.sparse.linalg as spl
from numpy_vs_scipy import interleaved_medians, poisson_2d

import prdp_ops as po


def numpy_table(N: int, k: int, K: int, repeats: int) -> list[tuple[str, float, float]]:
    """Rows ``(what, block seconds, separate seconds)``."""
    A = poisson_2d(N)
    rng = np.random.default_rng(0)
    B = rng.standard_normal((N * N, k))
    X_bar = rng.standard_normal((N * N, k))
    fixed = dict(rtol=0.0, maxiter=K)

    def separate(fn: Callable[[int], object]) -> Callable[[], None]:
        return lambda: [fn(j) for j in range(k)]

    rows = []
    t = interleaved_medians({
        "block": lambda: po.solve(A, B, "cg", **fixed),
        "separate": separate(lambda j: po.solve(A, B[:, j], "cg", **fixed)),
        "scipy": separate(lambda j: spl.cg(A, B[:, j], rtol=1e-300, atol=0.0, maxiter=K)),
    }, repeats)
    rows.append((f"forward, K = {K} iterations", t["block"], t["separate"], t["scipy"]))
    t = interleaved_medians({
        "block": lambda: po.solve(A, B, "cg", rtol=1e-6, maxiter=10 * K),
        "separate": separate(lambda j: po.solve(A, B[:, j], "cg", rtol=1e-6, maxiter=10 * K)),
        "scipy": separate(lambda j: spl.cg(A, B[:, j], rtol=1e-6, maxiter=10 * K)),
    }, repeats)
    rows.append(("forward, rtol = 1e-6 (per-column stops)", t["block"], t["separate"],
                 t["scipy"]))
    for adjoint in ("implicit", "unrolled"):
        options = dict(adjoint=adjoint, adjoint_rtol=0.0, adjoint_maxiter=K, **fixed)
        t = interleaved_medians({
            "block": lambda o=options: po.solve_vjp(A, B, "cg", **o)[1](X_bar).b,
            "separate": separate(lambda j, o=options: po.solve_vjp(
                A, B[:, j], "cg", **o)[1](X_bar[:, j]).b),
        }, repeats)
        rows.append((f"forward + vjp, {adjoint}, K = {K}", t["block"], t["separate"],
                     float("nan")))
    return rows


def size_sweep(sizes: list[int], k: int, K: int, repeats: int) -> list[tuple[int, float, float]]:
    """Forward (K iterations) at each grid size: ``(N, block seconds, separate seconds)``."""
    rows = []
    for N in sizes:
        A = poisson_2d(N)
        B = np.random.default_rng(0).standard_normal((N * N, k))
        t = interleaved_medians({
            "block": lambda A=A, B=B: po.solve(A, B, "cg", rtol=0.0, maxiter=K),
            "separate": lambda A=A, B=B: [po.solve(A, B[:, j], "cg", rtol=0.0, maxiter=K)
                                          for j in range(k)],
        }, repeats)
        rows.append((N, t["block"], t["separate"]))
    return rows


def jax_row(N: int, k: int, K: int, repeats: int) -> tuple[str, float, float, float]:
    """The bridge under vmap: one block solve on the host against one problem at a time."""
    import jax
    import jax.numpy as jnp
    from prdp_ops.backends import jax as pj

    jax.config.update("jax_enable_x64", True)
    A = poisson_2d(N)
    B = jnp.asarray(np.random.default_rng(0).standard_normal((k, N * N)))

    def loss_one(b: jax.Array) -> jax.Array:
        return jnp.sum(pj.solve(A, b, "cg", rtol=0.0, maxiter=K, adjoint_rtol=0.0,
                                adjoint_maxiter=K, backend="numpy") ** 2)

    block = jax.jit(jax.grad(lambda B: jax.vmap(loss_one)(B).sum()))
    one_by_one = jax.jit(jax.grad(lambda B: jax.lax.map(loss_one, B).sum()))
    t = interleaved_medians({"block": lambda: block(B).block_until_ready(),
                             "separate": lambda: one_by_one(B).block_until_ready()}, repeats)
    return (f"bridge under vmap, grad (implicit), K = {K}", t["block"], t["separate"],
            float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 32, k = 8: a smoke run")
    parser.add_argument("--jax", action="store_true",
                        help="also time the JAX bridge under vmap (needs the jax extra)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per contender")
    parser.add_argument("--sweep", default="32,64,128,256",
                        help="grid sizes N of the forward size sweep (comma-separated; '' skips)")
    args = parser.parse_args()
    N, k, K = (32, 8, 50) if args.quick else (128, 32, 200)
    rows = numpy_table(N, k, K, args.repeats)
    if args.jax:
        rows.append(jax_row(N, k, K, args.repeats))
    print(f"2D Poisson {N}x{N} (n = {N * N}), k = {k} right-hand sides, CG, float64")
    print("| what | block (ms) | k separate solves (ms) | block / separate | "
          "k SciPy cg calls (ms) | block / SciPy |")
    print("|---|---|---|---|---|---|")
    for what, block, separate, scipy in rows:
        versus = "" if np.isnan(scipy) else f"{1e3 * scipy:.0f}"
        ratio = "" if np.isnan(scipy) else f"{block / scipy:.2f}"
        print(f"| {what} | {1e3 * block:.0f} | {1e3 * separate:.0f} | "
              f"**{block / separate:.2f}** | {versus} | {ratio} |")
    sizes = [int(v) for v in args.sweep.split(",") if v] if not args.quick else [16, 32]
    if sizes:
        print(f"\nForward, K = {K}, k = {k}: block / separate by grid size")
        print("| N | n | block (ms) | separate (ms) | block / separate |")
        print("|---|---|---|---|---|")
        for size, block, separate in size_sweep(sizes, k, K, args.repeats):
            print(f"| {size} | {size * size} | {1e3 * block:.0f} | {1e3 * separate:.0f} | "
                  f"{block / separate:.2f} |")


if __name__ == "__main__":
    main()
