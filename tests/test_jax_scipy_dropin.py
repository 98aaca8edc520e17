"""``prdp_ops.backends.jax.cg/bicgstab/gmres`` against ``jax.scipy.sparse.linalg``'s own:
same signatures, same answers, gradients against a dense ``jnp.linalg.solve``, and every
documented difference (the list in ``backends/_jax_scipy.py``) pinned.

Tolerances come from the project's rounding model (``tests/helpers.py``):

* two converged solutions of the same system differ by at most ``converged_tol(cond,
  rho_1, rho_2, n)`` with ``rho_i`` their measured relative residuals (a bound, whatever the
  order of the sums);
* two runs of the same method for a fixed count ``k < n`` of iterations, or a derivative
  computed two ways, differ by rounding: ``agree_tol(dtype, cond, k)`` (forward) and
  ``agree_tol(dtype, cond, k, power=2)`` (cotangents: an adjoint solve on a right-hand side
  that already carries the forward error).

Everything is built in JAX's default float dtype (float32, or float64 with x64), so the file
runs under ``JAX_NUMPY_DTYPE_PROMOTION=strict`` with x64 on and off.
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy.sparse.linalg as jsl
import numpy as np
import pytest
from helpers import agree_tol, assert_agree, converged_tol, relative_residual, spd
from prdp_ops.backends import jax as pj

SOLVERS = ("cg", "bicgstab", "gmres")
N = 8
#: JAX's default float: float32, or float64 with x64 enabled.
F = jnp.dtype(jax.dtypes.canonicalize_dtype(np.float64))


def _weak(x: Any) -> bool:
    from jax._src.dtypes import is_weakly_typed

    return bool(is_weakly_typed(x))


def _matrix(solver: str) -> np.ndarray:
    """SPD for CG (eigenvalues in [1, 20]); SPD plus a skew part for the others."""
    A = spd(N, seed=4, cond=20.0)
    if solver != "cg":
        A = A + 0.3 * np.triu(np.ones((N, N)), 1) - 0.3 * np.tril(np.ones((N, N)), -1)
    return A


def _problem(solver: str) -> tuple[jax.Array, jax.Array, float]:
    A = _matrix(solver)
    b = np.random.default_rng(7).standard_normal(N)
    return jnp.asarray(A, F), jnp.asarray(b, F), float(np.linalg.cond(A))


def _ours(solver: str) -> Any:
    return getattr(pj, solver)


def _theirs(solver: str) -> Any:
    return getattr(jsl, solver)


def _tight() -> float:
    """A tolerance the dtype resolves for these cond ~ 20 problems."""
    return 1e-10 if F == jnp.float64 else 1e-5


# -- signatures ---------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", SOLVERS)
def test_signature_extends_jax(solver: str) -> None:
    """JAX's parameters come first, with the same kinds and defaults; ours follow,
    keyword-only."""
    ours = list(inspect.signature(_ours(solver)).parameters.values())
    theirs = list(inspect.signature(_theirs(solver)).parameters.values())
    for mine, jaxs in zip(ours, theirs, strict=False):
        assert (mine.name, mine.kind, mine.default) == (jaxs.name, jaxs.kind, jaxs.default)
    extras = ours[len(theirs):]
    assert [p.name for p in extras][:1] == ["adjoint"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extras)
    assert solver in pj.__all__


# -- answers ------------------------------------------------------------------------------------
def _as(kind: str, A: jax.Array) -> Any:
    if kind == "matrix":
        return A
    if kind == "function":
        return lambda x: A @ x

    class Matmul:  # an object with ``@`` and a shape, as JAX's tests use
        shape = A.shape

        def __matmul__(self, x: Any) -> Any:
            return A @ x

    return Matmul()


def _gmres_slow(solvers: tuple[str, ...]) -> list:
    """The solvers, GMRES (the longest JAX compiles) left to ``pytest -m slow``."""
    return [pytest.param(s, marks=(pytest.mark.slow,) if s == "gmres" else ()) for s in solvers]


def _solution_cases() -> list:
    """Every solver, operator kind and preconditioning. The default run keeps, per solver,
    the unpreconditioned dense matrix and each other operator kind once (the function
    preconditioned, the matmul operator not: each kind and each preconditioning runs), and
    leaves the rest to ``pytest -m slow``; GMRES (the longest compiles) keeps only the
    unpreconditioned dense matrix (its preconditioned solve runs in test_difference_1)."""
    default = {("matrix", False), ("function", True), ("matmul", False)}

    def kept(solver: str, kind: str, precondition: bool) -> bool:
        if solver == "gmres":
            return (kind, precondition) == ("matrix", False)
        return (kind, precondition) in default

    return [pytest.param(solver, kind, precondition, id=f"{precondition}-{kind}-{solver}",
                         marks=() if kept(solver, kind, precondition) else (pytest.mark.slow,))
            for precondition in (False, True) for kind in ("matrix", "function", "matmul")
            for solver in SOLVERS]


@pytest.mark.parametrize(("solver", "kind", "precondition"), _solution_cases())
def test_same_solution_as_jax(solver: str, kind: str, precondition: bool) -> None:
    A, b, cond = _problem(solver)
    M = jnp.diag(1.0 / jnp.diag(A)) if precondition else None
    tol = _tight()
    x, info = _ours(solver)(_as(kind, A), b, tol=tol, M=M)
    x_jax, _ = _theirs(solver)(_as(kind, A), b, tol=tol, M=M)
    assert info is None
    assert x.dtype == x_jax.dtype == F and x.shape == b.shape
    rho, rho_jax = relative_residual(A, b, x), relative_residual(A, b, x_jax)
    # true-residual stop: ours meets tol on ||b - A x|| itself (in float64 on the host),
    # up to the rounding of that residual, eps cond (power 1, relative to ||b||)
    assert rho <= tol + agree_tol(F, cond)
    assert_agree(x, x_jax, converged_tol(cond, rho, rho_jax, n=N))
    x_dense = np.linalg.solve(np.asarray(A, np.float64), np.asarray(b, np.float64))
    assert_agree(x, x_dense, converged_tol(cond, rho, n=N))


def test_pytree_b_and_function_of_pytrees() -> None:
    """b a dict of differently shaped arrays; A a function on such dicts (JAX's pytree form);
    x has b's structure and shapes, and solves the raveled system."""
    A, _, cond = _problem("cg")
    rng = np.random.default_rng(3)
    b = {"u": jnp.asarray(rng.standard_normal((2, 3)), F),
         "v": jnp.asarray(rng.standard_normal(2), F)}

    def ravel(t: Any) -> jax.Array:
        return jnp.concatenate([t["u"].ravel(), t["v"]])

    def matvec(t: Any) -> Any:
        y = A @ ravel(t)
        return {"u": y[:6].reshape(2, 3), "v": y[6:]}

    for solver in SOLVERS:
        x, _ = _ours(solver)(matvec, b, tol=_tight())
        x_jax, _ = _theirs(solver)(matvec, b, tol=_tight())
        assert jax.tree_util.tree_structure(x) == jax.tree_util.tree_structure(b)
        assert x["u"].shape == (2, 3) and x["v"].dtype == F
        rho = relative_residual(A, ravel(b), ravel(x))
        rho_jax = relative_residual(A, ravel(b), ravel(x_jax))
        assert_agree(ravel(x), ravel(x_jax), converged_tol(cond, rho, rho_jax, n=N))


@pytest.mark.parametrize("solver", _gmres_slow(SOLVERS))
def test_weak_types_kept(solver: str) -> None:
    """A Python scalar b gives a weakly typed x (JAX's BiCGSTAB and GMRES do too; its CG
    drops the weak type, and its test_cg_weak_types calls bicgstab)."""
    x, _ = _ours(solver)(lambda v: 2 * v, 1.0)
    x_jax, _ = _theirs(solver)(lambda v: 2 * v, 1.0)
    assert _weak(x) and x.dtype == x_jax.dtype
    assert _weak(x_jax) == (solver != "cg")
    x, _ = _ours(solver)(lambda v: 2 * v, jnp.ones(3, F))
    assert not _weak(x)


@pytest.mark.parametrize("solver", _gmres_slow(SOLVERS))
def test_tol_and_atol_rule(solver: str) -> None:
    """``||b - A x|| <= max(tol ||b||, atol)``: a loose ``tol`` stops early (and the residual
    meets it), an ``atol`` above ``||b||`` returns ``x0`` untouched, as JAX's does."""
    A, b, cond = _problem(solver)
    x, _ = _ours(solver)(A, b, tol=1e-2)
    assert relative_residual(A, b, x) <= 1e-2 + agree_tol(F, cond)
    bnorm = float(jnp.linalg.norm(b))
    x0 = jnp.full(N, 0.5, F)
    for f in (_ours(solver), _theirs(solver)):
        x, _ = f(A, b, x0, tol=0.0, atol=2 * bnorm + 10 * float(jnp.linalg.norm(A @ x0)))
        np.testing.assert_array_equal(x, x0)


@pytest.mark.parametrize("solver", ["cg", "bicgstab"])
def test_fixed_count_matches_jax_under_jit_with_traced_maxiter(solver: str) -> None:
    """``tol = atol = 0`` and ``maxiter = k``: k iterations of the same method as JAX's (the
    same iterates in exact arithmetic, k < n so no Ritz value has converged): agree to
    ``agree_tol(dtype, cond, k)``. ``maxiter`` is traced: one compilation serves every k."""
    A, b, cond = _problem(solver)
    traces = []

    @jax.jit
    def ours(k: jax.Array) -> jax.Array:
        traces.append(k)
        return _ours(solver)(A, b, tol=0.0, maxiter=k)[0]

    for k in (1, 2, 3):
        x_jax, _ = _theirs(solver)(A, b, tol=0.0, maxiter=k)
        assert_agree(ours(jnp.asarray(k)), x_jax, agree_tol(F, cond, k))
    assert len(traces) == 1


# -- derivatives ----------------------------------------------------------------------------------
def _dense(A: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.linalg.solve(A, b)


@pytest.mark.parametrize("solver", _gmres_slow(SOLVERS))
def test_grad_and_jvp_match_dense_solve(solver: str) -> None:
    """Implicit (default) gradients w.r.t. a matrix's entries and b, reverse and forward
    mode, against the derivative of ``jnp.linalg.solve``: both carry the forward error of a
    converged solve; the cotangent adds an adjoint solve on it (power 2)."""
    A, b, cond = _problem(solver)
    w = jnp.linspace(-1.0, 1.0, N, dtype=F)
    tol = _tight()

    def loss(f: Any) -> Any:
        return lambda A, b: jnp.vdot(w, f(A, b))

    ours = loss(lambda A, b: _ours(solver)(A, b, tol=tol, atol=0.0)[0])
    ref = loss(_dense)
    # the implicit derivative is exact at convergence: rounding plus the tol-sized residual
    bound = agree_tol(F, cond, N, power=2) + converged_tol(cond, tol, tol, n=N)
    # jitted: one compile per derivative instead of one per primitive
    for got, want in zip(jax.jit(jax.grad(ours, (0, 1)))(A, b),
                         jax.jit(jax.grad(ref, (0, 1)))(A, b), strict=True):
        assert_agree(got, want, bound)
    dA, db = jnp.asarray(_matrix("gmres") * 0.1, F), jnp.ones(N, F)
    _, t_ours = jax.jit(lambda *p: jax.jvp(lambda A, b: _ours(solver)(A, b, tol=tol)[0],
                                           (A, b), p))(dA, db)
    _, t_ref = jax.jit(lambda *p: jax.jvp(_dense, (A, b), p))(dA, db)
    assert_agree(t_ours, t_ref, bound)


def test_grad_reaches_arrays_closed_over_by_a_function_and_pytree_b() -> None:
    _, b, _ = _problem("cg")
    half = {"p": b[:4], "q": b[4:]}

    def ours(scale: jax.Array, half: Any) -> jax.Array:
        matvec = lambda t: {"p": scale * t["p"], "q": 2.0 * t["q"]}  # noqa: E731
        x, _ = pj.cg(matvec, half, tol=_tight())
        return jnp.sum(x["p"]) + jnp.sum(x["q"] ** 2)

    def ref(scale: jax.Array, half: Any) -> jax.Array:
        return jnp.sum(half["p"] / scale) + jnp.sum((half["q"] / 2.0) ** 2)

    scale = jnp.asarray(3.0, F)
    got = jax.jit(jax.grad(ours, (0, 1)))(scale, half)
    want = jax.jit(jax.grad(ref, (0, 1)))(scale, half)
    tol = agree_tol(F, 1.5, N, power=2) + converged_tol(1.5, _tight(), _tight(), n=N)
    for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want),
                    strict=True):
        assert_agree(g, r, tol)


