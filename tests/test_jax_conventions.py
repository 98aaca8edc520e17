"""JAX's conventions, as jax.scipy and lineax keep them (issue 8, part 3, and part 5's memory
traps): strict dtype promotion with x64 on and off, integer promotion, forward-mode
derivatives, memory that does not scale with a huge ``maxiter``, and a clear error for
NumPy-only operators.

Each test sets the JAX configuration it checks with context managers
(``jax.enable_x64``, ``jax.numpy_dtype_promotion("strict")``), so both x64 states are covered
whatever the environment says (``tests/test_jax_backend.py`` switches x64 on globally when it
is imported). References are independent of the code under test: dense direct solves and
their autodiff evaluated in float64/complex128 (x64 on), JAX's own autodiff of the solver's
steps in a Python loop, the NumPy implementation, finite differences
(``jax.test_util.check_grads``) and closed forms.

Tolerances follow from the solve's accuracy. A converged solve has ``||b - A x|| <= rtol
||b||`` up to the rounding of evaluating that residual (about ``n eps ||A|| ||x||``), so
``||x - x*|| <= cond(A) (rtol + n eps) ||x*||``; a gradient or a tangent is one more solve of
the same kind (and, for A's cotangent ``-lambda x^T``, a product of two such factors).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse.linalg as sla
from helpers import SOLVER_CASES, random_vector, spd
from jax.test_util import check_grads
from prdp_ops.backends import jax as pj

import prdp_ops as po

N = 6

#: (x64, dtype): every dtype JAX has in each x64 state.
CONFIGS = [
    pytest.param(True, np.float32, id="x64-float32"),
    pytest.param(True, np.float64, id="x64-float64"),
    pytest.param(True, np.complex64, id="x64-complex64"),
    pytest.param(True, np.complex128, id="x64-complex128"),
    pytest.param(False, np.float32, id="x32-float32"),
    pytest.param(False, np.complex64, id="x32-complex64"),
]


def _one_per_solver() -> list:
    seen, cases = set(), []
    for case in SOLVER_CASES:
        if case.name not in seen:
            seen.add(case.name)
            cases.append(case)
    return cases


def _solver_by_config() -> list:
    """Every solver in every configuration; the default run keeps one configuration per
    solver (none for GMRES, the longest compiles, whose JAX path the default run covers in
    test_jax_scipy_dropin and test_bad_input), rotated so that each of the six
    configurations runs for exactly one of the six other solvers, and leaves the rest to
    ``pytest -m slow``."""
    params, rotation = [], 0
    for case in _one_per_solver():
        kept = None
        if case.name != "gmres":
            kept, rotation = rotation % len(CONFIGS), rotation + 1
        for j, config in enumerate(CONFIGS):
            marks = () if j == kept else (pytest.mark.slow,)
            params.append(pytest.param(case, *config.values, marks=marks,
                                       id=f"{config.id}-{case.id}"))
    return params


@contextlib.contextmanager
def strict(x64: bool) -> Iterator[None]:
    """JAX as its own test suites run: strict dtype promotion, x64 as given."""
    with jax.enable_x64(x64), jax.numpy_dtype_promotion("strict"):
        yield


@contextlib.contextmanager
def wide() -> Iterator[None]:
    """Where references are computed: x64 on, standard promotion."""
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        yield


def _eps(dtype: object) -> float:
    return float(np.finfo(dtype).eps)


def _rtol(dtype: object) -> float:
    """The solve tolerance of a dtype: well above the rounding floor 16 eps of the driver."""
    return 1e-5 if _eps(dtype) > 1e-10 else 1e-10


def _relative_error(got: object, want: object) -> float:
    got, want = np.asarray(got, np.complex128), np.asarray(want, np.complex128)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _wide_dtype(dtype: object) -> type:
    return np.complex128 if np.issubdtype(dtype, np.complexfloating) else np.float64


def _data(case: object, dtype: object) -> tuple:
    """A, b, a loss weight w and tangent directions dA, db, as numpy arrays of ``dtype``."""
    A = case.matrix_for(N, dtype=dtype)
    b, w = random_vector(N, dtype=dtype), random_vector(N, seed=7, dtype=dtype)
    rng = np.random.default_rng(11)
    dA = rng.standard_normal((N, N)) / N
    if np.issubdtype(dtype, np.complexfloating):
        dA = dA + 1j * rng.standard_normal((N, N)) / N
    return A, b, w, dA.astype(dtype), random_vector(N, seed=9, dtype=dtype)


def _steps(case: object, A: jax.Array, b: jax.Array, k: int) -> jax.Array:
    """The solver's own init/step in a Python loop, for JAX to differentiate directly."""
    solver = po.get_solver(case.name, **case.options)
    op = po.DenseOperator(A)
    state = solver.init(pj.OPS, op, b, jnp.zeros_like(b), None)
    for _ in range(k):
        state = solver.step(pj.OPS, op, b, state, None)
    return solver.iterate(pj.OPS, op, b, state, None)


