"""Operators: the adjoint identity, agreement with dense matrices, explicit entries, shape
handling, errors, conversion of every documented kind, no mutation of user inputs, and
parameter cotangents (every part) against central finite differences.

References are independent of the code under test: dense NumPy matrices the operators were
built from, stencil matrices assembled node by node with Python loops, and finite
differences of ``y_bar . (A(p) x)`` through ``with_parameters``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spl
from helpers import (
    HAS_CUPY,
    agree_tol,
    assert_agree,
    assert_product_agrees,
    random_vector,
    spd,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import prdp_ops as po

N = 5
PARTS = ("full", "diagonal", "strict_lower", "strict_upper")
GRIDS = [(7,), (4, 5), (3, 4, 3)]
BOUNDARIES = ["dirichlet", "periodic"]


# -- independent references ---------------------------------------------------------------------
def stencil_reference(c: np.ndarray, boundary: str, spacing: tuple[float, ...]) -> np.ndarray:
    """The diffusion matrix assembled node by node (row-major numbering).

    Each node gets, per axis and per side, ``face / h^2`` on the diagonal and ``-face / h^2``
    at the neighbour; the face coefficient is the mean of the two node values, or the node's
    own value on a Dirichlet boundary face (whose neighbour is not an unknown).
    """
    grid = c.shape
    A = np.zeros((c.size, c.size))
    for node in np.ndindex(grid):
        row = np.ravel_multi_index(node, grid)
        for axis, h in enumerate(spacing):
            for step in (-1, 1):
                neighbour = list(node)
                neighbour[axis] += step
                if boundary == "periodic":
                    neighbour[axis] %= grid[axis]
                elif not 0 <= neighbour[axis] < grid[axis]:
                    A[row, row] += c[node] / h**2
                    continue
                face = 0.5 * (c[node] + c[tuple(neighbour)])
                A[row, row] += face / h**2
                A[row, np.ravel_multi_index(tuple(neighbour), grid)] -= face / h**2
    return A


def dense_of(op: po.LinearOperator) -> np.ndarray:
    """An operator's matrix, column by column from matvec on unit vectors."""
    n = op.shape[1]
    return np.stack([np.asarray(op.matvec(e)) for e in np.eye(n, dtype=op.dtype)], axis=1)


def restrict(M: np.ndarray, part: str) -> np.ndarray:
    return {"full": M, "diagonal": np.diag(np.diag(M)), "strict_lower": np.tril(M, -1),
            "strict_upper": np.triu(M, 1)}[part]


