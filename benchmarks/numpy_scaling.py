"""How the NumPy ratios move with the problem size, and the unrolled run's memory.

The same measurements as ``benchmarks/numpy_vs_scipy.py`` (interleaved runs, medians,
OpenBLAS on one thread) over 2D Poisson grids from 64^2 to 1024^2 and one 3D case (64^3),
for CG, BiCGSTAB, GMRES(20) and Jacobi. K shrinks at the large sizes so the tape stays near
1 GiB (the ratios are per iteration and hardly depend on K).

Memory: the peak traced memory (tracemalloc) of an unrolled fwd + vjp from a cold tape cache,
minus that of the forward alone, per iteration, in n-vectors; against its floor, the tape
vectors per step plus, for a scipy.sparse A, one cotangent per A^T product kept for A's
deferred cotangent (``TAPE_VECTORS`` in numpy_vs_scipy.py). Blocks are allocated 8 MiB at a
time, so small grids read a little above the floor.

    python benchmarks/numpy_scaling.py            # the sweep (a few minutes)
    python benchmarks/numpy_scaling.py --quick    # 64^2 and 16^3 only
    python benchmarks/numpy_scaling.py --clock cpu --solvers gmres --grids 2D512,3D64
"""

from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__":  # before numpy loads (see numpy_vs_scipy.py)
    _threads = "1"
    if "--blas-threads" in sys.argv:
        _threads = sys.argv[sys.argv.index("--blas-threads") + 1]
    os.environ.setdefault("OPENBLAS_NUM_THREADS", _threads)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from numpy_vs_scipy import (
    SOLVERS,
    TAPE_VECTORS,
    bench,
    fmt,
    poisson_2d,
    poisson_3d,
    set_clock,
)

#: Tape budget per unrolled solve that sets K at the large sizes (bytes).
TAPE_BUDGET = 1 << 30


def iterations(n: int, solver: str, k_max: int) -> int:
    """K for ``n`` unknowns: ``k_max``, or fewer so the tape stays within the budget."""
    per_step = TAPE_VECTORS[solver] * 8 * n
    k = min(k_max, int(TAPE_BUDGET // per_step))
    return max(20, k - k % 20)  # whole GMRES cycles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64^2 and 16^3, 3 repeats")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--solvers", default=",".join(SOLVERS))
    parser.add_argument("--blas-threads", default="1", help="OpenBLAS threads (default 1)")
    parser.add_argument("-k", type=int, default=200, help="iterations at the small sizes")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or this process's CPU time (steadier under load)")
    parser.add_argument("--grids", default=None,
                        help="grids to run, e.g. 2D256,2D512,3D64 (default: the whole sweep)")
    args = parser.parse_args()
    set_clock(args.clock)
    if args.quick:
        grids, repeats, k_max = [("2D", 64), ("3D", 16)], 3, 40
    else:
        grids = [("2D", 64), ("2D", 128), ("2D", 256), ("2D", 512), ("2D", 1024), ("3D", 64)]
        repeats, k_max = args.repeats, args.k
    if args.grids:
        grids = [(g[:2], int(g[2:])) for g in args.grids.split(",")]
    print(f"Poisson, CSR, tolerances 0, medians of {repeats} interleaved runs ({args.clock} "
          f"clock), OpenBLAS threads {os.environ.get('OPENBLAS_NUM_THREADS')}, load average "
          f"{os.getloadavg()[0]:.2f}")
    print("| solver | grid | K | ours fwd (ms) | ours / SciPy fwd (<= 1.10) "
          "| implicit / fwd (<= 2.2) | unrolled / fwd (<= 3.0) | floor "
          "| memory per iteration (n-vectors) | its floor |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for solver in args.solvers.split(","):
        for dim, side in grids:
            A = poisson_2d(side) if dim == "2D" else poisson_3d(side)
            k = iterations(A.shape[0], solver, k_max)
            r = bench(A, solver, k, repeats, memory=True)
            grid = f"{side}²" if dim == "2D" else f"{side}³"
            print(f"| {solver} | {grid} | {k} | {r['ours_ms']:.0f} "
                  f"| {fmt(r.get('forward_ratio'), 1.10)} "
                  f"| {fmt(r.get('implicit_ratio'), 2.2)} "
                  f"| {fmt(r['unrolled_ratio'], 3.0)} | {SOLVERS[solver][1]:.2f} "
                  f"| {r['vectors_per_iteration']:.2f} | {TAPE_VECTORS[solver]:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