# -- every solver, every dtype, strict promotion, x64 on and off -------------------------------
@pytest.mark.parametrize(("case", "x64", "dtype"), _solver_by_config())
def test_solve_grad_and_jvp_under_strict_promotion(case: object, x64: bool,
                                                   dtype: object) -> None:
    solver = po.get_solver(case.name, **case.options)
    if np.issubdtype(dtype, np.complexfloating) and not solver.supports_complex:
        pytest.skip(f"{case.name} does not support complex data")
    A_h, b_h, w_h, dA_h, db_h = _data(case, dtype)
    rtol, k = _rtol(dtype), 3

    def loss(A: jax.Array, b: jax.Array, w: jax.Array, adjoint: str, maxiter: int,
             tol: float) -> jax.Array:
        x = pj.solve(A, b, case.name, maxiter=maxiter, rtol=tol, adjoint=adjoint,
                     on_failure="raise", **case.options)
        return jnp.real(jnp.vdot(w, x))

    with strict(x64):
        A, b, w, dA, db = (jnp.asarray(v) for v in (A_h, b_h, w_h, dA_h, db_h))
        assert A.dtype == dtype

        @jax.jit
        def run(A: jax.Array, b: jax.Array, w: jax.Array, dA: jax.Array,
                db: jax.Array) -> tuple:
            x, result = pj.solve(A, b, case.name, maxiter=3000, rtol=rtol, return_result=True,
                                 on_failure="raise", **case.options)
            grads = jax.grad(loss, argnums=(0, 1))(A, b, w, "implicit", 3000, rtol)
            tangent = jax.jvp(lambda A, b: pj.solve(A, b, case.name, maxiter=3000, rtol=rtol,
                                                    on_failure="raise", **case.options),
                              (A, b), (dA, db))[1]
            unrolled = jax.grad(loss, argnums=(0, 1))(A, b, w, "unrolled", k, 0.0)
            unrolled_tangent = jax.jvp(
                lambda A, b: pj.solve(A, b, case.name, maxiter=k, rtol=0.0, adjoint="unrolled",
                                      **case.options), (A, b), (dA, db))[1]
            return x, result.converged, grads, tangent, unrolled, unrolled_tangent

        x, converged, grads, tangent, unrolled, unrolled_tangent = run(A, b, w, dA, db)
        for value in (x, *grads, tangent, *unrolled, unrolled_tangent):
            assert value.dtype == dtype
        assert bool(converged)

    with wide():
        wide_dtype = _wide_dtype(dtype)

        @jax.jit
        def reference(A: jax.Array, b: jax.Array, w: jax.Array, dA: jax.Array,
                      db: jax.Array) -> tuple:
            grads = jax.grad(lambda A, b: jnp.real(jnp.vdot(w, jnp.linalg.solve(A, b))),
                             argnums=(0, 1))(A, b)
            unrolled = jax.grad(lambda A, b: jnp.real(jnp.vdot(w, _steps(case, A, b, k))),
                                argnums=(0, 1))(A, b)
            return (jnp.linalg.solve(A, b), grads, jax.jvp(jnp.linalg.solve, (A, b), (dA, db))[1],
                    unrolled, jax.jvp(lambda A, b: _steps(case, A, b, k), (A, b), (dA, db))[1])

        x_ref, grads_ref, tangent_ref, unrolled_ref, unrolled_tangent_ref = reference(
            *(jnp.asarray(v, wide_dtype) for v in (A_h, b_h, w_h, dA_h, db_h)))

    cond = np.linalg.cond(A_h.astype(wide_dtype))
    eps = _eps(dtype)
    # The solve and the adjoint solve each err by at most cond (rtol + n eps); A's cotangent
    # -lambda x^T carries both errors. The tangent solve's right-hand side db - dA x carries
    # x's error amplified by ||dA|| ||x|| / ||db - dA x|| before its own solve.
    one_solve = cond * (rtol + N * eps)
    rhs = np.asarray(db_h, wide_dtype) - np.asarray(dA_h, wide_dtype) @ np.asarray(x_ref)
    amplification = 1 + (cond * np.linalg.norm(dA_h, 2) * np.linalg.norm(x_ref)
                         / np.linalg.norm(rhs))
    assert _relative_error(x, x_ref) <= one_solve
    assert _relative_error(grads[1], grads_ref[1]) <= one_solve
    assert _relative_error(grads[0], grads_ref[0]) <= 2 * one_solve
    assert _relative_error(tangent, tangent_ref) <= amplification * one_solve
    # k steps computed in `dtype` against the same steps in 64-bit: each step's scalars are
    # inner products of n terms (relative error n eps) whose effect on the iterate is
    # amplified by at most cond(A); its derivative is a product of two such factors.
    steps_error = 2 * k * N * eps * cond
    for got, want in zip((*unrolled, unrolled_tangent), (*unrolled_ref, unrolled_tangent_ref),
                         strict=True):
        assert _relative_error(got, want) <= steps_error