def nonsymmetric(n: int, seed: int, dtype: Any = np.float64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((n, n))
    if np.issubdtype(dtype, np.complexfloating):
        M = M + 1j * rng.standard_normal((n, n))
    return M.astype(dtype)


def sparse_pattern(n: int, seed: int, dtype: Any = np.float64) -> np.ndarray:
    """A dense matrix with a sparse pattern (a full diagonal and a few off-diagonals)."""
    M = nonsymmetric(n, seed, dtype)
    mask = np.random.default_rng(seed + 100).random((n, n)) < 0.4
    np.fill_diagonal(mask, True)
    return np.where(mask, M, 0)


def coefficient(grid: tuple[int, ...], seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.5, 2.0, grid)


# -- operator cases -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class OpCase:
    """An operator, built fresh each time, with the dense matrix it must equal."""

    id: str
    build: Callable[[], tuple[po.LinearOperator, np.ndarray]]
    has_diagonal: bool = True
    has_matrix: bool = True
    parts: tuple[str, ...] = PARTS


def _dense(dtype: Any, seed: int = 0) -> tuple[po.LinearOperator, np.ndarray]:
    D = nonsymmetric(N, seed, dtype)
    return po.aslinearoperator(D), D


def _sparse(fmt: Callable[[np.ndarray], Any], dtype: Any = np.float64,
            seed: int = 1) -> Callable[[], tuple[po.LinearOperator, np.ndarray]]:
    def build() -> tuple[po.LinearOperator, np.ndarray]:
        D = sparse_pattern(N, seed, dtype)
        return po.aslinearoperator(fmt(D)), D

    return build


def _scipy_linear_operator() -> tuple[po.LinearOperator, np.ndarray]:
    D = nonsymmetric(N, 2, np.complex128)
    op = spl.LinearOperator((N, N), matvec=lambda x: D @ x, rmatvec=lambda y: D.conj().T @ y,
                            dtype=D.dtype)
    return po.aslinearoperator(op), D


def _function_with_rmatvec() -> tuple[po.LinearOperator, np.ndarray]:
    D = nonsymmetric(N, 3)
    return po.FunctionOperator(lambda x: D @ x, N, rmatvec=lambda y: D.T @ y), D


def _function_hermitian() -> tuple[po.LinearOperator, np.ndarray]:
    S = spd(N, seed=4, dtype=np.complex128)
    return po.FunctionOperator(lambda x: S @ x, N, np.complex128, hermitian=True), S


def _stencil(kind: str, grid: tuple[int, ...],
             boundary: str) -> Callable[[], tuple[po.LinearOperator, np.ndarray]]:
    spacing = tuple(0.5 + 0.25 * a for a in range(len(grid)))

    def build() -> tuple[po.LinearOperator, np.ndarray]:
        if kind == "laplacian":
            op = po.LaplacianStencil(grid, boundary=boundary, spacing=spacing)
            return op, stencil_reference(np.ones(grid), boundary, spacing)
        c = coefficient(grid)
        op = po.DiffusionStencil(c, boundary=boundary, spacing=spacing)
        return op, stencil_reference(c, boundary, spacing)

    return build


def _composite(name: str) -> Callable[[], tuple[po.LinearOperator, np.ndarray]]:
    def build() -> tuple[po.LinearOperator, np.ndarray]:
        A, DA = _dense(np.float64, seed=5)
        B, DB = _sparse(sp.csr_matrix, seed=6)()
        C, DC = _dense(np.complex128, seed=7)
        S, DS = _stencil("diffusion", (3, 2), "dirichlet")()
        L, DL = _stencil("laplacian", (3, 2), "dirichlet")()
        return {
            "sum": lambda: (A + B, DA + DB),
            "difference": lambda: (S - L * 0.5, DS - 0.5 * DL),
            "scaled": lambda: ((1.5 - 2j) * A, (1.5 - 2j) * DA),
            "negated": lambda: (-C, -DC),
            "product": lambda: (A @ B, DA @ DB),
            "transpose": lambda: (C.T, DC.T),
            "adjoint": lambda: (C.H, DC.conj().T),
            "transpose_of_sum": lambda: ((A + C).T, (DA + DC).T),
            "adjoint_of_stencil_product": lambda: ((S @ L).H, (DS @ DL).T),
        }[name]()

    return build


OP_CASES = [
    OpCase("dense-real", lambda: _dense(np.float64)),
    OpCase("dense-complex", lambda: _dense(np.complex128)),
    OpCase("csr_matrix", _sparse(sp.csr_matrix)),
    OpCase("csc_matrix", _sparse(sp.csc_matrix)),
    OpCase("coo_matrix", _sparse(sp.coo_matrix)),
    OpCase("csr_array", _sparse(sp.csr_array)),
    OpCase("csr-complex", _sparse(sp.csr_matrix, np.complex128)),
    OpCase("scipy-LinearOperator", _scipy_linear_operator, has_diagonal=False,
           has_matrix=False),
    OpCase("function-rmatvec", _function_with_rmatvec, has_diagonal=False, has_matrix=False),
    OpCase("function-hermitian", _function_hermitian, has_diagonal=False, has_matrix=False),
    *[OpCase(f"{kind}-{len(grid)}d-{boundary}", _stencil(kind, grid, boundary))
      for kind in ("laplacian", "diffusion") for grid in GRIDS for boundary in BOUNDARIES],
    OpCase("sum", _composite("sum")),
    OpCase("difference", _composite("difference")),
    OpCase("scaled", _composite("scaled")),
    OpCase("negated", _composite("negated")),
    OpCase("product", _composite("product"), has_diagonal=False, parts=("full",)),
    OpCase("transpose", _composite("transpose")),
    OpCase("adjoint", _composite("adjoint")),
    OpCase("transpose_of_sum", _composite("transpose_of_sum")),
    OpCase("adjoint_of_stencil_product", _composite("adjoint_of_stencil_product"),
           has_diagonal=False, parts=("full",)),
]
op_cases = pytest.mark.parametrize("case", OP_CASES, ids=lambda c: c.id)


def complex_vectors(n: int, count: int = 2, seed: int = 11) -> list[np.ndarray]:
    return [random_vector(n, seed=seed + k, dtype=np.complex128) for k in range(count)]


# -- the adjoint identity and agreement with the dense matrix -----------------------------------
@op_cases
def test_adjoint_identity(case):
    A, _ = case.build()
    v, w = complex_vectors(A.shape[1])
    lhs = np.vdot(A @ v, w)
    scale = np.linalg.norm(A @ v) * np.linalg.norm(w)
    assert abs(lhs - np.vdot(v, A.rmatvec(w))) <= 1e-12 * scale
    assert abs(lhs - np.vdot(v, A.H @ w)) <= 1e-12 * scale
    # The transpose is the bilinear adjoint: (A v) . w == v . (A^T w), no conjugation.
    assert abs(np.sum((A @ v) * w) - np.sum(v * (A.T @ w))) <= 1e-12 * scale


@op_cases
def test_products_agree_with_the_dense_matrix(case):
    A, D = case.build()
    assert A.shape == D.shape
    v, w = complex_vectors(A.shape[1])
    V = np.stack(complex_vectors(A.shape[1], count=3, seed=20), axis=1)
    np.testing.assert_allclose(A.matvec(v), D @ v, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(A @ v, D @ v, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(A(v), D @ v, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(A.rmatvec(w), D.conj().T @ w, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(A.matmat(V), D @ V, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(A @ V, D @ V, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(A.rmatmat(V), D.conj().T @ V, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(A.dot(v), D @ v, rtol=1e-12, atol=1e-12)


@op_cases
def test_column_vectors_keep_their_shape(case):
    A, D = case.build()
    v, w = complex_vectors(A.shape[1])
    column = A @ v.reshape(-1, 1)
    assert column.shape == (A.shape[0], 1)
    np.testing.assert_allclose(column[:, 0], D @ v, rtol=1e-12, atol=1e-12)
    back = A.rmatvec(w.reshape(-1, 1))
    assert back.shape == (A.shape[1], 1)
    np.testing.assert_allclose(back[:, 0], D.conj().T @ w, rtol=1e-12, atol=1e-12)


@op_cases
def test_diagonal_and_to_matrix_are_consistent_with_matvec(case):
    A, _ = case.build()
    from_matvec = dense_of(A)
    if case.has_diagonal:
        np.testing.assert_allclose(A.diagonal(), np.diag(from_matvec), rtol=1e-12, atol=1e-12)
    else:
        with pytest.raises(po.MatrixFreeError, match="diagonal"):
            A.diagonal()
    if case.has_matrix:
        M = A.to_matrix()
        assert not isinstance(M, np.matrix), "solvers expect ndarrays or sparse matrices"
        M = M.toarray() if sp.issparse(M) else np.asarray(M)
        np.testing.assert_allclose(M, from_matvec, rtol=1e-12, atol=1e-12)
    else:
        with pytest.raises(po.MatrixFreeError, match="explicit entries"):
            A.to_matrix()


def test_stencil_matrices_are_canonical_csr_with_the_stencil_pattern():
    A = po.DiffusionStencil(coefficient((4, 5)), boundary="periodic")
    M = A.to_matrix()
    assert sp.isspmatrix_csr(M) and M.has_canonical_format
    assert M.nnz == 20 * 5  # the node and its four distinct neighbours


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_stencils_are_symmetric_and_dirichlet_is_positive_definite(boundary):
    A = po.DiffusionStencil(coefficient((4, 3, 3)), boundary=boundary)
    assert A.hermitian
    M = dense_of(A)
    np.testing.assert_allclose(M, M.T, rtol=0, atol=0)
    smallest = np.linalg.eigvalsh(M)[0]
    if boundary == "dirichlet":
        assert smallest > 1e-3
    else:  # constants span the null space
        assert abs(smallest) < 1e-12
        np.testing.assert_allclose(A @ np.ones(A.shape[0]), 0, atol=1e-13)


def test_float32_stencil_keeps_its_dtype():
    A = po.DiffusionStencil(coefficient((5, 4)).astype(np.float32))
    x = np.ones(20, dtype=np.float32)
    assert A.dtype == np.float32 and (A @ x).dtype == np.float32
    assert A.diagonal().dtype == np.float32 and A.to_matrix().dtype == np.float32
    assert po.LaplacianStencil(4, dtype=np.float32).to_matrix().dtype == np.float32


def test_integer_coefficient_is_converted_not_modified():
    c = np.full((3, 4), 2)
    A = po.DiffusionStencil(c)
    assert A.dtype == np.float64 and np.issubdtype(c.dtype, np.integer)
    np.testing.assert_allclose(dense_of(A), 2 * dense_of(po.LaplacianStencil((3, 4))))


def test_stencil_solves_like_a_direct_solve():
    c = coefficient((6, 7))
    A = po.DiffusionStencil(c, spacing=(0.2, 0.3))
    b = random_vector(42)
    x = po.solve(A, b, "cg", rtol=1e-12).x
    np.testing.assert_allclose(x, np.linalg.solve(stencil_reference(c, "dirichlet",
                                                                    (0.2, 0.3)), b),
                               rtol=1e-9, atol=1e-12)


# -- errors ---------------------------------------------------------------------------------------
def test_wrong_vector_shapes_are_refused_clearly():
    A = po.aslinearoperator(np.eye(4))
    with pytest.raises(ValueError, match=r"x must have shape \(4,\) or \(4, 1\).*got \(5,\)"):
        A.matvec(np.ones(5))
    with pytest.raises(ValueError, match=r"got \(4, 2\)"):
        A.matvec(np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"y must have shape"):
        A.rmatvec(np.ones(3))
    with pytest.raises(ValueError, match="4 rows"):
        A.matmat(np.ones((3, 2)))
    with pytest.raises(ValueError, match="1-D or 2-D"):
        A @ np.ones((4, 1, 1))
    # A grid-shaped array is not a flattened vector: it is refused, not silently reshaped.
    with pytest.raises(ValueError, match="12 rows"):
        po.LaplacianStencil((3, 4)) @ np.ones((3, 4))
    with pytest.raises(ValueError, match=r"b must have shape \(12,\)"):
        po.solve(po.LaplacianStencil((3, 4)), np.ones((3, 4)))


def test_shape_mismatches_in_the_algebra_are_refused():
    A, B = po.aslinearoperator(np.eye(3)), po.aslinearoperator(np.eye(4))
    with pytest.raises(ValueError, match=r"cannot add operators of shapes \(3, 3\) and \(4, 4\)"):
        A + B
    with pytest.raises(ValueError, match="cannot add"):
        A - B
    with pytest.raises(ValueError, match="cannot compose"):
        A @ po.aslinearoperator(np.ones((4, 2)))
    with pytest.raises(ValueError, match="use \\*"):
        A @ 2.0


def test_non_square_operator_is_refused_by_solve():
    with pytest.raises(ValueError, match=r"A must be square.*\(3, 4\)"):
        po.solve(np.ones((3, 4)), np.ones(3))
    with pytest.raises(ValueError, match="must be square"):
        po.solve(po.aslinearoperator(np.ones((3, 4))), np.ones(3))


def test_aslinearoperator_errors_name_the_problem():
    with pytest.raises(TypeError, match="pass shape="):
        po.aslinearoperator(lambda x: x)
    with pytest.raises(TypeError, match="got str"):
        po.aslinearoperator("not a matrix")
    with pytest.raises(TypeError, match="got dict"):
        po.aslinearoperator({"a": 1})
    with pytest.raises(ValueError, match="2-D"):
        po.aslinearoperator(np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match="2-D"):
        po.aslinearoperator(np.ones(3))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"shape": (0, 3)}, ValueError, "at least 1 nodes"),
    ({"shape": (2, 3, 4, 5)}, ValueError, "1 to 3 positive ints"),
    ({"shape": (2.5, 3)}, ValueError, "1 to 3 positive ints"),
    ({"shape": "abc"}, ValueError, "1 to 3 positive ints"),
    ({"shape": (4, 2), "boundary": "periodic"}, ValueError, "at least 3 nodes"),
    ({"shape": 4, "boundary": "neumann"}, ValueError, "boundary must be one of"),
    ({"shape": 4, "spacing": 0.0}, ValueError, "spacing must be a finite number > 0"),
    ({"shape": 4, "spacing": float("nan")}, ValueError, "spacing"),
    ({"shape": (4, 4), "spacing": (1.0, 2.0, 3.0)}, ValueError, "one per axis"),
])
def test_laplacian_bad_input(kwargs, error, match):
    shape = kwargs.pop("shape")
    with pytest.raises(error, match=match):
        po.LaplacianStencil(shape, **kwargs)


@pytest.mark.parametrize("c, kwargs, error, match", [
    (-np.ones((3, 3)), {}, ValueError, "finite and > 0"),
    (np.array([1.0, np.nan, 1.0]), {}, ValueError, "finite and > 0"),
    (np.array([1.0, 0.0, 1.0]), {}, ValueError, "finite and > 0"),
    (np.ones(4, dtype=complex), {}, TypeError, "c must be real"),
    (np.ones((2, 2, 2, 2)), {}, ValueError, "1-, 2- or 3-D"),
    (3.0, {}, ValueError, "1-, 2- or 3-D"),
    (np.ones((3, 2)), {"boundary": "periodic"}, ValueError, "at least 3 nodes"),
    (np.ones(4), {"spacing": -1.0}, ValueError, "spacing"),
])
def test_diffusion_bad_input(c, kwargs, error, match):
    with pytest.raises(error, match=match):
        po.DiffusionStencil(c, **kwargs)


def test_diffusion_parameter_errors():
    A = po.DiffusionStencil(np.ones((3, 4)))
    with pytest.raises(ValueError, match=r"keep the grid shape \(3, 4\)"):
        A.with_parameters({"c": np.ones(12)})
    with pytest.raises(ValueError, match="part must be one of"):
        A.param_vjp(np.ones(12), np.ones(12), part="lower")


def test_matrix_free_operators_refuse_entry_based_solvers():
    op, _ = _function_with_rmatvec()
    with pytest.raises(po.MatrixFreeError):
        op.to_matrix()
    assert issubclass(po.MatrixFreeError, TypeError)


def test_function_operator_without_rmatvec_fails_clearly():
    op = po.FunctionOperator(lambda x: 2 * x, 3)
    with pytest.raises(NotImplementedError, match="no rmatvec"):
        op.rmatvec(np.ones(3))
    with pytest.raises(NotImplementedError, match="no rmatvec"):
        op.T @ np.ones(3)
    np.testing.assert_allclose(po.FunctionOperator(lambda x: 2 * x, 3, symmetric=True).T
                               @ np.ones(3), 2 * np.ones(3))


# -- conversion of every documented kind ---------------------------------------------------------
SPARSE_FORMATS = [sp.csr_matrix, sp.csc_matrix, sp.coo_matrix, sp.bsr_matrix, sp.lil_matrix,
                  sp.dia_matrix, sp.dok_matrix, sp.csr_array, sp.csc_array, sp.coo_array]


# np.matrix is deprecated by NumPy but still a documented input kind.
@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
@pytest.mark.parametrize("kind", [
    "ndarray", "np.matrix", *[f.__name__ for f in SPARSE_FORMATS], "scipy-aslinearoperator",
    "callable",
])
def test_aslinearoperator_accepts_every_host_kind(kind):
    D = sparse_pattern(6, seed=8)
    formats = {f.__name__: f for f in SPARSE_FORMATS}
    A = {
        "ndarray": lambda: D,
        "np.matrix": lambda: np.asmatrix(D),
        "scipy-aslinearoperator": lambda: spl.aslinearoperator(sp.csr_matrix(D)),
        "callable": lambda: (lambda x: D @ x),
    }.get(kind, lambda: formats[kind](D))()
    op = po.aslinearoperator(A, shape=(6, 6)) if kind == "callable" else po.aslinearoperator(A)
    assert isinstance(op, po.LinearOperator) and op.shape == (6, 6)
    v = random_vector(6, seed=9)
    # other sums than NumPy's (sparse formats, SciPy's operator): rounding of one product
    assert_product_agrees(op @ v, D @ v, D, v)
    if kind != "callable":
        assert_product_agrees(op.rmatvec(v), D.T @ v, D.T, v)
    result = po.solve(op if kind == "callable" else A, v, "gmres", rtol=1e-10)
    np.testing.assert_allclose(D @ result.x, v, rtol=1e-8, atol=1e-10)


def test_aslinearoperator_returns_our_operators_as_they_are():
    for op in (po.LaplacianStencil(4), po.aslinearoperator(np.eye(3)),
               po.FunctionOperator(lambda x: x, 3)):
        assert po.aslinearoperator(op) is op


def test_aslinearoperator_hermitian_flag_serves_the_adjoint():
    S = spd(4, seed=1)
    op = po.aslinearoperator(lambda x: S @ x, shape=(4, 4), hermitian=True)
    v = random_vector(4)
    np.testing.assert_allclose(op.rmatvec(v), S @ v)


def _jax():
    jax = pytest.importorskip("jax", reason="jax is not installed")
    jax.config.update("jax_enable_x64", True)
    return jax


def _require_jax_backend():
    if importlib.util.find_spec("prdp_ops.backends.jax") is None:
        pytest.skip("prdp_ops.backends.jax (the JAX array backend) is not available yet")


def test_aslinearoperator_accepts_jax_arrays():
    jax = _jax()
    D = nonsymmetric(5, seed=10)
    op = po.aslinearoperator(jax.numpy.asarray(D))
    v, w = random_vector(5, seed=1), random_vector(5, seed=2)
    y = op @ jax.numpy.asarray(v)
    assert type(y).__module__.startswith("jax")
    assert_product_agrees(y, D @ v, D, v)  # XLA's sums against NumPy's: one product
    assert_product_agrees(op.rmatvec(jax.numpy.asarray(w)), D.T @ w, D.T, w)


def test_jax_operators_expose_their_diagonal():
    jax = _jax()
    _require_jax_backend()
    D = nonsymmetric(5, seed=10)
    np.testing.assert_allclose(np.asarray(po.aslinearoperator(jax.numpy.asarray(D)).diagonal()),
                               np.diag(D))


def test_aslinearoperator_accepts_jax_bcoo():
    jax = _jax()
    _require_jax_backend()
    from jax.experimental import sparse as jsparse

    D = sparse_pattern(5, seed=11)
    op = po.aslinearoperator(jsparse.BCOO.fromdense(jax.numpy.asarray(D)))
    v, w = random_vector(5, seed=1), random_vector(5, seed=2)
    assert_product_agrees(op @ jax.numpy.asarray(v), D @ v, D, v)  # BCOO's sums: one product
    assert_product_agrees(op.rmatvec(jax.numpy.asarray(w)), D.T @ w, D.T, w)
    np.testing.assert_allclose(np.asarray(op.diagonal()), np.diag(D))
    assert abs(np.vdot(D @ v, w) - np.vdot(v, np.asarray(op.rmatvec(jax.numpy.asarray(w))))
               ) < 1e-12


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_diffusion_stencil_on_jax_matches_numpy_and_jax_autodiff(boundary):
    jax = _jax()
    _require_jax_backend()
    jnp = jax.numpy
    c = coefficient((4, 3))
    x, y_bar = random_vector(12, seed=1), random_vector(12, seed=2)
    host = po.DiffusionStencil(c, boundary=boundary, spacing=0.5)
    op = po.DiffusionStencil(jnp.asarray(c), boundary=boundary, spacing=0.5)
    # XLA against NumPy, one product; the diagonal and the matrix have no sums
    assert_product_agrees(op @ jnp.asarray(x), host @ x, host.to_matrix(), x)
    np.testing.assert_allclose(np.asarray(op.diagonal()), host.diagonal(), rtol=1e-13)
    np.testing.assert_allclose(np.asarray(op.to_matrix()), host.to_matrix().toarray(),
                               rtol=1e-13)
    restrict_jax = {"full": lambda M: M, "diagonal": lambda M: jnp.diag(jnp.diag(M)),
                    "strict_lower": lambda M: jnp.tril(M, -1),
                    "strict_upper": lambda M: jnp.triu(M, 1)}
    for part, cut in restrict_jax.items():
        def loss(cc, cut=cut):
            M = po.DiffusionStencil(cc, boundary=boundary, spacing=0.5).to_matrix()
            return jnp.asarray(y_bar) @ cut(M) @ jnp.asarray(x)

        expected = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(c)))
        got = op.param_vjp(jnp.asarray(x), jnp.asarray(y_bar), part)["c"]
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-12, atol=1e-12,
                                   err_msg=part)
    jitted = jax.jit(lambda cc, v: po.DiffusionStencil(cc, boundary=boundary,
                                                       spacing=0.5) @ v)
    assert_product_agrees(jitted(jnp.asarray(c), jnp.asarray(x)), host @ x, host.to_matrix(),
                          x)


def test_large_jax_stencil_has_no_dense_matrix():
    jax = _jax()
    _require_jax_backend()
    op = po.DiffusionStencil(jax.numpy.ones((65, 64)))
    with pytest.raises(po.MatrixFreeError, match="4096"):
        op.to_matrix()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUPY, reason="cupy with a CUDA GPU is not available on this machine")
