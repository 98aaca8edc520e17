"""The controller's history: one compact, columnar, optionally bounded record per check.

In memory a check costs 50 bytes: four float64 columns (``loss``, ``ema``, ``checkpoint`` with
``+inf`` for "none yet", ``residual`` with NaN for "none"), two int64 columns (``k``,
``k_adjoint``) and two uint8 columns (``reason`` as an index into
:data:`~prdp_ops._controller_rule.REASONS`, ``plateau``). Everything else a history entry shows
(``check``, ``decision``, ``capped``, ``converged_at_k``, ``k_next``, ``k_adjoint_next``) is
derived from these and the hyperparameters, so it cannot disagree with them.

Saved (``PRDPController.state_dict()["history"]``) it is a dict of JSON lists, see
:meth:`History.to_json`; :mod:`prdp_ops._controller_columns` decodes it and
:mod:`prdp_ops._controller_state` checks it against the resume state before a load.
"""

from __future__ import annotations

import itertools
import math
from array import array
from collections.abc import Mapping, Sequence
from typing import Any

from prdp_ops._controller_columns import ColumnError, plot_columns
from prdp_ops._controller_rule import (
    DECISION_OF,
    REASON_CODE,
    REASONS,
    REFINE_REASONS,
    CheckRecord,
    Hyperparameters,
    check_bool,
    check_int,
    next_count,
)

__all__ = ["ROW_KEYS", "History", "converged", "cumulative_iterations", "run_lengths"]

ROW_KEYS = (
    "check", "loss", "ema", "k", "k_adjoint", "decision", "reason", "plateau", "checkpoint",
    "residual", "converged_at_k", "capped", "k_next", "k_adjoint_next",
)


# --------------------------------------------------------------------------- the store


class History:
    """Columnar record of a controller's checks, keeping the last ``limit`` (all if ``None``).

    Parameters
    ----------
    hp : Hyperparameters
        The controller's rule settings (to derive ``k_next``, ``capped``, ...).
    limit : int or None
        How many of the most recent checks to keep; ``0`` keeps none.
    next_check : int, default 0
        Index of the next check to be appended.
    """

    def __init__(self, hp: Hyperparameters, limit: int | None, next_check: int = 0) -> None:
        self._hp = hp
        self._limit = limit
        self._next_check = next_check
        self._columns: dict[str, array] = {
            "loss": array("d"), "ema": array("d"), "checkpoint": array("d"),
            "residual": array("d"), "k": array("q"), "k_adjoint": array("q"),
            "reason": array("B"), "plateau": array("B"),
        }

    def append(self, record: CheckRecord) -> None:
        """Record one check (the one with index :attr:`next_check`)."""
        self._next_check += 1
        if self._limit == 0:
            return
        loss, ema, k, k_adjoint, reason, plateau, checkpoint, residual, _ = record
        columns = self._columns
        columns["loss"].append(loss)
        columns["ema"].append(ema)
        columns["checkpoint"].append(checkpoint)
        columns["residual"].append(math.nan if residual is None else residual)
        columns["k"].append(k)
        columns["k_adjoint"].append(k_adjoint)
        columns["reason"].append(REASON_CODE[reason])
        columns["plateau"].append(plateau)
        # Drop the oldest entries in blocks (O(1) amortised per check) rather than one per
        # check (O(limit) each); the views show only the last `limit`.
        if self._limit is not None and len(columns["loss"]) >= 2 * self._limit + 1024:
            self._trim()

    def _trim(self) -> None:
        excess = len(self._columns["loss"]) - len(self)
        if excess > 0:
            for column in self._columns.values():
                del column[:excess]

    def set_limit(self, limit: int | None) -> None:
        """Keep the last ``limit`` entries from now on (all if ``None``)."""
        self._limit = limit
        self._trim()

    def __len__(self) -> int:
        stored = len(self._columns["loss"])
        return stored if self._limit is None else min(stored, self._limit)

    @property
    def next_check(self) -> int:
        """Index of the next check to be recorded (the controller's number of checks)."""
        return self._next_check

    @property
    def first_check(self) -> int:
        """Index of the oldest check kept."""
        return self._next_check - len(self)

    def _view(self, name: str) -> list[Any]:
        column = self._columns[name]
        return column[len(column) - len(self):].tolist()

    def rows(self) -> list[dict[str, Any]]:
        """The entries as new dicts with the keys :data:`ROW_KEYS`, oldest first."""
        hp = self._hp
        columns = {name: self._view(name) for name in self._columns}
        rows = []
        for index, (loss, ema, checkpoint, residual, k, k_adjoint, code, plateau) in enumerate(
            zip(*columns.values(), strict=True)
        ):
            reason = REASONS[code]
            refine = reason in REFINE_REASONS
            residual = None if math.isnan(residual) else residual
            rows.append({
                "check": self.first_check + index, "loss": loss, "ema": ema, "k": k,
                "k_adjoint": k_adjoint, "decision": DECISION_OF[reason], "reason": reason,
                "plateau": bool(plateau),
                "checkpoint": None if math.isinf(checkpoint) else checkpoint,
                "residual": residual,
                "converged_at_k": converged(hp, residual),
                "capped": reason == "at k_max",
                "k_next": next_count(hp, k, hp.k_step, hp.k_max) if refine else k,
                "k_adjoint_next": (
                    next_count(hp, k_adjoint, hp.k_adjoint_step, hp.k_adjoint_max) if refine
                    else k_adjoint),
            })
        return rows

    def to_json(self) -> dict[str, Any]:
        """The kept entries as JSON lists (no infinities or NaN), column by column.

        ``first_check`` is the index of the first entry; ``reasons`` the legend of the
        ``reason`` codes; ``loss``, ``ema``, ``residual`` (``None`` = not given) one number per
        check; ``plateau`` 0 or 1 per check; ``k``, ``k_adjoint`` and ``checkpoint`` (``None`` =
        no refinement yet), which change only at refinements, as ``[value, run length]`` pairs.
        """
        checkpoint = [None if math.isinf(value) else value for value in self._view("checkpoint")]
        return {
            "first_check": self.first_check,
            "reasons": list(REASONS),
            "loss": self._view("loss"),
            "ema": self._view("ema"),
            "residual": [None if math.isnan(value) else value for value in self._view("residual")],
            "reason": self._view("reason"),
            "plateau": self._view("plateau"),
            "k": run_lengths(self._view("k")),
            "k_adjoint": run_lengths(self._view("k_adjoint")),
            "checkpoint": run_lengths(checkpoint),
        }

    @classmethod
    def from_columns(
        cls, columns: Mapping[str, array], hp: Hyperparameters, limit: int | None,
        next_check: int,
    ) -> History:
        """A history holding already validated columns (as :func:`decode_json` returns them,
        checked against the resume state), of which the last ``limit`` are kept."""
        history = cls(hp, limit, next_check=next_check)
        history._columns = {name: columns[name] for name in history._columns}
        history._trim()
        return history


