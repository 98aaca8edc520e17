"""The unrolled reverse sweep from a solver's hand-derived reverse step (private to
``prdp_ops.backends.jax``).

A built-in solver writes its reverse step once, over ``ops``: ``record`` says what of one
forward step the reverse needs (CG: its direction ``p``, ``q = A p``, ``r'`` and the scalars
``rho``, ``rho'``, ``<p, q>``),
``step_vjp`` maps the cotangent of the state after a step to the one before it, and
``init_vjp``/``iterate_vjp`` close the chain. The NumPy backend runs them in a Python loop
(:func:`prdp_ops.backends.numpy.unrolled_vjp`); here the forward ``lax.while_loop`` writes
each step's record into a preallocated tape (one row per step, so the reverse reads each
record as contiguous rows) and a reverse ``lax.fori_loop`` calls ``step_vjp`` on the rows in
reverse order. Compared with pulling the cotangent back through ``jax.vjp`` of ``step``
(:func:`prdp_ops.backends._jax_driver.unrolled_pullback`, the fallback for solvers without a
traceable reverse step) no reverse step re-runs its forward step: the products with ``A``
the reverse needs are on the tape.

:class:`ReverseContext` is the functional JAX twin of the NumPy
:class:`~prdp_ops.backends.numpy.ReverseContext`: for every forward product ``y = A v`` the
reverse step asks for ``A^T y_bar`` (the operator's own transpose, or JAX's transpose of
its matvec) and A's parameters receive ``vjp(p -> A(p) v)(y_bar)`` (the operator's own
``param_vjp`` when it has one); the cotangents of ``b`` and of the parameters are carried
through the reverse loop as loop state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from prdp_ops.backends._jax_driver import LoopOutput, Tape, consumed_keys, materialized
from prdp_ops.backends._jax_operators import like_parameter, own_param_vjp, transpose
from prdp_ops.backends._jax_ops import TracedHostReadError

from prdp_ops._solver.base import IterativeSolver, State

__all__ = ["TRACEABLE_REVERSE_ATTR", "ReverseContext", "hand_pullback", "keys_for_records",
           "record_avals"]

#: What a solver's reverse step raises when it cannot run on traced arrays: it reads a
#: traced value on the host (GMRES's ``record`` reads the step counter as a Python int
#: through ``ops.to_float``, which raises :class:`~prdp_ops.backends._jax_ops.TracedHostReadError`;
#: ``int()``/``float()``/``bool()``/``np.asarray`` of a tracer raise JAX's concretization
#: errors), or a part of it is not implemented. Only these send the sweep to ``jax.vjp`` of
#: ``step``; any other error is a bug in the reverse step and surfaces (see
#: :func:`record_avals`).
_UNTRACEABLE = (NotImplementedError, TracedHostReadError, jax.errors.ConcretizationTypeError,
                jax.errors.TracerIntegerConversionError, jax.errors.TracerArrayConversionError)

#: A solver class may set this attribute to ``False`` to have its unrolled JAX reverse
#: derived by ``jax.vjp`` of ``step`` even though it has a ``step_vjp`` (one written for
#: NumPy only, say).
TRACEABLE_REVERSE_ATTR = "jax_traceable_reverse"


def _tree_add(a: Any, b: Any) -> Any:
    return jax.tree_util.tree_map(jnp.add, a, b)


def _part_matvec(A: Any, part: str, v: Any) -> Any:
    """``A_part v`` for one piece of the splitting ``A = D + L + U`` (Jacobi, SOR)."""
    if part == "full":
        return A.matvec(v)
    if part == "diagonal":
        return A.diagonal() * v
    if part == "strict_lower":
        return jnp.tril(A.to_matrix(), -1) @ v
    if part == "strict_upper":
        return jnp.triu(A.to_matrix(), 1) @ v
    raise NotImplementedError(f"unknown part {part!r} of an operator's splitting")


@dataclasses.dataclass(eq=False)
class ReverseContext:
    """What a reverse step produces besides the state cotangents (JAX, functional).

    A fresh context wraps each reverse step: it starts from the running cotangents
    ``b_bar`` and ``params_bar`` (loop state of the reverse loop) and the step's calls add
    to them; the loop body reads them back afterwards.

    Attributes
    ----------
    A, M
        The operator and the preconditioner (constant) of the forward solve.
    rebuild
        ``params -> A(params)``: A's parameter cotangents are vjps of ``p -> A(p) v``.
    params
        A's parameters; ``live`` the names that receive cotangents.
    b_bar, params_bar
        The running cotangents of ``b`` and of the live parameters.
    token
        A value ``>= 0`` unknown to the compiler: products are kept out of their consumers'
        fusions on CPU (see :class:`~prdp_ops.backends._jax_driver.Materialized`).
    """

    A: Any
    M: Any
    rebuild: Callable[[dict[str, Any]], Any]
    params: dict[str, Any]
    live: tuple[str, ...]
    b_bar: Any
    params_bar: dict[str, Any]
    token: Any = None

    def matvec_T(self, v: Any, y_bar: Any) -> Any:
        """Return ``A^T y_bar`` for a forward ``y = A v``; A's parameters get their share."""
        self.record_pair(v, y_bar)
        return transpose(self.A, y_bar).matvec(y_bar)

    def record_pair(self, v: Any, y_bar: Any, part: str = "full") -> None:
        """Add the parameter cotangent of ``y = A_part(p) v`` for ``y_bar`` (no product)."""
        if not self.live:
            return
        live = {k: self.params[k] for k in self.live}
        if own_param_vjp(self.A):
            own = self.A.param_vjp(v, y_bar, part)
            bar = {k: like_parameter(own.get(k), p) for k, p in live.items()}
            self.params_bar = _tree_add(self.params_bar, bar)
            return

        def apply(sub: dict[str, Any], v: Any) -> Any:
            return _part_matvec(self.rebuild({**self.params, **sub}), part, v)

        # A real scalar parameter c (a coefficient) by forward mode: its cotangent is
        # Re sum(y_bar * dy/dc), one product for the tangent dy/dc and one dot. The vjp
        # would reduce over the product's shifted slices, which XLA:CPU writes out one by
        # one (measured: more than a forward step for a stencil).
        scalars = tuple(k for k, p in live.items() if _real_scalar(p))
        tensors = {k: p for k, p in live.items() if k not in scalars}
        bar = {}
        for k in scalars:
            def tangent(v: Any, k: str = k) -> Any:
                one = {k: jnp.ones_like(live[k])}
                return jax.jvp(lambda s: apply(s, v), ({k: live[k]},), (one,))[1]

            dy = lax.cond(self.token >= 0, tangent, jnp.zeros_like, v) if self._split() \
                else tangent(v)
            bar[k] = jnp.real(jnp.sum(y_bar * dy)).astype(live[k].dtype).reshape(
                jnp.shape(live[k]))
        if tensors:
            out, pull = jax.vjp(lambda t: apply(t, v), tensors)
            bar.update(pull(y_bar.astype(out.dtype))[0])
        self.params_bar = _tree_add(self.params_bar, bar)

    def _split(self) -> bool:
        """Whether products go into a conditional branch of their own (see ``token``)."""
        return self.token is not None and jax.default_backend() == "cpu"

    def precond_T(self, z_bar: Any) -> Any:
        """Return ``M^T z_bar`` for a forward ``z = M r`` (``M`` is a constant)."""
        return transpose(self.M, z_bar).matvec(z_bar)

    def add_b(self, b_bar: Any) -> None:
        """Accumulate a contribution to b's cotangent."""
        self.b_bar = self.b_bar + b_bar.astype(self.b_bar.dtype)