def test_cupy_kinds_and_stencil():
    import cupy
    import cupyx.scipy.sparse as csp

    D = sparse_pattern(6, seed=12)
    v = random_vector(6)
    for A in (cupy.asarray(D), csp.csr_matrix(sp.csr_matrix(D))):
        op = po.aslinearoperator(A)
        # the GPU's sums against NumPy's: rounding of one product
        assert_product_agrees(cupy.asnumpy(op @ cupy.asarray(v)), D @ v, D, v)
        assert_product_agrees(cupy.asnumpy(op.rmatvec(cupy.asarray(v))), D.T @ v, D.T, v)
    c = coefficient((4, 5))
    host = po.DiffusionStencil(c, boundary="periodic")
    op = po.DiffusionStencil(cupy.asarray(c), boundary="periodic")
    x = random_vector(20)
    assert_product_agrees(cupy.asnumpy(op @ cupy.asarray(x)), host @ x, host.to_matrix(), x)
    np.testing.assert_allclose(op.to_matrix().get().toarray(), host.to_matrix().toarray())
    # sums of products of neighbour differences (cancellation): normwise, one product's eps
    assert_agree(
        cupy.asnumpy(op.param_vjp(cupy.asarray(x), cupy.asarray(x), "strict_lower")["c"]),
        host.param_vjp(x, x, "strict_lower")["c"], agree_tol(np.float64))


