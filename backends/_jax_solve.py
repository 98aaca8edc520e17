"""The differentiable core of the JAX solve (private to ``prdp_ops.backends.jax``).

``adjoint="implicit"`` follows ``lax.custom_linear_solve``: the solve is a
``jax.custom_jvp`` function whose tangent is another linear solve,

    A x = b   =>   A dx = db - dA x,   dx = A^-1 (db - dA x),

and that tangent solve is a ``lax.custom_linear_solve`` whose transpose is our adjoint solve
``A^T lambda = x_bar`` (own solver, iteration limit and tolerances). Forward mode
(``jax.jvp``, ``jax.jacfwd``) runs the tangent solve; reverse mode (``jax.grad``) is JAX's
transpose of the tangent map: ``b_bar = lambda`` and ``A``'s cotangent is the transpose of
``dA -> -dA x`` at ``lambda``; and derivatives of any order compose from these two rules.
The iteration counts and tolerances are ordinary (possibly traced) inputs of the solves, and
every solve reports its own failures (and, for adjoint solves, hands its result to
``adjoint_callback``).

``adjoint="unrolled"`` is a ``jax.custom_jvp`` too, whose tangent is the linear map of the
iterations that ran: forward mode evaluates it (``jax.jvp`` of the loop), reverse mode
transposes it with the tape sweep, which pulls the cotangent back through ``jax.vjp`` of one
step at a time (:func:`prdp_ops.backends._jax_driver.unrolled_pullback`). First derivatives
only.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from prdp_ops.backends import _jax_args as args
from prdp_ops.backends import _jax_driver as driver
from prdp_ops.backends import _jax_unrolled as unrolled
from prdp_ops.backends._jax_operators import structured_adjoint, transpose
from prdp_ops.backends._jax_ops import OPS, JaxSolveResult
from prdp_ops.backends.numpy import report_failure

from prdp_ops._operators.base import LinearOperator
from prdp_ops._solution import SolveResult
from prdp_ops._solver.base import IterativeSolver

__all__ = ["Problem", "report", "solve_core"]

SymbolicZero = jax.custom_derivatives.SymbolicZero


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """Everything static about one solve: the solver, how to build the operators from their
    parameters, the adjoint mode and the buffers' static sizes.

    ``callback`` receives this solve's result (set for adjoint solves: the user's
    ``adjoint_callback``); ``adjoint_callback`` is the one its own adjoint solve passes on.
    ``checkpoint_every=None`` lets the unrolled tape choose (see :func:`_tape_layout`).
    """

    solver: IterativeSolver
    adjoint_solver: IterativeSolver
    rebuild: Callable[[dict[str, Any]], LinearOperator]
    rebuild_precond: Callable[[dict[str, Any]], LinearOperator] | None
    mode: str
    on_failure: str
    tape_capacity: int | None = None
    checkpoint_every: int | None = 1
    maxiter_given: bool = True
    history_size: int | None = None
    adjoint_history_size: int | None = None
    callback: Callable[[SolveResult], None] | None = None
    adjoint_callback: Callable[[SolveResult], None] | None = None
    what: str = "solve"

    @property
    def solver_name(self) -> str:
        return self.solver.name or type(self.solver).__name__

    def operators(self, params: dict[str, Any], m_params: dict[str, Any]) -> tuple[Any, Any]:
        M = None if self.rebuild_precond is None else self.rebuild_precond(m_params)
        return self.rebuild(params), M

    def adjoint(self, like: Any) -> Problem:
        """The problem ``A^T lambda = x_bar`` (its own adjoint is this problem again)."""
        rebuild, precond = self.rebuild, self.rebuild_precond
        return dataclasses.replace(
            self, solver=self.adjoint_solver, adjoint_solver=self.solver,
            rebuild=lambda p: transpose(rebuild(p), like),
            rebuild_precond=None if precond is None else (lambda q: transpose(precond(q), like)),
            mode="implicit", tape_capacity=None, history_size=self.adjoint_history_size,
            adjoint_history_size=self.history_size, callback=self.adjoint_callback,
            adjoint_callback=self.callback, what=f"adjoint of the {self.what}",
        )

    def tangent(self) -> Problem:
        """The problem ``A dx = db - dA x`` of forward mode: the same solver and settings,
        no history, its failures reported under its own name."""
        return dataclasses.replace(self, mode="implicit", tape_capacity=None,
                                   history_size=None, callback=None,
                                   what=f"tangent of the {self.what}")


# -- failure reports -----------------------------------------------------------------------------
def report(result: JaxSolveResult, on_failure: str, what: str,
           callback: Callable[[SolveResult], None] | None = None) -> None:
    """Apply the failure policy to a finished solve and hand it to ``callback``.

    Outside tracing this happens here; inside ``jit``/``vmap`` (and inside the staged
    tangent and adjoint solves) through ``jax.debug.callback`` (a raised
    :class:`~prdp_ops.SolverError` then surfaces as a runtime error of the call), which only
    runs when the solve failed or a ``callback`` wants every result.
    """
    if on_failure == "ignore" and callback is None:
        return

    def host(res: JaxSolveResult) -> None:
        res = res.to_solve_result()
        if callback is not None:
            callback(res)
        report_failure(res, on_failure, what)

    if not any(args.is_traced(leaf) for leaf in jax.tree_util.tree_leaves(result)):
        host(result)
        return
    if callback is None:
        # Only the numbers the message needs cross to the host, and only on failure: the
        # initial and final residual norms (the message quotes the final one) and the true
        # residual norm, not x or the whole history.
        norms = result.residual_norms
        final = norms[jnp.minimum(result.iterations, norms.shape[0] - 1)]
        result = dataclasses.replace(result, x=jnp.zeros(()),
                                     residual_norms=jnp.stack([norms[0], final]))
    needed = jnp.asarray(callback is not None) | (result.status >= driver.BREAKDOWN)
    lax.cond(needed, lambda: jax.debug.callback(host, result), lambda: None)


# -- the forward solve ---------------------------------------------------------------------------
def forward(problem: Problem, params: dict[str, Any], m_params: dict[str, Any], b: Any,
            x0: Any, controls: tuple, tape: driver.Tape | None = None) -> tuple:
    """Run the solve: ``(x, info, loop)`` with ``info = (iterations, status, history,
    true_norm)``, ``true_norm`` the driver's ``||b - A x||`` (NaN where it computed none)."""
    A, M = problem.operators(params, m_params)
    maxiter, rtol, atol = controls[:3]
    bnorm = OPS.norm(b)
    tol = jnp.maximum(rtol * bnorm, atol)
    # As SciPy: b = 0 with a tolerance is solved exactly by x = 0 in 0 iterations.
    zero_rhs = (bnorm == 0) & ((rtol > 0) | (atol > 0))
    tol = jnp.where(zero_rhs, jnp.ones_like(tol), tol)
    size = problem.history_size
    loop = driver.run_loop(problem.solver, OPS, A, M, b, x0, maxiter, tol,
                           history_size=size, tape=tape)
    history = loop.history
    if size is not None and (args.is_traced(maxiter) or size < int(maxiter)):
        # The buffer was bounded below the iteration limit (args.history_size): a longer
        # solve keeps its final residual norm in the last entry.
        final = problem.solver.residual_norm(OPS, loop.state).astype(history.dtype)
        history = history.at[size].set(jnp.where(loop.iterations > size, final,
                                                 history[size]))
    return loop.x, (loop.iterations, loop.status, history, loop.true_norm), loop


