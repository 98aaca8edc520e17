"""The PRDP rule as a pure function: validated hyperparameters, plain state, pure update.

Modelled on optax's ``contrib/_reduce_on_plateau.py``: :func:`make_hyperparameters`
(:mod:`prdp_ops._controller_params`) checks every argument once and returns a frozen
:class:`Hyperparameters`; :class:`ControllerState` is an immutable tuple of plain Python
scalars (O(1) in the number of checks); :func:`update` maps ``(hyperparameters, state, loss,
residual, fidelity)`` to the next state and a :class:`CheckRecord` of what was seen and
decided, and :func:`start_update` maps ``(hyperparameters, state, fidelity)`` to the next
state of the start search, touching nothing else. The rule itself is described, with its
maths, in :mod:`prdp_ops._controller`; :class:`~prdp_ops.PRDPController` wraps these functions
with validation of the signals, a history and persistence.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

from prdp_ops._controller_fidelity import jump_factor, predicted_fidelity, tolerance
from prdp_ops._controller_params import (
    DEFAULT_FIDELITY_POWER,
    DEFAULT_FIDELITY_TOL,
    DEFAULT_GROWTH,
    MAX_COUNT,
    RULES,
    Hyperparameters,
    as_signal,
    check_bool,
    check_int,
    make_hyperparameters,
)

__all__ = [
    "DECISION_OF",
    "DEFAULT_FIDELITY_POWER",
    "DEFAULT_FIDELITY_TOL",
    "DEFAULT_GROWTH",
    "REASONS",
    "REASON_CODE",
    "REFINE_REASONS",
    "RULES",
    "CheckRecord",
    "ControllerState",
    "Decision",
    "Hyperparameters",
    "advance",
    "as_signal",
    "at_caps",
    "check_bool",
    "check_int",
    "init_state",
    "make_hyperparameters",
    "next_count",
    "predicted_fidelity",
    "start_update",
    "update",
    "wants_fidelity",
]

Decision = Literal["refine", "hold", "stop"]

# Why a check decided what it did. The position of a reason is its code in a saved history
# (prdp_ops._controller_history), so new reasons may only be appended.
REASONS: tuple[str, ...] = (
    "warm-up", "no plateau", "improved", "worsened", "no gain", "at k_max",
    "solver converged", "stopped",
    # rule="fidelity" (appended: the codes above keep their meaning in saved histories)
    "plateau", "fidelity", "fidelity ok", "awaiting signal",
)
REASON_CODE = {reason: code for code, reason in enumerate(REASONS)}
REFINE_REASONS = frozenset({"improved", "worsened", "plateau", "fidelity"})
#: A fidelity is measured again once the metric fell by this factor since the measurement.
STALE_FALL = 10.0
# The reason determines the decision, so the history stores only the reason.
DECISION_OF: dict[str, Decision] = {
    reason: "refine" if reason in REFINE_REASONS else "stop" if reason == "no gain" else "hold"
    for reason in REASONS
}

# --------------------------------------------------------------------------- state and rule


class ControllerState(NamedTuple):
    """Everything the rule needs to continue: O(1) plain Python scalars.

    ``checkpoint`` is ``math.inf`` before the first refinement; ``recent_emas`` holds the last
    ``min(checks, lookback)`` moving averages, oldest first. ``fidelity`` is the last gradient
    fidelity measured at the current counts (``None`` when none was given since the last
    refinement); ``signal_seen`` whether any was ever given; ``first_ema`` the first check's
    average, the scale of the fidelity tolerance; ``fidelity_ema`` the average of the check
    at which ``fidelity`` was given, from which the rule extrapolates it; ``level_start`` the
    index of the first check at the current counts and ``measured_check`` the index of the
    check that gave ``fidelity`` (``None`` with it), which space the measurements it asks for
    (rule ``"fidelity"`` only). ``searching`` is whether the start search is open (before the
    first check, rule ``"fidelity"`` only: :func:`start_update`); ``start_k`` and
    ``start_k_adjoint`` are the counts the first check runs with (the minima, or where the
    search ended), and ``start_fidelity`` is the last fidelity the search was given (``None``
    when none).
    """

    checks: int
    recent_emas: tuple[float, ...]
    k: int
    k_adjoint: int
    checkpoint: float
    stopped: bool
    solver_converged: bool
    fidelity: float | None = None
    signal_seen: bool = False
    first_ema: float | None = None
    fidelity_ema: float | None = None
    level_start: int = 0
    measured_check: int | None = None
    searching: bool = False
    start_k: int = 1
    start_k_adjoint: int = 1
    start_fidelity: float | None = None


class CheckRecord(NamedTuple):
    """What one check saw and decided (one history entry, before any encoding).

    ``k``, ``k_adjoint`` and ``checkpoint`` are the values before the decision (the ones the
    loss was produced with and the average was compared against); ``residual`` is ``None``
    when none was given.
    """

    loss: float
    ema: float
    k: int
    k_adjoint: int
    reason: str
    plateau: bool
    checkpoint: float
    residual: float | None
    converged_at_k: bool

    @property
    def decision(self) -> Decision:
        """The answer of :meth:`~prdp_ops.PRDPController.update` at this check."""
        return DECISION_OF[self.reason]


def init_state(hp: Hyperparameters) -> ControllerState:
    """The state before the first check: the start search is open under rule ``"fidelity"``
    unless both counts start at their caps (no more refined count to compare with)."""
    return ControllerState(
        checks=0, recent_emas=(), k=hp.k_min, k_adjoint=hp.k_adjoint_min, checkpoint=math.inf,
        stopped=False, solver_converged=False,
        searching=hp.rule == "fidelity" and not at_caps(hp, hp.k_min, hp.k_adjoint_min),
        start_k=hp.k_min, start_k_adjoint=hp.k_adjoint_min,
    )


def advance(count: int, step: int, cap: int | None) -> int:
    """``count + step``, capped at ``cap`` (when not ``None``)."""
    return count + step if cap is None else min(count + step, cap)


def growth_steps(count: int, step: int, growth: float) -> int:
    """How many ``step``s one refinement of the fidelity rule adds to ``count``:
    ``max(1, round((growth - 1) * count / step))``, so that the count grows by a factor of
    about ``growth`` while staying on the ``k_min + j * step`` grid."""
    return max(1, round((growth - 1.0) * count / step))


def next_count(hp: Hyperparameters, count: int, step: int, cap: int | None,
               factor: float | None = None) -> int:
    """The count after one refinement: ``count + step`` for the paper's rule; for the fidelity
    rule ``count + step * growth_steps(count, step, factor)`` (geometric growth by ``factor``,
    ``growth`` when ``None``); capped."""
    if hp.rule == "fidelity":
        step = step * growth_steps(count, step, hp.growth if factor is None else factor)
    return advance(count, step, cap)


def at_caps(hp: Hyperparameters, k: int, k_adjoint: int) -> bool:
    """Whether no refinement can change either count (both at their caps)."""
    return (k == next_count(hp, k, hp.k_step, hp.k_max)
            and k_adjoint == next_count(hp, k_adjoint, hp.k_adjoint_step, hp.k_adjoint_max))


def start_update(hp: Hyperparameters, state: ControllerState,
                 fidelity: float) -> tuple[ControllerState, Decision]:
    """One measurement of the start search: the next state and ``"refine"`` or ``"hold"`` (pure).

    The search runs before the first training step, on the raw gradient fidelity at the
    initial parameters (see :mod:`prdp_ops._controller`): ``fidelity`` above ``fidelity_tol``
    multiplies both counts by ``growth`` on their grids (capped), anything else ends the
    search at the current counts. It also ends where the counts reach their caps (no more
    refined count is left to compare with) or where a count would leave the range of counts
    the history stores. ``state.searching`` must be ``True`` (the controller checks it).
    """
    if fidelity <= hp.fidelity_tol:
        return state._replace(searching=False, start_fidelity=fidelity), "hold"
    # Doubling (growth), not the contraction estimate's jump: the search compares k with 2k,
    # so the next measurement's g_k is the last one's g_2k (the caller may reuse it) and the
    # count it ends at is the first of k_min, 2 k_min, 4 k_min, ... that meets the tolerance.
    k = next_count(hp, state.k, hp.k_step, hp.k_max)
    k_adjoint = next_count(hp, state.k_adjoint, hp.k_adjoint_step, hp.k_adjoint_max)
    if (k, k_adjoint) == (state.k, state.k_adjoint) or max(k, k_adjoint) > MAX_COUNT:
        return state._replace(searching=False, start_fidelity=fidelity), "hold"
    return state._replace(k=k, k_adjoint=k_adjoint, start_k=k, start_k_adjoint=k_adjoint,
                          searching=not at_caps(hp, k, k_adjoint),
                          start_fidelity=fidelity), "refine"


def wants_fidelity(hp: Hyperparameters, state: ControllerState) -> bool:
    """Whether the next check should bring a new fidelity measurement (rule ``"fidelity"``).

    A measurement costs solver work (two gradients, at ``k`` and ``k'``), so the rule asks for
    one only where it can change a decision: at the first check at new counts (none is known),
    and when the extrapolated fidelity at the last check came within a factor 2 of the
    tolerance (the next check's decision could flip) -- then once the checks since the last
    measurement reach half the checks spent at these counts, so that a level held for ``N``
    checks costs ``O(log N)`` measurements and a change is seen within half the level's age --
    and once the metric fell by :data:`STALE_FALL` since the measurement (one per decade of
    progress). While the start search is open, every measurement goes to it
    (:func:`start_update`). Never at both caps, and never under the paper's rule.
    """
    if hp.rule != "fidelity" or at_caps(hp, state.k, state.k_adjoint):
        return False
    if state.searching or state.fidelity is None or not state.recent_emas:
        return True
    ema = state.recent_emas[-1]
    first = ema if state.first_ema is None else state.first_ema
    if state.fidelity_ema is not None and ema * STALE_FALL <= state.fidelity_ema:
        # The metric fell tenfold since the measurement: the extrapolation's model (a fixed
        # displacement of the optimum) has been stretched over a decade, and a measurement
        # that read ~0 (e.g. an optimiser's first, sign-like step) would otherwise never be
        # revised. At most one measurement per decade of progress.
        return True
    predicted = predicted_fidelity(state.fidelity, state.fidelity_ema, ema)
    if predicted <= 0.5 * tolerance(hp, ema, first):
        return False
    measured = state.level_start if state.measured_check is None else state.measured_check
    # Checks at these counts, the next one included, against those since the measurement.
    return 2 * (state.checks - measured) >= state.checks + 1 - state.level_start


def _ratio(now: float, past: float) -> float:
    """``now / past`` for non-negative averages, with ``0/0`` read as "unchanged" (1)."""
    if past == 0:
        return 1.0 if now == 0 else math.inf
    return now / past


def update(
    hp: Hyperparameters, state: ControllerState, loss: float, residual: float | None = None,
    fidelity: float | None = None,
) -> tuple[ControllerState, CheckRecord]:
    """One check of the rule: the next state and the record of the check (pure).

    Parameters
    ----------
    hp : Hyperparameters
        From :func:`make_hyperparameters`.
    state : ControllerState
        The state after the previous check (:func:`init_state` before the first).
    loss : float
        The monitored metric, already validated (finite, >= 0).
    residual : float or None
        The solve's residual at the current count, already validated, or ``None``.
    fidelity : float or None
        The gradient fidelity at the current counts, already validated, or ``None`` (read by
        rule ``"fidelity"`` only; the last one given since the last refinement is kept).

    Returns
    -------
    (ControllerState, CheckRecord)
        The state after this check and what it saw and decided.
    """
    # e_n = e_{n-1} + alpha (l_n - e_{n-1}), seeded with l_0: a convex combination, so it never
    # overflows (the paper's closed form with (1-alpha)^-n weights does after ~2000 checks).
    if state.recent_emas and hp.alpha != 1.0:
        previous = state.recent_emas[-1]
        ema = previous + hp.alpha * (loss - previous)
    else:
        ema = loss
    recent = (*state.recent_emas, ema)[-hp.lookback:]
    converged = hp.residual_tol is not None and residual is not None and (
        residual <= hp.residual_tol
    )
    plateau = state.checks >= hp.lookback and _ratio(ema, recent[0]) > hp.tau_step
    (checks, _, k, k_adjoint, checkpoint, stopped, _, current, seen, first, measured,
     level_start, measured_check, _, start_k, start_k_adjoint, start_fidelity) = state
    first = ema if first is None else first
    if hp.rule == "fidelity" and fidelity is not None:
        current, seen, measured, measured_check = fidelity, True, ema, checks
    factor = None
    if hp.rule == "plateau":
        reason = _reason(hp, state, ema, plateau, converged)
    else:
        tol = tolerance(hp, ema, first)
        predicted = None if current is None else predicted_fidelity(current, measured, ema)
        reason = _reason_fidelity(hp, state, plateau, converged, predicted, seen, tol)
        if reason == "fidelity":
            factor = jump_factor(hp, predicted, tol)
    # Positional construction: this runs once per check, and keywords cost a third of it.
    record = CheckRecord(loss, ema, k, k_adjoint, reason, plateau, checkpoint, residual,
                         converged)
    if reason in REFINE_REASONS:
        k = next_count(hp, k, hp.k_step, hp.k_max, factor)
        k_adjoint = next_count(hp, k_adjoint, hp.k_adjoint_step, hp.k_adjoint_max, factor)
        # A fidelity measured at the old counts says nothing about the new ones.
        checkpoint, stopped, current, measured = ema, False, None, None
        if hp.rule == "fidelity":  # the paper's rule has no levels to space measurements by
            level_start, measured_check = checks + 1, None
    elif reason == "no gain":
        stopped = True
    # The first check closes the start search, whether or not it ran (searching=False).
    return ControllerState(checks + 1, recent, k, k_adjoint, checkpoint, stopped,
                           converged, current, seen, first, measured, level_start,
                           measured_check, False, start_k, start_k_adjoint,
                           start_fidelity), record


def _held(hp: Hyperparameters, state: ControllerState, converged: bool) -> str | None:
    """Why a refinement that is due is held instead, or ``None`` when it goes ahead."""
    if converged:
        return "solver converged"
    if at_caps(hp, state.k, state.k_adjoint):
        return "at k_max"
    return None


def _reason_fidelity(
    hp: Hyperparameters, state: ControllerState, plateau: bool, converged: bool,
    fidelity: float | None, seen: bool, tol: float,
) -> str:
    """The fidelity rule's reason, from the state before the check (pure).

    ``fidelity`` is the (extrapolated) fidelity at the current counts, or ``None``. A measured
    fidelity decides from the first check: only the loss-only fallback, which tests plateaus,
    needs the warm-up's ``lookback`` averages.
    """
    if fidelity is not None:
        if fidelity <= tol:
            return "fidelity ok"
        return _held(hp, state, converged) or "fidelity"
    if state.checks < hp.lookback:
        return "warm-up"
    if not seen:
        # No fidelity signal was ever given: the loss alone cannot tell a floor set by the
        # network from one set by the physics, so every plateau refines (never "stop").
        if not plateau:
            return "no plateau"
        return _held(hp, state, converged) or "plateau"
    return "awaiting signal"


def _reason(
    hp: Hyperparameters, state: ControllerState, ema: float, plateau: bool, converged: bool
) -> str:
    """Why this check decides what it does, from the state before it (pure)."""
    if state.checks < hp.lookback:
        return "warm-up"
    if state.stopped and hp.latch:
        return "stopped"
    if not plateau:
        return "no plateau"
    if ema < hp.tau_stop * state.checkpoint:
        reason = "improved"
    elif ema > state.checkpoint:
        reason = "worsened"
    else:
        return "no gain"
    return _held(hp, state, converged) or reason
