"""``prdp_ops.linalg`` against ``scipy.sparse.linalg``: same signatures, same answers, and
every documented difference (the module docstring's list) pinned.

Agreement is checked with bounds derived from the problem, not with tuned constants:

* Two solutions that both satisfy the tolerance differ by at most ``||A^-1|| (||r_1|| +
  ||r_2||)`` (``x_1 - x_2 = A^-1 (r_2 - r_1)``), with the residuals of the returned vectors
  recomputed in float64.
* Two runs of the same method for a fixed number ``k`` of iterations differ only by rounding:
  at most ``C k eps cond(A) ||x||`` with ``eps`` the working precision's.
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as sla
from helpers import (
    DTYPES,
    SolverCase,
    convection_diffusion_2d,
    diagonally_dominant,
    poisson_1d,
    poisson_2d,
    random_vector,
    spd,
)

import prdp_ops as po
import prdp_ops.linalg as pl
from prdp_ops._solution import STAGNATION_WINDOW

SCIPY_NAMED = ("cg", "bicgstab", "gmres")

#: Rounding-growth constant of the fixed-count bound ``C k eps cond ||x||``.
ROUNDING_GROWTH = 10.0


# -- problems (from tests/helpers.py) ----------------------------------------------------------
def _problem(kind: str, dtype: Any) -> tuple[Any, np.ndarray]:
    """``(A, b)`` of one shared problem in ``dtype``."""
    complex_data = np.issubdtype(dtype, np.complexfloating)
    if kind == "poisson_2d":
        A = poisson_2d(8).astype(dtype)
    elif kind == "spd_dense":
        A = spd(40, seed=3, dtype=np.complex128 if complex_data else np.float64).astype(dtype)
    elif kind == "convection_2d":
        A = convection_diffusion_2d(8).astype(dtype)
        if complex_data:
            A = (A * (1 + 0.5j)).astype(dtype)
    elif kind == "nonsymmetric_dense":
        A = SolverCase("gmres", matrix="nonsymmetric").matrix_for(
            40, dtype=np.complex128 if complex_data else np.float64).astype(dtype)
    else:
        raise ValueError(kind)
    b = random_vector(A.shape[0], seed=5, dtype=np.complex128 if complex_data else np.float64)
    return A, b.astype(dtype)


def _dense64(A: Any) -> np.ndarray:
    dense = A.toarray() if sp.issparse(A) else np.asarray(A)
    return dense.astype(np.complex128 if np.iscomplexobj(dense) else np.float64)


def _residual64(A: Any, x: np.ndarray, b: np.ndarray) -> float:
    """``||b - A x||`` in float64 (complex128) from the returned vectors."""
    A64 = _dense64(A)
    return float(np.linalg.norm(b.astype(A64.dtype) - A64 @ x.astype(A64.dtype)))


def _rounding_of_residual(A: Any, x: np.ndarray, b: np.ndarray) -> float:
    """Bound on how far the residual computed in ``x.dtype`` (as the core checks it) can be
    from the exact one: ``gamma_k || |b| + |A| |x| ||`` with ``k`` the nonzeros per row + 1."""
    A64 = _dense64(A)
    k = int(np.count_nonzero(A64, axis=1).max()) + 1
    eps = float(np.finfo(x.dtype).eps)
    return 2 * k * eps * float(np.linalg.norm(np.abs(b) + np.abs(A64) @ np.abs(x)))


CG_PROBLEMS = ["poisson_2d", "spd_dense"]
NONSYM_PROBLEMS = ["convection_2d", "nonsymmetric_dense"]
CASES = ([("cg", {}, p) for p in CG_PROBLEMS]
         + [("bicgstab", {}, p) for p in NONSYM_PROBLEMS]
         + [("gmres", {"restart": r}, p) for p in NONSYM_PROBLEMS for r in (5, 20)])
case_ids = [f"{name}{opts.get('restart', '')}-{prob}" for name, opts, prob in CASES]


def _rtol(dtype: Any) -> float:
    return 1e-4 if np.finfo(dtype).eps > 1e-10 else 1e-9


def _quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return fn(*args, **kwargs)


# -- signatures --------------------------------------------------------------------------------
def _bare(sig: inspect.Signature) -> list[tuple[str, Any, Any]]:
    """Names, kinds and defaults (annotations left out: SciPy has none)."""
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


@pytest.mark.parametrize("name", SCIPY_NAMED)
def test_signature_equals_scipys(name: str) -> None:
    ours = inspect.signature(getattr(pl, name))
    theirs = inspect.signature(getattr(sla, name))
    assert _bare(ours) == _bare(theirs)


@pytest.mark.parametrize("name,options", [("jacobi", ["omega"]), ("sor", ["omega"]),
                                          ("richardson", ["omega"]), ("steepest_descent", [])])
def test_other_solvers_take_cgs_form(name: str, options: list[str]) -> None:
    """SciPy's cg signature (without M where the solver takes no preconditioner), then the
    solver's options, keyword-only."""
    solver = po.get_solver(name)
    expected = [p for p in _bare(inspect.signature(sla.cg))
                if p[0] != "M" or solver.supports_preconditioner]
    params = _bare(inspect.signature(getattr(pl, name)))
    assert params[: len(expected)] == expected
    extra = params[len(expected):]
    assert [p[0] for p in extra] == options
    assert all(kind is inspect.Parameter.KEYWORD_ONLY for _, kind, _ in extra)
    assert all(solver.options[p] == default for p, _, default in extra)