def _real_scalar(param: Any) -> bool:
    return jnp.size(param) == 1 and jnp.issubdtype(jnp.result_type(param), jnp.floating)


def _differentiable(state: State) -> State:
    """The floating-point entries of a state that are not mere diagnostics."""
    return {k: v for k, v in state.items()
            if jnp.issubdtype(jnp.result_type(v), jnp.inexact) and k not in ("rnorm",)}


def record_avals(solver: IterativeSolver, ops: Any, A: Any, M: Any, b: Any, x0: Any) -> Any:
    """The shapes of one step's ``record`` when ``solver``'s reverse step runs traced, else
    ``None`` (then the sweep differentiates ``step`` with ``jax.vjp``).

    Traces a whole reverse chain once (``init``, ``step``, ``record``, ``iterate_vjp``,
    ``step_vjp``, ``init_vjp``) without running it. The answer is ``None`` in exactly these
    cases: the solver has no ``step_vjp`` of its own, its class sets
    ``jax_traceable_reverse = False``, or tracing the chain raises one of the errors of
    :data:`_UNTRACEABLE` (a host read of a traced value, a ``NotImplementedError``).

    Raises
    ------
    RuntimeError
        When tracing the chain fails for any other reason (a shape or dtype mismatch, a
        missing state entry, ...): a bug in the solver's reverse step, which the fallback
        would hide behind a slower but silently different sweep. The original error is
        chained.
    """
    if not solver.supports_unrolled_numpy or not getattr(solver, TRACEABLE_REVERSE_ATTR, True):
        return None

    def chain(b: Any, x0: Any) -> Any:
        state = solver.init(ops, A, b, x0, M)
        new = solver.step(ops, A, b, state, M)
        record = solver.record(ops, A, b, M, state, new)
        ctx = ReverseContext(A, M, lambda p: A, A.parameters(), (), jnp.zeros_like(b), {})
        bar = solver.iterate_vjp(ops, A, b, M, new, solver.iterate(ops, A, b, new, M), ctx)
        bar = solver.step_vjp(ops, A, b, M, record, bar, ctx)
        solver.init_vjp(ops, A, b, x0, M, bar, ctx)
        return record

    try:
        return jax.eval_shape(chain, b, x0)
    except _UNTRACEABLE:
        return None
    except Exception as err:
        name = solver.name or type(solver).__name__
        raise RuntimeError(
            f"adjoint='unrolled': the reverse step of solver {name!r} (its record / "
            f"step_vjp / init_vjp / iterate_vjp) fails on JAX arrays with "
            f"{type(err).__name__}: {err}. This is a bug in that reverse step; fix it, or set "
            f"{TRACEABLE_REVERSE_ATTR} = False on {type(solver).__name__} to have JAX derive "
            "the reverse from step instead"
        ) from err


