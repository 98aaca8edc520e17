"""prdp_ops on NumPy against scipy.sparse.linalg, in one process, with the floor it is judged by.

2D Poisson (5-point stencil, CSR), N x N grid, K iterations with zero tolerances (so every run
does exactly K iterations). Runs are interleaved (ours, SciPy's, ours, ...) and the medians
are compared, so machine noise hits both sides alike.

    python benchmarks/numpy_vs_scipy.py            # N = 256 (K = 300) and 512 (K = 200)
    python benchmarks/numpy_vs_scipy.py --quick    # N = 64, a smoke run
    python benchmarks/numpy_vs_scipy.py --clock cpu --cases 256x300 --solvers gmres
    python benchmarks/numpy_scaling.py             # the size sweep and peak memory

OpenBLAS is pinned to one thread (``--blas-threads`` to change it) before numpy loads: on a
small machine shared with other work its spinning threads made single calls up to 1000x
slower, for SciPy and for us alike, which drowned every ratio. Both sides use the same BLAS.

Ratios reported (targets in brackets):

- forward:            our solver / SciPy's (CG, BiCGSTAB, GMRES restart 20)     [<= 1.10]
- implicit fwd + vjp: solve_vjp(adjoint="implicit") + vjp / our forward (CG)     [<= 2.2]
- unrolled fwd + vjp: solve_vjp(adjoint="unrolled") + vjp / our forward          [<= 3.0]
- the floor of that ratio (below), from the counts of memory traffic.

The floor
---------
Counted as the code does it today, per iteration, for real data without a preconditioner:
``R``/``W`` are n-vector reads/writes (``ops.axpy_`` with a scalar coefficient is one BLAS
axpy: 2R 1W; NumPy's ``y + a * x`` needs a temporary: 3R 2W; ``<a, a>`` reads ``a`` once),
``A``/``A^T`` products with the operator. The tape is what the forward keeps per step in
reused memory: a copy (``ops.keep``, 1R 1W) or, for a vector the step builds by
``ops.fresh_copy``, the step's own write into tape memory (no copy). The reverse reads it
back. For a scipy.sparse ``A`` the reverse also keeps one cotangent per ``A^T`` product for
A's (deferred) cotangent: +1R 1W each, counted in "reverse as coded".

=========  ======================  ===========  ======================  ====================
solver     forward as coded        tape/step    reverse as coded        least reverse
=========  ======================  ===========  ======================  ====================
CG         1 A, 12R 6W             3 (r',p,q)   1 A^T, 27R 13W *        1 A^T, 15R 3W
BiCGSTAB   2 A, 24R 10W            5 (r,p,v,    2 A^T, 45R 20W          2 A^T, 34R 9W
                                   t,s); 2 kept
GMRES, j   1 A, 4(j+1)R + 9R 5W    1 (w)        1 A^T, 3(j+1)R + 13R    1 A^T, ~4(j+1) + 12
           (step j, two passes)    + basis      (j+1)W + 8W
Jacobi     1 A, 8R 4W              1 (x')       1 A^T, 15R 11W *        1 A^T, 8R 5W
=========  ======================  ===========  ======================  ====================

(* counted before ``axpy_`` became a BLAS axpy: one pass fewer per non-unit ``axpy_`` today.)
The least reverse needs no forward quantity recomputed: CG keeps q = A p and r' (so no
product with A and no r - alpha q), records its scalars, and fuses each update into one pass.
BiCGSTAB keeps s (and <r_hat, v'>, <t, t>) besides r, p, v, t, and builds p', s, r' in tape
memory (``fresh_copy``), so only v' and t (the operator's outputs) are copied. GMRES keeps
``w = A v_j``; its forward makes two Gram-Schmidt passes at nearly every step (NumPy's
conditional DGKS pass, see ``prdp_ops/_solver/gmres.py``: on these Poisson matrices
``||w1|| / ||w||`` is about 0.4, under the ``1/sqrt(2)`` that triggers it), four reads of the
rows in use; its reverse reverses the projection the two passes compute (the same map in exact
arithmetic, so the same gradient to rounding): two products with the rows in use and one
in-place BLAS gemm that reads and writes their cotangent.

To turn counts into a ratio, weigh a product with the 5-point CSR matrix as the memory it
moves: 5 values (8 bytes), 5 column indices (4 bytes), a row pointer, ``x`` and ``y``, about
10 n-vector passes. The floor is (forward as coded + tape + least reverse) / forward as
coded; "as coded" is the same model for today's code:

=========  ==============  ==============  ==========================  ===========
solver     forward         least reverse   floor (fwd+vjp)/fwd         as coded
=========  ==============  ==============  ==========================  ===========
CG         18 + 10 = 28    18 + 10 = 28    (28 + 3 + 28) / 28 = 2.11   3.0
BiCGSTAB   34 + 20 = 54    43 + 20 = 63    (54 + 5 + 63) / 54 = 2.26   2.65
GMRES(20)  56 + 10 = 66    54 + 10 = 64    (66 + 1 + 64) / 66 = 1.98   2.14
Jacobi     12 + 10 = 22    13 + 10 = 23    (22 + 1 + 23) / 22 = 2.09   2.7
=========  ==============  ==============  ==========================  ===========

(GMRES averaged over a cycle of 20 steps, mean ``j + 1`` = 10.5; as coded: 1 A + 4 x 10.5 +
14 forward, 1 A^T + 4 x 10.5 + 21 reverse, 1 tape copy of 1R 1W. BiCGSTAB as coded: the
tape is 2 copies (v', t), 4 passes; the reverse 2 A^T + 65.)
All floors are under 3.0. Where the tape does not fit in the last-level cache (from about
128^2 on a 32 MiB L3) while the forward's working set does, its passes cost DRAM bandwidth
and weigh more than the forward's: the measured ratios sit above the floor by that.
"""