def test_every_registered_builtin_has_a_wrapper() -> None:
    for name in ("cg", "bicgstab", "gmres", "jacobi", "sor", "richardson", "steepest_descent"):
        assert name in po.available_solvers()
        assert name in pl.__all__


def test_positional_tolerance_is_a_type_error() -> None:
    A, b = _problem("poisson_2d", np.float64)
    for name in SCIPY_NAMED:
        with pytest.raises(TypeError):
            getattr(pl, name)(A, b, None, 1e-5)


# -- same answers as SciPy -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name,options,problem", CASES, ids=case_ids)
def test_converged_solution_matches_scipy(name: str, options: dict, problem: str,
                                          dtype: Any) -> None:
    A, b = _problem(problem, dtype)
    rtol = _rtol(dtype)
    x_s, info_s = getattr(sla, name)(A, b, rtol=rtol, **options)
    x_p, info_p = getattr(pl, name)(A, b, rtol=rtol, **options)
    assert info_s == 0 and info_p == 0
    assert x_p.dtype == x_s.dtype and x_p.shape == x_s.shape
    # Ours is confirmed on the true residual (up to the rounding of computing it in dtype).
    r_p = _residual64(A, x_p, b)
    assert r_p <= rtol * np.linalg.norm(b) + _rounding_of_residual(A, x_p, b)
    # Both meet (about) the tolerance, so they differ by at most ||A^-1|| (r_p + r_s).
    inv_norm = 1.0 / np.linalg.svd(_dense64(A), compute_uv=False)[-1]
    bound = inv_norm * (r_p + _residual64(A, x_s, b))
    assert np.linalg.norm(x_p.astype(np.complex128) - x_s) <= 1.01 * bound


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name,options,problem", CASES, ids=case_ids)
def test_fixed_iterations_match_scipy(name: str, options: dict, problem: str,
                                      dtype: Any) -> None:
    """``rtol=atol=0``: both run exactly ``maxiter`` iterations (GMRES: cycles) of the same
    method and report ``info == maxiter``; the iterates differ only by rounding."""
    A, b = _problem(problem, dtype)
    maxiter = 2 if name == "gmres" else 6
    kwargs = dict(rtol=0.0, atol=0.0, maxiter=maxiter, **options)
    x_s, info_s = getattr(sla, name)(A, b, **kwargs)
    x_p, info_p = getattr(pl, name)(A, b, **kwargs)
    assert info_s == info_p == maxiter
    steps = maxiter * options.get("restart", 1)
    cond = np.linalg.cond(_dense64(A))
    eps = float(np.finfo(dtype).eps)
    bound = ROUNDING_GROWTH * steps * eps * cond * np.linalg.norm(x_s)
    assert np.linalg.norm(x_p.astype(np.complex128) - x_s) <= bound


