"""The JAX loop driver and the unrolled reverse sweep (private to ``prdp_ops.backends.jax``).

The driver runs any registered solver's ``init``/``step`` inside ``lax.while_loop`` with the
NumPy driver's stopping rule (:func:`prdp_ops.backends.numpy.run_solver`): ``tol =
max(rtol ||b||, atol)``; ``tol == 0`` runs exactly ``maxiter`` iterations; a breakdown or a
non-finite residual stops the loop and keeps the last good state. ``maxiter`` and ``tol`` may
be traced, so a jitted caller compiles once for every iteration count.

The unrolled reverse sweep differentiates the iterations that ran: the forward loop keeps
the state before every step (only the entries the step reads), and the backward loop pulls
the cotangent back through ``jax.vjp`` of one ``step`` at a time. JAX derives each step's
reverse from the solver's own ``step``; nothing is solver-specific here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from prdp_ops.backends._jax_keys import (
    consumed_keys,
    keys_passed_through,
    keys_read_by_iterate,
    keys_read_by_step,
)

from prdp_ops._operators.base import LinearOperator
from prdp_ops._solution import STAGNATION_DECREASE, STAGNATION_WINDOW, Status
from prdp_ops._solver.base import IterativeSolver, State
from prdp_ops._solver.contract import checked_init, checked_step

__all__ = ["STATUSES", "LoopOutput", "Tape", "consumed_keys", "keys_passed_through",
           "keys_read_by_iterate", "keys_read_by_step", "run_loop", "unrolled_pullback"]

#: Status codes of the JAX driver: ``STATUSES[code]`` is the :class:`~prdp_ops.Status`.
STATUSES = (Status.CONVERGED, Status.MAX_ITERATIONS, Status.BREAKDOWN, Status.NONFINITE,
            Status.STAGNATED, Status.INACCURATE, Status.PRECISION_LIMIT)
(CONVERGED, MAX_ITERATIONS, BREAKDOWN, NONFINITE, STAGNATED, INACCURATE,
 PRECISION_LIMIT) = range(len(STATUSES))
#: Inside the loop only: the recursive residual met the tolerance, not yet confirmed.
CLAIMED = -1

#: ``Rebuild`` turns A's parameter dict into the operator (so gradients reach the arrays).
Rebuild = Callable[[dict[str, Any]], Any]


@dataclasses.dataclass(frozen=True)
class Tape:
    """Where the forward loop keeps the states the reverse sweep starts its steps from.

    ``capacity`` states of the ``keys`` that ``step`` reads (the rest do not influence a
    step's derivative). With ``every > 1`` only every ``every``-th state is kept and the
    others are recomputed during the reverse sweep (one more forward pass, memory
    ``capacity / every + every`` states instead of ``capacity``).
    """

    capacity: int
    keys: tuple[str, ...]
    every: int = 1
    #: The shapes of one step's ``solver.record`` when the reverse sweep runs the solver's
    #: own ``step_vjp`` (:mod:`._jax_unrolled`): with ``every == 1`` the tape then holds one
    #: record per step instead of the state before it. ``None``: states, ``jax.vjp`` of step.
    record_avals: Any = None

    @property
    def records(self) -> bool:
        """Whether the forward loop writes one record per step (not states)."""
        return self.record_avals is not None and self.every == 1

    @property
    def slots(self) -> int:
        return -(-self.capacity // self.every)


class LoopOutput(NamedTuple):
    """What :func:`run_loop` returns (all jax arrays)."""

    state: State
    iterations: Any  # steps run, the failing one included (as on NumPy)
    accepted: Any  # steps whose result was kept (= iterations unless a failure stopped it)
    status: Any  # index into STATUSES
    history: Any  # residual norms: capacity + 1 entries (NaN past the end) or [first, last]
    tape: Any  # dict of stacked states, or None
    x: Any  # the iterate of ``state`` (x0 if it was not finite)
    true_norm: Any  # ||b - A x|| computed by the driver; NaN for a fixed iteration count


class Materialized(LinearOperator):
    """``A`` whose products are computed inside a ``lax.cond`` branch (XLA:CPU only).

    XLA:CPU fuses a stencil's matvec into every consumer of its result and recomputes it
    there (CG's ``<p, A p>`` and ``r - alpha A p`` each re-evaluate the stencil, and the
    loop-carried ``p`` gets copied): about 1.6x the work of the step. A conditional branch
    is a fusion boundary, so the product is computed once. The predicate (``token >= 0``
    for an iteration counter) is always true but unknown to the compiler. On GPUs a
    conditional costs a device-to-host read of its predicate, so there the operator is
    used as is (see :func:`materialized`).
    """

    def __init__(self, A: LinearOperator, token: Any) -> None:
        super().__init__(A.shape, A.dtype)
        self.A, self.hermitian, self._token = A, A.hermitian, token

    def _matvec(self, x: Any) -> Any:
        return lax.cond(self._token >= 0, self.A._matvec, jnp.zeros_like, x)

    def _rmatvec(self, y: Any) -> Any:
        return lax.cond(self._token >= 0, self.A._rmatvec, jnp.zeros_like, y)

    def diagonal(self) -> Any:
        return self.A.diagonal()

    def to_matrix(self) -> Any:
        return self.A.to_matrix()


def materialized(A: Any, token: Any) -> Any:
    """``A`` with its products kept out of consumers' fusions on CPU (see
    :class:`Materialized`); ``A`` itself elsewhere."""
    if A is None or jax.default_backend() != "cpu":
        return A
    return Materialized(A, token)


def _is_inexact(value: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(value), jnp.inexact)


def _keep_if(failed: Any, old: State, new: State, live: tuple[str, ...]) -> State:
    """``old`` where the step failed, else ``new``, for the entries that matter later.

    ``live`` holds the entries ``iterate`` reads; the others take the new value: the loop
    stops after a failure, and selecting them would cost a pass over each at every step.
    """
    return {k: jnp.where(failed, old[k], v) if k in live else v for k, v in new.items()}


class _Carry(NamedTuple):
    """The loop's carry: the solver's state and the driver's bookkeeping (jax arrays)."""

    state: State
    iterations: Any
    accepted: Any
    status: Any  # a STATUSES index, or CLAIMED
    rnorm: Any  # the solver's (recursive) residual norm after the last step
    history: Any
    buffers: Any
    threshold: Any  # recursive residual that triggers the next confirmation
    last_true: Any  # true residual at the last failed confirmation
    best: Any  # best residual norm that counted as progress, and when it was reached
    best_at: Any
    true_norm: Any  # ||b - A x|| computed by the driver (NaN until computed)


