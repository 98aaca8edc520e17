"""The core contract: po.solve / po.solve_vjp arguments, results, registry, custom solvers,
and the implicit adjoint's guarantees (transposed preconditioner, rescaling, warm start)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spl
from helpers import (
    ADJOINT_MODES,
    agree_tol,
    convection_diffusion_2d,
    converged_tol,
    poisson_2d,
    random_vector,
    relative_residual,
    solver_cases,
    spd,
)

import prdp_ops as po


# -- SciPy parity -----------------------------------------------------------------------------
def test_cg_iterates_equal_scipy_iterate_for_iterate():
    A = poisson_2d(12)
    b = random_vector(A.shape[0])
    ours, theirs = [], []
    po.solve(A, b, "cg", rtol=0, atol=0, maxiter=25, callback=lambda x: ours.append(x.copy()))
    spl.cg(A, b, rtol=0, atol=0, maxiter=25, callback=lambda x: theirs.append(x.copy()))
    assert len(ours) == len(theirs) == 25
    # Tight on purpose: SciPy's cg makes the very same BLAS calls in the same order (np.dot,
    # the CSR product, the same updates), so the iterates are bit-identical on any CPU. A
    # SciPy that sums differently would need agree_tol (eps cond k).
    for k, (x_ours, x_theirs) in enumerate(zip(ours, theirs, strict=True)):
        np.testing.assert_allclose(x_ours, x_theirs, rtol=1e-12, atol=1e-14, err_msg=f"iter {k}")


def test_preconditioned_cg_equals_scipy():
    A = poisson_2d(10)
    b = random_vector(A.shape[0])
    M = sp.diags(1.0 / A.diagonal() * np.linspace(0.5, 1.5, A.shape[0]))
    ours = po.solve(A, b, "cg", M=M, rtol=0, atol=0, maxiter=15).x
    theirs, _ = spl.cg(A, b, M=M, rtol=0, atol=0, maxiter=15)
    # the same operations in the same order (as above): bit-identical, so tight
    np.testing.assert_allclose(ours, theirs, rtol=1e-11, atol=1e-13)


def test_cg_stopping_test_matches_scipy_iteration_count():
    A = poisson_2d(16)
    b = random_vector(A.shape[0])
    count = []
    spl.cg(A, b, rtol=1e-6, callback=lambda x: count.append(1))
    result = po.solve(A, b, "cg", rtol=1e-6)
    assert result.converged and result.info == 0
    assert result.iterations == len(count)
    assert np.linalg.norm(b - A @ result.x) <= 1e-6 * np.linalg.norm(b) * 1.0001


# -- results ----------------------------------------------------------------------------------
def test_result_fields_and_history():
    A, b = poisson_2d(8), random_vector(64)
    r = po.solve(A, b, rtol=1e-8)
    assert r.converged and r.status is po.Status.CONVERGED and r.info == 0
    assert r.residual_norms.shape == (r.iterations + 1,)
    np.testing.assert_allclose(r.residual_norms[0], np.linalg.norm(b))
    np.testing.assert_allclose(r.residual_norms[-1], np.linalg.norm(b - A @ r.x), rtol=1e-6)
    assert "tolerance" in r.message


def test_maxiter_is_a_hard_count_and_info_reports_it():
    A, b = poisson_2d(8), random_vector(64)
    r = po.solve(A, b, rtol=0, atol=0, maxiter=7)
    assert r.iterations == 7 and not r.converged
    assert r.info == 7 and r.status is po.Status.MAX_ITERATIONS
    assert "maxiter" in r.status.message


def test_default_maxiter_is_ten_n():
    A = sp.diags(np.linspace(1, 1e8, 20))  # CG needs ~20 steps at this conditioning
    r = po.solve(A, np.ones(20), rtol=0, atol=0)
    assert r.iterations == 200


def test_zero_rhs_returns_zero_like_scipy():
    r = po.solve(poisson_2d(4), np.zeros(16), x0=np.ones(16))
    x_scipy, info = spl.cg(poisson_2d(4), np.zeros(16), x0=np.ones(16))
    assert r.converged and r.iterations == 0 and info == 0
    np.testing.assert_array_equal(r.x, x_scipy)


def test_breakdown_is_reported_not_raised_and_x_is_finite():
    A = np.diag([1.0, -1.0])  # indefinite: p.Ap = 0 for b = (1, 1)
    r = po.solve(A, np.array([1.0, 1.0]), "cg", on_failure="ignore")
    assert r.status is po.Status.BREAKDOWN and r.info < 0 and not r.converged
    assert np.all(np.isfinite(r.x))
    assert "positive definite" in r.message


def test_breakdown_warns_by_default_and_raises_on_request(caplog):
    A, b = np.diag([1.0, -1.0]), np.array([1.0, 1.0])
    with caplog.at_level(logging.WARNING, logger="prdp_ops"):
        po.solve(A, b, "cg")
    assert any("broke down" in rec.message for rec in caplog.records)
    with pytest.raises(po.SolverError, match="broke down") as err:
        po.solve(A, b, "cg", on_failure="raise")
    assert err.value.result.status is po.Status.BREAKDOWN


def test_callback_and_inputs_not_mutated():
    A = poisson_2d(6).tocoo()
    A_copy = A.copy()
    b, x0 = random_vector(36), random_vector(36, seed=5)
    b0, x00 = b.copy(), x0.copy()
    seen = []
    po.solve(A, b, x0=x0, callback=seen.append, maxiter=3, rtol=0)
    assert len(seen) == 3
    np.testing.assert_array_equal(b, b0)
    np.testing.assert_array_equal(x0, x00)
    assert (A != A_copy).nnz == 0


def test_column_vector_b_and_integer_b_accepted():
    A = poisson_2d(4)
    r1 = po.solve(A, np.arange(16).reshape(-1, 1), rtol=1e-10)
    r2 = po.solve(A, np.arange(16.0), rtol=1e-10)
    # x takes b's shape (DESIGN.md): a column in, a column out
    assert r1.x.dtype == np.float64 and r1.x.shape == (16, 1)
    np.testing.assert_allclose(r1.x[:, 0], r2.x)


# -- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"b": np.ones(5)}, ValueError, r"b must have shape \(4,\)"),
        ({"A": np.ones((4, 3))}, ValueError, "square"),
        ({"b": np.array([1.0, np.nan, 0, 0])}, ValueError, "b contains NaN"),
        ({"x0": np.ones(3)}, ValueError, "x0 must have shape"),
        ({"maxiter": -1}, ValueError, "maxiter"),
        ({"maxiter": 2.5}, TypeError, "maxiter"),
        ({"maxiter": True}, TypeError, "maxiter"),
        ({"rtol": -1e-3}, ValueError, "rtol"),
        ({"atol": float("nan")}, ValueError, "atol"),
        ({"solver": "nope"}, KeyError, "registered solvers: .*cg"),
        ({"on_failure": "explode"}, ValueError, "on_failure"),
        ({"A": "matrix"}, TypeError, "A: A must be"),
        ({"M": np.eye(3)}, ValueError, "M must have A's shape"),
    ],
)
def test_bad_input_gives_clear_errors(kwargs, error, match):
    args = {"A": spd(4), "b": np.ones(4)} | kwargs
    A, b = args.pop("A"), args.pop("b")
    with pytest.raises(error, match=match):
        po.solve(A, b, **args)


def test_bad_adjoint_mode_and_cotangent_shape():
    with pytest.raises(ValueError, match="adjoint must be one of"):
        po.solve_vjp(spd(4), np.ones(4), adjoint="backwards")
    _, vjp = po.solve_vjp(spd(4), np.ones(4))
    with pytest.raises(ValueError, match="x_bar must have"):
        vjp(np.ones(5))


def test_complex_with_real_only_solver_is_refused():
    class RealOnly(po.IterativeSolver):
        supports_complex = False

        def init(self, ops, A, b, x0, M):
            return {"x": x0, "rnorm": ops.norm(b)}

        def step(self, ops, A, b, state, M):
            return state

    with pytest.raises(TypeError, match="does not support complex"):
        po.solve(spd(3), np.ones(3) + 1j, solver=RealOnly())


def test_matrix_free_operator_without_entries_is_refused_by_solvers_that_need_them():
    A = po.FunctionOperator(lambda x: 2 * x, 4, symmetric=True)
    with pytest.raises(po.MatrixFreeError, match="matrix-free"):
        po.solve(A, np.ones(4), "sor")


# -- registry and custom solvers -----------------------------------------------------------
def test_registry_names_duplicates_and_unknown():
    assert {"cg", "bicgstab", "gmres", "jacobi", "sor", "richardson",
            "steepest_descent"} <= set(po.available_solvers())
    with pytest.raises(ValueError, match="already registered"):
        po.register_solver(po.GMRES, "cg")
    with pytest.raises(KeyError, match="registered solvers"):
        po.get_solver("no-such-solver")
    with pytest.raises(TypeError, match=r"subclass of prdp_ops\.IterativeSolver"):
        po.register_solver(object, "obj")
    assert isinstance(po.get_solver("cg"), po.CG)


class _Richardson(po.IterativeSolver):
    """A test-local solver: x' = x + omega (b - A x), with a hand-written reverse step."""

    def __init__(self, omega: float = 0.1) -> None:
        super().__init__(omega=float(omega))

    def init(self, ops, A, b, x0, M):
        r = b - A.matvec(x0)
        return {"x": x0, "r": r, "rnorm": ops.norm(r)}

    def step(self, ops, A, b, state, M):
        x = state["x"] + self.options["omega"] * state["r"]
        r = b - A.matvec(x)
        return {"x": x, "r": r, "rnorm": ops.norm(r)}

    def step_vjp(self, ops, A, b, M, record, state_bar, ctx):
        before, after = record
        x_bar_new = state_bar.get("x", 0 * before["x"])
        # r' = b - A x'  (r' cotangent flows to b and to x' through -A^T)
        r_bar_new = state_bar.get("r")
        if r_bar_new is not None:
            ctx.add_b(r_bar_new)
            x_bar_new = x_bar_new + ctx.matvec_T(after["x"], -r_bar_new)
        # x' = x + omega r
        return {"x": x_bar_new, "r": self.options["omega"] * x_bar_new}

    def init_vjp(self, ops, A, b, x0, M, state_bar, ctx):
        r_bar = state_bar["r"]
        ctx.add_b(r_bar)
        return state_bar["x"] + ctx.matvec_T(x0, -r_bar)