from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__":  # before numpy loads (see the docstring)
    _threads = "1"
    if "--blas-threads" in sys.argv:
        _threads = sys.argv[sys.argv.index("--blas-threads") + 1]
    os.environ.setdefault("OPENBLAS_NUM_THREADS", _threads)

import gc
import statistics
import time
import tracemalloc
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spl
from prdp_ops.backends import numpy as pnp

import prdp_ops as po

#: Solvers measured, with their SciPy peer (None: no peer) and the floor ratio above.
SOLVERS: dict[str, tuple[Callable | None, float]] = {
    "cg": (spl.cg, 2.11),
    "bicgstab": (spl.bicgstab, 2.26),
    "gmres": (spl.gmres, 1.98),
    "jacobi": (None, 2.09),
}
#: n-vectors kept per iteration: the tape and, for a sparse A, one cotangent per A^T product
#: (and the vector A multiplied where the tape does not hold it: Jacobi's z). GMRES: w and
#: one basis of 21 rows per 20 steps.
TAPE_VECTORS = {"cg": 3 + 1, "bicgstab": 5 + 2, "gmres": 1 + 21 / 20 + 1, "jacobi": 1 + 2 + 1}
RESTART = 20


def poisson_2d(n: int) -> sp.csr_matrix:
    t = sp.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(n, n))
    eye = sp.identity(n)
    return (sp.kron(t, eye) + sp.kron(eye, t)).tocsr()


def poisson_3d(n: int) -> sp.csr_matrix:
    t = sp.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(n, n))
    eye = sp.identity(n)
    return (sp.kron(sp.kron(t, eye), eye) + sp.kron(sp.kron(eye, t), eye)
            + sp.kron(sp.kron(eye, eye), t)).tocsr()


#: The clock ``interleaved_medians`` reads: "wall" (``time.perf_counter``) or "cpu"
#: (``time.process_time``: this process's user + system time, page faults included, which on
#: a machine shared with other work moves less than wall time; with OpenBLAS on one thread
#: the two agree on a quiet machine). Set by ``--clock``.
CLOCK = {"now": time.perf_counter}


