"""Calling a solver's ``init`` and ``step`` with the contract checked, for every backend.

A user's solver that returns ``None`` from ``step``, forgets ``"rnorm"`` or raises deep
inside its arithmetic should get a message that names the solver, the method and the
iteration, not a ``KeyError`` from the driver's internals. The checks are on the state's
structure only (a dict, with ``"rnorm"``, with the keys ``init`` produced), so they cost
nothing per element and run the same on NumPy, CuPy and under JAX tracing.
"""

from __future__ import annotations

from typing import Any

from prdp_ops._solver.base import IterativeSolver, State

__all__ = ["checked_init", "checked_step", "solver_label"]

_CONTRACT = (
    "init and step must return a dict of arrays holding at least 'x' (or override "
    "iterate) and 'rnorm' (the residual norm, a real 0-d array), with the same keys at "
    "every step; see help(prdp_ops.IterativeSolver)"
)


def solver_label(solver: IterativeSolver) -> str:
    """The name errors and results use: the registered name, else the class name."""
    return solver.name or type(solver).__name__


def _annotate(err: BaseException, solver: IterativeSolver, where: str) -> BaseException:
    """Add which solver and which call failed to ``err``, keeping its type (a user's
    ``except ValueError`` still works) and traceback."""
    err.add_note(f"(raised in {where} of solver {solver_label(solver)!r})")
    return err


def _check_state(solver: IterativeSolver, state: Any, where: str,
                 keys: frozenset[str] | None) -> State:
    label = solver_label(solver)
    if not isinstance(state, dict):
        raise TypeError(
            f"solver {label!r}: {where} returned {type(state).__name__}, not a state dict. "
            + _CONTRACT
        )
    if "rnorm" not in state and type(solver).residual_norm is IterativeSolver.residual_norm:
        raise TypeError(
            f"solver {label!r}: the state {where} returned has no 'rnorm' (keys: "
            f"{sorted(state)}). " + _CONTRACT
        )
    if keys is not None and frozenset(state) != keys:
        raise TypeError(
            f"solver {label!r}: {where} changed the state's keys from {sorted(keys)} to "
            f"{sorted(state)}. " + _CONTRACT
        )
    return state


def checked_init(solver: IterativeSolver, ops: Any, A: Any, b: Any, x0: Any,
                 M: Any) -> State:
    """``solver.init(...)`` with the state contract checked and errors annotated."""
    try:
        state = solver.init(ops, A, b, x0, M)
    except Exception as err:
        raise _annotate(err, solver, "init") from None
    return _check_state(solver, state, "init", None)


def checked_step(solver: IterativeSolver, ops: Any, A: Any, b: Any, state: State, M: Any,
                 iteration: Any = None) -> State:
    """``solver.step(...)`` with the state contract checked and errors annotated.

    ``iteration`` (a Python int on NumPy/CuPy; ``None`` under JAX tracing, where the step is
    traced once for all iterations) goes into the error message.
    """
    where = "step" if iteration is None else f"step (iteration {iteration})"
    try:
        new = solver.step(ops, A, b, state, M)
    except Exception as err:
        raise _annotate(err, solver, where) from None
    return _check_state(solver, new, where, frozenset(state))
