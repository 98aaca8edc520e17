"""BiCGSTAB and GMRES: convergence, SciPy parity, the GMRES minimal-residual property,
iteration counting, breakdown, and implicit / unrolled / no adjoints.

References are independent of the library: ``scipy.sparse.linalg.spsolve`` and
``numpy.linalg.solve``, SciPy's ``bicgstab`` and ``gmres``, a dense least-squares solve over
an explicitly built Krylov basis, central finite differences of the K-step map, and JAX's
automatic differentiation of the very same ``init``/``step`` code run under ``jax.jit``.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from helpers import (
    BACKENDS,
    DTYPES,
    SOLVER_CASES,
    agree_tol,
    assert_agree,
    convection_diffusion_2d,
    poisson_2d,
    random_vector,
    to_backend,
    to_numpy,
    tolerance,
)
from prdp_ops.backends.numpy import run_solver, unrolled_vjp

import prdp_ops as po
from prdp_ops._array_ops import ArrayOps, NumpyOps

CASES = [c for c in SOLVER_CASES if c.name in ("bicgstab", "gmres")]
cases = pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
backends = pytest.mark.parametrize("backend", BACKENDS)
H = 1e-6  # finite-difference step


def _nonsymmetric(grid: int, dtype) -> sp.csr_matrix:
    """Convection-diffusion on a ``grid x grid`` mesh; for complex dtypes a complex shift
    makes the matrix genuinely complex (and non-Hermitian)."""
    A = convection_diffusion_2d(grid, peclet=0.8)
    if np.issubdtype(dtype, np.complexfloating):
        A = A + 0.5j * sp.identity(A.shape[0])
    return A.astype(dtype).tocsr()


def _preconditioner(A, seed: int = 3) -> np.ndarray:
    """The inverse diagonal of A plus a small non-symmetric perturbation, so a missing
    transpose of M in a reverse sweep changes the result."""
    A = A.toarray() if sp.issparse(A) else A
    rng = np.random.default_rng(seed)
    n = A.shape[0]
    M = np.diag(1.0 / np.diag(A))
    return (M + 0.02 * rng.uniform(-1, 1, (n, n)) / n).astype(A.dtype)


def _pair(u, v):
    """The pairing under which JAX-convention cotangents are transposes: Re(sum(u v))."""
    return np.real(np.sum(u * v))


# -- convergence ------------------------------------------------------------------------------
@backends
@pytest.mark.parametrize("dtype", DTYPES)
@cases
def test_converges_to_direct_solve(case, dtype, backend):
    A = _nonsymmetric(6, dtype)
    n = A.shape[0]
    b = random_vector(n, dtype=dtype)
    rtol = 1e-5 if dtype == np.float32 else 1e-10
    result = po.solve(to_backend(A, backend), to_backend(b, backend), case.name, rtol=rtol,
                      **case.options)
    x = to_numpy(result.x)
    assert result.converged and result.info == 0 and x.dtype == dtype
    exact = spla.spsolve(A.astype(np.complex128).tocsc(), b.astype(np.complex128))
    true_residual = np.linalg.norm(b - A @ x) / np.linalg.norm(b)
    assert true_residual <= rtol * 1.01 + tolerance(dtype)
    # The reported residual is the true one, up to rounding.
    assert abs(result.residual_norms[-1] / np.linalg.norm(b) - true_residual) <= (
        10 * tolerance(dtype))
    cond = np.linalg.cond(A.toarray())
    error = np.linalg.norm(x - exact) / np.linalg.norm(exact)
    assert error <= cond * (true_residual + np.finfo(dtype).eps * n)


@pytest.mark.parametrize("preconditioned", [False, True])
@pytest.mark.parametrize("matrix", ["poisson", "convection_diffusion"])
@cases
def test_converges_on_standard_problems(case, matrix, preconditioned):
    A = poisson_2d(10) if matrix == "poisson" else convection_diffusion_2d(10, peclet=1.5)
    n = A.shape[0]
    # A row scaling makes the inverse-diagonal preconditioner matter.
    A = (sp.diags(np.linspace(1.0, 50.0, n)) @ A).tocsr()
    b = random_vector(n)
    M = sp.diags(1.0 / A.diagonal()) if preconditioned else None
    result = po.solve(A, b, case.name, rtol=1e-10, M=M, maxiter=5000, **case.options)
    assert result.converged
    exact = spla.spsolve(A.tocsc(), b)
    np.testing.assert_allclose(result.x, exact, rtol=1e-6, atol=1e-8 * np.abs(exact).max())
    if preconditioned:
        plain = po.solve(A, b, case.name, rtol=1e-10, maxiter=5000, **case.options)
        assert result.iterations < plain.iterations


# -- SciPy parity -----------------------------------------------------------------------------
@pytest.mark.parametrize("preconditioned", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
def test_bicgstab_matches_scipy_iterate_for_iterate(dtype, preconditioned):
    A = _nonsymmetric(5, dtype)
    n = A.shape[0]
    b = random_vector(n, dtype=dtype)
    M = _preconditioner(A) if preconditioned else None
    K = 12
    ours, theirs = [], []
    po.solve(A, b, "bicgstab", rtol=0, atol=0, maxiter=K, M=M,
             callback=lambda xk: ours.append(np.copy(xk)))
    spla.bicgstab(A, b, rtol=0, atol=0, maxiter=K, M=M,
                  callback=lambda xk: theirs.append(np.copy(xk)))
    assert len(ours) == len(theirs) == K
    # Not the same operations throughout (bit-identical for float64 here, not for complex):
    # iterate k agrees to eps cond k
    cond = np.linalg.cond(A.toarray() if M is None else A.toarray() @ M)
    for k, (mine, ref) in enumerate(zip(ours, theirs, strict=True)):
        assert_agree(mine, ref, agree_tol(dtype, cond, k + 1), err_msg=f"iterate {k + 1}")


@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
def test_gmres_matches_scipy_cycle_for_cycle(dtype):
    # SciPy's maxiter counts restart cycles; after c cycles both must hold the same iterate.
    # (Without M only: SciPy preconditions on the left, we on the right.)
    A = _nonsymmetric(5, dtype)
    n = A.shape[0]
    b = random_vector(n, dtype=dtype)
    restart = 4
    for cycles in (1, 2, 3):
        ours = po.solve(A, b, "gmres", restart=restart, rtol=0, atol=0,
                        maxiter=cycles * restart).x
        theirs, _ = spla.gmres(A, b, restart=restart, rtol=0, atol=0, maxiter=cycles)
        # SciPy's GMRES is its own code (other operations, other order): eps cond k after
        # k = cycles * restart steps
        assert_agree(ours, theirs, agree_tol(dtype, np.linalg.cond(A.toarray()),
                                             cycles * restart))


def test_gmres_full_memory_counts_like_scipy():
    # With restart >= n there is a single cycle; SciPy's inner iterations (one "pr_norm"
    # callback each) are Arnoldi steps, exactly what we count.
    A = convection_diffusion_2d(8, peclet=1.0)
    n = A.shape[0]
    b = random_vector(n)
    ours = po.solve(A, b, "gmres", restart=n, rtol=1e-10)
    inner = []
    theirs, info = spla.gmres(A, b, restart=n, rtol=1e-10, callback=inner.append,
                              callback_type="pr_norm")
    assert ours.converged and info == 0
    assert abs(ours.iterations - len(inner)) <= 1
    np.testing.assert_allclose(ours.x, theirs, rtol=1e-7, atol=1e-9 * np.abs(theirs).max())


@pytest.mark.parametrize("restart", [5, 20])
def test_preconditioned_gmres_agrees_with_scipy_at_convergence(restart):
    A = (sp.diags(np.linspace(1.0, 20.0, 64)) @ convection_diffusion_2d(8, peclet=1.0)).tocsr()
    b = random_vector(A.shape[0])
    M = _preconditioner(A)
    ours = po.solve(A, b, "gmres", restart=restart, rtol=1e-11, M=M)
    theirs, info = spla.gmres(A, b, restart=restart, rtol=1e-11, M=M, maxiter=1000)
    assert ours.converged and info == 0
    np.testing.assert_allclose(ours.x, theirs, rtol=1e-7, atol=1e-9 * np.abs(theirs).max())


@pytest.mark.parametrize("preconditioned", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
def test_gmres_iterate_minimises_residual_over_krylov_space(dtype, preconditioned):
    # x_k = x_0 + M u with u in span{r0, (AM) r0, ..., (AM)^{k-1} r0} minimising ||b - A x||:
    # checked at every step of a cycle, mid-cycle included, against a dense least squares.
    A = _nonsymmetric(5, dtype).toarray()
    n = A.shape[0]
    b = random_vector(n, dtype=dtype)
    x0 = random_vector(n, seed=5, dtype=dtype)
    M = _preconditioner(A) if preconditioned else np.eye(n, dtype=dtype)
    restart = 8
    iterates = []
    po.solve(A, b, "gmres", restart=restart, x0=x0, rtol=0, atol=0, maxiter=restart,
             M=M if preconditioned else None, callback=lambda xk: iterates.append(xk))
    AM, r0 = A @ M, b - A @ x0
    krylov = [r0 / np.linalg.norm(r0)]
    for k, x in enumerate(iterates, start=1):
        basis, _ = np.linalg.qr(np.stack(krylov, axis=1))
        coefficients = np.linalg.lstsq(AM @ basis, r0, rcond=None)[0]
        reference = x0 + M @ (basis @ coefficients)
        np.testing.assert_allclose(x, reference, rtol=1e-8, atol=1e-10, err_msg=f"step {k}")
        krylov.append(AM @ krylov[-1] / np.linalg.norm(AM @ krylov[-1]))


@pytest.mark.parametrize("solver,options", [("bicgstab", {}), ("gmres", {"restart": 4})])
def test_reported_residuals_are_true_residuals(solver, options):
    A = convection_diffusion_2d(5, peclet=1.0)
    b = random_vector(A.shape[0])
    M = _preconditioner(A)
    iterates = []
    result = po.solve(A, b, solver, rtol=0, atol=0, maxiter=14, M=M,
                      callback=lambda xk: iterates.append(xk), **options)
    true = [np.linalg.norm(b - A @ x) for x in iterates]
    # Updated recursively, the residual drifts from the true one by rounding, O(eps ||b||).
    np.testing.assert_allclose(result.residual_norms[1:], true, rtol=1e-8,
                               atol=1e-13 * np.linalg.norm(b))
    assert result.residual_norms[0] == pytest.approx(np.linalg.norm(b))


# -- iteration counting -----------------------------------------------------------------------
@pytest.mark.parametrize("K", [1, 4, 7, 13])
@cases
def test_exactly_k_iterations_with_zero_tolerances(case, K):
    A = convection_diffusion_2d(5)
    b = random_vector(A.shape[0])
    result = po.solve(A, b, case.name, rtol=0, atol=0, maxiter=K, **case.options)
    assert result.iterations == K and len(result.residual_norms) == K + 1
    assert result.status is po.Status.MAX_ITERATIONS and not result.converged


@pytest.mark.parametrize("K", [1, 5, 6, 11, 17])
def test_gmres_iterations_are_matvecs_across_restarts(K):
    A = convection_diffusion_2d(5).toarray()
    n = A.shape[0]
    calls = []

    def matvec(x):
        calls.append(1)
        return A @ x

    op = po.FunctionOperator(matvec, n, rmatvec=lambda y: A.T @ y)
    restart = 5
    result = po.solve(op, random_vector(n), "gmres", restart=restart, rtol=0, atol=0,
                      maxiter=K)
    assert result.iterations == K
    # One product for the initial residual, one per Arnoldi step, one per restart.
    assert len(calls) == 1 + K + (K - 1) // restart


def test_bicgstab_takes_two_matvecs_per_iteration():
    A = convection_diffusion_2d(5).toarray()
    n = A.shape[0]
    calls = []

    def matvec(x):
        calls.append(1)
        return A @ x

    po.solve(po.FunctionOperator(matvec, n), random_vector(n), "bicgstab", rtol=0, atol=0,
             maxiter=6)
    assert len(calls) == 1 + 2 * 6


def _arnoldi_run(A: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray, list[bool]]:
    """One GMRES cycle of ``steps`` Arnoldi steps on NumPy: the basis, the Hessenberg matrix,
    and for each step whether the second Gram-Schmidt pass ran."""
    solver, op = po.GMRES(restart=steps), po.aslinearoperator(A)
    b = random_vector(A.shape[0], seed=2)
    state = solver.init(op.ops, op, b, np.zeros_like(b), None)
    second = []
    for _ in range(steps):
        state = solver.step(op.ops, op, b, state, None)
        second.append(state["arnoldi"].h2 is not None)
    return state["V"][: steps + 1], state["H"][: steps + 1, :steps], second


@pytest.mark.parametrize("case", ["ill_conditioned", "random"])
def test_gmres_conditional_reorthogonalisation_keeps_the_basis_orthonormal(case):
    # NumPy's Gram-Schmidt makes its second pass only when the first cancelled more than a
    # factor sqrt(2) of ||A v_j|| (DGKS). The basis must stay orthonormal to rounding as
    # with two passes always, and the Arnoldi relation A V_k = V_{k+1} H_k must hold, checked
    # against dense products. On a nonsymmetric A of condition 1e10 the second pass must
    # run (a nearly invariant Krylov space cancels most of w); on a random A of unit scale
    # (w mostly new) it must be skipped at some steps.
    rng = np.random.default_rng(0)
    n, steps = 80, 40
    if case == "ill_conditioned":
        U, _ = np.linalg.qr(rng.standard_normal((n, n)))
        W, _ = np.linalg.qr(rng.standard_normal((n, n)))
        A = U @ np.diag(np.logspace(0, -10, n)) @ W.T
        assert np.linalg.cond(A) > 1e9
    else:
        A = rng.standard_normal((n, n)) / np.sqrt(n)
    V, H, second = _arnoldi_run(A, steps)
    eps = np.finfo(np.float64).eps
    assert np.linalg.norm(V @ V.T - np.eye(steps + 1), 2) <= 10 * steps * eps
    residual = np.linalg.norm(A @ V[:steps].T - V.T @ H, 2)
    assert residual <= 10 * steps * eps * np.linalg.norm(A, 2)
    if case == "ill_conditioned":
        assert sum(second) >= steps // 2, second
    else:
        assert 0 < sum(second) < steps and not all(second), second
    # The skipped passes cost no accuracy: one cycle's iterate equals the dense minimiser
    # of ||b - A x|| over the same Krylov space, to eps cond.
    b = random_vector(n, seed=2)
    x = po.solve(A, b, "gmres", restart=steps, rtol=0, atol=0, maxiter=steps).x
    y = np.linalg.lstsq(A @ V[:steps].T, b, rcond=None)[0]
    reference = V[:steps].T @ y
    scale = np.linalg.norm(reference)
    assert np.linalg.norm(x - reference) <= 1e3 * eps * np.linalg.cond(A @ V[:steps].T) * scale


@pytest.mark.parametrize("case", ["ill_conditioned", "random"])
def test_gmres_unrolled_gradient_with_conditional_passes_matches_finite_differences(case):
    # Steps that made one Gram-Schmidt pass (random A) and steps that made two (an
    # ill-conditioned A) are reversed alike, as the projection they compute: the unrolled
    # cotangents of b and A against central differences of the K-step map, over two cycles.
    rng = np.random.default_rng(1)
    n = 30
    if case == "ill_conditioned":
        U, _ = np.linalg.qr(rng.standard_normal((n, n)))
        W, _ = np.linalg.qr(rng.standard_normal((n, n)))
        A = U @ np.diag(np.logspace(0, -4, n)) @ W.T
    else:
        A = rng.standard_normal((n, n)) / np.sqrt(n)
    _, _, second = _arnoldi_run(A, 12)
    assert (sum(second) >= 6) if case == "ill_conditioned" else (sum(second) < 12)
    b, x_bar = random_vector(n, seed=3), random_vector(n, seed=4)
    options = {"restart": 12, "rtol": 0, "atol": 0, "maxiter": 24}
    _, vjp = po.solve_vjp(A, b, "gmres", adjoint="unrolled", **options)
    cot = vjp(x_bar)

    def run(b, A):
        return po.solve(A, b, "gmres", **options).x

    for seed in (5, 6):
        db = random_vector(n, seed=seed)
        dA = np.random.default_rng(seed).standard_normal((n, n))
        for fd, derivative in (
                (_pair(x_bar, run(b + H * db, A) - run(b - H * db, A)) / (2 * H),
                 _pair(cot.b, db)),
                (_pair(x_bar, run(b, A + H * dA) - run(b, A - H * dA)) / (2 * H),
                 _pair(cot.A, dA))):
            assert abs(derivative - fd) <= 1e-6 * max(abs(fd), 1e-3), (fd, derivative)


def test_gmres_cycle_is_capped_at_n_and_exact_after_n_steps():
    A = _nonsymmetric(4, np.float64)
    n = A.shape[0]
    b = random_vector(n)
    solver = po.GMRES(restart=50)
    op = po.aslinearoperator(A)
    state = solver.init(op.ops, op, b, np.zeros(n), None)
    assert state["V"].shape == (n + 1, n)  # min(restart, n) + 1 basis vectors
    exact = spla.spsolve(A.tocsc(), b)
    for K in (n, 3 * n + 2):  # a full Krylov space, then past two restarts
        result = po.solve(A, b, solver, rtol=0, atol=0, maxiter=K)
        assert result.iterations == K
        np.testing.assert_allclose(result.x, exact, rtol=1e-9, atol=1e-12)


# -- breakdown and degenerate cases -----------------------------------------------------------
def test_bicgstab_breakdown_is_reported_without_nan():
    # A swaps the two components: v = A r0 is orthogonal to r_hat = r0, so <r_hat, v> = 0.
    A = np.array([[0.0, 1.0], [1.0, 0.0]])
    b = np.array([1.0, 0.0])
    result = po.solve(A, b, "bicgstab", on_failure="ignore")
    assert result.status is po.Status.BREAKDOWN and result.info < 0 and not result.converged
    assert np.all(np.isfinite(result.x))
    with pytest.raises(po.SolverError):
        po.solve(A, b, "bicgstab", on_failure="raise")


def test_gmres_breakdown_on_singular_operator_is_reported_without_nan():
    # A e_0 = 0: the first Hessenberg column is zero, R_00 = 0 while the residual is not.
    A = np.diag([0.0, 1.0, 2.0])
    b = np.array([1.0, 0.0, 0.0])
    result = po.solve(A, b, "gmres", restart=3, on_failure="ignore")
    assert result.status is po.Status.BREAKDOWN and not result.converged
    assert np.all(np.isfinite(result.x))


@pytest.mark.parametrize("solver", ["gmres", "bicgstab"])
def test_exact_solution_gives_no_nan(solver):
    # b is an eigenvector: GMRES has a happy breakdown (h_10 = 0) after one step and
    # BiCGSTAB's residual is exactly zero; running on with zero tolerances stays finite.
    A = np.diag([2.0, 3.0, 5.0, 7.0])
    b = np.array([1.0, 0.0, 0.0, 0.0])
    result = po.solve(A, b, solver, rtol=0, atol=0, maxiter=6, on_failure="raise")
    assert result.status is po.Status.CONVERGED and result.iterations == 6
    np.testing.assert_array_equal(result.x, b / 2)
    assert np.all(result.residual_norms[1:] == 0)
    _, vjp = po.solve_vjp(A, b, solver, adjoint="unrolled", rtol=0, atol=0, maxiter=6)
    cot = vjp(np.ones(4))
    assert np.all(np.isfinite(cot.b)) and np.all(np.isfinite(cot.A))


def test_zero_right_hand_side_converges_at_once():
    A = convection_diffusion_2d(3)
    for solver in ("gmres", "bicgstab"):
        result = po.solve(A, np.zeros(A.shape[0]), solver)
        assert result.converged and result.iterations == 0 and not np.any(result.x)


# -- options ----------------------------------------------------------------------------------
@pytest.mark.parametrize("restart,error", [(0, ValueError), (-3, ValueError),
                                           (2.5, TypeError), (True, TypeError),
                                           ("20", TypeError)])
def test_bad_restart_is_refused_clearly(restart, error):
    with pytest.raises(error, match="restart"):
        po.get_solver("gmres", restart=restart)
    with pytest.raises(error, match="restart"):
        po.solve(np.eye(3), np.ones(3), "gmres", restart=restart)


def test_gmres_options_identify_the_solver():
    assert po.get_solver("gmres") == po.GMRES(restart=20)
    assert po.GMRES(restart=5) != po.GMRES(restart=6)
    assert hash(po.GMRES(restart=5)) == hash(po.GMRES(restart=5))


# -- implicit adjoint -------------------------------------------------------------------------
@pytest.mark.parametrize("preconditioned", [False, True])
@pytest.mark.parametrize("fmt", ["dense", "sparse"])
@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
@cases
def test_implicit_gradients_match_direct_solve(case, dtype, fmt, preconditioned):
    A_sparse = _nonsymmetric(5, dtype)
    A = A_sparse.toarray()
    n = A.shape[0]
    b, x_bar = random_vector(n, dtype=dtype), random_vector(n, seed=9, dtype=dtype)
    M = _preconditioner(A) if preconditioned else None
    result, vjp = po.solve_vjp(A_sparse if fmt == "sparse" else A, b, case.name,
                               adjoint="implicit", rtol=1e-12, M=M, **case.options)
    assert result.converged
    cot = vjp(x_bar)
    assert cot.adjoint_result.converged
    x = np.linalg.solve(A, b)
    b_bar = np.linalg.solve(A.T, x_bar)
    A_bar = -np.outer(b_bar, x)
    np.testing.assert_allclose(cot.b, b_bar, rtol=1e-8, atol=1e-10)
    if fmt == "sparse":
        assert sp.issparse(cot.A)
        A_bar = np.where(A != 0, A_bar, 0)  # the cotangent keeps A's pattern
        cot_A = cot.A.toarray()
    else:
        cot_A = cot.A
    np.testing.assert_allclose(cot_A, A_bar, rtol=1e-8, atol=1e-10)


# -- unrolled adjoint -------------------------------------------------------------------------
UNROLLED = [
    ("bicgstab", {}, 1), ("bicgstab", {}, 4), ("bicgstab", {}, 9),
    # restart 4: K = 3 ends mid-cycle, 4 at a cycle's end, 10 after two restarts, 13
    # exactly at the end of the fourth cycle (one step before a restart).
    ("gmres", {"restart": 4}, 3), ("gmres", {"restart": 4}, 4),
    ("gmres", {"restart": 4}, 10), ("gmres", {"restart": 3}, 12),
    ("gmres", {"restart": 20}, 9),
]


@pytest.mark.parametrize("preconditioned", [False, True])
@pytest.mark.parametrize("fmt", ["dense", "sparse"])
@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
@pytest.mark.parametrize("solver,options,K", UNROLLED, ids=lambda v: str(v))
def test_unrolled_gradients_match_finite_differences(solver, options, K, dtype, fmt,
                                                      preconditioned):
    A_sparse = _nonsymmetric(4, dtype)
    A = A_sparse.toarray()
    n = A.shape[0]
    A_format = sp.csr_matrix if fmt == "sparse" else np.asarray
    b, x_bar = random_vector(n, dtype=dtype), random_vector(n, seed=9, dtype=dtype)
    x0 = random_vector(n, seed=6, dtype=dtype) * 0.1
    M = _preconditioner(A) if preconditioned else None

    def run(b, A):
        return po.solve(A_format(A), b, solver, x0=x0, maxiter=K, rtol=0, atol=0, M=M,
                        **options).x

    result, vjp = po.solve_vjp(A_format(A), b, solver, adjoint="unrolled", x0=x0, maxiter=K,
                               rtol=0, atol=0, M=M, **options)
    assert result.iterations == K
    cot = vjp(x_bar)
    cot_A = cot.A.toarray() if fmt == "sparse" else cot.A
    if fmt == "sparse":
        assert sp.issparse(cot.A) and np.all(cot_A[A == 0] == 0)

    def check(fd, derivative):
        assert abs(derivative - fd) <= 1e-6 * max(abs(fd), 1e-3), (fd, derivative)

    rng = np.random.default_rng(11)
    complex_data = dtype == np.complex128
    for seed in (12, 13):
        db = random_vector(n, seed=seed, dtype=dtype)
        check(_pair(x_bar, run(b + H * db, A) - run(b - H * db, A)) / (2 * H), _pair(cot.b, db))
        dA = rng.standard_normal((n, n)) + (1j * rng.standard_normal((n, n))
                                            if complex_data else 0)
        dA = np.where(A != 0, dA, 0) if fmt == "sparse" else dA
        check(_pair(x_bar, run(b, A + H * dA) - run(b, A - H * dA)) / (2 * H), _pair(cot_A, dA))


def test_gmres_tape_keeps_one_vector_per_step_and_one_basis_per_cycle():
    # Memory O(K n): every step keeps w = A v_j and a reference to its cycle's basis; only
    # the steps that began with a restart keep the finished cycle's state.
    A = convection_diffusion_2d(4)
    b = random_vector(A.shape[0])
    problem_solver = po.GMRES(restart=4)
    ops = po.aslinearoperator(A).ops
    Aop = po.aslinearoperator(A)
    state = problem_solver.init(ops, Aop, b, np.zeros_like(b), None)
    records = []
    for _ in range(11):
        new = problem_solver.step(ops, Aop, b, state, None)
        records.append(problem_solver.record(ops, Aop, b, None, state, new))
        state = new
    kept = [k for k, r in enumerate(records) if r["finished"] is not None]
    assert kept == [4, 8]  # the steps that restarted (after 4 and 8 Arnoldi steps)
    assert [r["j"] for r in records] == [0, 1, 2, 3] * 2 + [0, 1, 2]
    assert all(r["w"].shape == b.shape for r in records)
    bases = {id(r["V"]) for r in records}
    assert len(bases) == 3 and all(r["V"] is records[4 * (k // 4)]["V"]
                                   for k, r in enumerate(records))


@pytest.mark.parametrize("fmt", ["dense", "sparse"])
@cases
def test_adjoint_none_gives_zero_cotangents(case, fmt):
    A = _nonsymmetric(4, np.float64)
    A = A if fmt == "sparse" else A.toarray()
    b = random_vector(A.shape[0])
    _, vjp = po.solve_vjp(A, b, case.name, adjoint="none", maxiter=5, **case.options)
    cot = vjp(random_vector(A.shape[0], seed=4))
    assert cot.b.shape == b.shape and not np.any(cot.b)
    cot_A = cot.A.toarray() if fmt == "sparse" else cot.A
    assert cot_A.shape == A.shape and not np.any(cot_A)


# -- the same code under JAX tracing ----------------------------------------------------------
def _tracing_ops():
    """The JAX backend's ArrayOps, what ``pj.solve`` traces the steps with (a hand-made minimal
    one lacked its exact complex widenings, which strict dtype promotion requires)."""
    from prdp_ops.backends import get_ops

    return get_ops("jax")


@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
@pytest.mark.parametrize("solver", [po.BiCGSTAB(), po.GMRES(restart=4)], ids=repr)
def test_same_code_runs_under_jit_and_matches_jax_autodiff(solver, dtype):
    # init/step/iterate traced by jax.jit inside lax.fori_loop give the NumPy iterate, and
    # jax.vjp of those K traced steps equals the hand-written unrolled reverse sweep.
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    A = _nonsymmetric(4, dtype).toarray()
    n = A.shape[0]
    b, x_bar = random_vector(n, dtype=dtype), random_vector(n, seed=9, dtype=dtype)
    M = _preconditioner(A)
    K = 10
    ops = _tracing_ops()

    def k_step_map(A, b):
        op, precond = po.aslinearoperator(A), po.aslinearoperator(jnp.asarray(M))
        state = solver.init(ops, op, b, jnp.zeros_like(b), precond)
        state = jax.lax.fori_loop(0, K, lambda _, s: solver.step(ops, op, b, s, precond),
                                  state)
        return solver.iterate(ops, op, b, state, precond)

    with jax.enable_x64(True):
        x, pullback = jax.vjp(jax.jit(k_step_map), jnp.asarray(A), jnp.asarray(b))
        A_bar, b_bar = (np.asarray(v) for v in pullback(jnp.asarray(x_bar)))
        x = np.asarray(x)
    result, vjp = po.solve_vjp(A, b, solver, adjoint="unrolled", rtol=0, atol=0, maxiter=K,
                               M=M)
    cot = vjp(x_bar)
    np.testing.assert_allclose(x, result.x, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(cot.b, b_bar, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(cot.A, A_bar, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("case", ["zero_rhs", "complex_eigenvector"])
@pytest.mark.parametrize("solver", [
    po.BiCGSTAB(),
    # GMRES's JAX compiles are the longest (about 7 s each on 2 cores): -m slow.
    pytest.param(po.GMRES(restart=3), marks=pytest.mark.slow)], ids=repr)
def test_degenerate_cases_give_finite_jax_gradients(solver, case):
    # A zero residual and a happy breakdown (exact zeros in norms and Givens rotations) must
    # not turn JAX's derivative of the traced steps into NaN.
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    dtype = np.complex128 if case == "complex_eigenvector" else np.float64
    A = (np.diag([2.0, 3.0, 5.0, 7.0]) + (np.triu(np.ones((4, 4)), 1) if case == "zero_rhs"
                                          else 0)).astype(dtype)
    b = np.zeros(4, dtype) if case == "zero_rhs" else np.eye(4, dtype=dtype)[0]
    ops = _tracing_ops()

    def k_step_map(A, b):
        op = po.aslinearoperator(A)
        state = solver.init(ops, op, b, jnp.zeros_like(b), None)
        state = jax.lax.fori_loop(0, 6, lambda _, s: solver.step(ops, op, b, s, None), state)
        return solver.iterate(ops, op, b, state, None)

    with jax.enable_x64(True):
        x, pullback = jax.vjp(k_step_map, jnp.asarray(A), jnp.asarray(b))
        A_bar, b_bar = pullback(jnp.ones_like(x))
        np.testing.assert_allclose(np.asarray(x), np.linalg.solve(A, b), atol=1e-15)
        assert bool(jnp.all(jnp.isfinite(A_bar))) and bool(jnp.all(jnp.isfinite(b_bar)))


def test_gmres_fixed_shape_path_matches_numpy_path():
    # CuPy (like JAX) projects against all restart + 1 basis rows instead of slicing off the
    # rows in use; run that path eagerly on NumPy arrays and compare, reverse sweep included.
    class FixedShapeOps(NumpyOps):
        name = "fixed_shape"

    class FunctionalOps(ArrayOps):
        # What CuPy inherits: ArrayOps' functional axpy_/matmul_add_/set_at_ defaults.
        name = "functional"

        def __init__(self):
            super().__init__(np)

    A = po.aslinearoperator(_nonsymmetric(4, np.complex128))
    n = A.shape[0]
    b, x_bar = random_vector(n, dtype=np.complex128), random_vector(n, seed=9,
                                                                    dtype=np.complex128)
    M = po.aslinearoperator(_preconditioner(A.to_matrix()))
    solver = po.GMRES(restart=4)
    results = []
    for ops in (NumpyOps(), FixedShapeOps(), FunctionalOps()):
        run = run_solver(solver, ops, A, b, np.zeros(n, complex), M, maxiter=10, tol=0.0,
                         stop_on_convergence=False, keep_tape=True)
        b_bar, params_bar, _ = unrolled_vjp(solver, ops, A, b, np.zeros(n, complex), M, run,
                                            x_bar)
        results.append((run.result.x, b_bar, *params_bar().values()))
    for other in results[1:]:
        for mine, ref in zip(other, results[0], strict=True):
            np.testing.assert_allclose(mine, ref, rtol=1e-12, atol=1e-14)
