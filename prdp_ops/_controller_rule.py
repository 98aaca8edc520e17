"""The PRDP rule as a pure function: validated hyperparameters, plain state, pure update.

Modelled on optax's ``contrib/_reduce_on_plateau.py``: :func:`make_hyperparameters` checks
every argument once and returns a frozen :class:`Hyperparameters`; :class:`ControllerState`
is an immutable tuple of plain Python scalars (O(1) in the number of checks); and
:func:`update` maps ``(hyperparameters, state, loss, residual)`` to the next state and a
:class:`CheckRecord` of what was seen and decided, touching nothing else. The rule itself is
described, with its maths, in :mod:`prdp_ops._controller`; :class:`~prdp_ops.PRDPController`
wraps these functions with validation of the signals, a history and persistence.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, Literal, NamedTuple

from prdp_ops._controller_fidelity import jump_factor, predicted_fidelity, tolerance

__all__ = [
    "DECISION_OF",
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
    "check_bool",
    "check_int",
    "init_state",
    "make_hyperparameters",
    "next_count",
    "predicted_fidelity",
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
#: The refinement rules by name: the paper's, and the gradient-fidelity rule (the default).
RULES: tuple[str, ...] = ("fidelity", "plateau")
#: Defaults of the fidelity rule's own settings (also what a state saved before they existed
#: is read with; they do not affect rule="plateau").
DEFAULT_FIDELITY_TOL = 0.1
DEFAULT_GROWTH = 2.0
DEFAULT_FIDELITY_POWER = 0.0
#: A fidelity is measured again once the metric fell by this factor since the measurement.
STALE_FALL = 10.0
# The reason determines the decision, so the history stores only the reason.
DECISION_OF: dict[str, Decision] = {
    reason: "refine" if reason in REFINE_REASONS else "stop" if reason == "no gain" else "hold"
    for reason in REASONS
}

# Iteration counts are kept in int64 columns of the history; with counts and steps below
# 2**31, k stays below 2**63 for more than 4 billion refinements.
_MAX_COUNT = 2**31 - 1


# --------------------------------------------------------------------------- validation


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    """``value`` as a Python int in ``[minimum, maximum]``, or a TypeError/ValueError naming it."""
    span = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"PRDPController: {name} must be an integer {span}; received {value!r} "
            f"of type {type(value).__name__}."
        )
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"PRDPController: {name} must be {span}; received {value}.")
    return int(value)


def _check_count(name: str, value: Any, *, optional: bool = False) -> int | None:
    if optional and value is None:
        return None
    return check_int(name, value, 1, _MAX_COUNT)


def _check_positive_float(name: str, value: Any, *, at_most_one: bool = False) -> float:
    bound = f"0 < {name} <= 1" if at_most_one else f"0 < {name} (finite)"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"PRDPController: {name} must be a real number with {bound}; received {value!r} "
            f"of type {type(value).__name__}."
        )
    value = float(value)
    if not (math.isfinite(value) and value > 0 and (value <= 1 or not at_most_one)):
        raise ValueError(f"PRDPController: {name} must satisfy {bound}; received {value!r}.")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is exactly True or False, else a TypeError naming it."""
    if not isinstance(value, bool):
        raise TypeError(
            f"PRDPController: {name} must be True or False; received {value!r} "
            f"of type {type(value).__name__}."
        )
    return value


def _check_cap(name: str, cap: int | None, floor_name: str, floor: int) -> None:
    if cap is not None and cap < floor:
        raise ValueError(
            f"PRDPController: {name} must be >= {floor_name} ({floor}); received {cap}. "
            f"Raise {name}, lower {floor_name}, or pass {name}=None for no cap."
        )


def _check_residual_tol(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"PRDPController: residual_tol must be a real number >= 0 or None; received "
            f"{value!r} of type {type(value).__name__}."
        )
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(
            f"PRDPController: residual_tol must be finite and >= 0 (or None to ignore "
            f"residuals); received {value!r}."
        )
    return value


