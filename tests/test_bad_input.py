"""Bad input and edge cases give the same, trustworthy outcome on every path.

Every test is parametrised over the registered solvers (one case of ``helpers.SOLVER_CASES``
per solver name) and over the three paths a user can take:

* ``"numpy"``  -- ``po.solve`` / ``po.solve_vjp`` (the NumPy driver and its reverse sweep);
* ``"jax"``    -- ``pj.solve`` natively (``lax`` loops, JAX's derivative of the steps);
* ``"bridge"`` -- ``pj.solve(..., backend="numpy")`` (the NumPy driver inside a JAX
  ``custom_vjp``, through host callbacks).

The classes covered: a matvec function returning the wrong shape; ``b`` of shape ``(n, 1)``;
the empty system ``n = 0``; a callback that is not callable; NaN in ``b`` or ``A``, eagerly
and under ``jit``, with each ``on_failure`` policy; the gradient with respect to ``x0``; and
aliasing (nothing the caller holds feeds a gradient; nothing passed in is modified).

Compilation budget. A native solve costs seconds to compile (a ``while_loop`` per solve and
per adjoint), so the native path runs where it differs between solvers: every solver for
the unrolled derivative and for NaN under ``jit`` with the default policy; the other
adjoint modes and policies, whose native code does not depend on the solver (a
``stop_gradient``, a ``custom_vjp`` that returns no ``x0`` cotangent, the report after the
loop), for CG. Compiled functions are shared between tests (module-level caches).

Tolerances. Two evaluations of the same ``K``-step map (another implementation, another
shape, another BLAS kernel) differ by rounding only, ``helpers.agree_tol``'s model:
``eps cond k`` for forward quantities, ``eps cond^2 k`` for cotangents (:func:`_agree`;
``K = 4 < n`` steps, before short recurrences lose orthogonality, so the model holds;
measured: under 5% of it). Cotangents are compared relative to the larger of their own
norm and the seed's, ``||w||``: the reverse sweep's rounding is relative to what flows
through it, and a cotangent small by cancellation (BiCGSTAB's ``x0_bar`` is ``2e-3 ||w||``
here) has no smaller absolute error. Converged solves are compared by
``helpers.converged_tol``. A wrong result (a zero gradient, a mutated input leaking in)
misses by O(1), far outside.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp
from helpers import SOLVER_CASES, SolverCase, agree_tol, converged_tol, random_vector
from prdp_ops.backends import jax as pj

import prdp_ops as po

jax.config.update("jax_enable_x64", True)

#: One case per registered solver name (the first of helpers.SOLVER_CASES for it).
CASES: list[SolverCase] = []
for _case in SOLVER_CASES:
    if _case.name not in {c.name for c in CASES}:
        CASES.append(_case)

PATHS = ["numpy", "jax", "bridge"]
MODES = ["implicit", "unrolled", "none"]
POLICIES = ["warn", "raise", "ignore"]
N = 8
#: Iterations of the fixed-count solves (rtol = atol = 0): few enough that every solver's
#: unrolled derivative stays well conditioned, enough to exercise the loop and its tape.
K = 4
EPS = float(np.finfo(np.float64).eps)


def _params(*names: str, keep: Callable[..., bool] = lambda **_: True) -> Any:
    """``pytest.mark.parametrize`` over ``names`` (from "case", "path", "adjoint",
    "policy", "where", "how") with the combinations ``keep(**combo)`` accepts."""
    values = {"case": CASES, "path": PATHS, "adjoint": MODES, "policy": POLICIES,
              "where": ["b", "A"], "how": ["eager", "jit"]}
    combos: list[dict[str, Any]] = [{}]
    for name in names:
        combos = [{**c, name: v} for c in combos for v in values[name]]
    params = [pytest.param(*(c[n] for n in names),
                           id="-".join(c[n].id if n == "case" else str(c[n]) for n in names))
              for c in combos if keep(**c)]
    return pytest.mark.parametrize(names, params)


def _supported(case: SolverCase, path: str = "numpy", adjoint: str = "implicit",
               **_: Any) -> bool:
    """Unrolled mode on NumPy needs the solver's hand-written reverse step."""
    if path != "jax" and adjoint == "unrolled":
        return po.get_solver(case.name, **case.options).supports_unrolled_numpy
    return True


