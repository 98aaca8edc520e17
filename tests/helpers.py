"""Shared test cases: problems, solver cases, backends and dtypes.

Every solver test is parametrised from these lists (SciPy's solver tests and lineax's
tests/helpers.py work the same way), so adding a solver or a backend here adds it to every
test.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp


# -- problems -------------------------------------------------------------------------------
def poisson_1d(n: int, shift: float = 0.0) -> sp.csr_matrix:
    """The 1D Dirichlet Laplacian ``tridiag(-1, 2 + shift, -1)`` (SPD)."""
    return sp.diags([-1.0, 2.0 + shift, -1.0], [-1, 0, 1], shape=(n, n), format="csr")


def poisson_2d(n: int) -> sp.csr_matrix:
    """The 5-point Dirichlet Laplacian on an ``n x n`` grid (SPD, condition ~ n^2)."""
    t = poisson_1d(n)
    eye = sp.identity(n, format="csr")
    return (sp.kron(t, eye) + sp.kron(eye, t)).tocsr()


def convection_diffusion_2d(n: int, peclet: float = 0.5) -> sp.csr_matrix:
    """Upwind convection-diffusion on an ``n x n`` grid: non-symmetric, diagonally dominant."""
    main = poisson_1d(n)
    conv = sp.diags([-peclet, peclet], [-1, 0], shape=(n, n))
    eye = sp.identity(n, format="csr")
    return (sp.kron(main + conv, eye) + sp.kron(eye, main + 0.5 * conv)).tocsr()


def diagonally_dominant(n: int, seed: int = 0, symmetric: bool = False,
                        dtype: Any = np.float64) -> np.ndarray:
    """A dense, strictly diagonally dominant matrix (Jacobi and SOR converge)."""
    rng = np.random.default_rng(seed)
    A = rng.uniform(-1, 1, (n, n))
    if np.issubdtype(dtype, np.complexfloating):
        A = A + 1j * rng.uniform(-1, 1, (n, n))
    if symmetric:
        A = (A + A.conj().T) / 2
    A = A + np.diag(np.abs(A).sum(axis=1) + 1.0)
    return A.astype(dtype)


def spd(n: int, seed: int = 0, dtype: Any = np.float64, cond: float = 50.0) -> np.ndarray:
    """A dense Hermitian positive definite matrix with condition number ``cond``."""
    rng = np.random.default_rng(seed)
    Q = rng.standard_normal((n, n))
    if np.issubdtype(dtype, np.complexfloating):
        Q = Q + 1j * rng.standard_normal((n, n))
    Q, _ = np.linalg.qr(Q)
    eig = np.geomspace(1.0, cond, n)
    return ((Q * eig) @ Q.conj().T).astype(dtype)


def random_vector(n: int, seed: int = 1, dtype: Any = np.float64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(n)
    if np.issubdtype(dtype, np.complexfloating):
        v = v + 1j * rng.standard_normal(n)
    return v.astype(dtype)


# -- solver cases ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SolverCase:
    """A solver with the options and the matrix family it is meant for."""

    name: str
    options: dict = dataclasses.field(default_factory=dict)
    #: "spd" (Hermitian positive definite), "nonsymmetric", or "dominant" (diagonally
    #: dominant, for the stationary methods).
    matrix: str = "spd"
    complex_ok: bool = True
    preconditioner_ok: bool = False

    @property
    def id(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.name}({opts})" if opts else self.name

    @property
    def permutation_equivariant(self) -> bool:
        """Whether renumbering the unknowns gives the same iterates in exact arithmetic
        (inner products and products only); SOR sweeps in index order, so it does not."""
        return self.name != "sor"

    def matrix_for(self, n: int, dtype: Any = np.float64, seed: int = 0) -> np.ndarray:
        """A dense test matrix of this case's family."""
        if self.matrix == "spd":
            return spd(n, seed=seed, dtype=dtype)
        if self.matrix == "nonsymmetric":
            return diagonally_dominant(n, seed=seed, dtype=dtype) + np.triu(
                np.ones((n, n)), 1).astype(dtype)
        return diagonally_dominant(n, seed=seed, dtype=dtype)


SOLVER_CASES = [
    SolverCase("cg", matrix="spd", preconditioner_ok=True),
    SolverCase("bicgstab", matrix="nonsymmetric", preconditioner_ok=True),
    SolverCase("gmres", {"restart": 5}, matrix="nonsymmetric", preconditioner_ok=True),
    SolverCase("gmres", {"restart": 50}, matrix="nonsymmetric", preconditioner_ok=True),
    SolverCase("jacobi", {"omega": 0.8}, matrix="dominant"),
    SolverCase("sor", {"omega": 1.0}, matrix="dominant"),
    SolverCase("sor", {"omega": 1.2}, matrix="dominant"),
    # spd() has eigenvalues in [1, 50]: Richardson converges for omega < 2/50.
    SolverCase("richardson", {"omega": 0.035}, matrix="spd", preconditioner_ok=True),
    SolverCase("steepest_descent", matrix="spd", preconditioner_ok=True),
]

