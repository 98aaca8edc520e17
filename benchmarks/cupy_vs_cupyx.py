"""prdp_ops on CuPy against cupyx.scipy.sparse.linalg.cg, in one process, on one GPU.

2D Poisson (5-point stencil), N x N grid, K CG iterations with zero tolerances (every run
does exactly K iterations). Runs are interleaved (ours, theirs, ours, ...), the device is
drained before and after each, and medians are compared.

    python benchmarks/cupy_vs_cupyx.py            # N = 1024, K = 200
    python benchmarks/cupy_vs_cupyx.py --quick    # N = 256, a smoke run

Reported (targets in brackets):
- forward:   our CG on the CSR matrix / cupyx CG on it, convergence read every iteration
             as cupyx does                                                       [<= 1.10]
             (also: check_every=10, and the fused stencil kernel instead of CSR)
- implicit:  solve_vjp(adjoint="implicit") + vjp / our forward                  [<= 2.1]
- DLPack bridge: JAX <-> CuPy exchange is zero-copy and moves nothing through the host,
             shown three ways: equal device pointers both ways; zero bytes allocated on the
             device by the exchange (a CuPy memory hook); and a bridged solve + gradient
             run under ``jax.transfer_guard("disallow")``, which raises on any implicit
             host transfer. Needs a CUDA-enabled jaxlib; otherwise reported as not measured.

Without CuPy or a usable CUDA GPU it prints one line saying why and exits with status 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any


def gpu_backend_or_exit(script: str) -> Any:
    """``prdp_ops.backends.cupy``, or a one-line explanation and exit status 0."""
    try:
        from prdp_ops.backends import cupy as gpu
    except ImportError as err:
        print(f"{script}: skipped, it needs CuPy and a CUDA GPU: {err}")
        sys.exit(0)
    reason = gpu.gpu_unavailable_reason()
    if reason is not None:
        print(f"{script}: skipped, it needs a CUDA GPU: {reason}")
        sys.exit(0)
    return gpu


def interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
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


def bench_solvers(n: int, k: int, repeats: int) -> dict[str, float]:
    import cupy
    import cupyx.scipy.sparse as cupy_sparse
    import cupyx.scipy.sparse.linalg as cupy_sparse_linalg

    import prdp_ops as po

    stencil = po.LaplacianStencil((n, n))
    csr = cupy_sparse.csr_matrix(stencil.to_matrix())
    rng = cupy.random.default_rng(0)
    b = rng.standard_normal(n * n)
    x_bar = rng.standard_normal(n * n)
    fixed = {"rtol": 0.0, "atol": 0.0, "maxiter": k}

    def implicit() -> None:
        _, vjp = po.solve_vjp(csr, b, adjoint="implicit", **fixed)
        vjp(x_bar)

    return interleaved_medians({
        "cupyx": lambda: cupy_sparse_linalg.cg(csr, b, **fixed),
        "ours": lambda: po.solve(csr, b, **fixed),
        "ours_check10": lambda: po.solve(csr, b, **fixed, check_every=10),
        "ours_fused": lambda: po.solve(stencil, b, **fixed, check_every=10),
        "implicit": implicit,
    }, repeats)


def allocation_counter() -> Any:
    """A CuPy memory hook counting the device bytes allocated while it is active."""
    import cupy

    class AllocationCounter(cupy.cuda.MemoryHook):
        name = "prdp_allocation_counter"

        def __init__(self) -> None:
            self.bytes = 0

        def malloc_preprocess(self, device_id: int, size: int, mem_size: int) -> None:
            self.bytes += size

    return AllocationCounter()


def bridge_evidence(n: int) -> list[str]:
    """Evidence that the DLPack bridge is zero-copy and host-free, as printable lines."""
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return ["DLPack bridge: not measured (jax is not installed)"]
    if not any(d.platform == "gpu" for d in jax.devices()):
        return ["DLPack bridge: not measured (jax has no GPU device; install jax[cuda12])"]
    from prdp_ops.backends.cupy import cupy_to_jax, device_solve_vjp, jax_to_cupy

    import prdp_ops as po

    lines = []
    x = jnp.arange(n * n, dtype=jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
    x.block_until_ready()
    counter = allocation_counter()
    with counter:
        as_cupy = jax_to_cupy(x)
        back = cupy_to_jax(as_cupy)
    same_in = as_cupy.data.ptr == x.unsafe_buffer_pointer()
    same_out = back.unsafe_buffer_pointer() == as_cupy.data.ptr
    lines.append(f"DLPack JAX->CuPy same device pointer: {same_in}; CuPy->JAX: {same_out}; "
                 f"device bytes allocated by the exchange: {counter.bytes}")
    stencil = po.LaplacianStencil((n, n))
    b = jnp.ones(n * n, dtype=x.dtype)
    try:
        with jax.transfer_guard("disallow"):
            _, _, vjp = device_solve_vjp(stencil, b, rtol=0.0, atol=0.0, maxiter=50)
            b_bar, _ = vjp(b)
            b_bar.block_until_ready()
        lines.append("device_solve_vjp + vjp under jax.transfer_guard('disallow'): no host "
                     "transfer (it would have raised)")
    except Exception as err:  # report, do not hide: this is the measurement
        lines.append(f"device_solve_vjp under transfer_guard raised {type(err).__name__}: {err}")
    try:
        from prdp_ops.backends import jax as pj

        with jax.transfer_guard("disallow"):
            y = pj.solve(stencil, b, rtol=0.0, atol=0.0, maxiter=50, backend="cupy")
            y.block_until_ready()
        lines.append("pj.solve(..., backend='cupy') under transfer_guard('disallow'): no host "
                     "transfer")
    except Exception as err:  # report what the bridge in backends/jax.py does today
        lines.append("pj.solve(..., backend='cupy') under transfer_guard('disallow') raised "
                     f"{type(err).__name__}: {' '.join(str(err).split())[:200]}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 256, fewer repeats")
    parser.add_argument("--iterations", type=int, default=200, help="CG iterations K")
    args = parser.parse_args(argv)
    gpu_backend_or_exit("cupy_vs_cupyx.py")
    import cupy

    n, repeats = (256, 5) if args.quick else (1024, 11)
    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    t = bench_solvers(n, args.iterations, repeats)
    print(f"GPU: {name}; CuPy {cupy.__version__}; 2D Poisson {n}x{n}, K={args.iterations}, "
          f"medians of {repeats} interleaved runs")
    print(f"  cupyx cg forward                       {1e3 * t['cupyx']:9.2f} ms")
    print(f"  ours, CSR, check_every=1               {1e3 * t['ours']:9.2f} ms   "
          f"ratio {t['ours'] / t['cupyx']:.2f}  [target <= 1.10]")
    print(f"  ours, CSR, check_every=10              {1e3 * t['ours_check10']:9.2f} ms   "
          f"ratio {t['ours_check10'] / t['cupyx']:.2f}")
    print(f"  ours, fused stencil, check_every=10    {1e3 * t['ours_fused']:9.2f} ms   "
          f"ratio {t['ours_fused'] / t['cupyx']:.2f}")
    print(f"  implicit solve + vjp (CSR)             {1e3 * t['implicit']:9.2f} ms   "
          f"/ our forward {t['implicit'] / t['ours']:.2f}  [target <= 2.1]")
    for line in bridge_evidence(256 if args.quick else n):
        print(f"  {line}")


if __name__ == "__main__":
    main()