def _native_budget(case: SolverCase, path: str, adjoint: str = "unrolled",
                   **_: Any) -> bool:
    """See the module doc: natively, every solver unrolled, CG in the other modes."""
    return path != "jax" or adjoint == "unrolled" or case.name == "cg"


def _problem(case: SolverCase, n: int = N) -> tuple[np.ndarray, ...]:
    """``A`` of the case's family, ``b``, a non-zero ``x0`` and a cotangent ``w``."""
    return (case.matrix_for(n), random_vector(n, seed=1), random_vector(n, seed=2),
            random_vector(n, seed=3))


def _agree(A: np.ndarray, power: int) -> float:
    """``helpers.agree_tol`` for the ``K``-step solves here: ``power=1`` for ``x``,
    ``power=2`` for cotangents (a reverse sweep through steps that carry the forward's
    rounding)."""
    return agree_tol(np.float64, float(np.linalg.cond(A)), K, power=power)


def _assert_close(actual: Any, desired: Any, rtol: float, seed: Any = None) -> None:
    """Norm-wise relative comparison, relative to ``max(||desired||, ||seed||)``."""
    actual, desired = np.asarray(actual), np.asarray(desired)
    assert actual.shape == desired.shape, (actual.shape, desired.shape)
    scale = max(float(np.linalg.norm(desired)),
                0.0 if seed is None else float(np.linalg.norm(seed)),
                np.finfo(np.float64).tiny)
    error = float(np.linalg.norm(actual - desired))
    assert error <= rtol * scale, f"relative error {error / scale:.3g} > {rtol:.3g}"


def _pj(path: str, A: Any, b: Any, case: SolverCase, **kwargs: Any) -> Any:
    """``pj.solve`` natively ("jax") or through the bridge ("bridge")."""
    backend = "jax" if path == "jax" else "numpy"
    return pj.solve(A, b, case.name, backend=backend, **case.options, **kwargs)


def _status(result: Any) -> po.Status:
    return pj.JaxSolveResult.STATUSES[int(result.status)]


@functools.cache
def _vjp_fn(path: str, case_index: int, adjoint: str) -> Callable:
    """Jitted ``(A, b, x0, w) -> (x, A_bar, b_bar, x0_bar)`` of the ``K``-step solve.

    Shared by the column and the ``x0`` tests, which both call it with columns ``(n, 1)``:
    one compilation per solver and mode.
    """
    case = CASES[case_index]

    def run(A: Any, b: Any, x0: Any, w: Any) -> tuple:
        x, pull = jax.vjp(lambda A, b, x0: _pj(path, A, b, case, x0=x0, maxiter=K, rtol=0.0,
                                               adjoint=adjoint), A, b, x0)
        return (x, *pull(w))

    return jax.jit(run)


def _vjp_columns(path: str, case: SolverCase, adjoint: str, A: np.ndarray, b: np.ndarray,
                 x0: np.ndarray, w: np.ndarray) -> tuple:
    """``(x, A_bar, b_bar, x0_bar)`` on a JAX path, from column inputs."""
    fn = _vjp_fn(path, CASES.index(case), adjoint)
    return tuple(np.asarray(v) for v in fn(jnp.asarray(A), *(jnp.asarray(v[:, None])
                                                               for v in (b, x0, w))))


# -- a matvec function returning the wrong shape ------------------------------------------------
#: name -> (function of the array module, what the error message must show as returned)
BAD_MATVECS: dict[str, tuple[Callable[[Any], Callable[[Any], Any]], str]] = {
    "n-1": (lambda xp: lambda x: x[:-1], rf"\({N - 1},\)"),
    "n+1": (lambda xp: lambda x: xp.concatenate([x, x[:1]]), rf"\({N + 1},\)"),
    "None": (lambda xp: lambda x: None, "None"),
    "scalar": (lambda xp: lambda x: xp.sum(x), r"\(\)"),
}
bad_matvecs = pytest.mark.parametrize("bad", list(BAD_MATVECS))