def solve_core(problem: Problem, params: dict[str, Any], m_params: dict[str, Any], b: Any,
               x0: Any, controls: tuple) -> tuple[Any, tuple]:
    """``(x, info)`` with the derivative ``problem.mode`` asks for."""
    rtol, atol = controls[1:3]
    zero_rhs = (OPS.norm(b) == 0) & ((rtol > 0) | (atol > 0))
    x0 = jnp.where(zero_rhs, jnp.zeros_like(x0), x0)
    if problem.mode == "none":
        params, m_params, b, x0 = lax.stop_gradient((params, m_params, b, x0))
        x, info, _ = forward(problem, params, m_params, b, x0, controls)
        return x, info
    if problem.mode == "implicit":
        return _implicit(problem)(params, m_params, b, x0, controls)
    return _unrolled(problem)(params, m_params, b, x0, controls)


# -- implicit: a custom_jvp whose tangent is a custom_linear_solve ----------------------------
def _implicit(problem: Problem) -> Callable:
    """The solve as a ``jax.custom_jvp`` function of ``(params, m_params, b, x0, controls)``.

    ``x0``, the preconditioner's parameters and the controls get no derivative: at
    convergence ``x = A^-1 b`` depends on none of them.
    """

    @jax.custom_jvp
    def solve_fn(params: dict, m_params: dict, b: Any, x0: Any, controls: tuple) -> tuple:
        x, info, _ = forward(problem, params, m_params, b, x0, controls)
        return x, info

    def solve_jvp(primals: tuple, tangents: tuple) -> tuple:
        params, m_params, b, x0, controls = primals
        params_dot, _, b_dot, _, _ = tangents
        # Calling solve_fn (not forward) keeps the primal differentiable again.
        x, info = solve_fn(params, m_params, b, x0, controls)
        rhs = _tangent_rhs(problem, params, params_dot, b_dot, x)
        if rhs is None:
            x_dot = jnp.zeros_like(x)
        else:
            x_dot = _linear_solve(problem, params, m_params, controls, rhs)
        return (x, info), (x_dot, _info_tangent(info))

    solve_fn.defjvp(solve_jvp, symbolic_zeros=True)
    return solve_fn


