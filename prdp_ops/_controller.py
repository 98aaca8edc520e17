r"""The PRDP controller: when to raise a solver's iteration count during training.

Progressively Refined Differentiable Physics (PRDP, Bhatia, Koehler and Thuerey, ICLR 2025)
trains through an iterative solver that runs only ``k`` iterations, and raises ``k`` only when
training stops improving. :class:`PRDPController` makes the paper's rule an object with plain
Python state: it sees one non-negative scalar per *check* (normally a validation loss once per
epoch, one that does not depend on ``k``), and answers ``"refine"``, ``"hold"`` or ``"stop"``.

The rule
--------
Let :math:`\ell_n \ge 0` be the loss of check :math:`n = 0, 1, \dots`.

Smoothing. A recursive exponential moving average, seeded with the first value,

.. math::

    e_0 = \ell_0, \qquad e_n = e_{n-1} + \alpha\,(\ell_n - e_{n-1}),
    \qquad \alpha = \frac{2}{w + 1},

with ``w = ema_window`` (``use_ema=False`` sets :math:`e_n = \ell_n`). Each :math:`e_n` is a
convex combination of losses, so it stays finite for any number of checks; the closed form
:math:`e_n = (1-\alpha)^n \ell_0 + \alpha \sum_j (1-\alpha)^{n-j} \ell_j` evaluated with
:math:`(1-\alpha)^{-j}` weights (as in the paper's code) overflows after about 2,000 values.
Only the last ``lookback`` averages are kept: the state is O(1) in the number of checks.

Plateau. With :math:`L` = ``lookback``, no decision is taken while :math:`n < L` (that is,
until more than :math:`L` values have been seen). From then on check :math:`n` is a plateau
when

.. math::

    \frac{e_n}{e_{n-L+1}} > \tau_\text{step},

so a rise of the average counts as a plateau too (``0/0`` is read as 1).

Checkpoint. On a plateau the average is compared with the checkpoint :math:`c`, the average
stored at the last refinement (:math:`c = +\infty` before the first one):

- :math:`e_n < \tau_\text{stop}\,c` (the last refinement paid off) or :math:`e_n > c`
  (training got worse at this level: the physics is too coarse): **refine**,
  :math:`k \leftarrow \min(k + k_\text{step}, k_\text{max})`, the adjoint count likewise with
  its own step and cap, and :math:`c \leftarrow e_n`;
- otherwise refinement has stopped paying off: **stop**. With ``latch=True`` (default) the
  controller answers ``"hold"`` at every later check and never changes ``k`` again; with
  ``latch=False`` it keeps testing later plateaus against the same checkpoint, as the paper's
  reference code does, and may refine again.

Two cases turn a due refinement into ``"hold"`` without touching the checkpoint:

- the **cap**: ``k`` and ``k_adjoint`` are both at their maxima (``capped=True`` in history);
- the **residual signal**: ``update(loss, residual=r)`` with ``residual_tol`` set and
  :math:`r \le` ``residual_tol`` means the solve at the current ``k`` already meets the
  tolerance, so more iterations would not change the physics the network sees
  (``converged_at_k=True`` in history and :attr:`PRDPController.solver_converged`). This is
  not latched: if a later check reports a residual above the tolerance, a plateau refines
  again.

Every other check answers ``"hold"``.
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Literal

__all__ = ["PRDPController", "cumulative_iterations"]

logger = logging.getLogger("prdp_ops")

Decision = Literal["refine", "hold", "stop"]

_STATE_FORMAT = "prdp_ops.PRDPController"
_STATE_VERSION = 1
_STATE_KEYS = frozenset(
    {"format", "version", "hyperparameters", "checks", "recent_emas", "k", "k_adjoint",
     "checkpoint", "stopped", "solver_converged", "history"}
)
_HISTORY_KEYS = (
    "check", "loss", "ema", "k", "k_adjoint", "decision", "reason", "plateau", "checkpoint",
    "residual", "converged_at_k", "capped", "k_next", "k_adjoint_next",
)


# --------------------------------------------------------------------------- validation


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"PRDPController: {name} must be an integer >= {minimum}; received {value!r} "
            f"of type {type(value).__name__}."
        )
    if value < minimum:
        raise ValueError(f"PRDPController: {name} must be >= {minimum}; received {value}.")
    return int(value)


def _check_optional_int(name: str, value: Any, minimum: int) -> int | None:
    return None if value is None else _check_int(name, value, minimum)


def _check_positive_float(name: str, value: Any, *, at_most_one: bool = False) -> float:
    bound = "0 < {n} <= 1" if at_most_one else "0 < {n} (finite)"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"PRDPController: {name} must be a real number with {bound.format(n=name)}; "
            f"received {value!r} of type {type(value).__name__}."
        )
    value = float(value)
    if not (math.isfinite(value) and value > 0 and (value <= 1 or not at_most_one)):
        raise ValueError(
            f"PRDPController: {name} must satisfy {bound.format(n=name)}; received {value!r}."
        )
    return value


def _check_bool(name: str, value: Any) -> bool:
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


def _as_signal(name: str, value: Any) -> float:
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


def _encode_checkpoint(value: float) -> float | None:
    """JSON has no infinity: ``None`` stands for "no refinement yet" (+inf)."""
    return None if math.isinf(value) else value


def _decode_checkpoint(value: float | None) -> float:
    return math.inf if value is None else float(value)


def _ratio(now: float, past: float) -> float:
    """``now / past`` for non-negative averages, with ``0/0`` read as "unchanged" (1)."""
    if past == 0:
        return 1.0 if now == 0 else math.inf
    return now / past


# --------------------------------------------------------------------------- the controller


class PRDPController:
    r"""Progressive refinement of a solver's iteration count from a loss signal.

    See the module documentation (:mod:`prdp_ops._controller`) for the rule with its maths.
    Call :meth:`update` once per check (normally once per epoch, with a validation loss that
    does not depend on the iteration count) and run the solver with :attr:`k` forward and
    :attr:`k_adjoint` adjoint iterations until the next check.

    Parameters
    ----------
    k_min : int, default 1
        Initial forward iteration count (>= 1).
    k_step : int, default 1
        Increment of the forward count at each refinement (>= 1).
    k_max : int or None, default None
        Cap of the forward count (>= ``k_min``); ``None`` for no cap.
    tau_step : float, default 0.98
        Plateau threshold: check ``n`` is a plateau when ``ema[n] / ema[n - lookback + 1]``
        exceeds it (> 0; values >= 1 require a rise).
    tau_stop : float, default 0.9
        Payoff threshold (0 < tau_stop <= 1): on a plateau, refine again only when the average
        fell below ``tau_stop`` times the checkpoint (or rose above the checkpoint).
    ema_window : int, default 6
        Window ``w`` of the moving average, ``alpha = 2 / (w + 1)`` (>= 1; 1 means no
        smoothing).
    lookback : int, default 3
        The plateau test compares the average with the one ``lookback - 1`` checks earlier
        (>= 2). No decision is taken before more than ``lookback`` values were seen.
    k_adjoint_min, k_adjoint_step, k_adjoint_max : int or None, default None
        Schedule of the adjoint (backward) iteration count. Each defaults to its forward
        counterpart, so with none given ``k_adjoint == k`` at all times. Both counts advance at
        the same refinements, each by its own step up to its own cap.
    latch : bool, default True
        Whether a "stop" is final. ``False`` keeps testing later plateaus, as the paper's
        reference code does.
    use_ema : bool, default True
        ``False`` tests the raw loss instead of its average (the paper's Poisson setting).
    residual_tol : float or None, default None
        When set, a ``residual`` passed to :meth:`update` at or below it marks the solve as
        converged at the current count, and a refinement that would be due is answered with
        ``"hold"`` instead.

    Examples
    --------
    >>> import prdp_ops as po
    >>> controller = po.PRDPController(k_min=1, k_step=1, k_max=50)
    >>> for epoch in range(n_epochs):                                   # doctest: +SKIP
    ...     params = train_one_epoch(params, maxiter=controller.k)
    ...     decision = controller.update(validation_loss(params))
    """

    def __init__(
        self,
        k_min: int = 1,
        k_step: int = 1,
        k_max: int | None = None,
        tau_step: float = 0.98,
        tau_stop: float = 0.9,
        ema_window: int = 6,
        lookback: int = 3,
        *,
        k_adjoint_min: int | None = None,
        k_adjoint_step: int | None = None,
        k_adjoint_max: int | None = None,
        latch: bool = True,
        use_ema: bool = True,
        residual_tol: float | None = None,
    ) -> None:
        self._k_min = _check_int("k_min", k_min, 1)
        self._k_step = _check_int("k_step", k_step, 1)
        self._k_max = _check_optional_int("k_max", k_max, 1)
        _check_cap("k_max", self._k_max, "k_min", self._k_min)
        self._tau_step = _check_positive_float("tau_step", tau_step)
        self._tau_stop = _check_positive_float("tau_stop", tau_stop, at_most_one=True)
        self._ema_window = _check_int("ema_window", ema_window, 1)
        self._lookback = _check_int("lookback", lookback, 2)
        adjoint_min = _check_optional_int("k_adjoint_min", k_adjoint_min, 1)
        adjoint_step = _check_optional_int("k_adjoint_step", k_adjoint_step, 1)
        adjoint_max = _check_optional_int("k_adjoint_max", k_adjoint_max, 1)
        self._k_adjoint_min = self._k_min if adjoint_min is None else adjoint_min
        self._k_adjoint_step = self._k_step if adjoint_step is None else adjoint_step
        self._k_adjoint_max = self._k_max if adjoint_max is None else adjoint_max
        _check_cap("k_adjoint_max", self._k_adjoint_max, "k_adjoint_min", self._k_adjoint_min)
        self._latch = _check_bool("latch", latch)
        self._use_ema = _check_bool("use_ema", use_ema)
        self._residual_tol = (
            None if residual_tol is None else _as_residual_tol(residual_tol)
        )
        # alpha = 1 means no smoothing: the rule then tests the raw loss.
        self._alpha = 2.0 / (self._ema_window + 1) if self._use_ema else 1.0
        self._reset_state()

    # ------------------------------------------------------------------ state

    def _reset_state(self) -> None:
        self._checks = 0
        self._recent_emas: list[float] = []  # the last `lookback` averages, oldest first
        self._k = self._k_min
        self._k_adjoint = self._k_adjoint_min
        self._checkpoint = math.inf
        self._stopped = False
        self._solver_converged = False
        self._history: list[dict[str, Any]] = []

    @property
    def k(self) -> int:
        """Forward iteration count to use until the next check."""
        return self._k

    @property
    def k_adjoint(self) -> int:
        """Adjoint (backward) iteration count to use until the next check."""
        return self._k_adjoint

    @property
    def stopped(self) -> bool:
        """Whether the last plateau decision was "stop" (final when ``latch=True``)."""
        return self._stopped

    @property
    def solver_converged(self) -> bool:
        """Whether the last check's residual was at or below ``residual_tol``."""
        return self._solver_converged

    @property
    def ema(self) -> float | None:
        """Moving average after the last check (``None`` before the first)."""
        return self._recent_emas[-1] if self._recent_emas else None

    @property
    def checkpoint(self) -> float | None:
        """Average stored at the last refinement (``None`` before the first)."""
        return _encode_checkpoint(self._checkpoint)

    @property
    def num_checks(self) -> int:
        """Number of :meth:`update` calls so far."""
        return self._checks

    @property
    def history(self) -> list[dict[str, Any]]:
        """One dict per check (a copy), oldest first, with the keys

        ``check`` (index from 0), ``loss``, ``ema``, ``k`` and ``k_adjoint`` (the counts in
        effect while this loss was produced, i.e. before the decision), ``decision``,
        ``reason`` (``"warm-up"``, ``"no plateau"``, ``"improved"``, ``"worsened"``,
        ``"no gain"``, ``"at k_max"``, ``"solver converged"`` or ``"stopped"``), ``plateau``,
        ``checkpoint`` (the one the average was compared with; ``None`` = none yet),
        ``residual``, ``converged_at_k``, ``capped``, and ``k_next`` / ``k_adjoint_next``
        (the counts after the decision).
        """
        return [dict(entry) for entry in self._history]

    def hyperparameters(self) -> dict[str, Any]:
        """The constructor arguments, resolved (adjoint defaults filled in)."""
        return {
            "k_min": self._k_min,
            "k_step": self._k_step,
            "k_max": self._k_max,
            "tau_step": self._tau_step,
            "tau_stop": self._tau_stop,
            "ema_window": self._ema_window,
            "lookback": self._lookback,
            "k_adjoint_min": self._k_adjoint_min,
            "k_adjoint_step": self._k_adjoint_step,
            "k_adjoint_max": self._k_adjoint_max,
            "latch": self._latch,
            "use_ema": self._use_ema,
            "residual_tol": self._residual_tol,
        }

    def __repr__(self) -> str:
        arguments = ", ".join(f"{name}={value!r}" for name, value in self.hyperparameters().items())
        return f"PRDPController({arguments})"

    # ------------------------------------------------------------------ the rule

    def update(self, loss: Any, residual: Any = None) -> Decision:
        """Record one check and decide the iteration counts until the next one.

        Parameters
        ----------
        loss : float or 0-d array
            The monitored metric, finite and non-negative (Python, NumPy or JAX scalar).
        residual : float or 0-d array, optional
            Relative residual (or residual norm) of the solve at the current ``k``; used only
            when the controller has a ``residual_tol``.

        Returns
        -------
        {"refine", "hold", "stop"}
            ``"refine"``: :attr:`k` (and :attr:`k_adjoint`) were raised. ``"stop"``: a
            plateau where the last refinement no longer paid off. ``"hold"``: anything else.

        Raises
        ------
        ValueError, TypeError
            For a loss or residual that is not a finite, non-negative real scalar. The state
            is left exactly as it was.
        """
        loss = _as_signal("loss", loss)
        residual = None if residual is None else _as_signal("residual", residual)

        ema = self._smooth(loss)
        recent = [*self._recent_emas, ema][-self._lookback:]
        converged = self._residual_tol is not None and residual is not None and (
            residual <= self._residual_tol
        )
        plateau = self._checks >= self._lookback and (
            _ratio(ema, recent[0]) > self._tau_step
        )
        decision, reason = self._decide(ema, plateau, converged)

        entry = {
            "check": self._checks,
            "loss": loss,
            "ema": ema,
            "k": self._k,
            "k_adjoint": self._k_adjoint,
            "decision": decision,
            "reason": reason,
            "plateau": plateau,
            "checkpoint": _encode_checkpoint(self._checkpoint),
            "residual": residual,
            "converged_at_k": converged,
            "capped": reason == "at k_max",
        }
        # Commit: nothing above touched the state, so a bad value never leaves it half-updated.
        if decision == "refine":
            self._k = _advance(self._k, self._k_step, self._k_max)
            self._k_adjoint = _advance(self._k_adjoint, self._k_adjoint_step, self._k_adjoint_max)
            self._checkpoint = ema
            self._stopped = False
        elif decision == "stop":
            self._stopped = True
        entry["k_next"] = self._k
        entry["k_adjoint_next"] = self._k_adjoint
        self._recent_emas = recent
        self._solver_converged = converged
        self._checks += 1
        self._history.append(entry)
        self._log(entry)
        return decision

    def _smooth(self, loss: float) -> float:
        """The next moving average (the loss itself for the seed and without smoothing)."""
        if not self._recent_emas or self._alpha == 1.0:
            return loss
        previous = self._recent_emas[-1]
        # e_n = e_{n-1} + alpha (l_n - e_{n-1}): a convex combination, so never above
        # max(l_n, e_{n-1}); O(1) work and memory per check.
        return previous + self._alpha * (loss - previous)

    def _decide(self, ema: float, plateau: bool, converged: bool) -> tuple[Decision, str]:
        """The decision and its reason, from the state before this check (pure)."""
        if self._checks < self._lookback:
            return "hold", "warm-up"
        if self._stopped and self._latch:
            return "hold", "stopped"
        if not plateau:
            return "hold", "no plateau"
        if ema < self._tau_stop * self._checkpoint:
            reason = "improved"
        elif ema > self._checkpoint:
            reason = "worsened"
        else:
            return "stop", "no gain"
        if converged:
            return "hold", "solver converged"
        if self._k == _advance(self._k, self._k_step, self._k_max) and (
            self._k_adjoint == _advance(self._k_adjoint, self._k_adjoint_step, self._k_adjoint_max)
        ):
            return "hold", "at k_max"
        return "refine", reason

    @staticmethod
    def _log(entry: Mapping[str, Any]) -> None:
        if entry["decision"] == "refine":
            logger.info(
                "PRDP check %d: plateau (%s, ema %.6g) -> refine k %d -> %d, k_adjoint %d -> %d",
                entry["check"], entry["reason"], entry["ema"], entry["k"], entry["k_next"],
                entry["k_adjoint"], entry["k_adjoint_next"],
            )
        elif entry["decision"] == "stop":
            logger.info(
                "PRDP check %d: plateau without gain (ema %.6g, checkpoint %.6g) -> stop at k %d",
                entry["check"], entry["ema"], entry["checkpoint"], entry["k"],
            )
        elif entry["reason"] in ("at k_max", "solver converged"):
            logger.debug(
                "PRDP check %d: refinement due but held (%s) at k %d",
                entry["check"], entry["reason"], entry["k"],
            )

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly, as JSON-serialisable plain Python values.

        ``+inf`` (no checkpoint yet) is stored as ``None``. The hyperparameters are included
        so that :meth:`load_state_dict` can refuse a state from a differently configured
        controller.
        """
        return {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "hyperparameters": self.hyperparameters(),
            "checks": self._checks,
            "recent_emas": list(self._recent_emas),
            "k": self._k,
            "k_adjoint": self._k_adjoint,
            "checkpoint": _encode_checkpoint(self._checkpoint),
            "stopped": self._stopped,
            "solver_converged": self._solver_converged,
            "history": copy.deepcopy(self._history),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (possibly through ``json.dumps``/``loads``).

        The controller must have the same hyperparameters as the one that saved it. The dict
        is validated in full before anything is changed, and it is not modified.

        Raises
        ------
        ValueError, TypeError
            When ``state`` is not a state of this controller, with what is wrong.
        """
        restored = _parse_state(state, self.hyperparameters())
        self._checks = restored["checks"]
        self._recent_emas = restored["recent_emas"]
        self._k = restored["k"]
        self._k_adjoint = restored["k_adjoint"]
        self._checkpoint = restored["checkpoint"]
        self._stopped = restored["stopped"]
        self._solver_converged = restored["solver_converged"]
        self._history = restored["history"]


def _as_residual_tol(value: Any) -> float:
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


def _advance(count: int, step: int, cap: int | None) -> int:
    return count + step if cap is None else min(count + step, cap)


def _state_error(message: str) -> ValueError:
    return ValueError(f"PRDPController.load_state_dict: {message}")


def _parse_state(state: Any, hyperparameters: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a saved state against this controller's configuration; return plain values."""
    if not isinstance(state, Mapping):
        raise TypeError(
            "PRDPController.load_state_dict: state must be a dict from state_dict(); received "
            f"{type(state).__name__}."
        )
    keys = set(state)
    if keys != _STATE_KEYS:
        missing, unknown = sorted(_STATE_KEYS - keys), sorted(keys - _STATE_KEYS)
        raise _state_error(
            f"not a PRDPController state (missing keys {missing}, unknown keys {unknown})."
        )
    if state["format"] != _STATE_FORMAT or state["version"] != _STATE_VERSION:
        raise _state_error(
            f"unsupported format {state['format']!r} version {state['version']!r}; expected "
            f"{_STATE_FORMAT!r} version {_STATE_VERSION}."
        )
    saved = state["hyperparameters"]
    if not isinstance(saved, Mapping) or dict(saved) != dict(hyperparameters):
        saved = saved if isinstance(saved, Mapping) else {}
        differing = sorted(
            name for name in set(saved) | set(hyperparameters)
            if saved.get(name, "<missing>") != hyperparameters.get(name, "<missing>")
        )
        raise _state_error(
            f"the state was saved by a controller with different hyperparameters {differing} "
            f"(saved {[saved.get(n) for n in differing]}, this controller "
            f"{[hyperparameters.get(n) for n in differing]}). Construct the controller with the "
            "saved hyperparameters: PRDPController(**state['hyperparameters'])."
        )
    checks = _saved_int(state, "checks", 0)
    k = _saved_int(state, "k", hyperparameters["k_min"])
    k_adjoint = _saved_int(state, "k_adjoint", hyperparameters["k_adjoint_min"])
    for name, value, cap in (("k", k, hyperparameters["k_max"]),
                             ("k_adjoint", k_adjoint, hyperparameters["k_adjoint_max"])):
        if cap is not None and value > cap:
            raise _state_error(f"{name} = {value} exceeds its cap {cap}.")
    recent = state["recent_emas"]
    if not isinstance(recent, Sequence) or len(recent) != min(checks, hyperparameters["lookback"]):
        raise _state_error(
            f"recent_emas must be a list of min(checks, lookback) = "
            f"{min(checks, hyperparameters['lookback'])} averages; received {recent!r}."
        )
    recent_emas = [_saved_float("recent_emas", value) for value in recent]
    checkpoint = state["checkpoint"]
    if checkpoint is not None:
        checkpoint = _saved_float("checkpoint", checkpoint)
    history = state["history"]
    if not isinstance(history, Sequence) or len(history) != checks:
        raise _state_error(f"history must be a list of `checks` = {checks} entries.")
    for entry in history:
        if not isinstance(entry, Mapping) or set(entry) != set(_HISTORY_KEYS):
            raise _state_error(f"a history entry must have the keys {list(_HISTORY_KEYS)}.")
    flags = {}
    for name in ("stopped", "solver_converged"):
        if not isinstance(state[name], bool):
            raise _state_error(f"{name} must be a bool; received {state[name]!r}.")
        flags[name] = state[name]
    return {
        "checks": checks,
        "recent_emas": recent_emas,
        "k": k,
        "k_adjoint": k_adjoint,
        "checkpoint": _decode_checkpoint(checkpoint),
        "history": [dict(entry) for entry in copy.deepcopy(list(history))],
        **flags,
    }


def _saved_int(state: Mapping[str, Any], name: str, minimum: int) -> int:
    value = state[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _state_error(f"{name} must be an integer >= {minimum}; received {value!r}.")
    return value


def _saved_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _state_error(f"{name} must hold numbers; received {value!r}.")
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise _state_error(f"{name} must hold finite non-negative numbers; received {value!r}.")
    return value


# --------------------------------------------------------------------------- accounting


def cumulative_iterations(
    history: Sequence[Mapping[str, Any]],
    *,
    solves_per_check: int = 1,
    include_adjoint: bool = False,
) -> list[int]:
    """Solver iterations spent up to and including each check of a controller history.

    Between two checks the solver ran ``solves_per_check`` times at the count of the entry's
    ``k`` (the count in effect while that check's loss was produced), so the total after check
    ``n`` is ``solves_per_check * sum_{i <= n} (k_i + [k_adjoint_i])``. A fixed-count baseline
    with count ``K`` spends ``solves_per_check * K * (n + 1)`` (times 2 with adjoints).

    Parameters
    ----------
    history : sequence of dict
        :attr:`PRDPController.history`.
    solves_per_check : int, default 1
        Forward solves per check interval (e.g. batches per epoch times solves per batch).
    include_adjoint : bool, default False
        Also count the adjoint solves' ``k_adjoint`` iterations (one per forward solve).

    Returns
    -------
    list of int
        One running total per check.
    """
    solves_per_check = _check_int("solves_per_check", solves_per_check, 1)
    include_adjoint = _check_bool("include_adjoint", include_adjoint)
    totals, total = [], 0
    for entry in history:
        per_solve = entry["k"] + (entry["k_adjoint"] if include_adjoint else 0)
        total += solves_per_check * per_solve
        totals.append(total)
    return totals
