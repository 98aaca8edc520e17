"""The PRDP controller's settings: validated once, frozen, plain.

:func:`make_hyperparameters` checks every argument of :class:`~prdp_ops.PRDPController` that
shapes a decision and returns a frozen :class:`Hyperparameters` (after optax's
``reduce_on_plateau``, whose settings are validated up front too); the checks of single values
(:func:`check_int`, :func:`check_bool`, :func:`as_signal`) are shared with the controller's
methods and the state parser. The rule that reads these settings is in
:mod:`prdp_ops._controller_rule`, its maths in :mod:`prdp_ops._controller`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any

__all__ = [
    "DEFAULT_FIDELITY_POWER",
    "DEFAULT_FIDELITY_TOL",
    "DEFAULT_GROWTH",
    "MAX_COUNT",
    "RULES",
    "Hyperparameters",
    "as_signal",
    "check_bool",
    "check_int",
    "make_hyperparameters",
]

#: The refinement rules by name: the paper's, and the gradient-fidelity rule (the default).
RULES: tuple[str, ...] = ("fidelity", "plateau")
#: Defaults of the fidelity rule's own settings (also what a state saved before they existed
#: is read with; they do not affect rule="plateau").
DEFAULT_FIDELITY_TOL = 0.1
DEFAULT_GROWTH = 2.0
DEFAULT_FIDELITY_POWER = 0.5
# Iteration counts are kept in int64 columns of the history; with counts and steps below
# 2**31, k stays below 2**63 for more than 4 billion refinements.
MAX_COUNT = 2**31 - 1


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
    return check_int(name, value, 1, MAX_COUNT)


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


def as_signal(name: str, value: Any, method: str = "update") -> float:
    """A finite, non-negative Python float from a Python/NumPy/JAX real scalar.

    The rule compares ratios of the signal, which only make sense for a non-negative metric
    (an MSE, a relative error, a residual norm). ``method`` names the controller method
    that received it, in the error message.
    """
    where = f"PRDPController.{method}"
    if isinstance(value, bool) or isinstance(value, (str, bytes)) or value is None:
        raise TypeError(
            f"{where}: {name} must be a real scalar; received {value!r} of type "
            f"{type(value).__name__}."
        )
    dtype_kind = getattr(getattr(value, "dtype", None), "kind", "")
    if isinstance(value, complex) or dtype_kind == "c":
        raise ValueError(
            f"{where}: {name} must be real; received the complex value "
            f"{value!r}. Pass its absolute value or real part."
        )
    if getattr(value, "ndim", 0) != 0:
        raise ValueError(
            f"{where}: {name} must be a scalar (0-d); received an array of shape "
            f"{getattr(value, 'shape', '?')}. Reduce it (e.g. take the mean) first."
        )
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"{where}: {name} must be a real scalar; received {value!r} of type "
            f"{type(value).__name__}."
        ) from error
    if not math.isfinite(number) or number < 0:
        raise ValueError(
            f"{where}: {name} must be finite and non-negative; received "
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
