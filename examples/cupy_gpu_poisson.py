"""2D and 3D Poisson on the GPU: a prdp_ops solve and its implicit gradient on CuPy, timed
against ``cupyx.scipy.sparse.linalg.cg`` in the same process.

The problem is ``-Δu = f`` with zero Dirichlet boundaries on the unit square (cube), the
5-point (7-point) stencil, ``K`` CG iterations with zero tolerances so every run does the
same work. Three ways to apply the same matrix are timed, interleaved, medians reported:

* ``cupyx cg``    cupyx.scipy.sparse.linalg.cg on the assembled CSR matrix (the peer);
* ``ours, CSR``   ``po.solve`` on the same CSR matrix (the like-for-like comparison);
* ``ours, fused`` ``po.solve`` on ``LaplacianStencil`` with CuPy vectors, which runs the
  fused stencil kernel of ``prdp_ops.backends.cupy`` (no matrix stored);

then ``po.solve_vjp(adjoint="implicit")`` plus its vjp (the gradient of a loss of ``u``
w.r.t. ``f``: one extra solve with ``A^T``), as a ratio to our forward. ``check_every`` sets
how often the convergence test reads the residual back to the host (cupyx reads it every
iteration).

    python examples/cupy_gpu_poisson.py          # 256^2 and 64^3
    python examples/cupy_gpu_poisson.py --full   # 256^2, 1024^2, 64^3 and 128^3

Without CuPy or a usable CUDA GPU it prints one line saying why and exits with status 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _gpu import gpu_backend_or_exit


def timed_medians(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in turn; the device is drained around each."""
    import cupy

    def once(fn: Callable[[], Any]) -> float:
        cupy.cuda.Device().synchronize()
        start = time.perf_counter()
        fn()
        cupy.cuda.Device().synchronize()
        return time.perf_counter() - start

    for fn in fns.values():  # warm-up: kernel compilation, memory pool
        once(fn)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(once(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def run_grid(grid: tuple[int, ...], iterations: int, check_every: int, repeats: int) -> None:
    import cupy
    import cupyx.scipy.sparse as cupy_sparse
    import cupyx.scipy.sparse.linalg as cupy_sparse_linalg

    import prdp_ops as po

    spacing = 1.0 / (grid[0] + 1)
    stencil = po.LaplacianStencil(grid, spacing=spacing)
    csr = cupy_sparse.csr_matrix(stencil.to_matrix())  # assembled on the host once
    n = stencil.shape[0]
    rng = cupy.random.default_rng(0)
    f = rng.standard_normal(n)
    u_bar = rng.standard_normal(n)  # the cotangent of u: d(loss)/du for loss = <u_bar, u>
    fixed = {"rtol": 0.0, "atol": 0.0, "maxiter": iterations}

    def peer() -> Any:
        return cupy_sparse_linalg.cg(csr, f, **fixed)[0]

    def ours_csr() -> Any:
        return po.solve(csr, f, **fixed, check_every=check_every).x

    def ours_fused() -> Any:
        return po.solve(stencil, f, **fixed, check_every=check_every).x

    def ours_gradient() -> Any:
        _, vjp = po.solve_vjp(stencil, f, adjoint="implicit", **fixed,
                              check_every=check_every)
        return vjp(u_bar).b

    t = timed_medians({"peer": peer, "csr": ours_csr, "fused": ours_fused,
                       "grad": ours_gradient}, repeats)
    # Same iterations, same arithmetic: the iterates agree to rounding.
    x_peer, x_ours = peer(), ours_fused()
    agreement = float(cupy.linalg.norm(x_ours - x_peer) / cupy.linalg.norm(x_peer))
    # The gradient w.r.t. f is lambda with A^T lambda = u_bar (A is symmetric).
    lam = ours_gradient()
    adjoint_residual = float(cupy.linalg.norm(stencil.matvec(lam) - u_bar)
                             / cupy.linalg.norm(u_bar))
    size = "x".join(str(g) for g in grid)
    print(f"{size:>12} n={n:>9,d} K={iterations}  cupyx cg {1e3 * t['peer']:8.2f} ms | "
          f"ours CSR {1e3 * t['csr']:8.2f} ms ({t['csr'] / t['peer']:.2f}x) | "
          f"ours fused {1e3 * t['fused']:8.2f} ms ({t['fused'] / t['peer']:.2f}x) | "
          f"solve+grad {1e3 * t['grad']:8.2f} ms ({t['grad'] / t['fused']:.2f}x fwd)")
    print(f"{'':>12} |x_ours - x_cupyx| / |x_cupyx| = {agreement:.1e}; "
          f"adjoint relative residual after K iterations = {adjoint_residual:.1e}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also 1024^2 and 128^3")
    parser.add_argument("--iterations", type=int, default=200, help="CG iterations K")
    parser.add_argument("--check-every", type=int, default=10,
                        help="convergence test (a host read) every this many iterations")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per variant")
    args = parser.parse_args(argv)
    gpu = gpu_backend_or_exit("cupy_gpu_poisson.py")
    import cupy

    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    print(f"GPU: {name.decode() if isinstance(name, bytes) else name}; "
          f"CuPy {cupy.__version__}; backend {gpu.__name__}")
    grids = [(256, 256), (64, 64, 64)]
    if args.full:
        grids = [(256, 256), (1024, 1024), (64, 64, 64), (128, 128, 128)]
    for grid in grids:
        run_grid(grid, args.iterations, args.check_every, args.repeats)


if __name__ == "__main__":
    main()