@pytest.mark.parametrize("x64", [True, False], ids=["x64", "x32"])
def test_integer_inputs_promote_as_jnp_linalg_solve(x64: bool) -> None:
    A_h = np.array([[4, 1, 0], [1, 3, 1], [0, 1, 2]])
    b_h = np.array([1, -2, 3])
    x_exact = np.linalg.solve(A_h.astype(np.float64), b_h.astype(np.float64))
    cond = np.linalg.cond(A_h)
    with strict(x64):
        for int_dtype in (jnp.int32, jnp.int64) if x64 else (jnp.int32,):
            A, b = jnp.asarray(A_h, int_dtype), jnp.asarray(b_h, int_dtype)
            x = pj.solve(A, b, rtol=1e-12 if x64 else 1e-6, maxiter=50)
            expected = jnp.linalg.solve(A, b).dtype  # float64 for int64 (as NumPy), else f32
            assert x.dtype == expected
            # cond (rtol + n eps) with the eps of the dtype it computed in
            eps = _eps(expected)
            assert _relative_error(x, x_exact) <= cond * ((1e-12 if x64 else 1e-6) + 3 * eps)
        if x64:
            assert pj.solve(jnp.asarray(A_h), jnp.asarray(b_h)).dtype == np.float64


def test_strict_promotion_refuses_mixed_dtypes_with_a_clear_error() -> None:
    A = spd(N, dtype=np.float32)
    b = random_vector(N)
    with strict(True):
        with pytest.raises(TypeError, match="A has dtype float32 and b has dtype float64"):
            pj.solve(jnp.asarray(A), jnp.asarray(b))
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        x = pj.solve(jnp.asarray(A), jnp.asarray(b), rtol=1e-12, maxiter=100)
        assert x.dtype == jnp.linalg.solve(jnp.asarray(A), jnp.asarray(b)).dtype == np.float64
        # exact for the float32 entries of A, widened: cond (rtol + n eps), cond = 50
        x_ref = np.linalg.solve(A.astype(np.float64), b)
        assert _relative_error(x, x_ref) <= 50 * (1e-12 + N * _eps(np.float64))