def test_custom_solver_registered_in_a_test_solves_and_differentiates():
    po.register_solver(_Richardson, "test_richardson", overwrite=True)
    A = spd(8, cond=4.0)
    b = random_vector(8)
    r = po.solve(A, b, "test_richardson", omega=0.3, rtol=1e-10, maxiter=500)
    assert r.converged
    np.testing.assert_allclose(r.x, np.linalg.solve(A, b), rtol=1e-8)
    x_bar = random_vector(8, seed=9)
    _, vjp = po.solve_vjp(A, b, "test_richardson", omega=0.3, rtol=1e-12, maxiter=2000)
    lam = np.linalg.solve(A.T, x_bar)
    np.testing.assert_allclose(vjp(x_bar).b, lam, rtol=1e-7)
    # Unrolled: compare with finite differences of the fixed 6-step map.
    _, vjp = po.solve_vjp(A, b, "test_richardson", omega=0.3, rtol=0, atol=0, maxiter=6,
                          adjoint="unrolled")
    cot = vjp(x_bar)

    def loss(bb, AA):
        return x_bar @ po.solve(AA, bb, "test_richardson", omega=0.3, rtol=0, atol=0,
                                maxiter=6).x

    e, E, h = random_vector(8, seed=2), random_vector(64, seed=3).reshape(8, 8), 1e-6
    fd_b = (loss(b + h * e, A) - loss(b - h * e, A)) / (2 * h)
    fd_A = (loss(b, A + h * E) - loss(b, A - h * E)) / (2 * h)
    np.testing.assert_allclose(cot.b @ e, fd_b, rtol=1e-6)
    np.testing.assert_allclose(np.sum(cot.A * E), fd_A, rtol=1e-6)