# -- nothing the user passed is mutated ----------------------------------------------------------
def _snapshot(M: Any) -> dict[str, Any]:
    fields = ("data", "indices", "indptr", "row", "col")
    snap = {f: np.array(getattr(M, f), copy=True) for f in fields if hasattr(M, f)}
    snap["canonical"] = M.has_canonical_format
    snap["format"] = M.format
    return snap


def _assert_unchanged(M: Any, snap: dict[str, Any]) -> None:
    assert M.format == snap["format"] and M.has_canonical_format == snap["canonical"]
    for field, before in snap.items():
        if field not in ("canonical", "format"):
            np.testing.assert_array_equal(getattr(M, field), before, err_msg=field)


def _non_canonical() -> list[Any]:
    # (0, 0) and (2, 1) stored twice, CSR column indices unsorted within rows.
    rows = np.array([0, 2, 0, 1, 2, 3, 3, 2, 1])
    cols = np.array([0, 1, 0, 1, 1, 3, 0, 2, 2])
    vals = np.array([2.0, 1.0, 3.0, 5.0, -1.0, 6.0, 1.0, 4.0, 0.5])
    coo = sp.coo_matrix((vals, (rows, cols)), shape=(4, 4))
    csr = sp.csr_matrix((np.array([3.0, 2.0, 0.5, 5.0, 4.0, 1.0, 1.0, 1.0, 6.0]),
                         np.array([0, 0, 2, 1, 2, 1, 1, 0, 3]),
                         np.array([0, 2, 4, 7, 9])), shape=(4, 4))
    return [coo, csr, sp.coo_array((vals, (rows, cols)), shape=(4, 4))]