def test_adjoint_modes_exposed() -> None:
    """``adjoint="none"``: zero gradient; ``"unrolled"`` at a converged count: the implicit
    gradient (both differentiate the same converged solve)."""
    A, b, cond = _problem("cg")

    def grad(**kw: Any) -> jax.Array:
        return jax.jit(jax.grad(lambda b: jnp.sum(pj.cg(A, b, **kw)[0])))(b)

    np.testing.assert_array_equal(grad(adjoint="none"), jnp.zeros(N, F))
    # stopped at convergence: both are the derivative of x = A^-1 b up to the residual
    implicit = grad(tol=_tight(), maxiter=4 * N)
    unrolled = grad(tol=_tight(), maxiter=4 * N, adjoint="unrolled")
    assert_agree(unrolled, implicit, converged_tol(cond, _tight(), _tight(), n=N)
                 + agree_tol(F, cond, 4 * N, power=2))


def test_adjoint_callback_sees_the_adjoint_solve() -> None:
    A, b, _ = _problem("cg")
    seen = []
    jax.grad(lambda b: jnp.sum(pj.cg(A, b, adjoint_callback=seen.append)[0]))(b)
    assert len(seen) == 1 and seen[0].converged


# -- documented differences -----------------------------------------------------------------------
def test_difference_1_gmres_right_preconditioned() -> None:
    """Same Krylov space (``M K(A M, r0) = K(M A, M r0)``), different norm minimised: after
    one step ours has the smaller true residual, JAX's the smaller preconditioned one."""
    A, b, cond = _problem("gmres")
    M = jnp.asarray(np.linalg.inv(spd(N, seed=9, cond=10.0)), F)
    x, _ = pj.gmres(A, b, tol=0.0, restart=1, maxiter=1, M=M)
    x_jax, _ = jsl.gmres(A, b, tol=0.0, restart=1, maxiter=1, M=M)
    slack = agree_tol(F, cond, 1)
    true, true_jax = relative_residual(A, b, x), relative_residual(A, b, x_jax)
    pre = float(jnp.linalg.norm(M @ (b - A @ x)))
    pre_jax = float(jnp.linalg.norm(M @ (b - A @ x_jax)))
    assert true <= true_jax * (1 + slack)
    assert pre_jax <= pre * (1 + slack)
    assert true < true_jax * (1 - 10 * slack)  # a real difference, not rounding