@pytest.mark.parametrize("name", SCIPY_NAMED)
def test_callback_counts_match_scipy(name: str) -> None:
    """``callback(xk)`` once per iteration (GMRES 'x': once per cycle), as in SciPy."""
    A, b = _problem("convection_2d" if name != "cg" else "poisson_2d", np.float64)
    extra = {"callback_type": "x", "restart": 5} if name == "gmres" else {}
    for maxiter in (1, 3):
        seen_s: list[Any] = []
        seen_p: list[Any] = []
        getattr(sla, name)(A, b, rtol=0.0, maxiter=maxiter, callback=seen_s.append, **extra)
        getattr(pl, name)(A, b, rtol=0.0, maxiter=maxiter, callback=seen_p.append, **extra)
        assert len(seen_p) == len(seen_s) == maxiter


def test_gmres_x_callback_at_the_end_of_a_partial_cycle() -> None:
    """SciPy calls a 'x' callback after the last cycle also when it ended early (converged)."""
    A, b = _problem("convection_2d", np.float64)
    seen_s: list[Any] = []
    seen_p: list[Any] = []
    _, info_s = sla.gmres(A, b, restart=30, callback=seen_s.append, callback_type="x")
    x, info_p = pl.gmres(A, b, restart=30, callback=seen_p.append, callback_type="x")
    assert info_s == info_p == 0
    assert len(seen_p) == len(seen_s) == 1
    np.testing.assert_array_equal(seen_p[-1], x)


@pytest.mark.parametrize("callback_type", ["pr_norm", "legacy"])
def test_gmres_residual_callbacks_match_scipy_without_M(callback_type: str) -> None:
    """Without ``M`` SciPy's preconditioned residual is the true one: same values, same count
    (``maxiter`` counts cycles under 'pr_norm', Arnoldi steps under 'legacy')."""
    A, b = _problem("convection_2d", np.float64)
    seen_s: list[Any] = []
    seen_p: list[Any] = []
    kwargs = dict(rtol=0.0, restart=5, maxiter=3, callback_type=callback_type)
    _, info_s = sla.gmres(A, b, callback=seen_s.append, **kwargs)
    _, info_p = pl.gmres(A, b, callback=seen_p.append, **kwargs)
    assert info_p == info_s == 3
    assert len(seen_p) == len(seen_s) == (15 if callback_type == "pr_norm" else 3)
    assert all(type(r) is np.float64 for r in seen_p)
    np.testing.assert_allclose(seen_p, seen_s, rtol=1e-10)


def test_gmres_callback_without_type_warns_as_scipy() -> None:
    A, b = _problem("convection_2d", np.float64)
    for fn in (sla.gmres, pl.gmres):
        with pytest.warns(DeprecationWarning, match="called without specifying `callback_type`"):
            fn(A, b, maxiter=2, callback=lambda r: None)


def test_gmres_maxiter_counts_cycles() -> None:
    """SciPy's maxiter counts restart cycles: the core runs maxiter * min(restart, n)
    Arnoldi steps (one matvec each, plus one per restart and per convergence check)."""
    A, b = _problem("convection_2d", np.float64)
    count = [0]

    def matvec(v: np.ndarray) -> np.ndarray:
        count[0] += 1
        return A @ v

    op = sla.LinearOperator(A.shape, matvec=matvec, dtype=A.dtype)
    _, info = pl.gmres(op, b, rtol=0.0, restart=5, maxiter=3)
    assert info == 3
    assert count[0] == 3 * 5 + 3  # 15 Arnoldi steps, r = b - A x at each of 3 cycle starts
    _, info = pl.gmres(np.eye(3), np.ones(3), restart=50, maxiter=1)  # restart capped at n
    assert info == 0


@pytest.mark.parametrize("name", SCIPY_NAMED)
def test_info_for_the_iteration_limit_matches_scipy(name: str) -> None:
    A, b = _problem("convection_2d" if name != "cg" else "poisson_2d", np.float64)
    assert getattr(sla, name)(A, b, rtol=1e-12, maxiter=2)[1] == 2
    assert getattr(pl, name)(A, b, rtol=1e-12, maxiter=2)[1] == 2


