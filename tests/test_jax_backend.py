"""The native JAX backend: forward solves, the three adjoint modes, jit/vmap/grad, traced
iteration counts, operators of every kind, failure reporting and bad input.

References are independent of the code under test: the NumPy driver (``po.solve``), dense
direct solves (``jnp.linalg.solve`` and its autodiff), finite differences
(``jax.test_util.check_grads``), a conjugate-gradient loop written out here, and JAX's own
autodiff of a Python loop over the solver's steps.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    AGREE_SAFETY,
    SOLVER_CASES,
    agree_tol,
    assert_agree,
    permutation_spread,
    random_vector,
    spd,
)
from jax.experimental import sparse as jax_sparse
from jax.test_util import check_grads
from prdp_ops.backends import jax as pj

import prdp_ops as po

jax.config.update("jax_enable_x64", True)

N = 10


def _usable(case: object) -> str | None:
    """Why a solver case cannot run yet (its module is still a placeholder), or None."""
    A = case.matrix_for(4)
    try:
        po.solve(A, np.ones(4), case.name, maxiter=1, on_failure="ignore", **case.options)
    except NotImplementedError as err:
        return str(err)
    return None


def _cases(complex_only: bool = False, one_per_solver: bool = True) -> list:
    """Solver cases as pytest params; by default one per solver (compiles are slow)."""
    params, seen = [], set()
    for case in SOLVER_CASES:
        if (complex_only and not case.complex_ok) or (one_per_solver and case.name in seen):
            continue
        seen.add(case.name)
        reason = _usable(case)
        marks = [pytest.mark.skip(reason=f"solver not implemented yet: {reason}")] if reason else []
        if case.name == "gmres":
            # GMRES's compiles are the longest of these (2-8 s each on 2 cores): the slow
            # step runs them; the default run keeps JAX GMRES in test_jax_conventions (every
            # dtype), test_bad_input and test_krylov_solvers.
            marks.append(pytest.mark.slow)
        params.append(pytest.param(case, id=case.id, marks=marks))
    return params


def _problem(case: object, dtype: object = np.float64, n: int = N) -> tuple:
    return jnp.asarray(case.matrix_for(n, dtype=dtype)), jnp.asarray(random_vector(n,
                                                                                dtype=dtype))


def _dense_reference_loss(A: jax.Array, b: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.real(jnp.vdot(w, jnp.linalg.solve(A, b)))


# -- forward ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", _cases(one_per_solver=False))
def test_forward_matches_numpy_driver(case: object) -> None:
    A, b = _problem(case)
    solve = jax.jit(lambda A, b: pj.solve(A, b, case.name, maxiter=2000, rtol=1e-10,
                                          return_result=True, **case.options))
    x, result = solve(A, b)
    reference = po.solve(np.asarray(A), np.asarray(b), case.name, maxiter=2000, rtol=1e-10,
                         **case.options)
    assert reference.converged
    host = result.to_solve_result()
    assert host.status is reference.status
    k = min(host.iterations, reference.iterations)
    # XLA's sums and NumPy's round differently: within the eps model they agree to
    # eps cond k; CG's residual at step N = 10 (where it would terminate in exact
    # arithmetic) is made by rounding and moves ~1e-10 ||b|| between orders. The JAX run's
    # own spread under reordered sums (permuted unknowns) measures that; SOR sweeps in index
    # order, so it gets the eps model alone.
    spreads = (0.0, 0.0)
    if case.permutation_equivariant:
        A_host, b_host = np.asarray(A), np.asarray(b)

        def reordered(perm: np.ndarray) -> tuple:
            xp, rp = solve(jnp.asarray(A_host[np.ix_(perm, perm)]), jnp.asarray(b_host[perm]))
            return np.asarray(xp)[np.argsort(perm)], np.asarray(rp.residual_norms)[:k + 1]

        _, spreads = permutation_spread(reordered, N)
    floors = [agree_tol(np.float64, cond=np.linalg.cond(A), iterations=k, power=p)
              for p in (1, 2)]  # x; residual norms (relative to ||b||)
    got_norms, want_norms = host.residual_norms[:k + 1], reference.residual_norms[:k + 1]
    norms_tol = AGREE_SAFETY * spreads[1] + floors[1] * np.abs(want_norms).max()
    np.testing.assert_allclose(got_norms, want_norms, rtol=0, atol=norms_tol)
    if host.iterations == reference.iterations:
        np.testing.assert_allclose(x, reference.x, rtol=0, atol=AGREE_SAFETY * spreads[0]
                                   + floors[0] * np.abs(reference.x).max())
    else:
        # One run stopped a step later: only where the stopping test was decided by
        # rounding, i.e. the residual at the earlier stop lies within the two runs'
        # agreement band of the threshold (CG at step N, on some BLAS kernels).
        assert abs(host.iterations - reference.iterations) == 1
        threshold = 1e-10 * float(np.linalg.norm(np.asarray(b)))
        assert abs(float(want_norms[k]) - threshold) <= norms_tol, (want_norms[k], threshold)
    # converged to rtol 1e-10: within cond * 1e-10 of the direct solve
    np.testing.assert_allclose(x, np.linalg.solve(A, b), rtol=1e-7, atol=1e-8)


# Every solver and dtype: also in test_jax_conventions (strict promotion, the same
# references) and test_jax_unrolled_reverse; the full matrix runs with -m slow.
@pytest.mark.slow
@pytest.mark.parametrize("case", _cases(complex_only=True))
@pytest.mark.parametrize("dtype", [np.float32, np.complex128], ids=["float32", "complex128"])
def test_forward_dtypes(case: object, dtype: object) -> None:
    if np.issubdtype(dtype, np.complexfloating) and not po.get_solver(
            case.name, **case.options).supports_complex:
        pytest.skip(f"{case.name} does not support complex data")
    A, b = _problem(case, dtype)
    rtol = 1e-5 if dtype == np.float32 else 1e-10
    x = pj.solve(A, b, case.name, maxiter=3000, rtol=rtol, **case.options)
    assert x.dtype == dtype
    expected = np.linalg.solve(np.asarray(A, np.complex128), np.asarray(b, np.complex128))
    tol = 2e-3 if dtype == np.float32 else 1e-7
    np.testing.assert_allclose(x, expected, rtol=tol, atol=tol)


def test_fixed_iteration_count_runs_exactly_maxiter() -> None:
    A, b = jnp.asarray(spd(N)), jnp.asarray(random_vector(N))
    x, result = pj.solve(A, b, maxiter=4, rtol=0.0, atol=0.0, return_result=True)
    reference = po.solve(np.asarray(A), np.asarray(b), maxiter=4, rtol=0.0)
    assert int(result.iterations) == 4 == reference.iterations
    # 4 CG steps, XLA's sums against NumPy's: eps cond k, normwise
    assert_agree(x, reference.x, agree_tol(np.float64, np.linalg.cond(A), 4))
    assert not bool(result.converged)


def test_zero_rhs_is_solved_by_zero() -> None:
    A = jnp.asarray(spd(N))
    x, result = pj.solve(A, jnp.zeros(N), x0=jnp.ones(N), return_result=True)
    np.testing.assert_array_equal(x, 0.0)
    assert int(result.iterations) == 0 and bool(result.converged)


def test_column_vector_keeps_its_shape() -> None:
    A, b = jnp.asarray(spd(N)), jnp.asarray(random_vector(N)).reshape(N, 1)
    x = pj.solve(A, b, rtol=1e-10)
    assert x.shape == (N, 1)
    np.testing.assert_allclose(x[:, 0], np.linalg.solve(A, b[:, 0]), rtol=1e-7)


# Every solver and dtype: also in test_jax_conventions (strict promotion, the same
# references) and test_jax_unrolled_reverse; the full matrix runs with -m slow.
@pytest.mark.slow
# -- implicit gradients -------------------------------------------------------------------------
@pytest.mark.parametrize("case", _cases())
def test_implicit_gradient_matches_dense_solve(case: object) -> None:
    A, b = _problem(case)
    w = jnp.asarray(random_vector(N, seed=7))

    def loss(A: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.vdot(w, pj.solve(A, b, case.name, maxiter=500, rtol=1e-12, **case.options))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(A, b)
    expected = jax.jit(jax.grad(_dense_reference_loss, argnums=(0, 1)))(A, b, w)
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9)


def test_implicit_gradient_complex_hermitian() -> None:
    A = jnp.asarray(spd(N, dtype=np.complex128))
    b = jnp.asarray(random_vector(N, dtype=np.complex128))
    w = jnp.asarray(random_vector(N, seed=3, dtype=np.complex128))

    def loss(b: jax.Array, solve: object) -> jax.Array:
        return jnp.abs(jnp.vdot(w, solve(b))) ** 2

    got = jax.grad(loss)(b, lambda b: pj.solve(A, b, rtol=1e-12, maxiter=200))
    want = jax.grad(loss)(b, lambda b: jnp.linalg.solve(A, b))
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9)
    # and A's cotangent, through a Hermitian parameterisation A = S + S^H
    S = A / 2

    def loss_S(S: jax.Array, solve: object) -> jax.Array:
        return jnp.abs(jnp.vdot(w, solve(S + S.conj().T, b))) ** 2

    got = jax.grad(loss_S)(S, lambda A, b: pj.solve(A, b, rtol=1e-12, maxiter=200))
    want = jax.grad(loss_S)(S, jnp.linalg.solve)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)


def test_check_grads_implicit_first_and_second_order() -> None:
    A, b = jnp.asarray(spd(6, cond=5.0)), jnp.asarray(random_vector(6))

    def f(A: jax.Array, b: jax.Array) -> jax.Array:
        return pj.solve(A, b, maxiter=100, rtol=1e-13)

    check_grads(jax.jit(f), (A, b), order=2, modes=["rev"], atol=1e-5, rtol=1e-5)


def test_check_grads_unrolled_first_order() -> None:
    A, b = jnp.asarray(spd(6, cond=5.0)), jnp.asarray(random_vector(6))

    def f(A: jax.Array, b: jax.Array) -> jax.Array:
        return pj.solve(A, b, maxiter=3, rtol=0.0, adjoint="unrolled")

    check_grads(jax.jit(f), (A, b), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


def test_tiny_cotangent_does_not_underflow() -> None:
    A, b = jnp.asarray(spd(N)), jnp.asarray(random_vector(N))

    def loss(b: jax.Array, scale: float) -> jax.Array:
        return scale * jnp.sum(pj.solve(A, b, rtol=1e-12, maxiter=100))

    tiny = jax.grad(loss)(b, 1e-300)
    unit = jax.grad(loss)(b, 1.0)
    assert bool(jnp.all(jnp.isfinite(tiny)))
    # the same adjoint solve of a cotangent scaled by 1e-300 (not a power of two, so other
    # rounding), at most maxiter = 100 steps: eps cond k
    assert_agree(tiny / 1e-300, unit, agree_tol(np.float64, np.linalg.cond(A), 100))


def test_adjoint_settings_and_callback() -> None:
    A, b = jnp.asarray(spd(N)), jnp.asarray(random_vector(N))
    seen = []

    @jax.jit
    def grad_b(b: jax.Array) -> jax.Array:
        return jax.grad(lambda b: jnp.sum(pj.solve(
            A, b, rtol=1e-12, maxiter=100, adjoint_maxiter=2, adjoint_rtol=0.0,
            adjoint_callback=seen.append)))(b)

    g = jax.block_until_ready(grad_b(b))
    jax.effects_barrier()
    assert len(seen) == 1
    adjoint = seen[0]
    assert isinstance(adjoint, po.SolveResult) and adjoint.iterations == 2
    assert not adjoint.converged
    # two CG iterations on A^T lambda = 1: the gradient is that inexact lambda
    reference = po.solve(np.asarray(A).T, np.ones(N), maxiter=2, rtol=0.0)
    tol = agree_tol(np.float64, np.linalg.cond(A), 2)  # XLA's sums against NumPy's, 2 steps
    assert_agree(g, reference.x, tol)
    assert_agree(adjoint.x, reference.x, tol)


def test_preconditioned_gradient_uses_transposed_preconditioner() -> None:
    A, b = jnp.asarray(spd(N)), jnp.asarray(random_vector(N))
    w = jnp.asarray(random_vector(N, seed=5))
    M = jnp.diag(1.0 / jnp.diag(A))

    def loss(A: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.vdot(w, pj.solve(A, b, M=M, maxiter=200, rtol=1e-12))

    got = jax.grad(loss, argnums=(0, 1))(A, b)
    want = jax.jit(jax.grad(_dense_reference_loss, argnums=(0, 1)))(A, b, w)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-7, atol=1e-9)


# -- unrolled gradients -------------------------------------------------------------------------
def _reference_cg(A: jax.Array, b: jax.Array, x0: jax.Array, iterations: int) -> jax.Array:
    """Textbook CG, differentiated by plain JAX autodiff (the reference for "unrolled")."""
    x = x0
    r = b - A @ x
    p, rho = r, r @ r
    for _ in range(iterations):
        q = A @ p
        alpha = rho / (p @ q)
        x, r = x + alpha * p, r - alpha * q
        rho_new = r @ r
        p, rho = r + (rho_new / rho) * p, rho_new
    return x


@pytest.mark.parametrize("iterations", [1, 4])
def test_unrolled_matches_autodiff_of_reference_cg(iterations: int) -> None:
    A, b = jnp.asarray(spd(N)), jnp.asarray(random_vector(N))
    x0 = jnp.asarray(random_vector(N, seed=4))
    w = jnp.asarray(random_vector(N, seed=7))

    def ours(A: jax.Array, b: jax.Array, x0: jax.Array) -> jax.Array:
        return w @ pj.solve(A, b, x0=x0, maxiter=iterations, rtol=0.0, adjoint="unrolled")

    def reference(A: jax.Array, b: jax.Array, x0: jax.Array) -> jax.Array:
        return w @ _reference_cg(A, b, x0, iterations)

    got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(A, b, x0)
    want = jax.jit(jax.grad(reference, argnums=(0, 1, 2)))(A, b, x0)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-12)


def _autodiff_of_steps(case: object, A: jax.Array, b: jax.Array, iterations: int) -> jax.Array:
    """The solver's own init/step in a Python loop, for JAX to differentiate directly."""
    solver = po.get_solver(case.name, **case.options)
    op = po.DenseOperator(A)
    state = solver.init(pj.OPS, op, b, jnp.zeros_like(b), None)
    for _ in range(iterations):
        state = solver.step(pj.OPS, op, b, state, None)
    return solver.iterate(pj.OPS, op, b, state, None)