def set_clock(name: str) -> None:
    """Time with the wall clock ("wall") or this process's CPU time ("cpu")."""
    CLOCK["now"] = {"wall": time.perf_counter, "cpu": time.process_time}[name]


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median time (:data:`CLOCK`) of each function, the functions run in turn ``repeats``
    times."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    now = CLOCK["now"]
    for fn in fns.values():  # warm-up (the tape cache's blocks are allocated here)
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = now()
            fn()
            times[name].append(now() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak traced memory of one call, from a cold tape cache."""
    pnp.clear_tape_cache()
    gc.collect()
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def bench(A: sp.csr_matrix, solver: str, k: int, repeats: int,
          memory: bool = False) -> dict[str, float]:
    """Time our forward, SciPy's, and the implicit (CG) and unrolled fwd + vjp on ``A``."""
    n = A.shape[0]
    rng = np.random.default_rng(0)
    b = rng.standard_normal(n)
    x_bar = rng.standard_normal(n)
    opts = {"rtol": 0.0, "atol": 0.0, "maxiter": k}
    options = {"restart": RESTART} if solver == "gmres" else {}
    peer = SOLVERS[solver][0]

    def ours() -> None:
        po.solve(A, b, solver, **opts, **options)

    def theirs() -> None:
        if solver == "gmres":  # SciPy's maxiter counts restart cycles
            peer(A, b, rtol=0.0, atol=0.0, restart=RESTART, maxiter=k // RESTART)
        else:
            peer(A, b, **opts)

    def implicit() -> None:
        _, vjp = po.solve_vjp(A, b, solver, adjoint="implicit", **opts, **options)
        vjp(x_bar)

    def unrolled() -> None:
        _, vjp = po.solve_vjp(A, b, solver, adjoint="unrolled", **opts, **options)
        vjp(x_bar)

    fns: dict[str, Callable[[], object]] = {"ours": ours, "unrolled": unrolled}
    if peer is not None:
        fns["scipy"] = theirs
    if solver == "cg":
        fns["implicit"] = implicit
    t = interleaved_medians(fns, repeats)
    out = {"ours_ms": 1e3 * t["ours"], "unrolled_ratio": t["unrolled"] / t["ours"]}
    if peer is not None:
        out["forward_ratio"] = t["ours"] / t["scipy"]
    if solver == "cg":
        out["implicit_ratio"] = t["implicit"] / t["ours"]
    if memory:
        extra = peak_bytes(unrolled) - peak_bytes(ours)
        out["vectors_per_iteration"] = extra / (k * n * 8)
    return out


def fmt(value: float | None, target: float | None = None) -> str:
    """A ratio with two decimals, bold when it meets ``target``; '-' when not measured."""
    if value is None:
        return "-"
    text = f"{value:.2f}"
    return f"**{text}**" if target is not None and value <= target else text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 64, K = 50, 3 repeats")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--solvers", default=",".join(SOLVERS))
    parser.add_argument("--blas-threads", default="1", help="OpenBLAS threads (default 1)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or this process's CPU time (steadier under load)")
    parser.add_argument("--cases", default="256x300,512x200",
                        help="grid sides and iteration counts, NxK comma-separated")
    args = parser.parse_args()
    set_clock(args.clock)
    cases = ([(64, 50)] if args.quick else
             [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",")])
    repeats = 3 if args.quick else args.repeats
    print(f"2D Poisson, CSR, tolerances 0, medians of {repeats} interleaved runs "
          f"({args.clock} clock), OpenBLAS threads {os.environ.get('OPENBLAS_NUM_THREADS')}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| solver | N | K | ours fwd (ms) | ours / SciPy fwd (<= 1.10) "
          "| implicit fwd+vjp / fwd (<= 2.2) | unrolled fwd+vjp / fwd (<= 3.0) | floor |")
    print("|---|---|---|---|---|---|---|---|")
    for solver in args.solvers.split(","):
        for n, k in cases:
            r = bench(poisson_2d(n), solver, k, repeats)
            print(f"| {solver} | {n}² | {k} | {r['ours_ms']:.0f} "
                  f"| {fmt(r.get('forward_ratio'), 1.10)} "
                  f"| {fmt(r.get('implicit_ratio'), 2.2)} "
                  f"| {fmt(r['unrolled_ratio'], 3.0)} | {SOLVERS[solver][1]:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