def test_solver_without_reverse_step_refuses_unrolled_clearly():
    class NoReverse(po.IterativeSolver):
        def init(self, ops, A, b, x0, M):
            return {"x": x0, "rnorm": ops.norm(b - A.matvec(x0))}

        def step(self, ops, A, b, state, M):
            return state

    with pytest.raises(NotImplementedError, match="adjoint='implicit'"):
        po.solve_vjp(spd(3), np.ones(3), solver=NoReverse(), adjoint="unrolled")


def test_solver_instances_hash_by_options():
    assert po.get_solver("gmres", restart=5) == po.get_solver("gmres", restart=5)
    assert hash(po.get_solver("cg")) == hash(po.CG())
    assert po.get_solver("gmres", restart=5) != po.get_solver("gmres", restart=6)


# -- implicit adjoint: the guarantees -------------------------------------------------------
@solver_cases
@pytest.mark.parametrize("mode", ADJOINT_MODES)
def test_every_solver_every_mode_matches_dense_reference(case, mode):
    """Implicit at convergence and unrolled after many steps both equal the derivative of
    the dense direct solve; "none" gives zeros."""
    n = 8
    A = case.matrix_for(n)
    b = random_vector(n)
    x_bar = random_vector(n, seed=4)
    maxiter = 4000
    result, vjp = po.solve_vjp(A, b, case.name, adjoint=mode, rtol=1e-13, maxiter=maxiter,
                               **case.options)
    cot = vjp(x_bar)
    x = np.linalg.solve(A, b)
    np.testing.assert_allclose(result.x, x, rtol=1e-9, atol=1e-11)
    if mode == "none":
        assert np.all(cot.b == 0) and np.all(cot.A == 0)
        return
    lam = np.linalg.solve(A.T, x_bar)
    A_bar = -np.outer(lam, x)
    np.testing.assert_allclose(cot.b, lam, rtol=1e-7, atol=1e-9)
    if mode == "unrolled" and case.name == "cg":
        # CG's iterates are not A^-1 b for a non-symmetric A, so its unrolled derivative
        # agrees with the inverse's only along symmetric perturbations of A.
        cot_A, A_bar = (cot.A + cot.A.T) / 2, (A_bar + A_bar.T) / 2
    else:
        cot_A = cot.A
    np.testing.assert_allclose(cot_A, A_bar, rtol=1e-7, atol=1e-9)