# Every solver and dtype: also in test_jax_conventions (strict promotion, the same
# references) and test_jax_unrolled_reverse; the full matrix runs with -m slow.
@pytest.mark.slow
@pytest.mark.parametrize("case", _cases())
def test_unrolled_matches_autodiff_of_the_same_steps(case: object) -> None:
    A, b = _problem(case)
    w = jnp.asarray(random_vector(N, seed=7))
    k = 3

    def ours(A: jax.Array, b: jax.Array) -> jax.Array:
        return w @ pj.solve(A, b, case.name, maxiter=k, rtol=0.0, adjoint="unrolled",
                            **case.options)

    got = jax.jit(jax.grad(ours, argnums=(0, 1)))(A, b)
    want = jax.jit(jax.grad(lambda A, b: w @ _autodiff_of_steps(case, A, b, k),
                            argnums=(0, 1)))(A, b)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("case", _cases())
def test_unrolled_gradient_at_zero_rhs_is_finite_and_matches_numpy(case: object) -> None:
    """b = 0 makes every residual exactly zero; differentiating the reported norm ||r|| there
    would give 0 * inf = NaN. The NumPy hand-derived reverse sweep is the reference."""
    A, _ = _problem(case)
    b = jnp.zeros(N)
    w = random_vector(N, seed=7)
    k = 3

    def ours(A: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.asarray(w) @ pj.solve(A, b, case.name, maxiter=k, rtol=0.0,
                                         adjoint="unrolled", **case.options)

    got_A, got_b = jax.jit(jax.grad(ours, argnums=(0, 1)))(A, b)
    _, vjp = po.solve_vjp(np.asarray(A), np.zeros(N), case.name, adjoint="unrolled",
                          maxiter=k, rtol=0.0, atol=0.0, **case.options)
    want = vjp(w)
    np.testing.assert_allclose(got_b, want.b, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(got_A, want.A, rtol=1e-8, atol=1e-12)


def test_unrolled_checkpointing_gives_the_same_gradient() -> None:
    A, b = jnp.asarray(spd(N)), jnp.asarray(random_vector(N))

    def grad(every: int) -> tuple:
        def loss(A: jax.Array, b: jax.Array) -> jax.Array:
            return jnp.sum(pj.solve(A, b, maxiter=7, rtol=0.0, adjoint="unrolled",
                                    checkpoint_every=every) ** 2)
        return jax.grad(loss, argnums=(0, 1))(A, b)

    # the checkpointed run recomputes the very same steps (same code, same order): tight
    for g, r in zip(grad(3), grad(1), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-14)


def test_unrolled_stops_at_convergence_and_differentiates_what_ran() -> None:
    A, b = jnp.asarray(spd(N, cond=3.0)), jnp.asarray(random_vector(N))
    _, result = pj.solve(A, b, maxiter=50, rtol=1e-4, adjoint="unrolled", return_result=True)
    k = int(result.iterations)
    assert 0 < k < 50
    got = jax.grad(lambda b: jnp.sum(pj.solve(A, b, maxiter=50, rtol=1e-4,
                                               adjoint="unrolled")))(b)
    want = jax.jit(jax.grad(lambda b: jnp.sum(_reference_cg(A, b, jnp.zeros(N), k))))(b)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_none_mode_has_zero_gradient() -> None:
    A, b = jnp.asarray(spd(N)), jnp.asarray(random_vector(N))
    gA, gb = jax.grad(lambda A, b: jnp.sum(pj.solve(A, b, adjoint="none") ** 2),
                      argnums=(0, 1))(A, b)
    assert not bool(jnp.any(gA)) and not bool(jnp.any(gb))


# -- jit, vmap, traced iteration counts ---------------------------------------------------------
def test_traced_maxiter_compiles_once() -> None:
    A, b = jnp.asarray(spd(N)), jnp.asarray(random_vector(N))
    traces = []

    @jax.jit
    def step(A: jax.Array, k: jax.Array, tol: jax.Array) -> tuple:
        traces.append(1)

        def loss(A: jax.Array) -> tuple:
            x, result = pj.solve(A, b, maxiter=k, rtol=tol, adjoint_maxiter=k, max_steps=20,
                                 return_result=True)
            return jnp.sum(x ** 2), result.iterations

        return jax.grad(loss, has_aux=True)(A)

    counts = [int(step(A, jnp.asarray(k), jnp.asarray(0.0))[1]) for k in (2, 5, 9)]
    assert counts == [2, 5, 9]
    assert len(traces) == 1
    step(A, jnp.asarray(50), jnp.asarray(1e-6))
    assert len(traces) == 1
    grad5 = step(A, jnp.asarray(5), jnp.asarray(0.0))[0]
    reference = jax.grad(lambda A: jnp.sum(pj.solve(A, b, maxiter=5, rtol=0.0) ** 2))(A)
    # the same steps compiled with a traced and a static count (XLA fuses them differently):
    # a gradient through 5 forward and 5 adjoint steps, eps cond^2 2k
    assert_agree(grad5, reference, agree_tol(np.float64, np.linalg.cond(A), 10, power=2))


def test_traced_maxiter_in_unrolled_mode_needs_max_steps() -> None:
    A, b = jnp.asarray(spd(N)), jnp.asarray(random_vector(N))
    with pytest.raises(ValueError, match="max_steps"):
        jax.jit(lambda k: pj.solve(A, b, maxiter=k, adjoint="unrolled"))(3)

    @jax.jit
    def grad(b: jax.Array, k: jax.Array) -> jax.Array:
        return jax.grad(lambda b: jnp.sum(pj.solve(A, b, maxiter=k, rtol=0.0,
                                                   adjoint="unrolled", max_steps=8)))(b)

    want = jax.jit(jax.grad(lambda b: jnp.sum(_reference_cg(A, b, jnp.zeros(N), 4))))(b)
    # our steps against textbook CG (other sums), 4 steps forward and back: eps cond^2 2k
    assert_agree(grad(b, 4), want, agree_tol(np.float64, np.linalg.cond(A), 8, power=2))


def test_vmap_over_b_and_over_A() -> None:
    A = jnp.asarray(spd(N))
    B = jnp.stack([jnp.asarray(random_vector(N, seed=s)) for s in range(3)])
    As = jnp.stack([jnp.asarray(spd(N, seed=s)) for s in range(3)])
    solve = jax.jit(jax.vmap(lambda A, b: pj.solve(A, b, rtol=1e-12, maxiter=100),
                             in_axes=(None, 0)))
    np.testing.assert_allclose(solve(A, B), np.linalg.solve(A, B.T).T, rtol=1e-8)
    solve_A = jax.vmap(lambda A, b: pj.solve(A, b, rtol=1e-12, maxiter=100), in_axes=(0, 0))
    np.testing.assert_allclose(solve_A(As, B), jnp.linalg.solve(As, B[..., None])[..., 0],
                               rtol=1e-8)
    # the gradient of a vmapped loss agrees with the dense reference (vmap of a gradient:
    # test_vmap_of_unrolled_gradient, and the bridge tests)
    loss = lambda As, B: jnp.sum(solve_A(As, B) ** 2)  # noqa: E731
    ref = lambda As, B: jnp.sum(jnp.linalg.solve(As, B[..., None]) ** 2)  # noqa: E731
    for g, r in zip(jax.grad(loss, (0, 1))(As, B), jax.grad(ref, (0, 1))(As, B), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-7, atol=1e-10)


def test_vmap_of_unrolled_gradient() -> None:
    A = jnp.asarray(spd(N))
    B = jnp.stack([jnp.asarray(random_vector(N, seed=s)) for s in range(2)])
    f = jax.vmap(jax.grad(lambda b: jnp.sum(pj.solve(A, b, maxiter=3, rtol=0.0,
                                                     adjoint="unrolled") ** 2)))
    want = jnp.stack([jax.grad(lambda b: jnp.sum(_reference_cg(A, b, jnp.zeros(N), 3) ** 2))(b)
                      for b in B])
    # our steps against textbook CG (other sums), 3 steps forward and back: eps cond^2 2k
    assert_agree(f(B), want, agree_tol(np.float64, np.linalg.cond(A), 6, power=2))


# -- operators -----------------------------------------------------------------------------------
def test_matvec_function_closure_gets_gradients() -> None:
    S = jnp.asarray(spd(N))
    b = jnp.asarray(random_vector(N))
    c = jnp.asarray(np.linspace(1.0, 2.0, N))

    def ours(c: jax.Array, mode: str) -> jax.Array:
        return jnp.sum(pj.solve(lambda x: S @ x + c * x, b, rtol=1e-12, maxiter=100,
                                adjoint=mode) ** 2)

    def dense(c: jax.Array) -> jax.Array:
        return jnp.sum(jnp.linalg.solve(S + jnp.diag(c), b) ** 2)

    want = jax.jit(jax.grad(dense))(c)
    np.testing.assert_allclose(jax.jit(jax.grad(ours), static_argnums=1)(c, "implicit"), want,
                               rtol=1e-7)
    np.testing.assert_allclose(jax.grad(ours)(c, "unrolled"), want, rtol=1e-6)


def test_linear_operator_without_rmatvec_is_transposed_by_jax() -> None:
    A = jnp.asarray(spd(N) + 0.3 * np.triu(np.ones((N, N)), 1))
    b, w = jnp.asarray(random_vector(N)), jnp.asarray(random_vector(N, seed=2))
    op = po.FunctionOperator(lambda x: A @ x, N)  # no rmatvec, not symmetric
    got = jax.grad(lambda b: w @ pj.solve(op, b, "gmres" if _usable(SOLVER_CASES[2]) is None
                                          else "cg", rtol=1e-12, maxiter=200))(b)
    if _usable(SOLVER_CASES[2]) is None:
        np.testing.assert_allclose(got, np.linalg.solve(A.T, w), rtol=1e-7)
    else:
        assert got.shape == b.shape


def test_bcoo_matrix_gradient_on_its_pattern() -> None:
    dense = jnp.asarray(spd(N) * (np.abs(spd(N)) > 0.05))
    dense = dense + jnp.eye(N) * 2.0
    A = jax_sparse.BCOO.fromdense(dense)
    b, w = jnp.asarray(random_vector(N)), jnp.asarray(random_vector(N, seed=2))

    def loss(data: jax.Array) -> jax.Array:
        M = jax_sparse.BCOO((data, A.indices), shape=A.shape)
        return w @ pj.solve(M, b, rtol=1e-12, maxiter=200)

    got = jax.jit(jax.grad(loss))(A.data)
    dense_grad = jax.grad(lambda D: _dense_reference_loss(D, b, w))(dense)
    rows, cols = A.indices[:, 0], A.indices[:, 1]
    np.testing.assert_allclose(got, dense_grad[rows, cols], rtol=1e-7, atol=1e-10)


def test_diffusion_stencil_coefficient_gradient() -> None:
    if not hasattr(po, "DiffusionStencil"):
        pytest.skip("po.DiffusionStencil is not available yet")
    shape = (5, 4)
    c = jnp.asarray(np.random.default_rng(0).uniform(0.5, 2.0, shape))
    n = int(np.prod(shape))
    b, w = jnp.asarray(random_vector(n)), jnp.asarray(random_vector(n, seed=2))

    def ours(c: jax.Array) -> jax.Array:
        return w @ pj.solve(po.DiffusionStencil(c), b, rtol=1e-12, maxiter=500)

    def closure(c: jax.Array) -> jax.Array:
        op = po.DiffusionStencil(c)
        return w @ pj.solve(lambda x: op.matvec(x), b, rtol=1e-12, maxiter=500)

    def dense(c: jax.Array) -> jax.Array:
        # The matrix assembled column by column from the operator, then a direct solve.
        matrix = jax.vmap(po.DiffusionStencil(c).matvec, out_axes=1)(jnp.eye(n))
        return w @ jnp.linalg.solve(matrix, b)

    want = jax.grad(dense)(c)
    np.testing.assert_allclose(jax.jit(jax.grad(ours))(c), want, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(jax.grad(closure)(c), want, rtol=1e-7, atol=1e-10)
    # the NumPy implementation's cotangent agrees too
    _, vjp = po.solve_vjp(po.DiffusionStencil(np.asarray(c)), np.asarray(b), rtol=1e-12,
                          maxiter=500)
    np.testing.assert_allclose(vjp(np.asarray(w)).A["c"], want, rtol=1e-6, atol=1e-9)


def test_user_registered_solver_runs_and_differentiates() -> None:
    class HalfRichardson(po.IterativeSolver):
        def init(self, ops, A, b, x0, M):
            r = b - A.matvec(x0)
            return {"x": x0, "r": r, "rnorm": ops.norm(r)}

        def step(self, ops, A, b, state, M):
            x = state["x"] + 0.05 * state["r"]
            r = b - A.matvec(x)
            return {"x": x, "r": r, "rnorm": ops.norm(r)}

    A, b = jnp.asarray(spd(N, cond=5.0)), jnp.asarray(random_vector(N))
    solver = HalfRichardson()
    x = pj.solve(A, b, solver, maxiter=2000, rtol=1e-10)
    np.testing.assert_allclose(x, np.linalg.solve(A, b), rtol=1e-7)

    def reference(b: jax.Array) -> jax.Array:
        x = jnp.zeros(N)
        for _ in range(3):
            x = x + 0.05 * (b - A @ x)
        return jnp.sum(x ** 2)

    got = jax.grad(lambda b: jnp.sum(pj.solve(A, b, solver, maxiter=3, rtol=0.0,
                                               adjoint="unrolled") ** 2))(b)
    # 3 steps forward and back, ours against the loop above: eps cond^2 2k
    assert_agree(got, jax.grad(reference)(b),
                 agree_tol(np.float64, np.linalg.cond(A), 6, power=2))


# -- failures and bad input ---------------------------------------------------------------------
def _indefinite() -> tuple:
    A = np.diag(np.r_[np.ones(N - 1), -1.0]) + 0.0
    return jnp.asarray(A), jnp.ones(N)


def test_breakdown_is_reported_and_keeps_the_last_good_state(caplog: object) -> None:
    A, b = _indefinite()
    with caplog.at_level(logging.WARNING, logger="prdp_ops"):
        x, result = pj.solve(A, b, maxiter=20, return_result=True)
    assert result.to_solve_result().status is po.Status.BREAKDOWN
    assert bool(jnp.all(jnp.isfinite(x)))
    assert "broke down" in caplog.text
    with pytest.raises(po.SolverError, match="broke down"):
        pj.solve(A, b, maxiter=20, on_failure="raise")


def test_breakdown_raises_inside_jit_when_asked() -> None:
    A, b = _indefinite()
    with pytest.raises(Exception, match="broke down"):
        jax.block_until_ready(jax.jit(lambda b: pj.solve(A, b, maxiter=20,
                                                         on_failure="raise"))(b))
        jax.effects_barrier()
    x = jax.jit(lambda b: pj.solve(A, b, maxiter=20, on_failure="ignore"))(b)
    assert bool(jnp.all(jnp.isfinite(x)))


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"A": jnp.ones((3, 4)), "b": jnp.ones(3)}, ValueError, "square"),
    ({"b": jnp.ones(N + 1)}, ValueError, "shape"),
    ({"b": jnp.ones(N, bool)}, TypeError, "numeric"),
    ({"solver": "no_such_solver"}, KeyError, "registered solvers"),
    ({"adjoint": "backwards"}, ValueError, "adjoint"),
    ({"backend": "torch"}, ValueError, "backend"),
    ({"maxiter": -1}, ValueError, "maxiter"),
    ({"maxiter": 2.5}, TypeError, "maxiter"),
    ({"rtol": -1.0}, ValueError, "rtol"),
    ({"x0": jnp.ones(N - 1)}, ValueError, "x0"),
    ({"A": "matrix"}, TypeError, "must be"),
    ({"adjoint": "unrolled", "maxiter": 10, "max_steps": 5}, ValueError, "max_steps"),
])
def test_bad_input_raises_at_trace_time(kwargs: dict, error: type, match: str) -> None:
    args = {"A": jnp.asarray(spd(N)), "b": jnp.ones(N), **kwargs}
    A, b = args.pop("A"), args.pop("b")
    with pytest.raises(error, match=match):
        jax.jit(lambda b: pj.solve(A, b, **args)).trace(b)