def _matrix_free_ok(case: SolverCase, path: str, **_: Any) -> bool:
    # SOR needs explicit entries (its triangular sweep): on NumPy a matvec function is a
    # MatrixFreeError before any product. Natively and on the bridge the function's shape
    # is checked first, at trace time, whatever the solver.
    return not (path == "numpy" and case.name == "sor")


@bad_matvecs
@_params("case", "path", keep=_matrix_free_ok)
def test_wrong_shape_matvec_is_a_clear_error(case: SolverCase, path: str, bad: str) -> None:
    make, shown = BAD_MATVECS[bad]
    b = random_vector(N)
    match = rf"matvec.*{shown}"  # names the function and the shape it returned
    if path == "jax":
        A = make(jnp)  # a matvec function, as jax.scipy.sparse.linalg.cg takes
    else:
        # diagonal= lets Jacobi run matrix-free; symmetric= serves the implicit adjoint.
        A = po.FunctionOperator(make(np), N, symmetric=True, diagonal=np.full(N, 4.0))
    if path != "numpy":
        with pytest.raises(ValueError, match=match):
            jax.jit(lambda b: _pj(path, A, b, case))(jnp.asarray(b))
        return
    with pytest.raises(ValueError, match=match):
        po.solve(A, b, case.name, **case.options)
    for adjoint in MODES:
        if _supported(case, path, adjoint):
            with pytest.raises(ValueError, match=match):
                po.solve_vjp(A, b, case.name, adjoint=adjoint, **case.options)


@bad_matvecs
@_params("case", keep=lambda case: _matrix_free_ok(case, "numpy"))
def test_wrong_shape_rmatvec_is_a_clear_error(case: SolverCase, bad: str) -> None:
    # The implicit adjoint applies rmatvec (NumPy only: JAX transposes the matvec itself).
    make, shown = BAD_MATVECS[bad]
    A_dense, b, _, w = _problem(case)
    A = po.FunctionOperator(lambda x: A_dense @ x, N, rmatvec=make(np),
                            diagonal=np.diag(A_dense).copy())
    result, vjp = po.solve_vjp(A, b, case.name, maxiter=K, rtol=0, **case.options)
    assert np.all(np.isfinite(result.x))  # the forward pass never calls rmatvec
    with pytest.raises(ValueError, match=rf"rmatvec.*{shown}"):
        vjp(w)


# -- b of shape (n, 1) -------------------------------------------------------------------------
@_params("case", "path", "adjoint", keep=lambda **c: _supported(**c) and _native_budget(**c))
def test_column_b_round_trip(case: SolverCase, path: str, adjoint: str) -> None:
    A, b, x0, w = _problem(case)
    kw = {"maxiter": K, "rtol": 0.0, "adjoint": adjoint, **case.options}
    # The 1-D NumPy solve is the reference for the values.
    r, vjp = po.solve_vjp(A, b, case.name, x0=x0, **kw)
    c = vjp(w)
    assert r.x.shape == c.b.shape == c.x0.shape == (N,)
    ref = (r.x, c.A, c.b, c.x0)
    if path == "numpy":
        rc, vjpc = po.solve_vjp(A, b[:, None], case.name, x0=x0[:, None], **kw)
        cc = vjpc(w[:, None])
        got = (rc.x, cc.A, cc.b, cc.x0)
    else:
        got = _vjp_columns(path, case, adjoint, A, b, x0, w)
    # x, b_bar and x0_bar come back as columns; A_bar keeps A's shape.
    assert got[0].shape == got[2].shape == got[3].shape == (N, 1)
    assert got[1].shape == A.shape
    # Reshaped or computed by another implementation: equal up to rounding.
    _assert_close(got[0][:, 0], ref[0], _agree(A, 1))
    for one, other in zip((got[1], got[2][:, 0], got[3][:, 0]), ref[1:], strict=True):
        _assert_close(one, other, _agree(A, 2), seed=w)
    if adjoint != "none":  # the comparisons above must not be between two zeros
        assert np.linalg.norm(c.b) > 0.01 * np.linalg.norm(w)