def test_adjoint_uses_transposed_preconditioner():
    """A non-symmetric M: solving the adjoint with M instead of M^T would give a wrong
    gradient at a fixed small iteration count; M^T reproduces the dense reference."""
    A = convection_diffusion_2d(6, peclet=1.5).toarray()
    n = A.shape[0]
    M = np.linalg.inv(np.tril(A))  # Gauss-Seidel preconditioner: far from symmetric
    b, x_bar = random_vector(n), random_vector(n, seed=3)
    _, vjp = po.solve_vjp(A, b, "gmres", M=M, rtol=1e-12, restart=n)
    cot = vjp(x_bar)
    lam = np.linalg.solve(A.T, x_bar)
    np.testing.assert_allclose(cot.b, lam, rtol=1e-8)
    assert cot.adjoint_result.converged
    assert cot.adjoint_result.iterations < n // 2  # M^T really preconditions A^T


def test_tiny_cotangent_does_not_underflow_to_nan():
    A, b = poisson_2d(6), random_vector(36)
    _, vjp = po.solve_vjp(A, b, rtol=1e-10)
    x_bar = random_vector(36, seed=7) * 1e-300
    cot = vjp(x_bar)
    assert np.all(np.isfinite(cot.b))
    lam = spl.spsolve(A.T.tocsc(), x_bar * 1e300) * 1e-300
    np.testing.assert_allclose(cot.b, lam, rtol=1e-7)


