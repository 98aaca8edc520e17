"""Which state entries a solver's functions read, from their jaxprs (private to
``prdp_ops.backends.jax``; re-exported by :mod:`._jax_driver`).

The JAX tapes keep only what the reverse sweep needs: the entries ``step`` reads (not CG's
``q``, which each step recomputes), less those it passes through unchanged (constants of the
solve), and, for the hand reverse's checkpoints, those the records depend on
(:func:`prdp_ops.backends._jax_unrolled.keys_for_records`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from prdp_ops._solver.base import IterativeSolver, State

__all__ = ["consumed_keys", "keys_passed_through", "keys_read_by_iterate", "keys_read_by_step"]


def consumed_keys(fn: Callable[[State], Any], state: State) -> set[str]:
    """The entries of ``state`` that ``fn``'s outputs depend on, found from its jaxpr:
    equations whose results no output uses (and that have no effects) read nothing."""
    keys = sorted(state)
    closed = jax.make_jaxpr(lambda *leaves: fn(dict(zip(keys, leaves, strict=True))))
    jaxpr = closed(*[state[k] for k in keys]).jaxpr
    used = {id(v) for v in jaxpr.outvars}
    for eqn in reversed(jaxpr.eqns):
        if eqn.effects or any(id(v) in used for v in eqn.outvars):
            used.update(id(v) for v in eqn.invars)
    return {k for k, var in zip(keys, jaxpr.invars, strict=True) if id(var) in used}


def keys_read_by_step(solver: IterativeSolver, ops: Any, A: Any, M: Any, b: Any,
                      state: State) -> tuple[str, ...]:
    """The state entries ``solver.step`` computes with: the only ones a step's derivative
    depends on, so the only ones the tape keeps (not CG's ``q``, which each step recomputes).

    Entries a step merely passes through unchanged count as read, conservatively.
    """
    return tuple(sorted(consumed_keys(lambda s: solver.step(ops, A, b, s, M), state)))


def keys_passed_through(solver: IterativeSolver, ops: Any, A: Any, M: Any, b: Any,
                        state: State) -> tuple[str, ...]:
    """The entries ``step`` returns unchanged (the very input, by its jaxpr): constants of
    the solve such as a stationary method's prepared ``P`` (Jacobi's diagonal). A tape need
    not keep them per step: every state holds the final state's value."""
    keys = sorted(state)
    closed, shapes = jax.make_jaxpr(lambda *leaves: solver.step(
        ops, A, b, dict(zip(keys, leaves, strict=True)), M), return_shape=True)(
        *[state[k] for k in keys])
    jaxpr = closed.jaxpr
    out = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes), jaxpr.outvars)
    return tuple(k for k, var in zip(keys, jaxpr.invars, strict=True)
                 if isinstance(out, dict) and out.get(k) is var)


def keys_read_by_iterate(solver: IterativeSolver, ops: Any, A: Any, M: Any, b: Any,
                         state: State) -> tuple[str, ...]:
    """The entries ``iterate`` reads: those a failed step must not overwrite. The loop ends
    after a failed step, so nothing else of its state is used again (CG: only ``x``, not
    ``r`` and ``p``, which saves two vector selects per iteration)."""
    return tuple(sorted(consumed_keys(lambda s: solver.iterate(ops, A, b, s, M), state)))