# -- the empty system ---------------------------------------------------------------------------
@pytest.mark.parametrize("rtol", [1e-5, 0.0])
@_params("case", "path", "adjoint", keep=_supported)
def test_empty_system_gives_an_empty_result(case: SolverCase, path: str, adjoint: str,
                                            rtol: float) -> None:
    # maxiter=5 with rtol=0 asks for 5 iterations of nothing: GMRES used to index its
    # first basis vector there. The native solve of n = 0 compiles no loop (cheap).
    A, b = np.zeros((0, 0)), np.zeros(0)
    kw = {"maxiter": 5, "rtol": rtol}
    if path == "numpy":
        plain = po.solve(A, b, case.name, **kw, **case.options)
        result, vjp = po.solve_vjp(A, b, case.name, adjoint=adjoint, **kw, **case.options)
        cot = vjp(np.zeros(0))
        for r in (plain, result):
            assert r.x.shape == (0,) and r.converged and r.iterations == 0
            assert r.status is po.Status.CONVERGED
        assert cot.b.shape == cot.x0.shape == (0,) and cot.A.shape == (0, 0)
        return

    def loss(A: Any, b: Any) -> tuple:
        x, result = _pj(path, A, b, case, adjoint=adjoint, return_result=True, **kw)
        return jnp.sum(x), (x, result)

    grads, (x, result) = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(
        jnp.asarray(A), jnp.asarray(b))
    assert x.shape == (0,) and bool(result.converged) and int(result.iterations) == 0
    assert _status(result) is po.Status.CONVERGED
    assert grads[0].shape == (0, 0) and grads[1].shape == (0,)


# -- a callback that is not callable -----------------------------------------------------------
@_params("case", "path")
def test_non_callable_callback_names_the_argument(case: SolverCase, path: str) -> None:
    A, b, _, _ = _problem(case)
    if path == "numpy":
        for call in (po.solve, po.solve_vjp):
            with pytest.raises(TypeError, match=r"callback must be a function.*str 'print'"):
                call(A, b, case.name, callback="print", **case.options)
        return
    # pj.solve's callback argument is adjoint_callback (checked before any tracing).
    with pytest.raises(TypeError, match=r"adjoint_callback must be a function.*'print'"):
        _pj(path, jnp.asarray(A), jnp.asarray(b), case, adjoint_callback="print")


# -- NaN in b or A -----------------------------------------------------------------------------
#: Converged solves for the gradient comparison: each side's lambda is then within
#: cond(A) * rtol of the exact one. maxiter covers the slowest case (Richardson contracts
#: by 1 - 0.035 per step: about 650 steps to 1e-10).
NAN_RTOL, NAN_MAXITER = 1e-10, 2000


@functools.cache
def _nonfinite_fn(path: str, case_index: int, policy: str) -> Callable:
    """Jitted ``(A, b, x0, w) -> (x, status, (A_bar, b_bar))`` for ``sum(w * x)``."""
    case = CASES[case_index]

    def run(A: Any, b: Any, x0: Any, w: Any) -> tuple:
        def loss(A: Any, b: Any) -> tuple:
            x, result = _pj(path, A, b, case, x0=x0, rtol=NAN_RTOL, maxiter=NAN_MAXITER,
                            on_failure=policy, return_result=True)
            return jnp.sum(w * x), (x, result.status)

        grads, (x, status) = jax.grad(loss, argnums=(0, 1), has_aux=True)(A, b)
        return x, status, grads

    return jax.jit(run)


def _with_nan(case: SolverCase, where: str) -> tuple[np.ndarray, ...]:
    A, b, x0, w = _problem(case)
    if where == "b":
        b[1] = np.nan
    else:
        A[0, 0] = np.nan
    return A, b, x0, w


def _nonfinite_combo(case: SolverCase, path: str, where: str, policy: str,
                     how: str) -> bool:
    if path == "numpy":
        return how == "eager"  # po.solve is not traced
    if path == "jax" and case.name != "cg":
        # Native, every solver under jit with the default policy; an eager NaN b is a
        # trace-time error (no compilation) for every solver too.
        return (how == "jit" and policy == "warn") or (how == "eager" and where == "b")
    return True