solver_cases = pytest.mark.parametrize("case", SOLVER_CASES, ids=lambda c: c.id)

DTYPES = [np.float32, np.float64, np.complex128]
ADJOINT_MODES = ["implicit", "unrolled", "none"]


# -- backends -------------------------------------------------------------------------------
def _cupy_usable() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # any CUDA failure means: no GPU here
        return False


HAS_CUPY = _cupy_usable()
BACKENDS = [
    "numpy",
    pytest.param("cupy", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not HAS_CUPY, reason="cupy with a CUDA GPU is not available on this machine")]),
]


def to_backend(a: Any, backend: str) -> Any:
    """Move a numpy array or scipy.sparse matrix to ``backend``."""
    if backend == "numpy":
        return a
    import cupy
    import cupyx.scipy.sparse as csp

    return csp.csr_matrix(a) if sp.issparse(a) else cupy.asarray(a)


def to_numpy(a: Any) -> Any:
    """Bring an array (or sparse matrix) back to numpy / scipy."""
    if hasattr(a, "get"):
        return a.get()
    return np.asarray(a) if not sp.issparse(a) else a


def tolerance(dtype: Any) -> float:
    """A comparison tolerance for results computed in ``dtype``."""
    return 2e-4 if np.dtype(dtype) in (np.float32, np.complex64) else 1e-9



# -- tolerances for comparing two floating-point computations -------------------------------
#: Covers the constants of the model in agree_tol: the length factor of a sum (~ n eps worst
#: case, ~ sqrt(n) eps typically; n <= a few hundred here) and both computations carrying
#: their own error.
AGREE_SAFETY = 10.0


def eps(dtype: Any) -> float:
    """The machine epsilon of ``dtype`` (of its real part for a complex dtype)."""
    return float(np.finfo(dtype).eps)


def agree_tol(dtype: Any, cond: float = 1.0, iterations: int = 1, *, power: int = 1,
              safety: float = AGREE_SAFETY) -> float:
    """A normwise relative tolerance for two computations of the same quantity whose sums run
    in different orders: another CPU's BLAS kernels, XLA against NumPy, SciPy against us, a
    stencil against its CSR matrix. Such results agree to rounding times conditioning times
    iterations, not to a fixed 1e-10.

    The model. Every inner product and matrix-vector product is exact up to a relative
    perturbation of order ``eps(dtype)`` (its length factor is in ``safety``). A k-step
    iteration takes k such perturbations, each amplified by at most the condition number of
    what it perturbs:

    * ``power=1``, forward (an iterate, a solution): ``eps * cond * k``;
    * ``power=2``, adjoint (a cotangent: ``A^T lambda = g`` solved for a ``g`` that already
      carries the forward error, or a reverse sweep through k steps), and a residual
      ``b - A x`` of a forward iterate (``||A dx|| <= ||A|| ||dx||`` and ``||A|| ||x|| <=
      cond ||b||``), relative to ``||b||``: ``eps * cond**2 * k``.

    ``iterations`` is the number of steps that ran (``result.iterations`` of a converged
    solve). Use it with :func:`assert_agree`: the bound is normwise, so it is measured against
    the largest entry; an entry that is small by cancellation carries the whole vector's
    absolute error, and an entrywise rtol on it fails on another machine.

    Where the model does not hold. Krylov methods with short recurrences (CG, BiCGSTAB)
    lose orthogonality in floating point once a Ritz value converges (for these small
    problems: near n steps); from then on two runs that round differently take different
    paths and their iterates agree only as far as both are converged (measured: CG on
    ``spd(10)``, cond 50, stopped at step 10 moves x by ~100 eps cond k between orders, an
    unrolled gradient through 8 steps by ~1e-10; on cond 1000 mid-solve iterates by 1e-5).
    Compare those by
    :func:`converged_tol` (solutions) or :func:`permutation_spread` (anything else, e.g. an
    unrolled gradient through such steps), not by this model.

    Two computations of the same code in the same order are bit-identical and need none of
    this: compare those tightly (or exactly) and say so.
    """
    return safety * eps(dtype) * max(int(iterations), 1) * float(cond) ** power