@pytest.mark.parametrize("index", range(3), ids=["coo_matrix", "csr_matrix", "coo_array"])
def test_non_canonical_sparse_input_is_left_unchanged(index):
    M = _non_canonical()[index]
    assert not M.has_canonical_format
    snap = _snapshot(M)
    dense = M.toarray()  # duplicates sum
    op = po.aslinearoperator(M)
    b = random_vector(4)
    assert_product_agrees(op @ b, dense @ b, dense, b)  # duplicates summed in another order
    np.testing.assert_allclose(op.diagonal(), np.diag(dense))
    np.testing.assert_allclose(op.to_matrix().toarray(), dense)
    op.param_vjp(b, b)
    result, vjp = po.solve_vjp(M, b, "gmres", rtol=1e-12)
    np.testing.assert_allclose(dense @ result.x, b, rtol=1e-9, atol=1e-11)
    vjp(b)
    _assert_unchanged(M, snap)


def test_dense_inputs_and_vectors_are_left_unchanged():
    D = nonsymmetric(5, seed=13)
    c = coefficient((3, 4))
    D0, c0 = D.copy(), c.copy()
    x = random_vector(12)
    x0 = x.copy()
    A = po.DiffusionStencil(c, boundary="periodic")
    for part in PARTS:
        A.param_vjp(x, x, part)
    A @ x, A.matmat(np.stack([x, x], 1)), A.diagonal(), A.to_matrix()
    op = po.aslinearoperator(D)
    op.param_vjp(x[:5], x[:5])
    np.testing.assert_array_equal(D, D0)
    np.testing.assert_array_equal(c, c0)
    np.testing.assert_array_equal(x, x0)