@_params("case", "path", "where", "policy", "how", keep=_nonfinite_combo)
def test_nonfinite_data_same_policy_same_outcome(case: SolverCase, path: str, where: str,
                                                 policy: str, how: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    A, b, x0, w = _with_nan(case, where)
    caplog.set_level(logging.WARNING, logger="prdp_ops")
    kw = {"x0": x0, "on_failure": policy}

    if where == "b" and how == "eager":
        # A concrete b is argument checking, on every path: an error naming b.
        with pytest.raises(ValueError, match="b contains NaN"):
            if path == "numpy":
                po.solve(A, b, case.name, **kw, **case.options)
            else:
                _pj(path, jnp.asarray(A), jnp.asarray(b), case, **kw)
        return

    def run() -> tuple[np.ndarray, po.Status]:
        if path == "numpy":
            result = po.solve(A, b, case.name, **kw, **case.options)
            return result.x, result.status
        if how == "eager":
            x, result = _pj(path, jnp.asarray(A), jnp.asarray(b), case, return_result=True,
                            **kw)
            status = result.status
        else:
            fn = _nonfinite_fn(path, CASES.index(case), policy)
            x, status, _ = fn(*(jnp.asarray(v) for v in (A, b, x0, w)))
        jax.block_until_ready(x)
        jax.effects_barrier()  # native reports through jax.debug.callback
        return np.asarray(x), pj.JaxSolveResult.STATUSES[int(status)]

    if policy == "raise":
        # Eagerly the SolverError itself; inside jit it surfaces as the runtime error of
        # the call (a host callback raised it), with the solver's message.
        expected = po.SolverError if how == "eager" else jax.errors.JaxRuntimeError
        with pytest.raises(expected, match="NaN or infinite"):
            run()
        return
    x, status = run()
    # Reported, not hidden: NONFINITE, and x is the last finite iterate, x0 (the NaN
    # reaches the first residual).
    assert status is po.Status.NONFINITE
    np.testing.assert_array_equal(x, x0)
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING
              and "NaN or infinite" in r.getMessage()]
    assert warned if policy == "warn" else not warned


@_params("case", "where")
def test_nonfinite_data_gradient_bridge_equals_native(case: SolverCase, where: str) -> None:
    # Under jit the backward pass must not crash either, and must give native's gradient
    # (the functions are those the test above compiled).
    A, b, x0, w = _with_nan(case, where)
    args = [jnp.asarray(v) for v in (A, b, x0, w)]
    native = _nonfinite_fn("jax", CASES.index(case), "warn")(*args)[2]
    bridged = _nonfinite_fn("bridge", CASES.index(case), "warn")(*args)[2]
    # Two converged adjoint solves (true residuals <= rtol, confirmed by the drivers) differ
    # by at most cond(A) (rtol + rtol), normwise.
    tol = converged_tol(float(np.linalg.cond(case.matrix_for(N))), NAN_RTOL, NAN_RTOL)
    for g, r in zip(bridged, native, strict=True):
        g, r = np.asarray(g), np.asarray(r)
        assert np.all(np.isfinite(r)), "the native gradient is not finite"
        _assert_close(g, r, tol, seed=w)