def test_ops_registration_and_helpers() -> None:
    from prdp_ops.backends import get_ops

    ops = get_ops("jax")
    assert ops is pj.OPS and ops.name == "jax" and not ops.eager
    a = jnp.zeros(3)
    assert float(ops.set_at(a, 1, 2.0)[1]) == 2.0 and float(a[1]) == 0.0
    dense = jnp.asarray(spd(N))
    np.testing.assert_allclose(pj.bcoo_diagonal(jax_sparse.BCOO.fromdense(dense)),
                               np.diag(dense))
    L = jnp.tril(dense)
    y = ops.solve_triangular(jax_sparse.BCOO.fromdense(L), jnp.ones(N), lower=True)
    np.testing.assert_allclose(L @ y, np.ones(N), rtol=1e-10)
    with pytest.raises(TypeError, match="traced"):
        jax.jit(lambda v: ops.to_float(v)).trace(jnp.ones(()))


def test_hermitian_flag_gives_the_same_gradients() -> None:
    S, b = jnp.asarray(spd(N)), jnp.asarray(random_vector(N))
    scale = jnp.asarray(1.5)

    def grads(hermitian: bool, adjoint: str) -> tuple:
        def loss(scale: jax.Array, b: jax.Array) -> jax.Array:
            x = pj.solve(lambda v: scale * (S @ v), b, maxiter=5, rtol=0.0, adjoint=adjoint,
                         hermitian=hermitian)
            return jnp.sum(x ** 2)
        return jax.grad(loss, argnums=(0, 1))(scale, b)

    # the matvec as its own adjoint against JAX's transpose of it (other sums): 5 steps
    # forward and 5 back, eps cond^2 2k
    tol = agree_tol(np.float64, np.linalg.cond(S), 10, power=2)
    for adjoint in ("implicit", "unrolled"):
        for g, r in zip(grads(True, adjoint), grads(False, adjoint), strict=True):
            assert_agree(g, r, tol)