def _info_tangent(info: tuple) -> tuple:
    """Zero tangents of the convergence information (float0 for the integer codes)."""
    iterations, status, history, true_norm = info
    float0 = jax.dtypes.float0
    return (np.zeros(np.shape(iterations), float0), np.zeros(np.shape(status), float0),
            jnp.zeros_like(history), jnp.zeros_like(true_norm))


def _tangent_rhs(problem: Problem, params: dict[str, Any], params_dot: dict[str, Any],
                 b_dot: Any, x: Any) -> Any:
    """``db - dA x`` (``None`` when both tangents are symbolically zero)."""
    rhs = None if isinstance(b_dot, SymbolicZero) else b_dot
    live = {k: t for k, t in params_dot.items() if not isinstance(t, SymbolicZero)}
    if live:
        # dA x: the jvp of p -> A(p) x along the parameters that carry tangents.
        def apply(sub: dict[str, Any]) -> Any:
            return problem.rebuild({**params, **sub}).matvec(x)

        _, dA_x = jax.jvp(apply, ({k: params[k] for k in live},), (live,))
        dA_x = dA_x.astype(x.dtype)
        rhs = -dA_x if rhs is None else rhs - dA_x
    return rhs


def _linear_solve(problem: Problem, params: dict[str, Any], m_params: dict[str, Any],
                  controls: tuple, rhs: Any) -> Any:
    """``A^-1 rhs`` as a ``lax.custom_linear_solve``: its transpose is the adjoint solve.

    ``matvec`` closes over A's parameters, so a derivative of this solve (a second
    derivative of the original) gets ``-A^-1 dA (A^-1 rhs)`` from JAX; the solves close over
    the controls and the preconditioner, which get none.
    """
    A = problem.rebuild(params)
    adjoint_controls = controls[3:] + controls[:3]

    def solve(_: Callable, r: Any) -> Any:
        return _scaled_solve(problem.tangent(), params, m_params, controls, r)

    def transpose_solve(_: Callable, r: Any) -> Any:
        return _scaled_solve(problem.adjoint(r), params, m_params, adjoint_controls, r)

    return lax.custom_linear_solve(A.matvec, rhs, solve, transpose_solve)