# -- the gradient with respect to x0 ----------------------------------------------------------
def _x0_gradient(path: str, case: SolverCase, adjoint: str, A: np.ndarray, b: np.ndarray,
                 x0: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The cotangent of ``x0`` for the loss ``<w, x_K(x0)>``."""
    if path == "numpy":
        _, vjp = po.solve_vjp(A, b, case.name, x0=x0, maxiter=K, rtol=0.0, adjoint=adjoint,
                              **case.options)
        return vjp(w).x0
    return _vjp_columns(path, case, adjoint, A, b, x0, w)[3][:, 0]


@_params("case", "path", "adjoint", keep=lambda **c: _supported(**c) and _native_budget(**c))
def test_x0_gradient_same_on_every_path(case: SolverCase, path: str, adjoint: str) -> None:
    A, b, x0, w = _problem(case)
    g = _x0_gradient(path, case, adjoint, A, b, x0, w)
    assert g.shape == x0.shape
    if adjoint != "unrolled":
        # Implicit: at convergence x does not depend on x0. None: no gradient at all.
        np.testing.assert_array_equal(g, np.zeros_like(x0))
        return
    # Against central differences of the NumPy forward map along d: truncation O(h^2) and
    # rounding O(eps / h) are both about eps^(2/3) ~ 4e-11 at h = eps^(1/3); 1e-6 leaves room
    # for the curvature of the Krylov maps (rational in x0). A zero gradient fails it: the
    # finite difference is not zero.
    d = random_vector(N, seed=4)
    h = EPS ** (1 / 3)

    def f(x0: np.ndarray) -> float:
        x = po.solve(A, b, case.name, x0=x0, maxiter=K, rtol=0.0, **case.options).x
        return float(w @ x)

    fd = (f(x0 + h * d) - f(x0 - h * d)) / (2 * h)
    assert abs(float(g @ d) - fd) <= 1e-6 * np.linalg.norm(w) * np.linalg.norm(d)
    assert abs(fd) > 1e-6 * np.linalg.norm(w) * np.linalg.norm(d)  # a dependence to find
    if path != "jax":  # and equal to the native JAX derivative, up to rounding
        native = _x0_gradient("jax", case, adjoint, A, b, x0, w)
        _assert_close(g, native, _agree(A, 2), seed=w)


# -- aliasing: nothing the caller holds feeds a gradient; nothing passed in is modified --------
@_params("case", "adjoint", keep=_supported)
def test_numpy_nothing_the_caller_holds_feeds_the_gradient(case: SolverCase,
                                                           adjoint: str) -> None:
    A, b, x0, w = _problem(case)
    kw = {"maxiter": K, "rtol": 0.0, "adjoint": adjoint, **case.options}
    originals = [v.copy() for v in (A, b, x0, w)]

    ref_result, ref_vjp = po.solve_vjp(A, b, case.name, x0=x0, **kw)
    ref = ref_vjp(w)
    ref_b, ref_x0, ref_A = ref.b.copy(), ref.x0.copy(), np.array(ref.A)
    # Never modified by the solve or the vjp.
    for v, v0 in zip((A, b, x0, w), originals, strict=True):
        np.testing.assert_array_equal(v, v0)

    # A caller who writes into everything it holds, between and after the calls: the
    # inputs, the result, what the callback receives, x_bar, and .b/.x0 before .A is
    # computed (lazily, on access).
    b2, x02, w2 = b.copy(), x0.copy(), w.copy()
    result, vjp = po.solve_vjp(A, b2, case.name, x0=x02, callback=lambda xk: xk.fill(1e3),
                               **kw)
    # The same arithmetic as the reference, on arrays at other addresses (a BLAS kernel
    # may split its sums by alignment): equal up to rounding.
    _assert_close(result.x, ref_result.x, _agree(A, 1))
    result.x[:] = 1e3
    b2[:], x02[:] = 7.0, -7.0
    cot = vjp(w2)
    w2[:] = 5.0
    got_b, got_x0 = cot.b.copy(), cot.x0.copy()
    cot.b[:], cot.x0[:] = 9.0, 9.0
    if cot.adjoint_result is not None:
        cot.adjoint_result.x[:] = 9.0
    got_A = np.array(cot.A)
    for got, want in ((got_b, ref_b), (got_x0, ref_x0), (got_A, ref_A)):
        _assert_close(got, want, _agree(A, 2), seed=w)
    if adjoint != "none":
        assert np.linalg.norm(ref_A) > 0.01 * np.linalg.norm(w)  # not two zeros


@_params("case", "adjoint", keep=lambda **c: _supported(path="bridge", **c))
def test_bridge_inputs_never_modified(case: SolverCase, adjoint: str) -> None:
    # On the bridge the host solver receives a constant A as the caller's own object (here
    # a scipy.sparse matrix), and b and x0 as read-only views of JAX's buffers: all are
    # read, never written, in the forward and the backward pass.
    A, b, x0, w = _problem(case)
    A_sparse = sp.csr_matrix(A)
    originals = [A.copy(), b.copy(), x0.copy(), w.copy()]

    def loss(b: Any, x0: Any) -> Any:
        x = _pj("bridge", A_sparse, b, case, x0=x0, maxiter=K, rtol=0.0, adjoint=adjoint)
        return jnp.sum(x * w)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(b, x0)
    assert all(np.all(np.isfinite(g)) for g in grads)
    for v, v0 in zip((A_sparse.toarray(), b, x0, w), originals, strict=True):
        np.testing.assert_array_equal(v, v0)