# -- inputs as SciPy accepts them ------------------------------------------------------------
class _DuckOperator:
    """Not a LinearOperator: anything with shape, dtype and matvec, as SciPy accepts."""

    def __init__(self, A: Any) -> None:
        self.A, self.shape, self.dtype = A, A.shape, A.dtype

    def matvec(self, x: np.ndarray) -> np.ndarray:
        return self.A @ x


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
@pytest.mark.parametrize("form", ["ndarray", "matrix", "csr_matrix", "csr_array",
                                  "LinearOperator", "duck", "po_operator"])
@pytest.mark.parametrize("name", SCIPY_NAMED)
def test_operator_forms(name: str, form: str) -> None:
    A, b = _problem("convection_2d" if name != "cg" else "poisson_2d", np.float64)
    dense = A.toarray()
    given = {"ndarray": dense, "matrix": np.asmatrix(dense), "csr_matrix": sp.csr_matrix(A),
             "csr_array": sp.csr_array(A), "LinearOperator": sla.aslinearoperator(A),
             "duck": _DuckOperator(A), "po_operator": po.aslinearoperator(A)}[form]
    x_ref, _ = getattr(pl, name)(dense, b, rtol=1e-10)
    x, info = getattr(pl, name)(given, b, rtol=1e-10)
    assert info == 0
    cond = np.linalg.cond(dense)
    assert np.linalg.norm(x - x_ref) <= 2e-10 * cond * np.linalg.norm(x_ref)


def test_a_function_is_refused_as_by_scipy() -> None:
    b = np.ones(3)
    with pytest.raises(TypeError):
        sla.cg(lambda v: v, b)
    with pytest.raises(TypeError, match=r"A must be a matrix .*got function\. Wrap"):
        pl.cg(lambda v: v, b)


@pytest.mark.parametrize("name", SCIPY_NAMED)
def test_column_b_gives_a_flat_x(name: str) -> None:
    A, b = _problem("poisson_2d", np.float64)
    x_s, _ = getattr(sla, name)(A, b[:, None])
    x_p, info = getattr(pl, name)(A, b[:, None], x0=np.zeros((b.size, 1)))
    assert info == 0
    assert x_p.shape == x_s.shape == (b.size,)


@pytest.mark.parametrize("A_dtype,b_dtype", [(np.float32, np.float32), (np.float32, np.float64),
                                             (np.int64, np.int64), (np.float16, np.float32),
                                             (np.float64, np.complex64),
                                             (np.complex64, np.float32)])
@pytest.mark.parametrize("name", SCIPY_NAMED)
def test_working_precision_is_scipys(name: str, A_dtype: Any, b_dtype: Any) -> None:
    A = (4 * np.eye(6) + np.diag(np.ones(5), 1) + np.diag(np.ones(5), -1)).astype(A_dtype)
    b = np.arange(1, 7).astype(b_dtype)
    x_s, _ = getattr(sla, name)(A, b)
    x_p, info = getattr(pl, name)(A, b)
    assert info == 0
    assert x_p.dtype == x_s.dtype


@pytest.mark.parametrize("name", SCIPY_NAMED)
def test_x0_is_used_and_not_modified(name: str) -> None:
    A, b = _problem("poisson_2d", np.float64)
    x_exact = np.linalg.solve(A.toarray(), b)
    x0 = x_exact.copy()
    kept = x0.copy()
    seen: list[Any] = []
    extra = {"callback_type": "x"} if name == "gmres" else {}
    x, info = getattr(pl, name)(A, b, x0, callback=seen.append, **extra)
    assert info == 0 and seen == []  # x0 already solves it: no iteration
    np.testing.assert_array_equal(x0, kept)
    assert x is not x0


@pytest.mark.parametrize("name", SCIPY_NAMED)
def test_x0_Mb(name: str) -> None:
    A, b = _problem("convection_2d", np.float64)
    M = sp.diags(1.0 / A.diagonal())
    x_mb, info_mb = getattr(pl, name)(A, b, x0="Mb", M=M, rtol=0.0, maxiter=2)
    x_ex, info_ex = getattr(pl, name)(A, b, x0=M @ b, M=M, rtol=0.0, maxiter=2)
    np.testing.assert_array_equal(x_mb, x_ex)
    assert info_mb == info_ex == 2
    x, info = getattr(pl, name)(A, b, x0="Mb", rtol=1e-8)  # no M: x0 = b
    assert info == 0 and getattr(sla, name)(A, b, x0="Mb")[1] == 0
    assert _residual64(A, x, b) <= 1e-8 * np.linalg.norm(b) + _rounding_of_residual(A, x, b)


