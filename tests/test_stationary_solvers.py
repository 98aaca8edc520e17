"""Jacobi, SOR, Richardson and steepest descent: convergence, single steps against the
textbook formulas, failure reporting, bad input, and implicit / unrolled / no adjoints.

References are independent of the library: ``numpy.linalg.solve``, the component-wise
textbook sweeps written out densely here, and central finite differences of the K-step map.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from helpers import (
    BACKENDS,
    SOLVER_CASES,
    diagonally_dominant,
    poisson_1d,
    poisson_2d,
    random_vector,
    spd,
    to_backend,
    to_numpy,
    tolerance,
)

import prdp_ops as po

NAMES = ("jacobi", "sor", "richardson", "steepest_descent")
CASES = [c for c in SOLVER_CASES if c.name in NAMES]
cases = pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
# Each case without, and (where it takes one) with a preconditioner.
cases_and_preconditioning = pytest.mark.parametrize(
    "case,preconditioned",
    [(c, p) for c in CASES for p in (False, True) if c.preconditioner_ok or not p],
    ids=lambda v: v.id if hasattr(v, "id") else ("M" if v else "noM"),
)
backends = pytest.mark.parametrize("backend", BACKENDS)
N = 16


def _as_format(A: np.ndarray, fmt: str):
    return sp.csr_matrix(A) if fmt == "sparse" else A


def _preconditioner(A: np.ndarray, seed: int = 3) -> np.ndarray:
    """The inverse diagonal of A plus a small non-symmetric perturbation, so a missing
    transpose of M in a reverse sweep changes the result."""
    rng = np.random.default_rng(seed)
    n = A.shape[0]
    M = np.diag(1.0 / np.real(np.diag(A)))
    return (M + 0.02 * rng.uniform(-1, 1, (n, n)) / n).astype(A.dtype)


# -- convergence ----------------------------------------------------------------------------
@backends
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.complex128])
@cases
def test_converges_to_direct_solve(case, dtype, backend):
    A = case.matrix_for(N, dtype)
    b = random_vector(N, dtype=dtype)
    rtol = 1e-5 if dtype == np.float32 else 1e-10
    result = po.solve(to_backend(A, backend), to_backend(b, backend), case.name,
                      rtol=rtol, maxiter=5000, **case.options)
    x = to_numpy(result.x)
    assert result.converged and result.info == 0
    assert x.dtype == dtype
    exact = np.linalg.solve(A.astype(np.complex128), b.astype(np.complex128))
    true_residual = np.linalg.norm(b - A @ x) / np.linalg.norm(b)
    # The reported residual is the true one (up to rounding), and the error obeys the
    # perturbation bound ||x - x*|| / ||x*|| <= cond(A) ||r|| / ||b||.
    assert true_residual <= rtol * 1.01 + tolerance(dtype)
    error = np.linalg.norm(x - exact) / np.linalg.norm(exact)
    assert error <= np.linalg.cond(A) * (true_residual + np.finfo(dtype).eps * N)


@pytest.mark.parametrize("solver,options,matrix", [
    ("jacobi", {"omega": 2 / 3}, poisson_1d(40)),
    ("sor", {"omega": 1.5}, poisson_2d(8)),
    ("richardson", {"omega": 0.12}, poisson_2d(8)),
    ("steepest_descent", {}, poisson_2d(8)),
])
def test_converges_on_poisson(solver, options, matrix):
    b = random_vector(matrix.shape[0])
    result = po.solve(matrix, b, solver, rtol=1e-8, maxiter=20_000, **options)
    assert result.converged
    exact = np.linalg.solve(matrix.toarray(), b)
    assert np.linalg.norm(result.x - exact) <= 1e-8 * np.linalg.cond(matrix.toarray()) * (
        np.linalg.norm(exact))


def test_sor_overrelaxation_beats_gauss_seidel_on_poisson():
    # For the 2D Laplacian the optimal omega is 2 / (1 + sin(pi h)): far fewer sweeps.
    A, n = poisson_2d(12), 12
    b = random_vector(A.shape[0])
    omega_opt = 2 / (1 + np.sin(np.pi / (n + 1)))
    gs = po.solve(A, b, "sor", rtol=1e-8, maxiter=5000)
    sor = po.solve(A, b, "sor", rtol=1e-8, maxiter=5000, omega=omega_opt)
    assert gs.converged and sor.converged
    assert sor.iterations < gs.iterations / 4


# -- single steps against the textbook formulas ---------------------------------------------
def _jacobi_reference(A, b, x, omega):
    return x + omega * (b - A @ x) / np.diag(A)


def _sor_reference(A, b, x, omega):
    """One forward SOR sweep, component by component (Young's formula)."""
    x = x.copy()
    for i in range(len(b)):
        sigma = A[i, :i] @ x[:i] + A[i, i + 1:] @ x[i + 1:]
        x[i] = (1 - omega) * x[i] + omega * (b[i] - sigma) / A[i, i]
    return x


def _richardson_reference(A, b, x, omega, M=None):
    r = b - A @ x
    return x + omega * (r if M is None else M @ r)


def _steepest_descent_reference(A, b, x, M=None):
    r = b - A @ x
    z = r if M is None else M @ r
    return x + (np.vdot(r, z) / np.vdot(z, A @ z)) * z


def _reference_step(case, A, b, x, M=None):
    omega = case.options.get("omega", 1.0)
    if case.name == "jacobi":
        return _jacobi_reference(A, b, x, omega)
    if case.name == "sor":
        return _sor_reference(A, b, x, omega)
    if case.name == "richardson":
        return _richardson_reference(A, b, x, omega, M)
    return _steepest_descent_reference(A, b, x, M)


@backends
@pytest.mark.parametrize("fmt", ["dense", "sparse"])
@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
@cases_and_preconditioning
def test_steps_match_textbook_formula(case, preconditioned, dtype, fmt, backend):
    A = case.matrix_for(N, dtype)
    b, x0 = random_vector(N, dtype=dtype), random_vector(N, seed=5, dtype=dtype)
    M = _preconditioner(A) if preconditioned else None
    iterates = []
    result = po.solve(to_backend(_as_format(A, fmt), backend), to_backend(b, backend),
                      case.name, x0=to_backend(x0, backend), maxiter=3, rtol=0, atol=0,
                      M=None if M is None else to_backend(M, backend),
                      callback=lambda xk: iterates.append(to_numpy(xk)), **case.options)
    expected = x0
    for xk in iterates:
        expected = _reference_step(case, A, b, expected, M)
        np.testing.assert_allclose(xk, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_numpy(result.x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fmt", ["dense", "sparse"])
def test_gauss_seidel_is_sor_with_omega_one(fmt):
    A = diagonally_dominant(N, seed=2)
    b = random_vector(N)
    assert po.get_solver("sor").options["omega"] == 1.0
    result = po.solve(_as_format(A, fmt), b, "sor", maxiter=4, rtol=0, atol=0)
    # Gauss-Seidel in matrix form: (D + L) x' = b - U x.
    x = np.zeros(N)
    for _ in range(4):
        x = np.linalg.solve(np.tril(A), b - np.triu(A, 1) @ x)
    np.testing.assert_allclose(result.x, x, rtol=1e-12, atol=1e-12)


@cases
def test_exactly_k_iterations_with_zero_tolerances(case):
    A = case.matrix_for(N)
    b = random_vector(N)
    iterates = []
    result = po.solve(A, b, case.name, maxiter=7, rtol=0, atol=0,
                      callback=iterates.append, **case.options)
    assert result.iterations == 7 and len(iterates) == 7
    assert result.residual_norms.shape == (8,)
    assert not result.converged and result.status is po.Status.MAX_ITERATIONS
    # Each reported norm is that of the true residual b - A x_k of the iterate reached.
    true_norms = [np.linalg.norm(b - A @ x) for x in [np.zeros(N), *iterates]]
    np.testing.assert_allclose(result.residual_norms, true_norms, rtol=1e-9)


# -- failure and bad input -----------------------------------------------------------------
def _not_dominant(n=N):
    """A matrix for which Jacobi's iteration matrix has spectral radius far above 1."""
    rng = np.random.default_rng(7)
    return rng.uniform(-1, 1, (n, n)) + 0.3 * np.eye(n)


def test_jacobi_divergence_is_reported_not_silent():
    A, b = _not_dominant(), random_vector(N)
    radius = max(abs(np.linalg.eigvals(np.eye(N) - A / np.diag(A)[:, None])))
    assert radius > 1.5  # the premise: Jacobi diverges on this matrix
    short = po.solve(A, b, "jacobi", maxiter=20, on_failure="ignore")
    assert short.status is po.Status.MAX_ITERATIONS and not short.converged
    assert short.info == 20
    long = po.solve(A, b, "jacobi", maxiter=100_000, on_failure="ignore")
    assert long.status is po.Status.NONFINITE and long.info < 0
    assert np.all(np.isfinite(long.x))
    with pytest.raises(po.SolverError) as info:
        po.solve(A, b, "jacobi", maxiter=100_000, on_failure="raise")
    assert info.value.result.status is po.Status.NONFINITE


def test_sor_divergence_does_not_crash():
    # SOR with omega near 2 on a non-dominant, non-symmetric matrix blows up; the
    # triangular solve must not raise on the way (no finiteness check there).
    A, b = _not_dominant(), random_vector(N)
    result = po.solve(A, b, "sor", omega=1.9, maxiter=100_000, on_failure="ignore")
    assert result.status in (po.Status.NONFINITE, po.Status.MAX_ITERATIONS)
    assert not result.converged and np.all(np.isfinite(result.x))


def _matrix_free(A, **kwargs):
    return po.FunctionOperator(lambda v: A @ v, A.shape, rmatvec=lambda v: A.T @ v, **kwargs)


def test_sor_rejects_matrix_free_operator():
    A = diagonally_dominant(N)
    with pytest.raises(po.MatrixFreeError, match=r"sor.*jacobi|jacobi.*sor"):
        po.solve(_matrix_free(A), random_vector(N), "sor")


def test_jacobi_matrix_free_needs_a_diagonal():
    A, b = diagonally_dominant(N), random_vector(N)
    with pytest.raises(po.MatrixFreeError, match="diagonal"):
        po.solve(_matrix_free(A), b, "jacobi")
    free = po.solve(_matrix_free(A, diagonal=np.diag(A).copy()), b, "jacobi", maxiter=5,
                    rtol=0, atol=0)
    dense = po.solve(A, b, "jacobi", maxiter=5, rtol=0, atol=0)
    np.testing.assert_allclose(free.x, dense.x, rtol=1e-14)


@pytest.mark.parametrize("solver,omega,error", [
    ("jacobi", 0.0, ValueError), ("jacobi", -0.5, ValueError), ("jacobi", np.nan, ValueError),
    ("jacobi", "fast", TypeError), ("sor", 2.0, ValueError), ("sor", 0.0, ValueError),
    ("sor", 2.5, ValueError), ("sor", True, TypeError), ("richardson", 0.0, ValueError),
    ("richardson", np.inf, ValueError),
])
def test_bad_omega_is_refused_clearly(solver, omega, error):
    with pytest.raises(error, match=rf"{solver}.*omega"):
        po.solve(np.eye(3), np.ones(3), solver, omega=omega)


@pytest.mark.parametrize("solver", ["jacobi", "sor"])
@pytest.mark.parametrize("fmt", ["dense", "sparse"])
def test_zero_diagonal_is_refused_clearly(solver, fmt):
    A = diagonally_dominant(N)
    A[3, 3] = 0.0
    with pytest.raises(ValueError, match=r"zero diagonal.*index 3"):
        po.solve(_as_format(A, fmt), random_vector(N), solver)


def test_steepest_descent_breakdown_is_reported():
    # Indefinite A with b along a negative eigenvector: <r, A r> < 0 at the first step.
    A = np.diag([1.0, -1.0, 2.0])
    result = po.solve(A, np.array([0.0, 1.0, 0.0]), "steepest_descent", on_failure="ignore")
    assert result.status is po.Status.BREAKDOWN and result.info < 0
    assert np.all(np.isfinite(result.x))
    with pytest.raises(po.SolverError):
        po.solve(A, np.array([0.0, 1.0, 0.0]), "steepest_descent", on_failure="raise")


def test_steepest_descent_zero_denominator_gives_no_nan():
    A = spd(4)
    # r = 0 exactly: <z, A z> = 0 is the converged case, not a breakdown.
    result = po.solve(A, np.zeros(4), "steepest_descent", maxiter=3, rtol=0, atol=0,
                      on_failure="raise")
    assert result.converged and not np.any(result.x)
    # r != 0 but z = M r = 0 (a singular preconditioner): a breakdown, still no NaN.
    result = po.solve(A, random_vector(4), "steepest_descent", M=np.zeros((4, 4)),
                      maxiter=3, rtol=0, atol=0, on_failure="ignore")
    assert result.status is po.Status.BREAKDOWN
    assert np.all(np.isfinite(result.x)) and np.all(np.isfinite(result.residual_norms))


# -- adjoints -------------------------------------------------------------------------------
def _implicit_reference(A, b, x_bar):
    x = np.linalg.solve(A, b)
    b_bar = np.linalg.solve(A.T, x_bar)
    return b_bar, -np.outer(b_bar, x)


@pytest.mark.parametrize("fmt", ["dense", "sparse"])
@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
@cases
def test_implicit_gradients_match_direct_solve(case, dtype, fmt):
    A = case.matrix_for(N, dtype)
    b, x_bar = random_vector(N, dtype=dtype), random_vector(N, seed=9, dtype=dtype)
    result, vjp = po.solve_vjp(_as_format(A, fmt), b, case.name, adjoint="implicit",
                               rtol=1e-12, maxiter=20_000, **case.options)
    assert result.converged
    cot = vjp(x_bar)
    b_bar, A_bar = _implicit_reference(A, b, x_bar)
    np.testing.assert_allclose(cot.b, b_bar, rtol=1e-8, atol=1e-10)
    if fmt == "sparse":
        assert sp.issparse(cot.A)
        A_bar = np.where(A != 0, A_bar, 0)  # the cotangent keeps A's pattern
        cot_A = cot.A.toarray()
    else:
        cot_A = cot.A
    np.testing.assert_allclose(cot_A, A_bar, rtol=1e-8, atol=1e-10)


K = 5
H = 1e-6


def _k_step_map(case, A_format, M):
    def run(b, A):
        return po.solve(A_format(A), b, case.name, maxiter=K, rtol=0, atol=0, M=M,
                        **case.options).x
    return run


def _pair(u, v):
    """The pairing under which JAX-convention cotangents are transposes: Re(sum(u v))."""
    return np.real(np.sum(u * v))


def _directions(A, rng, complex_data):
    """Directions in A's space: one per part of the splitting D + L + U, on A's pattern."""
    n = A.shape[0]
    dA = rng.standard_normal((n, n)) + (1j * rng.standard_normal((n, n)) if complex_data else 0)
    dA = np.where(A != 0, dA, 0)
    return {"diagonal": np.diag(np.diag(dA)), "strict_lower": np.tril(dA, -1),
            "strict_upper": np.triu(dA, 1)}


@pytest.mark.parametrize("fmt", ["dense", "sparse"])
@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
@cases_and_preconditioning
def test_unrolled_gradients_match_finite_differences(case, preconditioned, dtype, fmt):
    complex_data = dtype == np.complex128
    A = case.matrix_for(N, dtype)
    if fmt == "sparse":  # a genuinely sparse pattern
        A = np.where(np.abs(np.subtract.outer(np.arange(N), np.arange(N))) <= 2, A, 0)
    b, x_bar = random_vector(N, dtype=dtype), random_vector(N, seed=9, dtype=dtype)
    M = _preconditioner(A) if preconditioned else None
    A_format = sp.csr_matrix if fmt == "sparse" else np.asarray

    result, vjp = po.solve_vjp(A_format(A), b, case.name, adjoint="unrolled", maxiter=K,
                               rtol=0, atol=0, M=M, **case.options)
    assert result.iterations == K
    cot = vjp(x_bar)
    cot_A = cot.A.toarray() if fmt == "sparse" else cot.A
    run = _k_step_map(case, A_format, M)

    def check(derivative_fd, derivative_vjp):
        assert abs(derivative_vjp - derivative_fd) <= 1e-6 * max(abs(derivative_fd), 1e-3)

    rng = np.random.default_rng(11)
    db = random_vector(N, seed=12, dtype=dtype)
    fd = _pair(x_bar, run(b + H * db, A) - run(b - H * db, A)) / (2 * H)
    check(fd, _pair(cot.b, db))
    for part, dA in _directions(A, rng, complex_data).items():
        fd = _pair(x_bar, run(b, A + H * dA) - run(b, A - H * dA)) / (2 * H)
        assert fd != 0 or part == "strict_upper", part
        check(fd, _pair(cot_A, dA))


@pytest.mark.parametrize("adjoint", ["implicit", "unrolled"])
@cases
def test_gradient_of_a_loss_matches_finite_differences(case, adjoint):
    # End to end: d/db of 0.5 ||x(b)||^2 against finite differences along every axis.
    A, b = case.matrix_for(6), random_vector(6)
    kwargs = dict(maxiter=K, rtol=0, atol=0) if adjoint == "unrolled" else dict(
        rtol=1e-12, maxiter=20_000)
    result, vjp = po.solve_vjp(A, b, case.name, adjoint=adjoint, **kwargs, **case.options)
    grad = vjp(result.x).b

    def loss(bb):
        return 0.5 * np.sum(po.solve(A, bb, case.name, **kwargs, **case.options).x ** 2)

    fd = [(loss(b + H * e) - loss(b - H * e)) / (2 * H) for e in np.eye(6)]
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)


@pytest.fixture
def jax_x64():
    """jax with 64-bit floats for the duration of one test."""
    jax = pytest.importorskip("jax")
    pytest.importorskip("prdp_ops.backends.jax")
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield jax
    jax.config.update("jax_enable_x64", previous)


@pytest.mark.parametrize("fmt", ["dense", "bcoo"])
@cases
def test_unrolled_reverse_sweep_equals_jax_autodiff(case, fmt, jax_x64):
    # The same init/step code traced by jax.jit and differentiated by jax.vjp is an
    # independent reference for the hand-derived NumPy reverse sweep (cotangents of b and
    # of every entry of A, JAX's convention on both sides).
    jax, jnp = jax_x64, jax_x64.numpy
    from jax.experimental import sparse as jsparse
    from prdp_ops.backends import get_ops

    ops, solver = get_ops("jax"), po.get_solver(case.name, **case.options)
    A, b, x_bar = case.matrix_for(N), random_vector(N), random_vector(N, seed=9)

    def operator(matrix):
        if fmt == "dense":
            return po.aslinearoperator(matrix)
        return po.aslinearoperator(jsparse.BCOO.fromdense(matrix, nse=N * N))

    @jax.jit
    def k_steps(matrix, rhs):
        op = operator(matrix)
        state = solver.init(ops, op, rhs, jnp.zeros_like(rhs), None)
        for _ in range(K):
            state = solver.step(ops, op, rhs, state, None)
        return state["x"]

    x, pullback = jax.vjp(k_steps, jnp.asarray(A), jnp.asarray(b))
    A_bar, b_bar = pullback(jnp.asarray(x_bar))
    result, vjp = po.solve_vjp(A, b, case.name, adjoint="unrolled", maxiter=K, rtol=0, atol=0,
                               **case.options)
    cot = vjp(x_bar)
    np.testing.assert_allclose(result.x, np.asarray(x), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(cot.b, np.asarray(b_bar), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(cot.A, np.asarray(A_bar), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("fmt", ["dense", "sparse"])
@cases
def test_adjoint_none_gives_zero_cotangents(case, fmt):
    A, b = case.matrix_for(N), random_vector(N)
    _, vjp = po.solve_vjp(_as_format(A, fmt), b, case.name, adjoint="none", maxiter=5,
                          **case.options)
    cot = vjp(random_vector(N, seed=4))
    assert cot.b.shape == b.shape and not np.any(cot.b)
    cot_A = cot.A.toarray() if fmt == "sparse" else cot.A
    assert cot_A.shape == A.shape and not np.any(cot_A)


def test_stationary_reverse_sweep_keeps_only_the_iterates():
    # The tape of a stationary method holds references to the iterates and to the map P
    # prepared once per solve, nothing computed per step.
    solver = po.get_solver("sor", omega=1.3)
    ops = po.aslinearoperator(diagonally_dominant(N)).ops
    P = object()
    before = {"x": np.zeros(N), "r": np.ones(N), "P": P}
    after = {"x": np.ones(N), "r": np.zeros(N), "P": P}
    record = solver.record(ops, None, None, None, before, after)
    assert len(record) == 3
    assert record[0] is before["x"] and record[1] is after["x"] and record[2] is P
