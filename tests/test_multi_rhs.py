"""A block of right-hand sides, ``b`` of shape ``(n, k)``, on NumPy (and CuPy where a GPU is).

Every column must be what a solve of that column alone gives -- its iterations, status,
solution and cotangents -- and both must agree with a dense reference. Column-wise
reductions sum in another order than the single-vector BLAS calls, so the comparisons use
``agree_tol`` (eps x cond x iterations) with fixed iteration counts, and ``converged_tol``
against dense solves.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.sparse as sp
from helpers import (
    AGREE_SAFETY,
    BACKENDS,
    SOLVER_CASES,
    agree_tol,
    assert_agree,
    converged_tol,
    permutation_spread,
    relative_residual,
    solver_cases,
    to_backend,
    to_numpy,
)

import prdp_ops as po

N, K = 12, 4


def _problem(case, dtype=np.float64, seed=0):
    A = case.matrix_for(N, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed + 1)
    B = rng.standard_normal((N, K)).astype(dtype)
    B[:, 1] *= 1e-3  # columns of different sizes converge at different iterations
    X_bar = rng.standard_normal((N, K)).astype(dtype)
    return A, B, X_bar


def _reordering_spreads(case, A, solve_column) -> tuple:
    """How far rounding alone moves a column's results: ``solve_column(A, perm)`` solves
    with the unknowns renumbered by ``perm`` and returns its arrays in the original order.
    BiCGSTAB's two-sided recurrence amplifies a rounding difference by more than agree_tol's
    eps x cond x k (its documented limit); this measures it (zeros for SOR, whose sweep order
    is part of the method). Returns one spread per returned array."""
    if not case.permutation_equivariant:
        return (0.0,) * len(solve_column(A, np.arange(N)))

    def reordered(perm):
        return solve_column(A[np.ix_(perm, perm)], perm)

    return permutation_spread(reordered, N)[1]


def _fixed(case) -> int:
    """A fixed iteration count below n: the Krylov recurrences are still in agree_tol's
    model (no loss of orthogonality yet) and the stationary methods are mid-way."""
    return 6


@solver_cases
@pytest.mark.parametrize("backend", BACKENDS)
def test_each_column_is_its_own_solve(case, backend) -> None:
    A, B, _ = _problem(case)
    A_b, B_b = to_backend(A, backend), to_backend(B, backend)
    block = po.solve(A_b, B_b, case.name, rtol=1e-9, maxiter=2000, **case.options)
    assert to_numpy(block.x).shape == (N, K)
    cond = np.linalg.cond(A)
    for j in range(K):
        single = po.solve(A_b, B_b[:, j], case.name, rtol=1e-9, maxiter=2000, **case.options)
        column = block.column(j)
        assert column.status is single.status is po.Status.CONVERGED
        # The same recurrence, its sums in another order: the tolerance test can be met one
        # step apart.
        assert abs(column.iterations - single.iterations) <= 1, (j, column, single)
        # Both converged: they agree as far as their residuals say (a bound, any order).
        ref = np.linalg.solve(A, B[:, j])
        rho = relative_residual(A, B[:, j], to_numpy(column.x))
        assert rho <= 1e-9 * (1 + 1e-6)
        assert_agree(to_numpy(column.x), ref, converged_tol(cond, rho, 1e-15, n=N))
        assert column.true_residual_norm == pytest.approx(
            np.linalg.norm(B[:, j] - A @ to_numpy(column.x)), rel=agree_tol(np.float64, cond))


@solver_cases
def test_fixed_count_iterates_equal_the_single_solves(case) -> None:
    A, B, _ = _problem(case)
    k = _fixed(case)
    block = po.solve(A, B, case.name, rtol=0.0, maxiter=k, **case.options)
    assert list(block.iterations) == [k] * K
    cond = np.linalg.cond(A)
    for j in range(K):
        single = po.solve(A, B[:, j], case.name, rtol=0.0, maxiter=k, **case.options)

        def solve_column(A_p, perm, j=j):
            r = po.solve(A_p, B[perm, j], case.name, rtol=0.0, maxiter=k, **case.options)
            x = np.empty_like(r.x)
            x[perm] = r.x
            return x, r.residual_norms

        spreads = _reordering_spreads(case, A, solve_column)
        # x: eps cond k; residual norms (relative to the initial one, so normwise: the
        # small late norms carry its absolute error): eps cond^2 k; plus rounding's measured
        # reach through the recurrence.
        for got, want, spread, power in zip((block.x[:, j], block.residual_norms[:, j]),
                                            (single.x, single.residual_norms), spreads, (1, 2),
                                            strict=True):
            np.testing.assert_allclose(got, want, rtol=0, atol=AGREE_SAFETY * spread + agree_tol(
                np.float64, cond, k, power=power) * np.abs(want).max())


@solver_cases
@pytest.mark.parametrize("adjoint", ["implicit", "unrolled"])
def test_cotangents_are_the_columns_cotangents_summed_for_A(case, adjoint) -> None:
    A, B, X_bar = _problem(case)
    k = _fixed(case)
    # The adjoint solve of the implicit mode converges; the forward runs k steps.
    kwargs = dict(rtol=0.0, maxiter=k, adjoint=adjoint, adjoint_rtol=1e-12,
                  adjoint_maxiter=5000, **case.options)
    _, vjp = po.solve_vjp(A, B, case.name, **kwargs)
    got = vjp(X_bar)
    A_bar, b_bars, x0_bars, spreads = 0, [], [], np.zeros(3)
    for j in range(K):
        _, vjp_j = po.solve_vjp(A, B[:, j], case.name, **kwargs)
        c = vjp_j(X_bar[:, j])
        A_bar, b_bars = A_bar + c.A, [*b_bars, c.b]
        x0_bars.append(c.x0)

        def column_cotangents(A_p, perm, j=j):
            _, v = po.solve_vjp(A_p, B[perm, j], case.name, **kwargs)
            c = v(X_bar[perm, j])
            b_bar, x0_bar, A_bar_j = np.empty(N), np.empty(N), np.empty((N, N))
            b_bar[perm], x0_bar[perm] = c.b, c.x0
            A_bar_j[np.ix_(perm, perm)] = c.A
            return b_bar, x0_bar, A_bar_j

        spreads = spreads + np.asarray(_reordering_spreads(case, A, column_cotangents))
    cond = np.linalg.cond(A)
    tol = agree_tol(np.float64, cond, k if adjoint == "unrolled" else 50, power=2)
    b_spread, x0_spread, A_spread = AGREE_SAFETY * spreads
    assert_agree(got.b, np.stack(b_bars, axis=1), tol + b_spread / np.abs(got.b).max())
    # x0's cotangent is small by cancellation (the iterations forget x0): its rounding
    # error is relative to the size of x_bar, which it cancels.
    np.testing.assert_allclose(got.x0, np.stack(x0_bars, axis=1), rtol=0,
                               atol=tol * np.abs(X_bar).max() + x0_spread)
    assert_agree(got.A, A_bar, tol + A_spread / np.abs(A_bar).max())
    if adjoint == "implicit":
        # Against the dense implicit function theorem: b_bar = A^-T x_bar.
        assert got.adjoint_result.converged.all()
        assert_agree(got.b, np.linalg.solve(A.T, X_bar), converged_tol(cond, 1e-12, 1e-12,
                                                                        n=N))


@pytest.mark.parametrize("adjoint", ["implicit", "unrolled"])
def test_stencil_coefficient_gradient_sums_over_the_columns(adjoint) -> None:
    rng = np.random.default_rng(3)
    c = rng.uniform(0.5, 2.0, (6, 6))
    A = po.DiffusionStencil(c)
    B = rng.standard_normal((36, 3))
    X_bar = rng.standard_normal((36, 3))
    kwargs = dict(rtol=0.0, maxiter=8, adjoint=adjoint, adjoint_rtol=1e-12)
    _, vjp = po.solve_vjp(A, B, "cg", **kwargs)
    got = vjp(X_bar).A["c"]
    want = sum(po.solve_vjp(A, B[:, j], "cg", **kwargs)[1](X_bar[:, j]).A["c"]
               for j in range(3))
    cond = np.linalg.cond(A.to_matrix().toarray() if sp.issparse(A.to_matrix())
                          else A.to_matrix())
    assert_agree(got, want, agree_tol(np.float64, cond, 8, power=2))


def test_frozen_columns_keep_their_state_and_their_gradients() -> None:
    """Columns converge at different iterations; a converged column is frozen while the
    others go on, in the forward and in the unrolled reverse sweep."""
    A = np.diag(np.arange(1.0, 9.0))
    B = np.zeros((8, 3))
    B[0, 0] = 1.0  # an eigenvector: CG converges in one step
    B[:, 1] = 1.0  # eight distinct eigenvalues: eight steps
    B[:3, 2] = 1.0  # three: three steps
    result, vjp = po.solve_vjp(A, B, "cg", rtol=1e-12, adjoint="unrolled")
    assert list(result.iterations) == [1, 8, 3]
    assert np.isnan(result.residual_norms[2:, 0]).all()  # nothing recorded once frozen
    assert_agree(result.x, B / np.diag(A)[:, None], agree_tol(np.float64, 8, 8))
    X_bar = np.ones((8, 3))
    got = vjp(X_bar)
    for j in range(3):
        _, vjp_j = po.solve_vjp(A, B[:, j], "cg", rtol=1e-12, adjoint="unrolled")
        c = vjp_j(X_bar[:, j])
        assert_agree(got.b[:, j], c.b, agree_tol(np.float64, 8, 8, power=2))
        # Converged: x0's cotangent is rounding, relative to x_bar's size (see above).
        np.testing.assert_allclose(got.x0[:, j], c.x0, rtol=0,
                                   atol=agree_tol(np.float64, 8, 8, power=2))


def test_a_failing_column_fails_alone_and_its_nan_stays_out_of_the_gradients() -> None:
    """CG breaks down on an indefinite A for the column with p.Ap = 0; the others converge,
    and the broken column's discarded steps (NaN-free or not) do not reach their gradient."""
    A = np.diag([1.0, -1.0, 2.0, 3.0])
    B = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    result, vjp = po.solve_vjp(A, B, "cg", rtol=1e-10, adjoint="unrolled",
                               on_failure="ignore")
    assert result.status == (po.Status.CONVERGED, po.Status.BREAKDOWN, po.Status.CONVERGED)
    assert list(result.converged) == [True, False, True]
    assert result.failed.tolist() == [False, True, False]
    assert list(result.info)[1] == -1 and result.info[0] == 0
    assert np.isfinite(result.x).all()
    c = vjp(np.ones((4, 3)))
    assert np.isfinite(c.b).all() and np.isfinite(c.A).all()
    for j in (0, 2):
        single = po.solve_vjp(A, B[:, j], "cg", rtol=1e-10, adjoint="unrolled")[1](np.ones(4))
        assert_agree(c.b[:, j], single.b, agree_tol(np.float64, 3, 2, power=2))
    with pytest.raises(po.SolverError, match=r"2 of 3 columns converged; column 1: "):
        po.solve(A, B, "cg", rtol=1e-10, on_failure="raise")