# -- parameter cotangents against finite differences ---------------------------------------------
def _real_loss(op: po.LinearOperator, part: str, x: np.ndarray, y_bar: np.ndarray) -> float:
    """``Re(y_bar . (A_part x))``, the functional whose gradient JAX's cotangent convention
    gives: ``p_bar = dL/dRe(p) - i dL/dIm(p)`` (just ``dL/dp`` for a real ``p``)."""
    return float(np.real(np.sum(y_bar * (restrict(dense_of(op), part) @ x))))


def finite_difference_cotangents(op: po.LinearOperator, part: str, x: np.ndarray,
                                 y_bar: np.ndarray, eps: float = 1e-6) -> dict[str, Any]:
    params = op.parameters()
    out = {}
    for name, p in params.items():
        directions = [1.0, 1j] if np.iscomplexobj(p) else [1.0]
        grad = np.zeros(p.shape, dtype=p.dtype)
        for j in range(p.size):
            for direction in directions:
                values = []
                for sign in (1, -1):
                    q = np.array(p, copy=True)
                    q.flat[j] += sign * eps * direction
                    values.append(_real_loss(op.with_parameters({**params, name: q}), part, x,
                                             y_bar))
                # p_bar = dL/dRe - i dL/dIm: the imaginary direction enters conjugated.
                grad.flat[j] += np.conj(direction) * (values[0] - values[1]) / (2 * eps)
        out[name] = grad
    return out


