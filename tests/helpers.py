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