@pytest.mark.parametrize("name", SCIPY_NAMED)
def test_psolve_of_A_is_the_default_preconditioner(name: str) -> None:
    """SciPy's convention: without M, ``A.psolve`` preconditions."""
    A, b = _problem("convection_2d", np.float64)
    d = A.diagonal()
    calls = [0]

    def psolve(r: np.ndarray) -> np.ndarray:
        calls[0] += 1
        return r / d

    op = sla.aslinearoperator(A)
    op.psolve = psolve
    x_attr, info_attr = getattr(pl, name)(op, b, rtol=0.0, maxiter=2)
    assert calls[0] > 0
    x_M, info_M = getattr(pl, name)(A, b, rtol=0.0, maxiter=2, M=sp.diags(1.0 / d))
    assert info_attr == info_M == 2
    np.testing.assert_allclose(x_attr, x_M, rtol=1e-12)


@pytest.mark.parametrize("name", SCIPY_NAMED)
def test_zero_b_gives_zero_x(name: str) -> None:
    A, _ = _problem("poisson_2d", np.float64)
    b = np.zeros(A.shape[0])
    for kwargs in ({}, {"rtol": 0.0, "atol": 0.0}, {"x0": np.ones(b.size)}):
        x_s, info_s = getattr(sla, name)(A, b, **kwargs)
        x_p, info_p = getattr(pl, name)(A, b, **kwargs)
        assert info_p == info_s == 0
        np.testing.assert_array_equal(x_p, x_s)


@pytest.mark.parametrize("tolerances", [{"atol": np.inf}, {"rtol": np.inf},
                                        {"rtol": 0.0, "atol": math.inf}])
@pytest.mark.parametrize("name", SCIPY_NAMED)
def test_infinite_tolerance_returns_x0_converged(name: str, tolerances: dict) -> None:
    A, b = _problem("poisson_2d", np.float64)
    x0 = np.full(b.size, 0.5)
    for fn in (getattr(sla, name), getattr(pl, name)):
        x, info = fn(A, b, x0, **tolerances)
        assert info == 0
        np.testing.assert_array_equal(x, x0)


@pytest.mark.parametrize("atol", ["legacy", None, -1, -np.inf])
@pytest.mark.parametrize("name", SCIPY_NAMED)
def test_bad_atol_is_a_value_error_as_in_scipy(name: str, atol: Any) -> None:
    A, b = _problem("poisson_2d", np.float64)
    with pytest.raises(ValueError):
        getattr(sla, name)(A, b, atol=atol)
    with pytest.raises(ValueError, match=rf"prdp_ops.linalg.{name}: atol must be a real"):
        getattr(pl, name)(A, b, atol=atol)


def test_gmres_bad_callback_type_as_in_scipy() -> None:
    A, b = _problem("poisson_2d", np.float64)
    for fn in (sla.gmres, pl.gmres):
        with pytest.raises(ValueError, match="callback_type"):
            fn(A, b, callback=print, callback_type="residual")


def test_shape_errors_as_in_scipy() -> None:
    A, b = _problem("poisson_2d", np.float64)
    for args in ((A, b[:-1]), (A[:, :-1], b), (A, b, np.ones(3))):
        with pytest.raises(ValueError):
            sla.cg(*args)
        with pytest.raises(ValueError, match="must"):
            pl.cg(*args)
    with pytest.raises(ValueError, match="M must have A's shape"):
        pl.cg(A, b, M=np.eye(3))


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_gmres_complex_on_identity(dtype: Any) -> None:
    """SciPy's test_abi, in both complex precisions."""
    x_r, info_r = pl.gmres(np.eye(2), np.ones(2))
    x_c, info_c = pl.gmres(np.eye(2).astype(dtype), np.ones(2).astype(dtype))
    assert np.iscomplexobj(x_c) and info_c == info_r == 0
    np.testing.assert_allclose(x_c, x_r.astype(dtype))