def _scaled_solve(problem: Problem, params: dict[str, Any], m_params: dict[str, Any],
                  controls: tuple, rhs: Any) -> Any:
    """Solve ``problem`` for ``rhs`` from zero, reporting the result.

    As on NumPy, the right-hand side is scaled to unit max-norm (CG's ``rho = <r, r>`` of a
    cotangent of size 1e-200 would underflow to 0 and give 0/0 = NaN) and the absolute
    tolerance scaled with it; the relative one is scale-free. The reported residual norms are
    unscaled.
    """
    scale = jnp.max(jnp.abs(rhs))
    safe = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    maxiter, rtol, atol = controls[:3]
    scaled_controls = (maxiter, rtol, atol / safe.astype(atol.dtype), *controls[3:])
    x, (iterations, status, history, true_norm), _ = forward(
        problem, params, m_params, rhs / safe.astype(rhs.dtype), jnp.zeros_like(rhs),
        scaled_controls)
    x = x * safe.astype(x.dtype)
    result = JaxSolveResult(x, status == driver.CONVERGED, iterations,
                            history * safe.astype(history.dtype), status, problem.solver_name,
                            true_norm * safe.astype(true_norm.dtype))
    report(lax.stop_gradient(result), problem.on_failure, problem.what, problem.callback)
    return x


# -- unrolled: a custom_jvp whose tangent map is transposed by the tape sweep -----------------
def _unrolled(problem: Problem) -> Callable:
    """The solve as a ``jax.custom_jvp`` function of ``(params, m_params, b, x0, controls)``.

    Its tangent is the linear map ``L: (dA, db, dx0) -> dx_K`` of the ``K`` iterations that
    ran, written as a ``lax.custom_linear_solve`` (see :func:`_unrolled_tangent`) so that
    forward mode evaluates ``L`` (``jax.jvp`` of the loop) and reverse mode transposes it
    with the tape sweep ``L^T`` (:func:`prdp_ops.backends._jax_driver.unrolled_pullback`)
    without ever running the loop's jvp. The preconditioner and the controls get no
    derivative, as before. First order only: see :func:`_first_order_only`.
    """

    @jax.custom_jvp
    def solve_fn(params: dict, m_params: dict, b: Any, x0: Any, controls: tuple) -> tuple:
        x, info, _ = forward(problem, params, m_params, b, x0, controls)
        return x, info

    def solve_jvp(primals: tuple, tangents: tuple) -> tuple:
        params, m_params, b, x0, controls = _first_order_only(primals)
        params_dot, _, b_dot, x0_dot, _ = tangents
        A, M = problem.operators(params, m_params)
        tape = _tape_layout(problem, A, M, b, x0)
        x, info, loop = forward(problem, params, m_params, b, x0, controls, tape)
        live = {k: t for k, t in params_dot.items()
                if not isinstance(t, SymbolicZero) and _is_inexact(params[k])}
        b_dot = None if isinstance(b_dot, SymbolicZero) else b_dot
        x0_dot = None if isinstance(x0_dot, SymbolicZero) else x0_dot
        if not live and b_dot is None and x0_dot is None:
            return (x, info), (jnp.zeros_like(x), _info_tangent(info))
        x_dot = _unrolled_tangent(problem, (params, m_params, b, x0, M), loop, tape,
                                  (live, b_dot, x0_dot))
        return (x, info), (x_dot, _info_tangent(info))

    solve_fn.defjvp(solve_jvp, symbolic_zeros=True)
    return solve_fn


def _is_inexact(value: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(value), jnp.inexact)