def keys_for_records(solver: IterativeSolver, ops: Any, A: Any, M: Any, b: Any,
                     state: State) -> tuple[str, ...]:
    """The state entries that steps run again from a checkpoint need to reproduce their
    records: those the record of a step depends on, and those the needed entries of the
    next state depend on (a fixed point, found from the jaxprs of ``step`` and ``record``).

    A checkpoint of the hand reverse keeps only these: CG's records do not depend on the
    iterate ``x`` (the reverse of ``x' = x + alpha p`` needs ``p`` only), so neither its
    checkpoints nor the recomputed segments carry ``x`` (XLA drops the unused update).
    """
    needed: set[str] = set()
    while True:
        def run(s: State, keep: frozenset = frozenset(needed)) -> Any:
            new = solver.step(ops, A, b, s, M)
            return solver.record(ops, A, b, M, s, new), {k: new[k] for k in keep}

        found = consumed_keys(run, state) | needed
        if found == needed:
            return tuple(sorted(needed))
        needed = found


def _normalize(bar: State, template: State) -> State:
    """``bar`` on the template's keys and dtypes (absent or ``None`` entries are zeros)."""
    out = {}
    for k, like in template.items():
        value = bar.get(k)
        out[k] = jnp.zeros_like(like) if value is None else jnp.asarray(value).astype(
            like.dtype).reshape(jnp.shape(like))
    return out