def run_loop(solver: IterativeSolver, ops: Any, A: Any, M: Any, b: Any, x0: Any,
             maxiter: Any, tol: Any, *, history_size: int | None = None,
             tape: Tape | None = None) -> LoopOutput:
    """Run ``solver`` from ``x0`` for at most ``maxiter`` iterations under ``lax.while_loop``.

    The rules are those of the NumPy driver (:class:`prdp_ops.backends.numpy.Monitor`): a
    convergence claim of the solver's recurrence is confirmed on ``||b - A x||``, a
    residual that stopped decreasing ends a solve with a tolerance, and a non-finite value
    anywhere is :attr:`~prdp_ops.Status.NONFINITE`. They are laid out as two nested loops:
    the inner one runs steps until the recursive residual claims convergence (or fails, or
    stagnates, or runs out of iterations); the outer one confirms a claim with one product
    with ``A`` and resumes the inner loop when the claim was premature. The confirmation
    thus runs once per claim, also under ``vmap`` (where a ``lax.cond`` inside the step loop
    would evaluate its branch at every step).

    Parameters
    ----------
    maxiter, tol
        The iteration limit (an int32 scalar, possibly traced) and the absolute residual
        tolerance ``max(rtol ||b||, atol)`` (possibly traced); ``tol == 0`` runs exactly
        ``maxiter`` iterations.
    history_size
        Keep every residual norm in a buffer of ``history_size + 1`` entries (static);
        ``None`` keeps only the first and the last.
    tape
        Keep the states the unrolled reverse sweep needs (see :class:`Tape`); the loop then
        also stops after ``tape.capacity`` iterations.
    """
    state = checked_init(solver, ops, A, b, x0, M)
    live = keys_read_by_iterate(solver, ops, A, M, b, state)
    r0 = solver.residual_norm(ops, state)
    real = r0.dtype
    stop_on_convergence = tol > 0
    bnorm = ops.norm(b)
    # A tolerance under 16 eps ||b|| asks for more than rounding allows (NumPy: the same).
    precision_floor = 16 * jnp.finfo(real).eps * bnorm
    status = jnp.where(~jnp.isfinite(r0) | ~jnp.isfinite(bnorm), NONFINITE,
                       jnp.where(stop_on_convergence & (r0 <= tol), CLAIMED, MAX_ITERATIONS))
    zero = jnp.zeros((), jnp.int32)
    history = None
    if history_size is not None:
        history = jnp.full((history_size + 1,), jnp.nan, real).at[0].set(r0)
    buffers = None
    records = tape is not None and tape.records
    if records:
        buffers = jax.tree_util.tree_map(lambda a: jnp.zeros((tape.slots, *a.shape), a.dtype),
                                         tape.record_avals)
    elif tape is not None:
        # One spare row (see _push). A full tape of states (every == 1) takes the state
        # before step 0 in row 0 now and each step's result after the step; a checkpointed
        # one takes a state only where a run of steps starts (see segment below).
        buffers = {k: jnp.zeros((tape.slots + 1, *jnp.shape(state[k])),
                                jnp.result_type(state[k])) for k in tape.keys}
        if tape.every == 1:
            buffers = {k: buf.at[0].set(state[k]) for k, buf in buffers.items()}
    checkpoints = tape is not None and not records and tape.every > 1
    if tape is not None:
        limit = jnp.minimum(maxiter, tape.capacity)
    else:
        limit = maxiter
    tol = jnp.asarray(tol, real)
    nan = jnp.asarray(jnp.nan, real)
    carry = _Carry(state, zero, zero, status.astype(jnp.int32), r0, history, buffers,
                   threshold=tol, last_true=jnp.asarray(jnp.inf, real), best=r0, best_at=zero,
                   true_norm=nan)

    def true_residual(state: State) -> Any:
        return ops.norm(b - A.matvec(solver.iterate(ops, A, b, state, M)))

    def stepping(c: _Carry) -> Any:
        return (c.status == MAX_ITERATIONS) & (c.iterations < limit)

    def step(c: _Carry) -> _Carry:
        buffers = c.buffers
        new_state = checked_step(solver, ops, materialized(A, c.iterations), b, c.state,
                                 materialized(M, c.iterations))
        if records:
            # Row ``accepted`` of the tape: what the reverse of this step reads (a failed
            # step's row is never read: the loop ends and ``accepted`` does not count it).
            record = solver.record(ops, A, b, M, c.state, new_state)
            buffers = jax.tree_util.tree_map(lambda buf, v: buf.at[c.accepted].set(v),
                                             buffers, record)
        rnorm = solver.residual_norm(ops, new_state)
        failure = jnp.where(~jnp.isfinite(rnorm), NONFINITE,
                            jnp.where(solver.breakdown(ops, new_state), BREAKDOWN,
                                      MAX_ITERATIONS))
        failed = failure != MAX_ITERATIONS
        # Keep the last good state on failure: a NaN iterate would poison a training loop.
        state = _keep_if(failed, c.state, new_state, live)
        if buffers is not None and not records and not checkpoints:
            # The state before step ``accepted + 1`` (a failed step's row is never read).
            buffers = _push(buffers, state, c.accepted + 1, tape)
        iterations = c.iterations + 1
        progress = rnorm < c.best * (1 - STAGNATION_DECREASE)
        best = jnp.where(progress, rnorm, c.best)
        best_at = jnp.where(progress, iterations, c.best_at)
        stagnated = stop_on_convergence & (iterations - best_at >= STAGNATION_WINDOW)
        claimed = stop_on_convergence & (rnorm <= c.threshold)
        status = jnp.where(failed, failure,
                           jnp.where(claimed, CLAIMED,
                                     jnp.where(stagnated, STAGNATED, MAX_ITERATIONS)))
        history = c.history
        if history is not None:
            history = history.at[iterations].set(rnorm)
        return c._replace(state=state, iterations=iterations,
                          accepted=c.accepted + (~failed).astype(jnp.int32),
                          status=status.astype(jnp.int32), rnorm=rnorm, history=history,
                          buffers=buffers, best=best, best_at=best_at)

    def confirm(state: State, rnorm: Any, last_true: Any, threshold: Any) -> tuple:
        true = true_residual(state)
        unimproved = jnp.where(tol < precision_floor, PRECISION_LIMIT, INACCURATE)
        status = jnp.where(~jnp.isfinite(true), NONFINITE,
                           jnp.where(true <= tol, CONVERGED,
                                     jnp.where(true > 0.5 * last_true, unimproved,
                                               MAX_ITERATIONS)))
        resumed = status == MAX_ITERATIONS
        return (status.astype(jnp.int32), jnp.where(resumed, true, last_true),
                jnp.where(resumed, rnorm / 10, threshold), true)

    def unconfirmed(state: State, rnorm: Any, last_true: Any, threshold: Any) -> tuple:
        return jnp.asarray(MAX_ITERATIONS, jnp.int32), last_true, threshold, nan

    def running(c: _Carry) -> Any:
        return (c.status == CLAIMED) | stepping(c)

    def segment(c: _Carry) -> _Carry:
        status, last_true, threshold, true = lax.cond(
            c.status == CLAIMED, confirm, unconfirmed, c.state, c.rnorm, c.last_true,
            c.threshold)
        c = c._replace(status=jnp.where(c.status == CLAIMED, status, c.status),
                       last_true=last_true, threshold=threshold,
                       true_norm=jnp.where(c.status == CLAIMED, true, c.true_norm))
        if not checkpoints:
            return lax.while_loop(stepping, step, c)
        # A checkpointed tape: the state a run of steps starts from is stored once, here
        # (its slot, or the spare row between checkpoints), and the run stops at the next
        # checkpoint. Storing every step's state somewhere (a conditional write becomes a
        # select of the whole buffer under vmap) wrote each kept entry once per step.
        start = c.accepted
        c = c._replace(buffers=_push(c.buffers, c.state, start, tape))

        def within(c: _Carry) -> Any:
            return stepping(c) & ((c.accepted == start) | (c.accepted % tape.every != 0))

        return lax.while_loop(within, step, c)

    c = lax.while_loop(running, segment, carry)
    c = _finish(c, stop_on_convergence, tol, true_residual)
    x = solver.iterate(ops, A, b, c.state, M)
    x_finite = jnp.all(jnp.isfinite(x))
    status = jnp.where(x_finite, c.status, NONFINITE).astype(jnp.int32)
    # A NaN the solver's residual hid leaves no good iterate to keep: x0 is the last known
    # to be finite (as on NumPy).
    x = jnp.where(x_finite, x, x0)
    history = c.history if c.history is not None else jnp.stack([r0, c.rnorm])
    return LoopOutput(c.state, c.iterations, c.accepted, status, history, c.buffers, x,
                      c.true_norm)