# -- the other registered solvers -----------------------------------------------------------
@pytest.mark.parametrize("name,options,matrix", [
    ("jacobi", {"omega": 0.8}, "dominant"), ("sor", {"omega": 1.2}, "dominant"),
    ("richardson", {"omega": 0.035}, "spd"), ("steepest_descent", {}, "spd")])
def test_other_solvers_equal_po_solve(name: str, options: dict, matrix: str) -> None:
    A = (diagonally_dominant(30, seed=2) if matrix == "dominant" else spd(30, seed=2))
    b = random_vector(30, seed=4)
    seen: list[Any] = []
    # Richardson and steepest descent contract by about 0.965 per step here.
    x, info = getattr(pl, name)(A, b, rtol=1e-8, maxiter=2000, callback=seen.append,
                                **options)
    result = po.solve(A, b, name, rtol=1e-8, maxiter=2000, **options)
    assert info == 0 and result.converged
    np.testing.assert_array_equal(x, result.x)
    assert len(seen) == result.iterations
    assert _residual64(A, x, b) <= 1e-8 * np.linalg.norm(b) + _rounding_of_residual(A, x, b)
    _, info = getattr(pl, name)(A, b, rtol=0.0, maxiter=3, **options)
    assert info == 3


def test_stationary_solvers_take_no_preconditioner() -> None:
    A = diagonally_dominant(5)
    with pytest.raises(TypeError):
        pl.jacobi(A, np.ones(5), M=np.eye(5))  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="omega"):
        pl.sor(A, np.ones(5), omega=2.5)


# -- the documented differences (module docstring, items 1-6) --------------------------------
def test_difference_1_gmres_right_preconditioning() -> None:
    """With M, a 'pr_norm' callback gets the true relative residual (SciPy: ||M r|| / ||b||),
    so scaling M changes nothing here and scales SciPy's values; computing it costs one
    extra product with A per Arnoldi step."""
    A, b = _problem("nonsymmetric_dense", np.float64)
    M = np.diag(1.0 / np.diag(A))  # not a multiple of I: left and right differ
    kwargs = dict(rtol=0.0, restart=5, maxiter=1, callback_type="pr_norm")
    ours: dict[float, list[float]] = {}
    theirs: dict[float, list[float]] = {}
    for scale in (1.0, 1e-3):
        ours[scale], theirs[scale] = [], []
        pl.gmres(A, b, M=scale * M, callback=ours[scale].append, **kwargs)
        sla.gmres(A, b, M=scale * M, callback=theirs[scale].append, **kwargs)
    np.testing.assert_allclose(ours[1e-3], ours[1.0], rtol=1e-10)
    np.testing.assert_allclose(theirs[1e-3], 1e-3 * np.asarray(theirs[1.0]), rtol=1e-10)
    # Ours is ||b - A x_k|| / ||b|| of the iterates the core produces.
    true: list[float] = []
    po.solve(A, b, "gmres", rtol=0.0, restart=5, maxiter=5, M=M,
             callback=lambda xk: true.append(np.linalg.norm(b - A @ xk) / np.linalg.norm(b)))
    np.testing.assert_allclose(ours[1.0], true, rtol=1e-12)
    # The iterates differ from SciPy's left-preconditioned ones (both still converge).
    x_p, _ = pl.gmres(A, b, M=M, rtol=0.0, restart=5, maxiter=1)
    x_s, _ = sla.gmres(A, b, M=M, rtol=0.0, restart=5, maxiter=1)
    assert np.linalg.norm(x_p - x_s) > 1e-6 * np.linalg.norm(x_s)
    assert pl.gmres(A, b, M=M, rtol=1e-10)[1] == sla.gmres(A, b, M=M, rtol=1e-10)[1] == 0
    # One extra product per step for the residual callback.
    count = [0]

    def matvec(v: np.ndarray) -> np.ndarray:
        count[0] += 1
        return A @ v

    op = sla.LinearOperator(A.shape, matvec=matvec, dtype=A.dtype)
    pl.gmres(op, b, rtol=0.0, restart=5, maxiter=1)
    without = count[0]
    count[0] = 0
    pl.gmres(op, b, rtol=0.0, restart=5, maxiter=1, callback=lambda r: None,
             callback_type="pr_norm")
    assert count[0] == without + 5