def _cotangent_arrays(op: po.LinearOperator, bar: dict[str, Any]) -> dict[str, np.ndarray]:
    """Cotangents as dense arrays shaped like the parameters (sparse data stays data)."""
    return {k: np.asarray(v) for k, v in bar.items()}


PARAM_CASES = [case for case in OP_CASES
               if case.id not in ("scipy-LinearOperator", "function-rmatvec",
                                  "function-hermitian") and not case.id.startswith("laplacian")]


@pytest.mark.parametrize("case", PARAM_CASES, ids=lambda c: c.id)
def test_param_vjp_matches_finite_differences(case):
    A, _ = case.build()
    assert A.parameters(), "every case here has parameters"
    complex_data = any(np.iscomplexobj(p) for p in A.parameters().values())
    dtype = np.complex128 if complex_data else np.float64
    x = random_vector(A.shape[1], seed=30, dtype=dtype)
    y_bar = random_vector(A.shape[0], seed=31, dtype=dtype)
    for part in case.parts:
        got = _cotangent_arrays(A, A.param_vjp(x, y_bar, part))
        expected = finite_difference_cotangents(A, part, x, y_bar)
        assert got.keys() == expected.keys()
        for name in expected:
            scale = max(1.0, np.abs(expected[name]).max())
            np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-6 * scale,
                                       err_msg=f"{case.id} part={part} param={name}")


@pytest.mark.parametrize("case", [c for c in PARAM_CASES if c.parts == ("full",)],
                         ids=lambda c: c.id)
def test_products_refuse_split_parts_clearly(case):
    A, _ = case.build()
    x = random_vector(A.shape[1])
    with pytest.raises(NotImplementedError, match="part="):
        A.param_vjp(x, x, "diagonal")


@pytest.mark.parametrize("case", PARAM_CASES, ids=lambda c: c.id)
def test_param_vjp_batch_is_the_sum_of_single_cotangents(case):
    A, _ = case.build()
    dtype = np.complex128 if any(np.iscomplexobj(p) for p in A.parameters().values()) \
        else np.float64
    X = np.stack([random_vector(A.shape[1], seed=40 + k, dtype=dtype) for k in range(3)])
    Y = np.stack([random_vector(A.shape[0], seed=50 + k, dtype=dtype) for k in range(3)])
    for part in case.parts:
        batch = A.param_vjp_batch(X, Y, part)
        singles = [A.param_vjp(x, y, part) for x, y in zip(X, Y, strict=True)]
        for name, value in batch.items():
            total = sum(np.asarray(s[name]) for s in singles)
            np.testing.assert_allclose(np.asarray(value), total, rtol=1e-12, atol=1e-12)


def test_stencil_cotangent_of_complex_vectors_is_real():
    c = coefficient((3, 4))
    A = po.DiffusionStencil(c)
    x = random_vector(12, seed=1, dtype=np.complex128)
    y_bar = random_vector(12, seed=2, dtype=np.complex128)
    got = A.param_vjp(x, y_bar)["c"]
    assert got.dtype == np.float64
    expected = finite_difference_cotangents(A, "full", x, y_bar)["c"]
    np.testing.assert_allclose(got, expected, atol=1e-6 * np.abs(expected).max())


def test_laplacian_has_no_parameters():
    L = po.LaplacianStencil((3, 3))
    assert L.parameters() == {}
    assert L.param_vjp(np.ones(9), np.ones(9)) == {}
    assert L.with_parameters({}) is L
    assert math.isclose(L.diagonal()[4], 4.0)


# -- scalars ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda A: 2.5 * A, lambda A: A * 2.5, lambda A: np.float64(2.5) * A,
    lambda A: A * np.float32(2.5), lambda A: A * np.array(2.5), lambda A: np.array(2.5) * A,
    lambda A: A / 0.4, lambda A: -(-2.5 * A),
], ids=["left", "right", "np-left", "np32-right", "0d-right", "0d-left", "divide", "negate"])
def test_every_scalar_form_scales(make):
    D = nonsymmetric(4, seed=14)
    A = make(po.aslinearoperator(D))
    assert isinstance(A, po.LinearOperator)
    v = random_vector(4, dtype=np.complex128)
    np.testing.assert_allclose(A @ v, 2.5 * D @ v, rtol=1e-6)
    np.testing.assert_allclose(A.H @ v, 2.5 * D.T @ v, rtol=1e-6)