# -- forward mode, implicit ---------------------------------------------------------------------
def test_implicit_jacfwd_hessian_and_check_grads_match_the_dense_solve() -> None:
    S, b = spd(N, cond=5.0), random_vector(N)
    c = np.linspace(1.0, 2.0, N)
    rtol = 1e-13
    with strict(True):
        S, b, c = jnp.asarray(S), jnp.asarray(b), jnp.asarray(c)

        def ours(c: jax.Array, b: jax.Array) -> jax.Array:
            return pj.solve(lambda x: S @ x + c * x, b, maxiter=200, rtol=rtol)

        def dense(c: jax.Array, b: jax.Array) -> jax.Array:
            return jnp.linalg.solve(S + jnp.diag(c), b)

        def loss(f: object) -> object:
            return lambda c, b: jnp.sum(f(c, b) ** 3)

        jac = jax.jit(jax.jacfwd(ours, argnums=(0, 1)))(c, b)
        # the references jitted too: one compile each instead of one per primitive
        jac_ref = jax.jit(jax.jacfwd(dense, argnums=(0, 1)))(c, b)
        hess = jax.jit(jax.hessian(loss(ours)))(c, b)
        hess_ref = jax.jit(jax.hessian(loss(dense)))(c, b)
        # cond(S + diag c) <= 7/2 over the spectrum [1, 5] + [1, 2]; each derivative is at
        # most three chained solves of error cond (rtol + n eps).
        bound = 3 * 3.5 * (rtol + N * _eps(np.float64))
        for got, want in zip((*jac, hess), (*jac_ref, hess_ref), strict=True):
            assert _relative_error(got, want) <= bound
        # and forward over forward against finite differences (reverse over reverse:
        # test_jax_backend.py); central differences of step 1e-4 (check_grads' default for
        # float64) err by O(1e-8) on this smooth map, well inside 1e-6
        check_grads(jax.jit(ours), (c, b), order=2, modes=["fwd"], atol=1e-6, rtol=1e-6)


def test_forward_mode_keeps_traced_maxiter_and_compiles_once() -> None:
    A_h, db_h = spd(N), random_vector(N, seed=3)
    traces = []
    with strict(True):
        A, b, db = jnp.asarray(A_h), jnp.asarray(random_vector(N)), jnp.asarray(db_h)

        @jax.jit
        def tangent(k: jax.Array) -> jax.Array:
            traces.append(1)
            return jax.jvp(lambda b: pj.solve(A, b, maxiter=k, rtol=0.0), (b,), (db,))[1]

        for k in (2, 5):
            got = tangent(jnp.asarray(k))
            # the tangent of x = A^-1 b along db is a solve with the forward's settings: k CG
            # iterations from zero on db, as the NumPy implementation runs them.
            want = po.solve(A_h, db_h, maxiter=k, rtol=0.0, atol=0.0).x
            # Same k steps in another order of sums: k n eps cond(A) = 50 k n eps.
            assert _relative_error(got, want) <= 50 * k * N * _eps(np.float64)
    assert len(traces) == 1


def test_adjoint_settings_and_callback_survive_the_forward_mode_rule() -> None:
    A_h, w_h = spd(N), random_vector(N, seed=5)
    seen = []
    with strict(True):
        A, b, w = jnp.asarray(A_h), jnp.asarray(random_vector(N)), jnp.asarray(w_h)

        def loss(b: jax.Array, k: jax.Array) -> jax.Array:
            return w @ pj.solve(A, b, maxiter=100, rtol=1e-12, adjoint_maxiter=k,
                                adjoint_rtol=0.0, adjoint_callback=seen.append)

        grad = jax.jit(jax.grad(loss))(b, jnp.asarray(2))
        jax.effects_barrier()
        assert [r.iterations for r in seen] == [2]
        # two CG iterations on A^T lambda = w, from zero: the NumPy implementation's
        reference = po.solve(A_h.T, w_h, maxiter=2, rtol=0.0, atol=0.0).x
        assert _relative_error(grad, reference) <= 50 * 2 * N * _eps(np.float64)
        assert _relative_error(seen[0].x, reference) <= 50 * 2 * N * _eps(np.float64)
        # forward mode runs no adjoint solve; a Hessian-vector product runs one
        jax.block_until_ready(jax.jvp(lambda b: loss(b, jnp.asarray(2)), (b,), (b,)))
        jax.effects_barrier()
        assert len(seen) == 1
        jax.block_until_ready(jax.jvp(jax.grad(lambda b: loss(b, jnp.asarray(2)) ** 2),
                                      (b,), (b,)))
        jax.effects_barrier()
        assert len(seen) > 1 and all(r.iterations == 2 for r in seen)