def test_failures_are_warned_once_naming_the_columns(caplog) -> None:
    A = np.diag([1.0, -1.0, 2.0, 3.0])
    B = np.array([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    with caplog.at_level(logging.WARNING, logger="prdp_ops"):
        po.solve(A, B, "cg", rtol=1e-10)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "column 1" in messages[0], messages


def test_zero_columns_are_solved_by_zero_with_the_implicit_gradient() -> None:
    case = SOLVER_CASES[0]
    A, B, X_bar = _problem(case)
    B[:, 2] = 0
    x0 = np.ones((N, K))
    result, vjp = po.solve_vjp(A, B, "cg", x0=x0, rtol=1e-10)
    assert result.iterations[2] == 0 and result.status[2] is po.Status.CONVERGED
    assert not result.x[:, 2].any()
    c = vjp(X_bar)
    # x = A^-1 b at b = 0 still has the derivative A^-1 (the implicit function theorem).
    assert_agree(c.b[:, 2], np.linalg.solve(A.T, X_bar[:, 2]),
                 converged_tol(np.linalg.cond(A), 1e-10, 1e-10, n=N))
    _, vjp_u = po.solve_vjp(A, B, "cg", x0=x0, rtol=1e-10, adjoint="unrolled")
    c = vjp_u(X_bar)
    assert not c.b[:, 2].any() and not c.x0[:, 2].any()  # no iteration ran for it


def test_result_api_and_repr() -> None:
    case = SOLVER_CASES[0]
    A, B, _ = _problem(case)
    result = po.solve(A, B, "cg", rtol=1e-8)
    assert isinstance(result, po.BlockSolveResult)
    text = repr(result)
    assert "\n" not in text and "columns=4" in text and "CONVERGED: 4" in text
    assert result.columns == K and result.info.tolist() == [0] * K
    assert result.residual_norms.shape == (result.iterations.max() + 1, K)
    np.testing.assert_array_equal(result.residual_norm,
                                  [result.column(j).residual_norm for j in range(K)])
    assert "4 of 4 columns converged" in result.message


def test_nothing_passed_in_is_modified_and_results_are_the_callers() -> None:
    case = SOLVER_CASES[0]
    A, B, X_bar = _problem(case)
    B_copy, X_bar_copy, x0 = B.copy(), X_bar.copy(), np.ones((N, K))
    seen = []
    result, vjp = po.solve_vjp(A, B, "cg", x0=x0, rtol=0.0, maxiter=5, adjoint="unrolled",
                               callback=seen.append)
    assert len(seen) == 5 and all(s.shape == (N, K) for s in seen)
    seen[0][:] = np.nan  # a callback's copy is its own
    first = vjp(X_bar)
    result.x[:] = 0
    again = vjp(X_bar)
    np.testing.assert_array_equal(first.b, again.b)
    np.testing.assert_array_equal(B, B_copy)
    np.testing.assert_array_equal(X_bar, X_bar_copy)
    np.testing.assert_array_equal(x0, np.ones((N, K)))


def test_sparse_block_is_one_product_per_iteration() -> None:
    """The block loop multiplies A by all k columns at once: k times fewer products."""
    A = sp.csr_matrix(SOLVER_CASES[0].matrix_for(N))
    calls = []

    class Counting(po.LinearOperator):
        def __init__(self) -> None:
            super().__init__(A.shape, A.dtype)
            self.hermitian = True

        def _matvec(self, x):
            calls.append(x.shape)
            return A @ x

        def _matmat(self, X):
            calls.append(X.shape)
            return A @ X

    po.solve(Counting(), np.ones((N, K)), "cg", rtol=0.0, maxiter=7)
    assert calls and all(shape == (N, K) for shape in calls), calls
    assert len(calls) == 8  # the initial residual, then one per iteration


def test_bad_shapes_name_the_argument() -> None:
    A = SOLVER_CASES[0].matrix_for(N)
    with pytest.raises(ValueError, match=r"x0 must have shape \(12, 4\).*block of 4"):
        po.solve(A, np.ones((N, K)), "cg", x0=np.ones(N))
    _, vjp = po.solve_vjp(A, np.ones((N, K)), "cg")
    with pytest.raises(ValueError, match=r"x_bar must have the solution's shape \(12, 4\)"):
        vjp(np.ones(N))
    with pytest.raises(ValueError, match=r"b must have shape \(12,\) .*\(12, k\) for a block"):
        po.solve(A, np.ones((N + 1, K)), "cg")
    with pytest.raises(NotImplementedError, match="callback with a block"):
        po.solve(A, np.ones((N, K)), "gmres", callback=print)


def test_empty_blocks() -> None:
    A = SOLVER_CASES[0].matrix_for(N)
    result, vjp = po.solve_vjp(A, np.ones((N, 0)), "cg")
    assert result.x.shape == (N, 0) and result.columns == 0
    assert vjp(np.ones((N, 0))).b.shape == (N, 0)


def test_column_of_one_stays_a_vector_solve() -> None:
    """``(n, 1)`` is one right-hand side, as in SciPy: a SolveResult, x of shape (n, 1)."""
    A = SOLVER_CASES[0].matrix_for(N)
    result = po.solve(A, np.ones((N, 1)), "cg")
    assert isinstance(result, po.SolveResult) and result.x.shape == (N, 1)


# -- JAX: vmap is the batch; the bridge hands it to one block solve ----------------------------
jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
pj = pytest.importorskip("prdp_ops.backends.jax")


@pytest.mark.parametrize(("solver", "adjoint"), [
    ("cg", "implicit"),
    # The unrolled block sweep itself is checked in the default run by the block-against-
    # columns tests above; through the bridge under vmap it runs under pytest -m slow, as
    # GMRES (the longest compiles, about 25 s on 2 cores).
    pytest.param("cg", "unrolled", marks=pytest.mark.slow),
    pytest.param("gmres", "unrolled", marks=pytest.mark.slow),
    pytest.param("gmres", "implicit", marks=pytest.mark.slow),
])
def test_bridge_under_vmap_is_one_block_solve_equal_to_native(solver, adjoint) -> None:
    """A batch of b through backend="numpy" under vmap: one host solve whose products all
    have the batch's k columns, with the native path's values and gradients -- the batch's
    and each example's own (vmap of grad) cotangent of A."""
    case = SOLVER_CASES[0] if solver == "cg" else SOLVER_CASES[2]
    with jax.enable_x64(True):
        A_np, B_np, W_np = _problem(case)
        A, B, W = jnp.asarray(A_np), jnp.asarray(B_np.T), jnp.asarray(W_np.T)
        # Unrolled: a fixed count below n, in agree_tol's model (a converged Krylov run has
        # lost orthogonality, and its unrolled derivative depends on the rounding).
        options = dict(rtol=1e-10 if adjoint == "implicit" else 0.0,
                       maxiter=200 if adjoint == "implicit" else _fixed(case),
                       adjoint=adjoint, **case.options)

        def loss(A, b, w, backend):
            return jnp.sum(w * pj.solve(A, b, solver, backend=backend, **options))

        def batch_loss(A, B, backend):
            return jax.vmap(loss, (None, 0, 0, None))(A, B, W, backend).sum()

        grads = {backend: jax.jit(jax.grad(batch_loss, (0, 1)), static_argnums=2)(A, B, backend)
                 for backend in ("jax", "numpy")}
        per_example = {backend: jax.vmap(jax.grad(loss), (None, 0, 0, None))(A, B, W, backend)
                       for backend in ("jax", "numpy")}
    cond = np.linalg.cond(A_np)
    # Implicit: two adjoint solves converged to 1e-10 (a bound, any order); unrolled: the
    # same iterations' derivative, summed in other orders (XLA against NumPy).
    tol = (converged_tol(cond, 1e-10, 1e-10, n=N) * cond if adjoint == "implicit"
           else agree_tol(np.float64, cond, _fixed(case), power=2))
    for got, want in zip(grads["numpy"], grads["jax"], strict=True):
        assert_agree(got, want, tol)
    assert per_example["numpy"].shape == (K, N, N)
    assert_agree(per_example["numpy"], per_example["jax"], tol)


def test_bridge_batch_runs_the_block_loop() -> None:
    calls = []
    A_np = SOLVER_CASES[0].matrix_for(N)

    class Counting(po.LinearOperator):
        def __init__(self) -> None:
            super().__init__(A_np.shape, A_np.dtype)
            self.hermitian = True

        def _matvec(self, x):
            calls.append(x.shape)
            return A_np @ x

        def _matmat(self, X):
            calls.append(X.shape)
            return A_np @ X

    with jax.enable_x64(True):
        B = jnp.ones((K, N))
        X = jax.jit(jax.vmap(lambda b: pj.solve(Counting(), b, "cg", rtol=0.0, maxiter=5,
                                                backend="numpy")))(B)
    assert X.shape == (K, N)
    iterations = [shape for shape in calls if shape != (N,)]  # (N,): the trace-time probe
    assert iterations == [(N, K)] * 6, calls


def test_native_jax_block_b_points_to_vmap() -> None:
    with pytest.raises(ValueError, match=r"use jax.vmap, e.g. jax.vmap\(.*in_axes=1, out_axes=1"):
        pj.solve(jnp.eye(N), jnp.ones((N, K)), "cg")