@pytest.mark.slow  # GMRES compiled twice, for one equality (the default run solves GMRES elsewhere)
def test_difference_2_solve_method_accepted_same_gmres() -> None:
    A, b, _ = _problem("gmres")
    x_inc, _ = pj.gmres(A, b, solve_method="incremental")
    x_bat, _ = pj.gmres(A, b, solve_method="batched")
    np.testing.assert_array_equal(x_inc, x_bat)  # the same code, bit for bit
    with pytest.raises(ValueError, match="solve_method"):
        pj.gmres(A, b, solve_method="qr")


def test_difference_3_gmres_info_and_maxiter_in_cycles() -> None:
    A, b, _ = _problem("gmres")
    x, info = pj.gmres(A, b, tol=0.0, restart=2, maxiter=2)
    assert info is None
    assert jsl.gmres(A, b)[1] is not None  # JAX's gives an array
    steps = pj.solve(A, b, "gmres", rtol=0.0, maxiter=4, restart=2)  # 2 cycles of 2 steps
    np.testing.assert_array_equal(x, steps)


def test_difference_4_dtypes() -> None:
    if jax.config.jax_numpy_dtype_promotion == "strict":  # a matrix must have b's dtype
        with pytest.raises(TypeError, match="b has dtype"):
            pj.cg(jnp.eye(3, dtype=F), jnp.arange(3))
    else:
        x, _ = pj.cg(jnp.eye(3, dtype=F), jnp.arange(3))
        assert x.dtype == F  # integer b: the solve's float
    C = jnp.dtype(jax.dtypes.canonicalize_dtype(np.complex128))
    x, _ = pj.bicgstab(lambda v: (1 + 1j) * v.astype(C), jnp.ones(3, C))
    assert x.dtype == C