def test_tangent_solve_failures_follow_the_failure_policy(caplog: object) -> None:
    # CG on A = diag(1, ..., 1, -1): b = (1, ..., 1, 0) is solved in one step (x = b), but
    # the tangent solve along e_n starts with p = e_n, p.Ap = -1 < 0: a breakdown.
    A = np.diag(np.r_[np.ones(N - 1), -1.0])
    b = np.r_[np.ones(N - 1), 0.0]
    with strict(True), caplog.at_level(logging.WARNING, logger="prdp_ops"):
        A, b = jnp.asarray(A), jnp.asarray(b)
        e = jnp.zeros(N).at[-1].set(1.0)
        jax.block_until_ready(jax.jvp(lambda b: pj.solve(A, b, maxiter=20), (b,), (e,)))
        jax.effects_barrier()
    assert "tangent of the cg solve" in caplog.text and "broke down" in caplog.text


# -- forward mode, unrolled ---------------------------------------------------------------------
def test_unrolled_jacfwd_equals_jacrev_and_second_derivatives_say_use_implicit() -> None:
    case = SOLVER_CASES[1]  # bicgstab: non-symmetric, so a transposition slip would show
    A_h = case.matrix_for(N)
    with strict(True):
        A, b = jnp.asarray(A_h), jnp.asarray(random_vector(N))

        def f(b: jax.Array) -> jax.Array:
            return pj.solve(A, b, case.name, maxiter=4, rtol=0.0, adjoint="unrolled")

        forward_jac = jax.jit(jax.jacfwd(f))(b)
        reverse_jac = jax.jit(jax.jacrev(f))(b)
        with wide():
            reference = jax.jacfwd(lambda b: _steps(case, jnp.asarray(A_h), b, 4))(
                jnp.asarray(b))
        # 4 steps in another order of sums: 2 k n eps cond(A) (see the strict test).
        bound = 2 * 4 * N * _eps(np.float64) * np.linalg.cond(A_h)
        assert _relative_error(forward_jac, reference) <= bound
        assert _relative_error(reverse_jac, reference) <= bound
        with pytest.raises(NotImplementedError, match="adjoint='implicit'"):
            jax.hessian(lambda b: jnp.sum(f(b) ** 3))(b)
        with pytest.raises(NotImplementedError, match="first derivatives only"):
            jax.jit(jax.grad(lambda b: jnp.sum(jax.grad(lambda b: jnp.sum(f(b) ** 3))(b))))(b)


# -- memory -------------------------------------------------------------------------------------
def _stencil_loss(shape: tuple[int, int], **kwargs: object) -> tuple:
    c = jnp.asarray(np.random.default_rng(0).uniform(0.5, 2.0, shape))
    b = jnp.asarray(random_vector(int(np.prod(shape))))

    def loss(c: jax.Array) -> jax.Array:
        return jnp.sum(pj.solve(po.DiffusionStencil(c), b, adjoint="unrolled", **kwargs) ** 2)

    return loss, c, b


def test_unrolled_default_tape_does_not_scale_with_10n() -> None:
    with strict(True):
        loss, c, _ = _stencil_loss((128, 128))
        compiled = jax.jit(jax.grad(loss)).lower(c).compile()
        # A tape of 10 n = 163840 CG states (r and p: 2 x 128 KiB each) would be 43 GB. The
        # default checkpoints every ceil(sqrt(10 n)) = 405 steps: 405 checkpoints and one
        # segment of 405 recomputed states of what a step reads (x, r, p: 384 KiB), 0.3 GB.
        assert compiled.memory_analysis().temp_size_in_bytes < 2**30


def test_unrolled_default_checkpointing_gives_the_full_tape_gradient() -> None:
    with strict(True):
        loss, c, b = _stencil_loss((12, 12))
        _, result = pj.solve(po.DiffusionStencil(c), b, return_result=True)
        k = int(result.iterations)
        assert 1 < k < 1440  # stopped at the tolerance, far short of maxiter = 10 n
        got = jax.jit(jax.grad(loss))(c)  # default maxiter: checkpointed sweep
        full_loss, _, _ = _stencil_loss((12, 12), maxiter=k, checkpoint_every=1)
        want = jax.jit(jax.grad(full_loss))(c)
        # the same k steps, recomputed bit for bit from the checkpoints
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)