def as_signal(name: str, value: Any) -> float:
    """A finite, non-negative Python float from a Python/NumPy/JAX real scalar.

    The rule compares ratios of the signal, which only make sense for a non-negative metric
    (an MSE, a relative error, a residual norm).
    """
    if isinstance(value, bool) or isinstance(value, (str, bytes)) or value is None:
        raise TypeError(
            f"PRDPController.update: {name} must be a real scalar; received {value!r} of type "
            f"{type(value).__name__}."
        )
    dtype_kind = getattr(getattr(value, "dtype", None), "kind", "")
    if isinstance(value, complex) or dtype_kind == "c":
        raise ValueError(
            f"PRDPController.update: {name} must be real; received the complex value "
            f"{value!r}. Pass its absolute value or real part."
        )
    if getattr(value, "ndim", 0) != 0:
        raise ValueError(
            f"PRDPController.update: {name} must be a scalar (0-d); received an array of shape "
            f"{getattr(value, 'shape', '?')}. Reduce it (e.g. take the mean) first."
        )
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"PRDPController.update: {name} must be a real scalar; received {value!r} of type "
            f"{type(value).__name__}."
        ) from error
    if not math.isfinite(number) or number < 0:
        raise ValueError(
            f"PRDPController.update: {name} must be finite and non-negative; received "
            f"{number!r}. The controller state is unchanged; check the training run for "
            f"divergence (NaN/inf) or pass a non-negative metric such as an MSE."
        )
    return number