def _unrolled_tangent(problem: Problem, primal: tuple, loop: driver.LoopOutput,
                      tape: driver.Tape, lin: tuple) -> Any:
    """``dx_K = L(dA, db, dx0)`` as a ``lax.custom_linear_solve`` with ``matvec = I``.

    ``custom_linear_solve(I, v, solve, transpose_solve)`` is a linear map of ``v`` that JAX
    evaluates with ``solve`` and transposes with ``transpose_solve``, and batches under
    ``vmap``. Its input and output share one structure, so ``v`` is the live tangents plus a
    slot for ``dx_K``: ``solve`` maps ``v`` to ``(0, ..., 0, L(v))`` and ``transpose_solve``
    maps a cotangent ``w`` to ``(L^T(w_slot), 0)``, which is its transpose. ``L`` reruns the
    ``K = loop.accepted`` steps that ran with ``jax.jvp`` (a fixed count, so rounding cannot
    move a stopping decision); ``L^T`` is the tape sweep. The slot must depend linearly on
    the tangents (JAX transposes only functions of its linear inputs), hence ``0 * t``.
    """
    params, m_params, b, x0, M = primal
    live, b_dot, x0_dot = lin
    keys = tuple(live)
    leaves = [*live.values(), b_dot, x0_dot]
    seed = next(t for t in leaves if t is not None)
    seed = jnp.sum(jnp.real(seed)) * 0
    v = (live, b_dot, x0_dot, jnp.broadcast_to(seed.astype(b.dtype), b.shape))
    # rtol = atol = 0: exactly the K accepted steps, no stopping decision left to rounding.
    zero = jnp.zeros((), args.real_dtype(b.dtype))
    fixed = (jnp.asarray(loop.accepted, jnp.int32), zero, zero)
    steps = dataclasses.replace(problem, history_size=None)

    def tangent_map(_: Callable, v: tuple) -> tuple:
        p_dot, b_dot, x0_dot, _ = v

        def run(p: dict[str, Any], b: Any, x0: Any) -> Any:
            return forward(steps, {**params, **p}, m_params, b, x0, fixed)[0]

        primals = ({k: params[k] for k in keys}, b, x0)
        tangents = (p_dot, _or_zeros(b_dot, b), _or_zeros(x0_dot, x0))
        _, x_dot = jax.jvp(run, primals, tangents)
        return (_zeros(p_dot), _zeros(b_dot), _zeros(x0_dot), x_dot)

    def pullback(_: Callable, w: tuple) -> tuple:
        if tape.record_avals is not None:
            params_bar, b_bar, x0_bar = unrolled.hand_pullback(
                problem.solver, OPS, problem.rebuild, M, params, keys, b, x0, loop, tape, w[3])
        else:
            params_bar, b_bar, x0_bar = driver.unrolled_pullback(
                problem.solver, OPS, structured_adjoint(problem.rebuild), M, params, b, x0,
                loop, tape, w[3])
        return ({k: params_bar[k] for k in keys}, None if b_dot is None else b_bar,
                None if x0_dot is None else x0_bar, jnp.zeros_like(w[3]))

    return lax.custom_linear_solve(lambda v: v, v, tangent_map, pullback)[3]


def _or_zeros(tangent: Any, like: Any) -> Any:
    return jnp.zeros_like(like) if tangent is None else tangent


def _first_order_only(primals: tuple) -> tuple:
    """``primals`` unchanged; differentiating them again raises a clear error.

    The unrolled tangent map treats the primal point (and the tape) as constants, so a
    derivative of a derivative would silently miss their dependence on the inputs. This
    identity's own derivative rule is what a second derivative reaches first.
    """
    return _guard(primals)


@jax.custom_jvp
def _guard(primals: tuple) -> tuple:
    return primals


@_guard.defjvp
def _guard_jvp(primals: tuple, tangents: tuple) -> tuple:
    raise NotImplementedError(
        "adjoint='unrolled' gives first derivatives only (jax.grad, jax.vjp, jax.jvp, "
        "jax.jacfwd, jax.jacrev); a second derivative (jax.hessian, a gradient of a "
        "gradient) needs adjoint='implicit', which differentiates to any order"
    )