def test_complex_scalar_is_conjugated_in_the_adjoint_and_drops_hermitian():
    S = spd(4, seed=2)
    A = po.aslinearoperator(S, hermitian=True)
    assert (2.0 * A).hermitian and not (2j * A).hermitian
    v = random_vector(4, dtype=np.complex128)
    assert_product_agrees((A / 2j).H @ v, (S / 2j).conj().T @ v, S / 2, v)
    with pytest.raises(ValueError, match="divided by a scalar"):
        A / A


def test_traced_jax_scalar_scales_an_operator_under_jit_and_grad():
    jax = _jax()
    _require_jax_backend()
    jnp = jax.numpy
    L = po.LaplacianStencil(5, spacing=0.5)
    D = L.to_matrix().toarray()
    v = random_vector(5)
    scaled = jax.jit(lambda a, x: (a * L) @ x)(jnp.asarray(3.0), jnp.asarray(v))
    assert_product_agrees(scaled, 3.0 * D @ v, 3.0 * D, v)  # XLA's stencil sums: one product
    grad = jax.grad(lambda a: jnp.sum((L * a).H @ jnp.asarray(v)))(2.0)
    # sum(L^H v): rounding bounded by 1^T |D| |v| (the column sums of D nearly cancel)
    assert_product_agrees(np.atleast_1d(float(grad)), np.atleast_1d(np.sum(D @ v)),
                          np.ones((1, 5)) @ np.abs(D), v)


# np.matrix is deprecated by NumPy but still a documented input kind.
@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_np_matrix_vectors_are_accepted_like_scipy():
    D = nonsymmetric(4, seed=15)
    A = po.aslinearoperator(D)
    column = np.asmatrix(np.arange(4.0)).T
    np.testing.assert_allclose(np.asarray(A @ column), D @ np.arange(4.0).reshape(-1, 1))
    np.testing.assert_allclose(np.asarray(A.rmatvec(column)), D.T @ np.arange(4.0).reshape(-1, 1))
    block = np.asmatrix(np.ones((4, 2)))
    np.testing.assert_allclose(np.asarray(A @ block), D @ np.ones((4, 2)))


# -- stencils on random grids ----------------------------------------------------------------------
@st.composite
def stencil_problems(draw):
    boundary = draw(st.sampled_from(BOUNDARIES))
    smallest = 3 if boundary == "periodic" else 1
    grid = tuple(draw(st.lists(st.integers(smallest, 5), min_size=1, max_size=3)
                      .filter(lambda g: math.prod(g) <= 60)))
    spacing = tuple(draw(st.lists(st.floats(0.1, 3.0), min_size=len(grid),
                                  max_size=len(grid))))
    seed = draw(st.integers(0, 2**16))
    return grid, boundary, spacing, seed


@settings(max_examples=40, deadline=None)
@given(stencil_problems())
def test_diffusion_stencil_matches_the_node_by_node_matrix_on_random_grids(problem):
    grid, boundary, spacing, seed = problem
    c = np.random.default_rng(seed).uniform(0.1, 10.0, grid)
    A = po.DiffusionStencil(c, boundary=boundary, spacing=spacing)
    reference = stencil_reference(c, boundary, spacing)
    scale = np.abs(reference).max()
    np.testing.assert_allclose(dense_of(A), reference, rtol=0, atol=1e-13 * scale)
    np.testing.assert_allclose(A.to_matrix().toarray(), reference, rtol=0, atol=1e-13 * scale)
    np.testing.assert_allclose(A.diagonal(), np.diag(reference), rtol=1e-13)
    x = random_vector(c.size, seed=seed % 97)
    y_bar = random_vector(c.size, seed=seed % 89 + 1)
    # A(c) is linear in c, A(c) = sum_k c_k A(e_k), so the exact cotangent of c_k under a
    # part is y_bar . (A(e_k)_part x), with A(e_k) from the node-by-node reference.
    pieces = [stencil_reference(np.eye(c.size)[k].reshape(grid), boundary, spacing)
              for k in range(c.size)]
    for part in PARTS:
        expected = np.array([y_bar @ restrict(M, part) @ x for M in pieces]).reshape(grid)
        np.testing.assert_allclose(A.param_vjp(x, y_bar, part)["c"], expected, rtol=1e-10,
                                   atol=1e-12 * scale * np.abs(x).max() * np.abs(y_bar).max(),
                                   err_msg=part)


@pytest.mark.parametrize("solver, options", [
    ("cg", {}), ("gmres", {"restart": 20}), ("bicgstab", {}), ("jacobi", {"omega": 0.8}),
    ("sor", {"omega": 1.5}), ("richardson", {"omega": 0.01}), ("steepest_descent", {}),
])
def test_every_solver_accepts_a_stencil(solver, options):
    c = coefficient((5, 4))
    A = po.DiffusionStencil(c, spacing=0.5)
    b = random_vector(20)
    result = po.solve(A, b, solver, rtol=1e-10, maxiter=20000, **options)
    assert result.converged, result.message
    expected = np.linalg.solve(stencil_reference(c, "dirichlet", (0.5, 0.5)), b)
    np.testing.assert_allclose(result.x, expected, rtol=1e-7, atol=1e-9)