_SYM_NONPD = np.array([[0, 0, 0, 0, 0, 1, -1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 2, 0, -1, 0, 0, 0],
                       [0, 0, 0, 0, 0, 2, 0, 0, -1, 0, 0], [0, 0, 0, 0, 0, 2, 0, 0, 0, -1, 0],
                       [0, 0, 0, 0, 0, 1, 0, 0, 0, 0, -1], [1, 2, 2, 2, 1, 0, 0, 0, 0, 0, 0],
                       [-1, 0, 0, 0, 0, 0, -1, 0, 0, 0, 0], [0, -1, 0, 0, 0, 0, 0, -1, 0, 0, 0],
                       [0, 0, -1, 0, 0, 0, 0, 0, -1, 0, 0], [0, 0, 0, -1, 0, 0, 0, 0, 0, -1, 0],
                       [0, 0, 0, 0, -1, 0, 0, 0, 0, 0, -1]], dtype=float)


def test_difference_2_negative_info_codes(caplog: pytest.LogCaptureFixture) -> None:
    """-1 breakdown, -2 NaN/inf; SciPy: -10/-11 (BiCGSTAB), > 0 (CG, GMRES), NaN in x."""
    b = np.zeros(11)
    b[5] = 1.0  # SciPy's "sym-nonpd" case: BiCGSTAB breaks down at once
    assert sla.bicgstab(_SYM_NONPD, b)[1] in (-10, -11)
    x, info = pl.bicgstab(_SYM_NONPD, b)
    assert info == -1 and np.isfinite(x).all()
    assert "broke down" in caplog.text  # logged, never silent

    indefinite = np.diag(np.r_[np.arange(1.0, 6.0), -np.arange(1.0, 6.0)])
    with np.errstate(all="ignore"):  # SciPy's CG divides by p.Ap = 0 here
        assert sla.cg(indefinite, np.ones(10))[1] > 0
    assert pl.cg(indefinite, np.ones(10))[1] == -1

    singular = np.array([[0.0, 1, 0], [1, 0, 0], [0, 0, 0]])  # SciPy's defective matrix
    assert sla.gmres(singular, np.array([1.0, 0, 1]), atol=0, rtol=1e-8)[1] > 0
    assert pl.gmres(singular, np.array([1.0, 0, 1]), atol=0, rtol=1e-8)[1] == -1

    A = poisson_1d(10)
    calls = [0]

    def matvec(v: np.ndarray) -> np.ndarray:  # NaN from the fourth product on
        calls[0] += 1
        return A @ v * (np.nan if calls[0] > 3 else 1.0)

    op = sla.LinearOperator(A.shape, matvec=matvec, dtype=np.float64)
    for name in SCIPY_NAMED:
        calls[0] = 0
        with np.errstate(all="ignore"):
            x_s, info_s = _quiet(getattr(sla, name), op, np.ones(10))
        calls[0] = 0
        x_p, info_p = _quiet(getattr(pl, name), op, np.ones(10))
        assert info_s > 0 and not np.isfinite(x_s).all()
        assert info_p == -2 and np.isfinite(x_p).all()


def test_difference_3_positive_info_counts_iterations_run() -> None:
    A, b = _problem("poisson_2d", np.float64)
    # maxiter=0 with an unconverged x0: SciPy's CG/BiCGSTAB claim success.
    for name in ("cg", "bicgstab"):
        assert getattr(sla, name)(A, b, maxiter=0)[1] == 0
    for name in SCIPY_NAMED:
        assert getattr(pl, name)(A, b, maxiter=0)[1] == 1
    # A tolerance float32 cannot resolve: SciPy's recursive residual claims convergence, the
    # true residual does not confirm it; ours ends early with info = iterations run.
    A32, b32 = A.astype(np.float32), b.astype(np.float32)
    x_s, info_s = sla.cg(A32, b32, rtol=1e-9)
    x_p, info_p = pl.cg(A32, b32, rtol=1e-9)
    assert info_s == 0 and _residual64(A, x_s, b32) > 1e-9 * np.linalg.norm(b32)
    assert 0 < info_p < 10 * b.size
    assert _residual64(A, x_p, b32) <= 2 * _residual64(A, x_s, b32)  # as good, reported honestly
    # Stagnation: GMRES(1) makes no progress on a rotation; ours stops after the window.
    rotation, e1 = np.array([[0.0, 1.0], [-1.0, 0.0]]), np.array([1.0, 0.0])
    assert sla.gmres(rotation, e1, restart=1, maxiter=3000)[1] == 3000
    info = pl.gmres(rotation, e1, restart=1, maxiter=10**6)[1]
    assert STAGNATION_WINDOW <= info <= STAGNATION_WINDOW + 1