def hand_pullback(solver: IterativeSolver, ops: Any, rebuild: Callable, M: Any,
                  params: dict[str, Any], live: tuple[str, ...], b: Any, x0: Any,
                  loop: LoopOutput, tape: Tape, x_bar: Any) -> tuple[dict[str, Any], Any, Any]:
    """Pull ``x_bar`` back through the ``loop.accepted`` steps with the solver's reverse
    step: ``(params_bar, b_bar, x0_bar)`` (``params_bar`` holds the ``live`` names).

    ``loop.tape`` holds one record per step (``tape.every == 1``) or a state every
    ``tape.every`` steps, from which each segment's records are recomputed.
    """
    A = rebuild(params)
    ctx = ReverseContext(A, M, rebuild, params, live, jnp.zeros_like(b),
                         {k: jnp.zeros_like(params[k]) for k in live})
    bar = solver.iterate_vjp(ops, A, b, M, loop.state, x_bar, ctx)
    # The reverse loop's carry: the cotangents of the state entries the reverse steps
    # produce (and of those iterate_vjp gave, for K = 0), typed like the entries.
    diff = _differentiable(loop.state)
    record = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), tape.record_avals)
    keys = set(bar) | set(jax.eval_shape(
        lambda: solver.step_vjp(ops, A, b, M, record, _normalize(bar, diff),
                                dataclasses.replace(ctx))))
    template = {k: v for k, v in diff.items() if k in keys}
    carry = (_normalize(bar, template), ctx.b_bar, ctx.params_bar)

    def reverse_step(record: Any, token: Any, carry: tuple) -> tuple:
        state_bar, b_bar, params_bar = carry
        step_ctx = dataclasses.replace(ctx, b_bar=b_bar, params_bar=params_bar, token=token)
        state_bar = solver.step_vjp(ops, A, b, M, record, state_bar, step_ctx)
        return _normalize(state_bar, template), step_ctx.b_bar, step_ctx.params_bar

    accepted = loop.accepted
    if tape.every == 1:
        def body(i: Any, carry: tuple) -> tuple:
            k = accepted - 1 - i
            return reverse_step(_row(loop.tape, k), k, carry)

        carry = lax.fori_loop(0, accepted, body, carry)
    else:
        carry = _checkpointed(solver, ops, A, M, b, loop, tape, reverse_step, carry)
    state_bar, b_bar, params_bar = carry
    end = dataclasses.replace(ctx, b_bar=b_bar, params_bar=params_bar)
    x0_bar = solver.init_vjp(ops, A, b, x0, M, state_bar, end)
    return end.params_bar, end.b_bar, jnp.asarray(x0_bar).astype(x0.dtype)


def _row(buffers: Any, k: Any) -> Any:
    """Row ``k`` of every stacked leaf of a tape."""
    return jax.tree_util.tree_map(lambda buf: buf[k], buffers)


def _checkpointed(solver: IterativeSolver, ops: Any, A: Any, M: Any, b: Any, loop: LoopOutput,
                  tape: Tape, reverse_step: Callable, carry: tuple) -> tuple:
    """Reverse sweep with a state kept every ``tape.every`` steps: each segment is run again
    from its checkpoint, writing its records into a buffer of ``tape.every`` rows, then
    reversed."""
    every, accepted = tape.every, loop.accepted
    template = loop.state
    segments = (accepted + every - 1) // every

    def segment(i: Any, acc: tuple) -> tuple:
        carry, local = acc
        s = segments - 1 - i
        length = jnp.minimum(every, accepted - s * every)
        # Entries not on the tape are constants of the solve (the final state holds their
        # value) or not read by step.
        first = {k: loop.tape[k][s] if k in loop.tape else v for k, v in template.items()}

        def forward(j: Any, acc: tuple) -> tuple:
            state, local = acc
            new = solver.step(ops, materialized(A, j), b, state, materialized(M, j))
            record = solver.record(ops, A, b, M, state, new)
            local = jax.tree_util.tree_map(lambda buf, v: buf.at[j].set(v), local, record)
            return new, local

        _, local = lax.fori_loop(0, length, forward, (first, local))

        def backward(j: Any, carry: tuple) -> tuple:
            k = length - 1 - j
            return reverse_step(_row(local, k), k, carry)

        return lax.fori_loop(0, length, backward, carry), local

    # One segment buffer for all segments, carried through the loop: rows past a short
    # segment's length keep an earlier segment's records and are never read. (A buffer of
    # zeros made per segment cost XLA a copy of each buffer per segment: the identical
    # zero arrays were merged into one, which the buffers could not all update in place.)
    local = jax.tree_util.tree_map(lambda a: jnp.zeros((every, *a.shape), a.dtype),
                                   tape.record_avals)
    return lax.fori_loop(0, segments, segment, (carry, local))[0]
