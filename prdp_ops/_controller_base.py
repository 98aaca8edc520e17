"""Read-only views of a :class:`~prdp_ops.PRDPController`: its counts, signals and history.

The base class below holds what the controller reports -- properties of its plain state
(:class:`prdp_ops._controller_rule.ControllerState`), its history and its settings -- and the
logging of decisions; :class:`prdp_ops._controller.PRDPController` adds the methods that
change the state (``start``, ``update``, ``load_state_dict``). The split keeps each module
short; the public class and its attributes are the same.
"""

from __future__ import annotations

import logging
from typing import Any

from prdp_ops._controller_history import History
from prdp_ops._controller_params import Hyperparameters
from prdp_ops._controller_rule import CheckRecord, ControllerState, wants_fidelity

__all__ = ["ControllerReadout"]

logger = logging.getLogger("prdp_ops")


class ControllerReadout:
    """What :class:`~prdp_ops.PRDPController` reports; the attributes are set by its
    constructor (``_hp``, ``_history_limit``, ``_state``, ``_history``)."""

    _hp: Hyperparameters
    _history_limit: int | None
    _state: ControllerState
    _history: History

    # ------------------------------------------------------------------ state

    @property
    def k(self) -> int:
        """Forward iteration count to use until the next check."""
        return self._state.k

    @property
    def k_adjoint(self) -> int:
        """Adjoint (backward) iteration count to use until the next check."""
        return self._state.k_adjoint

    @property
    def stopped(self) -> bool:
        """Whether the last plateau decision was "stop" (final when ``latch=True``)."""
        return self._state.stopped

    @property
    def solver_converged(self) -> bool:
        """Whether the last check's residual was at or below ``residual_tol``."""
        return self._state.solver_converged

    @property
    def ema(self) -> float | None:
        """Moving average after the last check (``None`` before the first)."""
        return self._state.recent_emas[-1] if self._state.recent_emas else None

    @property
    def checkpoint(self) -> float | None:
        """Average stored at the last refinement (``None`` before the first)."""
        checkpoint = self._state.checkpoint
        return None if checkpoint == float("inf") else checkpoint

    @property
    def num_checks(self) -> int:
        """Number of :meth:`update` calls so far."""
        return self._state.checks

    @property
    def history(self) -> list[dict[str, Any]]:
        """One new dict per kept check, oldest first, with the keys

        ``check`` (index from 0), ``loss``, ``ema``, ``k`` and ``k_adjoint`` (the counts in
        effect while this loss was produced, i.e. before the decision), ``decision``,
        ``reason`` (``"warm-up"``, ``"no plateau"``, ``"improved"``, ``"worsened"``,
        ``"no gain"``, ``"at k_max"``, ``"solver converged"`` or ``"stopped"``), ``plateau``,
        ``checkpoint`` (the one the average was compared with; ``None`` = none yet),
        ``residual``, ``converged_at_k``, ``capped``, and ``k_next`` / ``k_adjoint_next``
        (the counts after the decision).

        All checks, or the last ``history_limit``; after :meth:`load_state_dict` of a state
        saved without its history, the checks since the load. Building the dicts costs about
        a microsecond per check: in a loop, read it once.
        """
        return self._history.rows()

    def hyperparameters(self) -> dict[str, Any]:
        """The constructor arguments, resolved (adjoint defaults filled in)."""
        return {**self._hp.as_dict(), "history_limit": self._history_limit}

    def __repr__(self) -> str:
        arguments = ", ".join(f"{name}={value!r}" for name, value in self.hyperparameters().items())
        return f"PRDPController({arguments})"

    # ------------------------------------------------------------------ the rule

    @property
    def rule(self) -> str:
        """The refinement rule: ``"fidelity"`` or ``"plateau"``."""
        return self._hp.rule

    @property
    def fidelity(self) -> float | None:
        """The gradient fidelity last given at the current counts (``None`` since a
        refinement or before any)."""
        return self._state.fidelity

    @property
    def wants_fidelity(self) -> bool:
        """Whether the rule asks for a fidelity measurement (at the next check, or for
        :meth:`start` while :attr:`starting`).

        ``True`` during the start search, at the first check at new counts and while the
        extrapolated fidelity is within a factor 2 of the tolerance (where a measurement can
        change the decision); ``False`` otherwise, at both caps and under
        ``rule="plateau"``. A measurement costs solver work (two gradients), so a training
        loop measures only when asked; giving one when not asked is allowed and used.
        """
        return wants_fidelity(self._hp, self._state)

    @property
    def starting(self) -> bool:
        """Whether the start search is open: ``True`` from construction under rule
        ``"fidelity"`` (unless ``k_min`` is at the cap) until :meth:`start` ends it or the
        first :meth:`update` closes it. While it is, a fidelity measured at the initial
        parameters goes to :meth:`start`."""
        return self._state.searching

    @property
    def start_fidelity(self) -> float | None:
        """The last fidelity given to :meth:`start` (``None`` when the search got none)."""
        return self._state.start_fidelity

    @property
    def k_start(self) -> int:
        """The forward count of the first check: ``k_min``, or where the start search ended."""
        return self._state.start_k


    def _log(self, check: int, record: CheckRecord) -> None:
        if record.decision == "refine":
            logger.info(
                "PRDP check %d: %s (ema %.6g) -> refine k %d -> %d, k_adjoint %d -> %d",
                check, "fidelity above fidelity_tol" if record.reason == "fidelity"
                else f"plateau ({record.reason})",
                record.ema, record.k, self.k, record.k_adjoint,
                self.k_adjoint,
            )
        elif record.decision == "stop":
            logger.info(
                "PRDP check %d: plateau without gain (ema %.6g, checkpoint %.6g) -> stop at k %d",
                check, record.ema, record.checkpoint, record.k,
            )
        elif record.reason in ("at k_max", "solver converged"):
            logger.debug(
                "PRDP check %d: refinement due but held (%s) at k %d",
                check, record.reason, record.k,
            )