@pytest.mark.parametrize("bad", [{"tol": float("nan")}, {"tol": -1.0}, {"atol": float("inf")},
                                 {"maxiter": 1.5}, {"restart": 0}])
def test_difference_5_stricter_arguments(bad: dict) -> None:
    A, b, _ = _problem("gmres")
    name = next(iter(bad))
    with pytest.raises((ValueError, TypeError), match=name):
        pj.gmres(A, b, **bad)


def test_difference_5_jax_error_wording_kept() -> None:
    b = jnp.zeros(2, F)
    with pytest.raises(ValueError, match="x0 and b must have matching tree structure"):
        pj.cg(lambda v: v, {"x": b}, {"y": b})
    with pytest.raises(ValueError, match="x0 and b must have matching shape"):
        pj.cg(lambda v: v, b, b[:, None])
    with pytest.raises(ValueError, match=r"A: .*must be a square matrix"):
        pj.cg(jnp.zeros((3, 2), F), b)
    with pytest.raises(TypeError, match="A: linear operator must be either a function"):
        pj.cg([[1]], jnp.zeros(1, F))
    with pytest.raises(TypeError, match="M: linear operator must be either a function"):
        pj.cg(lambda v: v, b, M="jacobi")


def test_difference_6_one_more_product_to_confirm() -> None:
    """JAX's CG on ``2 I`` takes two products (``r0``, one step); ours also confirms the
    claim on the true residual, so at least one more."""
    counts = {"ours": 0, "jax": 0}

    def counted(who: str) -> Any:
        def matvec(v: jax.Array) -> jax.Array:
            jax.debug.callback(lambda: counts.__setitem__(who, counts[who] + 1))
            return 2 * v
        return matvec

    b = jnp.ones(4, F)
    jax.block_until_ready(pj.cg(counted("ours"), b)[0])
    jax.block_until_ready(jsl.cg(counted("jax"), b)[0])
    assert counts["ours"] >= counts["jax"] + 1