def test_unrolled_tape_larger_than_memory_fails_before_allocating() -> None:
    n = 1000

    def loss(b: jax.Array, **kwargs: object) -> jax.Array:
        return jnp.sum(pj.solve(2 * jnp.eye(n), b, adjoint="unrolled", **kwargs))

    with strict(True):
        b = jnp.asarray(random_vector(n))
        # 10^9 CG states of 3 x 8 kB: 24 TB, refused at trace time (eval_shape allocates
        # nothing)
        with pytest.raises(MemoryError, match=r"bytes(.|\n)*maxiter(.|\n)*max_steps(.|\n)*"
                                              r"checkpoint_every"):
            jax.eval_shape(jax.grad(lambda b: loss(b, maxiter=10**9, checkpoint_every=1)), b)
        # a traced maxiter's max_steps = 10^14, even checkpointed every 10^7 steps: 560 TB
        with pytest.raises(MemoryError, match="checkpoint_every="):
            jax.eval_shape(jax.grad(lambda b, k: loss(b, maxiter=k, max_steps=10**14)), b,
                           jnp.asarray(3))


def test_residual_history_is_bounded_whatever_maxiter() -> None:
    with strict(True):
        A, b = 2 * jnp.eye(N), jnp.asarray(random_vector(N))
        solve = jax.jit(lambda b: pj.solve(A, b, maxiter=int(2e8), return_result=True))
        x, result = solve(b)
        np.testing.assert_allclose(x, b / 2, rtol=1e-15)
        assert int(result.iterations) == 1  # CG solves 2 I x = b in one step
        bound = max(10 * N, 100_000) + 1
        assert result.residual_norms.shape == (bound,)
        # 2e8 + 1 float64 norms would take 1.6 GB; the bounded buffer takes 0.8 MB.
        memory = solve.lower(b).compile().memory_analysis()
        assert memory.temp_size_in_bytes + memory.output_size_in_bytes < 4 * 2**20
        host = result.to_solve_result()
        assert host.iterations == 1 and len(host.residual_norms) == 2


def test_residual_history_keeps_the_final_norm_past_its_bound() -> None:
    # Richardson on A = diag(1, 2) from zero: r_k = (I - omega A)^k b exactly.
    omega, iterations, bound = 1e-5, 100_007, 100_000
    with strict(True):
        A, b = jnp.diag(jnp.asarray([1.0, 2.0])), jnp.asarray([1.0, 1.0])
        _, result = jax.jit(lambda b: pj.solve(A, b, "richardson", omega=omega,
                                               maxiter=iterations, rtol=0.0,
                                               return_result=True))(b)
    norms = np.asarray(result.residual_norms)
    assert norms.shape == (bound + 1,) and int(result.iterations) == iterations

    def exact(k: int) -> float:
        return float(np.hypot((1 - omega) ** k, (1 - 2 * omega) ** k))

    # Rounding accumulates about eps per step in x: k eps ~ 2e-11 relative; ||r_k|| ~ 0.4
    # ||b|| here, so b - A x loses nothing to cancellation.
    for k in (1, 50_000, bound - 1):
        np.testing.assert_allclose(norms[k], exact(k), rtol=1e-9)
    np.testing.assert_allclose(norms[bound], exact(iterations), rtol=1e-9)


# -- NumPy-only operators -----------------------------------------------------------------------
def test_numpy_only_operators_get_an_error_naming_the_argument() -> None:
    A_h, b_h = spd(N), random_vector(N)
    scipy_op = sla.aslinearoperator(A_h)
    with strict(True):
        _numpy_only_errors(A_h, b_h, scipy_op)


def _numpy_only_errors(A_h: np.ndarray, b_h: np.ndarray, scipy_op: object) -> None:
    b = jnp.asarray(b_h)
    for A in (scipy_op, po.aslinearoperator(scipy_op), lambda x: A_h @ np.asarray(x)):
        with pytest.raises(TypeError, match=r"^A computes with NumPy/SciPy(.|\n)*"
                                            r"backend='numpy'(.|\n)*po.FunctionOperator"):
            pj.solve(A, b)
    with pytest.raises(TypeError, match=r"^M computes with NumPy/SciPy"):
        pj.solve(jnp.asarray(A_h), b, M=sla.aslinearoperator(np.eye(N)))
    # and the advice works: the NumPy implementation takes the SciPy operator
    x = jax.jit(lambda b: pj.solve(scipy_op, b, backend="numpy", rtol=1e-12, maxiter=100))(b)
    # cond(A) = 50: cond (rtol + n eps)
    assert _relative_error(x, np.linalg.solve(A_h, b_h)) <= 50 * (1e-12 + N * 2.3e-16)