@pytest.mark.parametrize("name", SCIPY_NAMED)
def test_difference_4_more_products_with_A(name: str) -> None:
    """An exact preconditioner: SciPy needs one product, the core a few more (r = b - A x0
    for x0 = 0, the true-residual check, BiCGSTAB's whole step)."""
    A, b = _problem("poisson_2d", np.float64)
    dense = A.toarray()
    counts = {}
    for label, fn in (("scipy", getattr(sla, name)), ("ours", getattr(pl, name))):
        count = [0]

        def matvec(v: np.ndarray, count: list[int] = count) -> np.ndarray:
            count[0] += 1
            return A @ v

        op = sla.LinearOperator(A.shape, matvec=matvec, dtype=A.dtype)
        M = sla.LinearOperator(A.shape, matvec=lambda v: np.linalg.solve(dense, v),
                               dtype=A.dtype)
        assert fn(op, b, x0=np.zeros(b.size), M=M, rtol=1e-8)[1] == 0
        counts[label] = count[0]
    assert counts["scipy"] <= 2
    assert 0 < counts["ours"] - counts["scipy"] <= 3


def test_difference_5_stricter_arguments() -> None:
    A, b = _problem("poisson_2d", np.float64)
    assert sla.cg(A, b, rtol=-1.0, atol=1e-3)[1] == 0  # SciPy accepts these
    assert sla.cg(A, b, rtol=np.nan, maxiter=3)[1] == 3
    with pytest.raises(ValueError, match="rtol must be a real number >= 0"):
        pl.cg(A, b, rtol=-1.0, atol=1e-3)
    with pytest.raises(ValueError, match="rtol"):
        pl.cg(A, b, rtol=np.nan)
    with pytest.raises(ValueError, match="atol"):
        pl.bicgstab(A, b, atol=np.nan)
    with pytest.raises(TypeError, match="maxiter"):
        pl.gmres(A, b, maxiter=2.5)
    with pytest.raises(ValueError, match="maxiter"):
        pl.cg(A, b, maxiter=-1)
    with pytest.raises(ValueError, match="x0 must be an array, None or the string 'Mb'"):
        pl.cg(A, b, x0="zeros")
    with pytest.raises(ValueError, match="restart"):
        pl.gmres(A, b, restart=0)
    with pytest.raises(TypeError, match="rtol"):
        pl.cg(A, b, rtol=None)


def test_difference_6_new_arrays() -> None:
    """x is always the caller's own new array, and callbacks get copies; SciPy returns b
    itself for b = 0 and hands its live iterate to the callback."""
    A, _ = _problem("poisson_2d", np.float64)
    zero = np.zeros(A.shape[0])
    assert np.shares_memory(sla.cg(A, zero)[0], zero)
    assert not np.shares_memory(pl.cg(A, zero)[0], zero)
    b = random_vector(A.shape[0])
    for name in ("cg", "bicgstab"):
        seen_s: list[Any] = []
        seen_p: list[Any] = []
        getattr(sla, name)(A, b, maxiter=2, callback=seen_s.append)
        x, _ = getattr(pl, name)(A, b, maxiter=2, callback=seen_p.append)
        assert seen_s[0] is seen_s[1]
        assert seen_p[0] is not seen_p[1] and not np.array_equal(seen_p[0], seen_p[1])
        np.testing.assert_array_equal(seen_p[1], x)