def _finish(c: _Carry, stop_on_convergence: Any, tol: Any,
            true_residual: Callable[[State], Any]) -> _Carry:
    """The final status: a fixed count (``tol == 0``) is converged only at a zero residual;
    a solve with a tolerance that ran out of iterations, stagnated or broke down reports the
    true residual of its final x (a confirmation gave it for the other ends), and is
    NONFINITE if that is not finite."""
    unconverged = stop_on_convergence & ((c.status == MAX_ITERATIONS) | (c.status == STAGNATED)
                                         | (c.status == BREAKDOWN))
    true = lax.cond(unconverged, true_residual, lambda s: c.true_norm, c.state)
    status = jnp.where(unconverged & ~jnp.isfinite(true), NONFINITE, c.status)
    status = jnp.where((status == MAX_ITERATIONS) & ~stop_on_convergence & (c.rnorm <= tol),
                       CONVERGED, status)
    return c._replace(status=status.astype(jnp.int32), true_norm=true)


def _push(buffers: dict[str, Any], state: State, index: Any, tape: Tape) -> dict[str, Any]:
    """Store ``state`` (the one before step ``index``): in row ``index`` of a full tape, in
    its checkpoint's slot if it starts one, else in the spare row at the end.

    A full tape of states stores each step's result after the step, not the state it
    starts from before it: a row written from the state the step reads would have to be
    written before the step overwrites that state's buffers in place, an order XLA does not
    see, so it copied each stored entry (two more passes per entry and step, measured for
    CG). A checkpointed tape stores the state where a run of steps starts (:func:`run_loop`
    runs the steps between checkpoints as one inner loop), before that loop: a run that
    starts between checkpoints (after a convergence claim was refuted) writes the spare row,
    which is cheaper than a conditional write (a select of the whole buffer under ``vmap``).
    """
    spare = tape.slots
    if tape.every == 1:
        return {k: buf.at[jnp.minimum(index, spare)].set(state[k])
                for k, buf in buffers.items()}
    slot = jnp.where(index % tape.every == 0, index // tape.every, spare)
    return {k: buf.at[slot].set(state[k]) for k, buf in buffers.items()}


# -- the unrolled reverse sweep -----------------------------------------------------------------
#: State entries that only report on the solve (``IterativeSolver`` contract). They feed
#: stopping decisions, never the iterate, so they are not differentiated: the reverse pass
#: through ``rnorm = ||r||`` would multiply a zero cotangent by ``1 / ||r||``, which is
#: ``0 * inf = NaN`` once the residual is exactly zero (e.g. for ``b = 0``).
_DIAGNOSTIC_KEYS = frozenset({"rnorm", "breakdown"})


def _differentiable(state: State) -> tuple[State, State]:
    """Split a state into the floating-point entries the iterate depends on and the rest
    (flags, counters, the reported residual norm)."""
    def differentiable(key: str, value: Any) -> bool:
        return _is_inexact(value) and key not in _DIAGNOSTIC_KEYS

    diff = {k: v for k, v in state.items() if differentiable(k, v)}
    fixed = {k: v for k, v in state.items() if not differentiable(k, v)}
    return diff, fixed


def _add(a: Any, b: Any) -> Any:
    return jax.tree_util.tree_map(jnp.add, a, b)


def unrolled_pullback(solver: IterativeSolver, ops: Any, rebuild: Rebuild, M: Any,
                      params: dict[str, Any], b: Any, x0: Any, loop: LoopOutput, tape: Tape,
                      x_bar: Any) -> tuple[dict[str, Any], Any, Any]:
    """Pull ``x_bar`` back through the iterations of ``loop``: ``(params_bar, b_bar, x0_bar)``.

    The exact derivative of ``x_K = iterate(step^K(init(b, x0)))`` with ``K =
    loop.accepted``. Each reverse step re-evaluates one forward step inside ``jax.vjp``
    (recomputing is cheaper than keeping each step's products with ``A`` on the tape: the
    tape lives outside the caches, the step's vectors inside them).
    """
    final = loop.state

    def iterate(diff: State, p: dict[str, Any], b: Any) -> Any:
        return solver.iterate(ops, rebuild(p), b, {**diff, **fixed_final}, M)

    diff_final, fixed_final = _differentiable(final)
    _, pull = jax.vjp(iterate, diff_final, params, b)
    state_bar, params_bar, b_bar = pull(x_bar)
    template = final

    def step_pullback(state: State, carry: tuple) -> tuple:
        state_bar, params_bar, b_bar = carry
        diff, fixed = _differentiable(state)

        def step(d: State, p: dict[str, Any], b: Any) -> State:
            # No Materialized wrapper here: differentiating through lax.cond costs more
            # than the fusion it saves.
            new = solver.step(ops, rebuild(p), b, {**d, **fixed}, M)
            return {key: new[key] for key in d}

        _, pull = jax.vjp(step, diff, params, b)
        d_bar, p_bar, bb = pull(state_bar)
        return d_bar, _add(params_bar, p_bar), b_bar + bb

    def restore(saved: dict[str, Any]) -> State:
        # Entries not on the tape: constants of the solve (the final state holds their
        # value), or entries the step does not read (anything of the right shape does).
        return {k: saved[k] if k in saved else v for k, v in template.items()}

    carry = (state_bar, params_bar, b_bar)
    accepted = loop.accepted
    if tape.every == 1:
        def body(i: Any, carry: tuple) -> tuple:
            k = accepted - 1 - i
            saved = {key: buf[k] for key, buf in loop.tape.items()}
            return step_pullback(restore(saved), carry)

        carry = lax.fori_loop(0, accepted, body, carry)
    else:
        carry = _checkpointed_sweep(solver, ops, rebuild(params), M, b, loop, tape, restore,
                                    step_pullback, carry)
    state_bar, params_bar, b_bar = carry

    def init(p: dict[str, Any], b: Any, x0: Any) -> State:
        return _differentiable(solver.init(ops, rebuild(p), b, x0, M))[0]

    _, pull = jax.vjp(init, params, b, x0)
    p_bar, bb, x0_bar = pull(state_bar)
    return _add(params_bar, p_bar), b_bar + bb, x0_bar


def _checkpointed_sweep(solver: IterativeSolver, ops: Any, A: Any, M: Any, b: Any,
                        loop: LoopOutput, tape: Tape, restore: Callable,
                        step_pullback: Callable, carry: tuple) -> tuple:
    """Reverse sweep with a checkpoint every ``tape.every`` steps: each segment is recomputed
    forward from its checkpoint into a buffer of ``tape.every`` states, then reversed.

    The segment buffer keeps only the entries ``step`` reads (``tape.keys``), like the
    checkpoints: the others cannot change a step's derivative (``restore`` fills them in).
    """
    every, accepted = tape.every, loop.accepted
    template = restore({})
    segments = (accepted + every - 1) // every

    def segment(i: Any, acc: tuple) -> tuple:
        carry, local = acc
        s = segments - 1 - i
        length = jnp.minimum(every, accepted - s * every)
        first = restore({key: buf[s] for key, buf in loop.tape.items()})
        # Row j holds the state before the segment's step j: each step's result is stored
        # after it (as run_loop does, see _push), the last one in the spare row.
        local = {k: local[k].at[0].set(first[k]) for k in local}

        def forward(j: Any, acc: tuple) -> tuple:
            state, local = acc
            state = solver.step(ops, materialized(A, j), b, state, materialized(M, j))
            return state, {k: local[k].at[j + 1].set(state[k]) for k in local}

        _, local = lax.fori_loop(0, length, forward, (first, local))

        def backward(j: Any, carry: tuple) -> tuple:
            k = length - 1 - j
            return step_pullback(restore({key: buf[k] for key, buf in local.items()}), carry)

        return lax.fori_loop(0, length, backward, carry), local

    # One segment buffer (and a spare row) for all segments, carried through the loop
    # (buffers of zeros made per segment cost XLA a copy of each per segment).
    local = {k: jnp.zeros((every + 1, *jnp.shape(template[k])), jnp.result_type(template[k]))
             for k in loop.tape}
    return lax.fori_loop(0, segments, segment, (carry, local))[0]