#: A full unrolled tape above this size is checkpointed on CPU (see :func:`_tape_layout`):
#: glibc serves larger blocks from fresh pages at every call.
FRESH_TAPE_BYTES = 32 * 2**20


def _fresh_tape_bytes() -> int:
    """:data:`FRESH_TAPE_BYTES`, or glibc's ``MALLOC_MMAP_THRESHOLD_`` when the process was
    started with a larger one: blocks below it come from the heap, which keeps its pages
    from call to call when ``MALLOC_TRIM_THRESHOLD_`` is large too (measured at 256^2,
    K = 200: the full tape then gives gradient / forward 3.7 against 4.8 checkpointed)."""
    try:
        return max(FRESH_TAPE_BYTES, int(os.environ.get("MALLOC_MMAP_THRESHOLD_", "0")))
    except ValueError:
        return FRESH_TAPE_BYTES


def _tape_layout(problem: Problem, A: Any, M: Any, b: Any, x0: Any) -> driver.Tape:
    """The unrolled tape: which state entries it keeps, how many, and how often.

    Decided on static shapes only, so the forward and the backward pass agree and a tape
    the device cannot hold fails here, before anything is allocated. ``checkpoint_every``
    left to us keeps every state when ``maxiter`` was given and the full tape takes at most
    an eighth of the device's memory, and otherwise checkpoints every ``ceil(sqrt(K))``
    states (memory ``~2 sqrt(K)`` states instead of ``K``, one more forward pass): the
    default ``maxiter = 10 n`` then no longer sizes a tape of ``10 n`` states (43 GB for CG
    on a 128 x 128 grid).

    On CPU a full tape above :data:`FRESH_TAPE_BYTES` is checkpointed too: XLA:CPU allocates
    it afresh at every call, and the page faults of touching fresh memory (measured about
    2 GB/s on a 2-core machine) cost more than the extra forward pass (CG, 2D Poisson at
    128^2 and 256^2, K = 300: gradient / forward 5.0 against 6.1 to 7.1 with every state).
    """
    state = jax.eval_shape(lambda b, x0: problem.solver.init(OPS, A, b, x0, M), b, x0)
    # The entries step reads, less the constants it passes through (Jacobi's diagonal).
    constant = driver.keys_passed_through(problem.solver, OPS, A, M, b, state)
    keys = tuple(k for k in driver.keys_read_by_step(problem.solver, OPS, A, M, b, state)
                 if k not in constant)
    capacity = max(problem.tape_capacity, 1)
    avals = unrolled.record_avals(problem.solver, OPS, A, M, b, x0)
    if avals is not None:
        # Checkpoints of the hand reverse keep what recomputing the records needs (not
        # CG's x).
        keys = tuple(k for k in unrolled.keys_for_records(problem.solver, OPS, A, M, b, state)
                     if k not in constant)
    tape_state = sum(_nbytes(state[k]) for k in keys)
    if avals is not None:
        tape_state = max(tape_state, sum(_nbytes(a) for a in jax.tree_util.tree_leaves(avals)))
    limit = args.device_memory()
    every = problem.checkpoint_every
    if every is None:
        full = args.tape_bytes(capacity, 1, tape_state)
        fits = limit is None or 8 * full <= limit
        fresh = jax.default_backend() == "cpu" and full > _fresh_tape_bytes()
        every = (1 if problem.maxiter_given and fits and not fresh
                 else args.sqrt_checkpoints(capacity))
    args.check_memory(capacity, every, tape_state, limit, maxiter_given=problem.maxiter_given)
    return driver.Tape(capacity, keys, every, avals)


def _nbytes(aval: Any) -> int:
    return int(np.prod(aval.shape, dtype=np.int64)) * jnp.dtype(aval.dtype).itemsize


def _zeros(tree: Any) -> Any:
    return jax.tree_util.tree_map(jnp.zeros_like, tree)