# --------------------------------------------------------------------------- hyperparameters


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    """The rule's settings, validated and resolved (adjoint defaults filled in).

    Build it with :func:`make_hyperparameters`, which checks every field; the fields mean
    what the arguments of :class:`~prdp_ops.PRDPController` of the same names mean.
    """

    k_min: int
    k_step: int
    k_max: int | None
    tau_step: float
    tau_stop: float
    ema_window: int
    lookback: int
    k_adjoint_min: int
    k_adjoint_step: int
    k_adjoint_max: int | None
    latch: bool
    use_ema: bool
    residual_tol: float | None
    rule: str = "plateau"
    fidelity_tol: float = DEFAULT_FIDELITY_TOL
    growth: float = DEFAULT_GROWTH
    fidelity_power: float = DEFAULT_FIDELITY_POWER

    @functools.cached_property
    def alpha(self) -> float:
        """Weight of the newest loss in the moving average (1 means no smoothing)."""
        return 2.0 / (self.ema_window + 1) if self.use_ema else 1.0

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict, in constructor order (JSON-serialisable)."""
        return dataclasses.asdict(self)


def make_hyperparameters(
    k_min: Any = 1,
    k_step: Any = 1,
    k_max: Any = None,
    tau_step: Any = 0.98,
    tau_stop: Any = 0.9,
    ema_window: Any = 6,
    lookback: Any = 3,
    *,
    k_adjoint_min: Any = None,
    k_adjoint_step: Any = None,
    k_adjoint_max: Any = None,
    latch: Any = True,
    use_ema: Any = True,
    residual_tol: Any = None,
    rule: Any = "fidelity",
    fidelity_tol: Any = DEFAULT_FIDELITY_TOL,
    growth: Any = DEFAULT_GROWTH,
    fidelity_power: Any = DEFAULT_FIDELITY_POWER,
) -> Hyperparameters:
    """Validate the rule's arguments; see :class:`~prdp_ops.PRDPController` for each.

    Raises
    ------
    TypeError, ValueError
        Naming the first bad argument, what was received and what is allowed.
    """
    k_min = _check_count("k_min", k_min)
    k_step = _check_count("k_step", k_step)
    k_max = _check_count("k_max", k_max, optional=True)
    _check_cap("k_max", k_max, "k_min", k_min)
    tau_step = _check_positive_float("tau_step", tau_step)
    tau_stop = _check_positive_float("tau_stop", tau_stop, at_most_one=True)
    ema_window = check_int("ema_window", ema_window, 1)
    lookback = check_int("lookback", lookback, 2)
    adjoint_min = _check_count("k_adjoint_min", k_adjoint_min, optional=True)
    adjoint_step = _check_count("k_adjoint_step", k_adjoint_step, optional=True)
    adjoint_max = _check_count("k_adjoint_max", k_adjoint_max, optional=True)
    adjoint_min = k_min if adjoint_min is None else adjoint_min
    adjoint_max = k_max if adjoint_max is None else adjoint_max
    _check_cap("k_adjoint_max", adjoint_max, "k_adjoint_min", adjoint_min)
    if not isinstance(rule, str) or rule not in RULES:
        raise (ValueError if isinstance(rule, str) else TypeError)(
            f"PRDPController: rule must be one of {list(RULES)}; received {rule!r}. "
            f"'plateau' is the paper's rule, 'fidelity' the gradient-fidelity rule."
        )
    fidelity_tol = _check_positive_float("fidelity_tol", fidelity_tol)
    growth = _check_positive_float("growth", growth)
    if growth < 1:
        raise ValueError(f"PRDPController: growth must be >= 1 (1 refines by k_step alone); "
                         f"received {growth!r}.")
    if isinstance(fidelity_power, bool) or not isinstance(fidelity_power, numbers.Real):
        raise TypeError(f"PRDPController: fidelity_power must be a real number >= 0; received "
                        f"{fidelity_power!r} of type {type(fidelity_power).__name__}.")
    fidelity_power = float(fidelity_power)
    if not (math.isfinite(fidelity_power) and fidelity_power >= 0):
        raise ValueError(f"PRDPController: fidelity_power must be finite and >= 0; received "
                         f"{fidelity_power!r}.")
    return Hyperparameters(
        k_min=k_min, k_step=k_step, k_max=k_max, tau_step=tau_step, tau_stop=tau_stop,
        ema_window=ema_window, lookback=lookback, k_adjoint_min=adjoint_min,
        k_adjoint_step=k_step if adjoint_step is None else adjoint_step,
        k_adjoint_max=adjoint_max, latch=check_bool("latch", latch),
        use_ema=check_bool("use_ema", use_ema), residual_tol=_check_residual_tol(residual_tol),
        rule=rule, fidelity_tol=fidelity_tol, growth=growth, fidelity_power=fidelity_power,
    )


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
    (rule ``"fidelity"`` only).
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


def init_state(hyperparameters: Hyperparameters) -> ControllerState:
    """The state before the first check."""
    return ControllerState(
        checks=0, recent_emas=(), k=hyperparameters.k_min,
        k_adjoint=hyperparameters.k_adjoint_min, checkpoint=math.inf, stopped=False,
        solver_converged=False,
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


def wants_fidelity(hp: Hyperparameters, state: ControllerState) -> bool:
    """Whether the next check should bring a new fidelity measurement (rule ``"fidelity"``).

    A measurement costs solver work (two gradients, at ``k`` and ``k'``), so the rule asks for
    one only where it can change a decision: at the first check at new counts (none is known),
    and when the extrapolated fidelity at the last check came within a factor 2 of the
    tolerance (the next check's decision could flip) -- then once the checks since the last
    measurement reach half the checks spent at these counts, so that a level held for ``N``
    checks costs ``O(log N)`` measurements and a change is seen within half the level's age --
    and once the metric fell by :data:`STALE_FALL` since the measurement (one per decade of
    progress). Never at both caps, and never under the paper's rule.
    """
    if hp.rule != "fidelity" or (
            state.k == next_count(hp, state.k, hp.k_step, hp.k_max)
            and state.k_adjoint == next_count(hp, state.k_adjoint, hp.k_adjoint_step,
                                              hp.k_adjoint_max)):
        return False
    if state.fidelity is None or not state.recent_emas:
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
     level_start, measured_check) = state
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
    return ControllerState(checks + 1, recent, k, k_adjoint, checkpoint, stopped,
                           converged, current, seen, first, measured, level_start,
                           measured_check), record


def _held(hp: Hyperparameters, state: ControllerState, converged: bool) -> str | None:
    """Why a refinement that is due is held instead, or ``None`` when it goes ahead."""
    if converged:
        return "solver converged"
    if state.k == next_count(hp, state.k, hp.k_step, hp.k_max) and (
            state.k_adjoint == next_count(hp, state.k_adjoint, hp.k_adjoint_step,
                                          hp.k_adjoint_max)):
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