def run_lengths(values: Sequence[Any]) -> list[list[Any]]:
    """``[value, run length]`` pairs of consecutive equal values."""
    return [[value, sum(1 for _ in group)] for value, group in itertools.groupby(values)]


def converged(hp: Hyperparameters, residual: float | None) -> bool:
    """Whether ``residual`` marks the solve as converged at the current count."""
    return hp.residual_tol is not None and residual is not None and residual <= hp.residual_tol


# --------------------------------------------------------------------------- accounting


def cumulative_iterations(
    history: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    *,
    solves_per_check: int = 1,
    include_adjoint: bool = False,
) -> list[int]:
    """Solver iterations spent up to and including each check of a controller history.

    Between two checks the solver ran ``solves_per_check`` times at the count of the entry's
    ``k`` (the count in effect while that check's loss was produced), so the total after check
    ``n`` is ``solves_per_check * sum_{i <= n} (k_i + [k_adjoint_i])``. A fixed-count baseline
    with count ``K`` spends ``solves_per_check * K * (n + 1)`` (times 2 with adjoints). For a
    history that does not start at check 0 (a ``history_limit``, or a resume without the
    saved history) the totals count from its first entry.

    Parameters
    ----------
    history : sequence of dict, or dict
        :attr:`PRDPController.history`, or ``PRDPController.state_dict()["history"]``.
    solves_per_check : int, default 1
        Forward solves per check interval (e.g. batches per epoch times solves per batch).
    include_adjoint : bool, default False
        Also count the adjoint solves' ``k_adjoint`` iterations (one per forward solve).

    Returns
    -------
    list of int
        One running total per check.

    Raises
    ------
    ValueError
        For a bad argument, or a history with a malformed entry (named in the message).
    """
    solves_per_check = check_int("solves_per_check", solves_per_check, 1)
    include_adjoint = check_bool("include_adjoint", include_adjoint)
    try:
        columns = plot_columns(history)
    except ColumnError as error:
        raise ValueError(f"cumulative_iterations: {error.render('history', error.path)} "
                         f"{error.detail} Pass PRDPController.history or "
                         f"state_dict()['history'] unmodified.") from None
    per_solve = columns["k"]
    if include_adjoint:
        per_solve = [k + k_adjoint for k, k_adjoint in zip(per_solve, columns["k_adjoint"],
                                                           strict=True)]
    return [solves_per_check * total for total in itertools.accumulate(per_solve)]