def test_adjoint_has_its_own_settings_and_reports_them():
    A, b = poisson_2d(8), random_vector(64)
    _, vjp = po.solve_vjp(A, b, rtol=1e-10, adjoint_maxiter=3, adjoint_rtol=0.0)
    cot = vjp(random_vector(64, seed=2))
    assert cot.adjoint_result.iterations == 3 and not cot.adjoint_result.converged
    assert cot.adjoint_result.residual_norms.shape == (4,)
    _, vjp = po.solve_vjp(A, b, adjoint_solver="gmres", adjoint_rtol=1e-12)
    cot = vjp(random_vector(64, seed=2))
    assert cot.adjoint_result.solver == "gmres" and cot.adjoint_result.converged


def test_adjoint_warm_start_cuts_iterations():
    A, b = poisson_2d(10), random_vector(100)
    x_bar = random_vector(100, seed=2)
    _, vjp = po.solve_vjp(A, b, rtol=1e-10)
    cold = vjp(x_bar)
    warm = vjp(x_bar * (1 + 1e-6), adjoint_x0=cold.b)
    # The warm start begins ~1e-6 away from the answer, so it needs fewer iterations.
    assert warm.adjoint_result.residual_norms[0] < 1e-5 * cold.adjoint_result.residual_norms[0]
    assert warm.adjoint_result.iterations < cold.adjoint_result.iterations
    # Both adjoint solves stopped at their tolerance, from different starts: they differ by
    # what the stopping test allows, not by rounding. For measured relative residuals rho,
    # ||l_warm - l_cold|| <= cond (rho_warm + rho_cold) ||l|| (2-norms), plus rounding.
    expected = cold.b * (1 + 1e-6)  # solves A^T l = x_bar (1 + 1e-6) to cold's residual
    cond = np.linalg.cond(A.toarray())
    bound = converged_tol(cond, relative_residual(A.T, x_bar, cold.b),
                          relative_residual(A.T, x_bar * (1 + 1e-6), warm.b))
    bound += agree_tol(np.float64, cond, cold.adjoint_result.iterations)
    assert np.linalg.norm(warm.b - expected) <= bound * np.linalg.norm(expected)


def test_sparse_cotangent_keeps_the_pattern():
    A = convection_diffusion_2d(5)
    b = random_vector(25)
    res, vjp = po.solve_vjp(A, b, "bicgstab", rtol=1e-13)
    cot = vjp(random_vector(25, seed=4))
    assert sp.issparse(cot.A) and cot.A.nnz == A.nnz
    dense = -np.outer(cot.b, res.x)
    np.testing.assert_allclose(cot.A.toarray(), dense * (A.toarray() != 0), rtol=1e-6,
                               atol=1e-10)


def test_function_operator_gradient_flows_to_b_only():
    A = spd(6)
    op = po.FunctionOperator(lambda x: A @ x, 6, rmatvec=lambda y: A.T @ y)
    _, vjp = po.solve_vjp(op, np.ones(6), rtol=1e-12)
    cot = vjp(np.ones(6))
    assert cot.A is None
    np.testing.assert_allclose(cot.b, np.linalg.solve(A.T, np.ones(6)), rtol=1e-8)


def test_result_message_json_friendly():
    r = po.solve(spd(4), np.ones(4))
    json.dumps({"status": r.status.value, "info": r.info, "iterations": r.iterations})