def converged_tol(cond: float, *relative_residuals: float, n: int = 1) -> float:
    """A relative bound on the difference of solutions of the same system whose true
    residuals are ``||b - A x_i|| <= rho_i ||b||``: ``x_i - x* = A^-1 r_i`` and
    ``||b|| <= ||A|| ||x*||`` give ``||x_1 - x_2|| <= cond (rho_1 + rho_2) ||x*||`` in
    2-norms, and a factor ``sqrt(n)`` turns that into the largest-entry form that
    :func:`assert_agree` checks.

    A bound, not a model: it holds whatever order the sums ran in. Pass the measured
    residuals (:func:`relative_residual`), not the requested rtol, so it is as tight as the
    solves are, and the 2-norm condition number (``np.linalg.cond``).
    """
    return float(cond) * float(sum(relative_residuals)) * float(np.sqrt(n))


def relative_residual(A: Any, b: Any, x: Any) -> float:
    """``||b - A x|| / ||b||`` on the host, in float64/complex128."""
    A = A.toarray() if sp.issparse(A) else np.asarray(A)
    b, x = np.asarray(b), np.asarray(x)
    wide = np.complex128 if np.iscomplexobj(A) or np.iscomplexobj(b) else np.float64
    A, b, x = A.astype(wide), b.astype(wide), x.astype(wide)
    return float(np.linalg.norm(b - A @ x) / np.linalg.norm(b))


def permutation_spread(compute: Any, n: int, trials: int = 3, seed: int = 0) -> tuple:
    """How far rounding alone moves a result: ``compute(perm)`` must solve the problem with
    its unknowns reordered by ``perm`` (``A[perm][:, perm]``, ``b[perm]``) and return its
    results (a tuple of arrays) mapped back to the original order. A solver built of inner
    products, norms and matrix-vector products (every one here but SOR, see
    ``SolverCase.permutation_equivariant``) gives the same result for every ``perm`` in exact
    arithmetic; in floating point each reorders the sums. Returns ``(reference, spreads)``:
    the unpermuted result and, per output, the largest entrywise difference that ``trials``
    random permutations produced.

    This measures the sensitivity that :func:`agree_tol`'s model cannot bound (Krylov runs
    past their loss of orthogonality, derivatives through them). Take several trials: one
    permutation can land 100x below the typical spread.
    """
    reference = tuple(np.asarray(r) for r in compute(np.arange(n)))
    spreads = [np.zeros(()) for _ in reference]
    rng = np.random.default_rng(seed)
    for _ in range(trials):
        other = compute(rng.permutation(n))
        # fmax skips NaN: padding past the end of a run that stopped one step earlier
        spreads = [np.fmax(s, np.nanmax(np.abs(np.asarray(o) - r), initial=0.0))
                   for s, o, r in zip(spreads, other, reference, strict=True)]
    return reference, tuple(float(s) for s in spreads)


def assert_agree(actual: Any, desired: Any, tol: float, err_msg: str = "") -> None:
    """``max |actual - desired| <= tol * max |desired|`` (normwise; see :func:`agree_tol`)."""
    desired = np.asarray(desired)
    scale = float(np.max(np.abs(desired))) if desired.size else 0.0
    np.testing.assert_allclose(np.asarray(actual), desired, rtol=0, atol=tol * scale,
                               err_msg=err_msg)


def assert_product_agrees(actual: Any, desired: Any, D: Any, v: Any, dtype: Any = np.float64,
                          err_msg: str = "") -> None:
    """``actual`` and ``desired`` are both ``D @ v``, summed in different orders: entrywise
    ``|actual - desired| <= agree_tol(dtype) (|D| |v|)``, the standard bound ``n eps |D| |v|``
    of one product (the row length n <= 10 here is in ``AGREE_SAFETY``). An entry that is
    small by cancellation still carries the rounding of its large terms, so an rtol on it
    alone fails on another machine."""
    magnitude = abs(D) if sp.issparse(D) else np.abs(np.asarray(D))
    bound = agree_tol(dtype) * np.asarray(magnitude @ np.abs(np.asarray(v)))
    error = np.abs(np.asarray(actual) - np.asarray(desired))
    worst = np.unravel_index(np.argmax(error - bound), error.shape) if error.ndim else ()
    assert np.all(error <= bound), (
        f"{err_msg} |actual - desired| exceeds agree_tol * (|D| |v|) at {worst}: "
        f"{error[worst]:.3e} > {bound[worst]:.3e}")


def fd_noise(value: float, cond: float, step: float, dtype: Any = np.float64) -> float:
    """The rounding noise of a central difference ``(L(c + h) - L(c - h)) / 2h`` of a loss
    ``L`` computed through a solve: each evaluation carries a relative error ~ ``eps cond``,
    so the difference quotient carries ``eps cond |L| / h`` in every entry, whatever the
    entry's size (``AGREE_SAFETY`` times that). Use it as the ``atol`` of a gradient check;
    the truncation error ``h^2 L''' / 6`` is far below it at ``h = 1e-6``."""
    return AGREE_SAFETY * eps(dtype) * float(cond) * abs(float(value)) / float(step)