def test_unrolled_stencil_gradient_matches_numpy_reverse_sweep() -> None:
    if not hasattr(po, "DiffusionStencil"):
        pytest.skip("po.DiffusionStencil is not available yet")
    c = np.random.default_rng(1).uniform(0.5, 2.0, (4, 5))
    b, w = random_vector(20), random_vector(20, seed=2)
    got = jax.grad(lambda c: jnp.asarray(w) @ pj.solve(
        po.DiffusionStencil(c), jnp.asarray(b), maxiter=6, rtol=0.0, adjoint="unrolled"))(
        jnp.asarray(c))
    # the NumPy side's hand-derived reverse steps (an independent derivation)
    _, vjp = po.solve_vjp(po.DiffusionStencil(c), b, maxiter=6, rtol=0.0, adjoint="unrolled")
    np.testing.assert_allclose(got, vjp(w).A["c"], rtol=1e-9, atol=1e-12)


def test_adjoint_failure_follows_the_failure_policy(caplog: object) -> None:
    if _usable(SOLVER_CASES[2]) is not None:
        pytest.skip("gmres is not implemented yet")
    A, b = _indefinite()  # GMRES solves it; CG breaks down on it

    def grad(policy: str) -> jax.Array:
        return jax.grad(lambda b: jnp.sum(pj.solve(
            A, b, "gmres", rtol=1e-10, maxiter=50, adjoint_solver="cg",
            on_failure=policy)))(b)

    with caplog.at_level(logging.WARNING, logger="prdp_ops"):
        g = grad("warn")
    assert "adjoint" in caplog.text and "broke down" in caplog.text
    assert bool(jnp.all(jnp.isfinite(g)))
    # The adjoint solve is the transpose of a staged lax.custom_linear_solve (so forward mode
    # works too): its SolverError comes from a host callback, as inside jit.
    with pytest.raises((po.SolverError, jax.errors.JaxRuntimeError),
                       match="adjoint of the gmres solve: cg: The solver broke down"):
        jax.block_until_ready(grad("raise"))
        jax.effects_barrier()


def test_unrolled_complex_matches_autodiff_of_the_same_steps() -> None:
    case = SOLVER_CASES[0]  # cg, Hermitian positive definite
    A = jnp.asarray(spd(N, dtype=np.complex128))
    b = jnp.asarray(random_vector(N, dtype=np.complex128))
    w = jnp.asarray(random_vector(N, seed=7, dtype=np.complex128))

    def ours(b: jax.Array) -> jax.Array:
        return jnp.abs(jnp.vdot(w, pj.solve(A, b, maxiter=3, rtol=0.0, adjoint="unrolled")))

    def reference(b: jax.Array) -> jax.Array:
        return jnp.abs(jnp.vdot(w, _autodiff_of_steps(case, A, b, 3)))

    np.testing.assert_allclose(jax.grad(ours)(b), jax.grad(reference)(b), rtol=1e-9,
                               atol=1e-12)
