"""The JAX unrolled reverse sweep from the solvers' own reverse steps (backends/_jax_unrolled).

Every built-in solver whose ``record``/``step_vjp``/``init_vjp`` run traced is reversed with
them; the reference is the other sweep, ``jax.vjp`` of one ``step`` at a time (selected by
making :func:`record_avals` answer ``None``), which JAX derives independently of the
hand-written reverse. Both are the exact derivative of the same K steps, so they differ by
rounding only: :func:`helpers.agree_tol` with ``power=2`` (a reverse sweep through K steps).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SOLVER_CASES, agree_tol, assert_agree, random_vector, spd
from prdp_ops.backends import _jax_unrolled as unrolled
from prdp_ops.backends import jax as pj

import prdp_ops as po

jax.config.update("jax_enable_x64", True)

N, K = 12, 5
#: Solvers reversed by JAX's vjp of their step: GMRES's record reads the step counter on
#: the host (one basis per restart cycle), which tracing cannot.
FALLBACK = {"gmres"}
CASES = [pytest.param(c, id=c.id) for c in SOLVER_CASES]
DTYPES = [np.float64, np.float32, np.complex128]


def _case_by_dtype() -> list:
    """Every case in every dtype; the default run keeps one dtype per case, rotated so that
    each dtype runs for two or three solvers (GMRES: float64 with restarts only, its
    compiles being the longest), and leaves the rest to ``pytest -m slow``."""
    params, rotation = [], 0
    for case in SOLVER_CASES:
        if case.name == "gmres":
            kept = 0 if case.options.get("restart", 0) < 20 else None
        else:
            kept, rotation = rotation % len(DTYPES), rotation + 1
        for j, dtype in enumerate(DTYPES):
            params.append(pytest.param(case, dtype, id=f"{np.dtype(dtype).name}-{case.id}",
                                       marks=() if j == kept else (pytest.mark.slow,)))
    return params


@pytest.fixture
def vjp_of_step(monkeypatch: pytest.MonkeyPatch):
    """Run a function with the ``jax.vjp``-of-step sweep instead of the hand reverse."""
    def run(fn, *args):
        with monkeypatch.context() as m:
            m.setattr(unrolled, "record_avals", lambda *a, **k: None)
            return fn(*args)
    return run


def _uses_hand_reverse(case, A, b) -> bool:
    solver = po.get_solver(case.name, **case.options)
    avals = unrolled.record_avals(solver, pj.OPS, po.DenseOperator(A), None, b,
                                  jnp.zeros_like(b))
    return avals is not None


@pytest.mark.parametrize(("case", "dtype"), _case_by_dtype())
def test_hand_reverse_matches_vjp_of_step(case, dtype, vjp_of_step) -> None:
    if dtype == np.complex128 and not case.complex_ok:
        pytest.skip("real solver")
    A_np = case.matrix_for(N, dtype)
    A, b = jnp.asarray(A_np), jnp.asarray(random_vector(N, dtype=dtype))
    w = jnp.asarray(random_vector(N, seed=7, dtype=dtype))
    assert _uses_hand_reverse(case, A, b) == (case.name not in FALLBACK)

    def loss(A, b):
        x = pj.solve(A, b, case.name, maxiter=K, rtol=0.0, adjoint="unrolled", **case.options)
        return jnp.real(jnp.vdot(w, x))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    got = grad(A, b)
    want = vjp_of_step(lambda: jax.jit(jax.grad(loss, argnums=(0, 1)))(A, b))
    tol = agree_tol(dtype, np.linalg.cond(A_np), K, power=2)
    for g, r, name in zip(got, want, ("A", "b"), strict=True):
        assert g.dtype == r.dtype
        assert_agree(g, r, tol, err_msg=f"{case.id} {np.dtype(dtype).name} d/d{name}")


def _stencil(c, n: int):
    """``c`` times the 1D Dirichlet Laplacian: c a scalar or a field (one per cell)."""
    def matvec(u):
        v = jnp.pad(u, 1)
        return c * (2 * v[1:-1] - v[:-2] - v[2:])
    return matvec


@pytest.mark.parametrize(("field", "dtype"), [
    pytest.param(False, np.float64, id="float64-scalar coefficient", marks=pytest.mark.slow),
    pytest.param(True, np.float64, id="float64-field"),
    pytest.param(False, np.float32, id="float32-scalar coefficient"),
    pytest.param(True, np.float32, id="float32-field", marks=pytest.mark.slow),
])
def test_closure_parameters(field: bool, dtype, vjp_of_step) -> None:
    """Arrays closed over by a matvec: a real scalar goes through the forward-mode route
    (one tangent product and a dot per pair), a field through the vjp of the product."""
    n = 16
    c = jnp.asarray(np.linspace(1.0, 2.0, n) if field else 1.5, dtype)
    b = jnp.asarray(random_vector(n, dtype=dtype))

    def loss(c, b):
        x = pj.solve(_stencil(c, n), b, maxiter=6, rtol=0.0, hermitian=True,
                     adjoint="unrolled")
        return jnp.sum(x ** 2)

    got = jax.jit(jax.grad(loss, argnums=(0, 1)))(c, b)
    want = vjp_of_step(lambda: jax.jit(jax.grad(loss, argnums=(0, 1)))(c, b))
    # cond of the 1D Laplacian on n cells ~ 4 (n + 1)^2 / pi^2 (times 2 for the field).
    tol = agree_tol(dtype, 2 * 4 * (n + 1) ** 2 / np.pi ** 2, 6, power=2)
    for g, r in zip(got, want, strict=True):
        assert g.shape == r.shape and g.dtype == r.dtype
        assert_agree(g, r, tol)


def test_operator_with_own_param_vjp(vjp_of_step) -> None:
    """A LinearOperator that computes its parameter cotangent itself (DiffusionStencil)."""
    n = 8
    c = jnp.asarray(np.linspace(1.0, 2.0, n * n))
    b = jnp.asarray(random_vector(n * n))

    def loss(c, b):
        x = pj.solve(po.DiffusionStencil(c.reshape(n, n)), b, maxiter=6, rtol=0.0,
                     adjoint="unrolled")
        return jnp.sum(x ** 2)

    got = jax.grad(loss, argnums=(0, 1))(c, b)
    want = vjp_of_step(lambda: jax.grad(loss, argnums=(0, 1))(c, b))
    tol = agree_tol(np.float64, 2 * 8 * (n + 1) ** 2 / np.pi ** 2, 6, power=2)
    for g, r in zip(got, want, strict=True):
        assert_agree(g, r, tol)


def test_preconditioned_and_x0(vjp_of_step) -> None:
    """M's transpose (``ctx.precond_T``) and x0's cotangent (``init_vjp``)."""
    A_np = spd(N)
    A, b = jnp.asarray(A_np), jnp.asarray(random_vector(N))
    M = jnp.diag(1 / jnp.diag(A))
    x0 = jnp.asarray(random_vector(N, seed=3))

    def loss(A, b, x0):
        return jnp.sum(pj.solve(A, b, x0=x0, M=M, maxiter=K, rtol=0.0,
                                adjoint="unrolled") ** 2)

    got = jax.grad(loss, argnums=(0, 1, 2))(A, b, x0)
    want = vjp_of_step(lambda: jax.grad(loss, argnums=(0, 1, 2))(A, b, x0))
    tol = agree_tol(np.float64, np.linalg.cond(A_np), K, power=2)
    for g, r in zip(got, want, strict=True):
        assert_agree(g, r, tol)


class _PlainRichardson(po.IterativeSolver):
    """A user solver with ``step`` only: no reverse step of its own."""

    name = "plain_richardson_test"

    def init(self, ops, A, b, x0, M):
        r = b - A.matvec(x0)
        return {"x": x0, "r": r, "rnorm": ops.norm(r)}

    def step(self, ops, A, b, state, M):
        x = state["x"] + 0.03 * state["r"]
        r = b - A.matvec(x)
        return {"x": x, "r": r, "rnorm": ops.norm(r)}


def test_user_solver_without_step_vjp_falls_back() -> None:
    A_np = spd(N)
    A, b = jnp.asarray(A_np), jnp.asarray(random_vector(N))
    solver = _PlainRichardson()
    assert unrolled.record_avals(solver, pj.OPS, po.DenseOperator(A), None, b,
                                 jnp.zeros_like(b)) is None

    def ours(A, b):
        return jnp.sum(pj.solve(A, b, solver, maxiter=K, rtol=0.0, adjoint="unrolled") ** 2)

    def autodiff(A, b):  # plain JAX autodiff of the same K steps
        x = jnp.zeros_like(b)
        for _ in range(K):
            x = x + 0.03 * (b - A @ x)
        return jnp.sum(x ** 2)

    tol = agree_tol(np.float64, np.linalg.cond(A_np), K, power=2)
    for g, r in zip(jax.grad(ours, argnums=(0, 1))(A, b),
                    jax.grad(autodiff, argnums=(0, 1))(A, b), strict=True):
        assert_agree(g, r, tol)


class _RichardsonWithReverse(po.Richardson):
    """Richardson (its reverse step is traceable) with a reverse step altered per test."""

    name = "richardson_reverse_test"


class _BuggyReverse(_RichardsonWithReverse):
    """A reverse step with a bug: it reads a state entry the record does not hold."""

    def step_vjp(self, ops, A, b, M, record, state_bar, ctx):
        return {"x": state_bar["no such entry"]}


class _HostReadReverse(_RichardsonWithReverse):
    """A reverse step that reads a value on the host (not traceable, as GMRES's record)."""

    def record(self, ops, A, b, M, before, after):
        ops.to_float(before["rnorm"])
        return super().record(ops, A, b, M, before, after)


class _ConcreteIntReverse(_RichardsonWithReverse):
    """A reverse step that turns an array into a Python int (JAX's own concretization error)."""

    def step_vjp(self, ops, A, b, M, record, state_bar, ctx):
        int(record[0][0])
        return super().step_vjp(ops, A, b, M, record, state_bar, ctx)


class _DeclaredNumpyOnly(_BuggyReverse):
    """A reverse step declared NumPy-only: JAX derives the reverse from ``step``."""

    jax_traceable_reverse = False


def _grad_of_unrolled(solver, A, b):
    def loss(A, b):
        return jnp.sum(pj.solve(A, b, solver, maxiter=K, rtol=0.0, adjoint="unrolled") ** 2)
    return jax.grad(loss, argnums=(0, 1))(A, b)


@pytest.mark.parametrize("cls", [_HostReadReverse, _ConcreteIntReverse, _DeclaredNumpyOnly])
def test_fallback_only_for_untraceable_reverse(cls, vjp_of_step) -> None:
    """A host read of a traced value (``ops.to_float``, ``int()`` of a tracer) or a class
    declared ``jax_traceable_reverse = False`` selects ``jax.vjp`` of ``step``, which gives
    the gradient of the same K steps."""
    A_np = spd(N, cond=5.0)
    A, b = jnp.asarray(A_np), jnp.asarray(random_vector(N))
    solver = cls(omega=0.5)
    assert unrolled.record_avals(solver, pj.OPS, po.DenseOperator(A), None, b,
                                 jnp.zeros_like(b)) is None
    got = _grad_of_unrolled(solver, A, b)
    want = vjp_of_step(lambda: _grad_of_unrolled(_RichardsonWithReverse(omega=0.5), A, b))
    tol = agree_tol(np.float64, np.linalg.cond(A_np), K, power=2)
    for g, r in zip(got, want, strict=True):
        assert_agree(g, r, tol)


def test_buggy_reverse_step_surfaces() -> None:
    """Any other error of a reverse step is a bug: it is raised, named, not hidden behind
    the ``jax.vjp`` fallback."""
    A, b = jnp.asarray(spd(N)), jnp.asarray(random_vector(N))
    with pytest.raises(RuntimeError, match=r"reverse step of solver 'richardson_reverse_test'"
                       r".*KeyError.*no such entry") as info:
        _grad_of_unrolled(_BuggyReverse(omega=0.5), A, b)
    assert isinstance(info.value.__cause__, KeyError)
    assert "jax_traceable_reverse = False" in str(info.value)


@pytest.mark.parametrize("every", [1, pytest.param(2, marks=pytest.mark.slow),
                                   pytest.param(3, marks=pytest.mark.slow), 7])
def test_checkpointed_hand_reverse(every: int) -> None:
    """Records recomputed segment by segment give the gradient of the full tape (the same
    operations in the same order: equal to rounding of nothing, but compared normwise)."""
    A_np = spd(N)
    A, b = jnp.asarray(A_np), jnp.asarray(random_vector(N))

    def loss(A, b, every):
        return jnp.sum(pj.solve(A, b, maxiter=7, rtol=0.0, adjoint="unrolled",
                                checkpoint_every=every) ** 2)

    want = jax.grad(loss, argnums=(0, 1))(A, b, 1)
    got = jax.grad(loss, argnums=(0, 1))(A, b, every)
    tol = agree_tol(np.float64, np.linalg.cond(A_np), 7, power=2)
    for g, r in zip(got, want, strict=True):
        assert_agree(g, r, tol)


@pytest.mark.parametrize("name", ["cg", "jacobi"])
def test_checkpointed_vjp_of_step(name: str, vjp_of_step) -> None:
    """The ``jax.vjp``-of-step sweep recomputing segments from checkpoints (7 steps in
    segments of 3: a short last one) gives the gradient of the hand reverse's full tape;
    Jacobi's diagonal, a constant of the solve, is not on its tape."""
    A_np = spd(N)
    A, b = jnp.asarray(A_np), jnp.asarray(random_vector(N))

    def loss(A, b, every):
        return jnp.sum(pj.solve(A, b, name, maxiter=7, rtol=0.0, adjoint="unrolled",
                                checkpoint_every=every, **({"omega": 0.5} if name ==
                                                            "jacobi" else {})) ** 2)

    want = jax.grad(loss, argnums=(0, 1))(A, b, 1)
    got = vjp_of_step(lambda: jax.grad(loss, argnums=(0, 1))(A, b, 3))
    tol = agree_tol(np.float64, np.linalg.cond(A_np), 7, power=2)
    for g, r in zip(got, want, strict=True):
        assert_agree(g, r, tol)


@pytest.mark.parametrize("hand", [True, False], ids=["hand reverse", "vjp of step"])
def test_checkpointed_solve_with_tolerance(hand: bool, vjp_of_step) -> None:
    """A checkpointed tape of a solve that stops at a tolerance (runs of steps end at
    checkpoints and at convergence claims; a refuted claim resumes between checkpoints)
    gives the gradient of the full tape."""
    A_np = spd(N, cond=50.0)
    A, b = jnp.asarray(A_np), jnp.asarray(random_vector(N))

    def grad(every):
        def loss(A, b):
            return jnp.sum(pj.solve(A, b, maxiter=40, rtol=1e-9, adjoint="unrolled",
                                    checkpoint_every=every) ** 2)
        run = (lambda f: f()) if hand else vjp_of_step
        return run(lambda: jax.grad(loss, argnums=(0, 1))(A, b))

    _, result = pj.solve(A, b, maxiter=40, rtol=1e-9, return_result=True)
    assert 3 < int(result.iterations) < 40
    want, got = grad(1), grad(3)
    tol = agree_tol(np.float64, np.linalg.cond(A_np), int(result.iterations), power=2)
    for g, r in zip(got, want, strict=True):
        assert_agree(g, r, tol)


def test_early_stop_traced_maxiter_and_vmap(vjp_of_step) -> None:
    """A solve that converges before its capacity, with a traced maxiter, under vmap."""
    A_np = spd(N, cond=5.0)
    A = jnp.asarray(A_np)
    B = jnp.stack([jnp.asarray(random_vector(N, seed=s)) for s in range(3)])

    def loss(b, k):
        return jnp.sum(pj.solve(A, b, maxiter=k, rtol=1e-6, adjoint="unrolled",
                                max_steps=20) ** 2)

    fn = jax.jit(jax.vmap(jax.grad(loss), in_axes=(0, None)))
    got = fn(B, 20)
    want = vjp_of_step(lambda: jax.jit(jax.vmap(jax.grad(loss), in_axes=(0, None)))(B, 20))
    tol = agree_tol(np.float64, np.linalg.cond(A_np), 20, power=2)
    assert_agree(got, want, tol)


def test_forward_mode_still_works() -> None:
    """jax.jvp / jacfwd of the unrolled solve (the tangent map, untouched by the reverse)
    equal jax.vjp's transpose: <w, J v> from both."""
    A_np = spd(N)
    A, b = jnp.asarray(A_np), jnp.asarray(random_vector(N))
    v, w = jnp.asarray(random_vector(N, seed=4)), jnp.asarray(random_vector(N, seed=5))

    def solve(b):
        return pj.solve(A, b, maxiter=K, rtol=0.0, adjoint="unrolled")

    _, jv = jax.jvp(solve, (b,), (v,))
    _, pull = jax.vjp(solve, b)
    (jtw,) = pull(w)
    tol = agree_tol(np.float64, np.linalg.cond(A_np), K, power=2)
    assert_agree(jnp.vdot(w, jv), jnp.vdot(jtw, v), tol)
    assert jax.jacfwd(solve)(b).shape == (N, N)
