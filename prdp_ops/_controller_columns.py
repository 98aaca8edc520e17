"""Decoding a saved controller history, field by field (JSON lists to typed columns).

:func:`decode_json` turns the columnar dict of ``PRDPController.state_dict()["history"]``
into ``array`` columns, checking every field on its own: types (no bools or strings for
numbers), finiteness and sign, lengths, run-length pairs, reason codes in the allowed set.
Checks that relate the fields to each other and to the resume state live in
:mod:`prdp_ops._controller_state`. :func:`plot_columns` does the same for the two forms a
plot may receive. Values are checked in bulk (per distinct type, then vectorised), so a
million-check history decodes in well under a second; only on an error is the first bad
entry searched for, to name it.
"""

from __future__ import annotations

import math
import numbers
from array import array
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from prdp_ops._controller_rule import DECISION_OF, REASONS

__all__ = ["JSON_KEYS", "ColumnError", "as_list", "decode_json", "describe", "is_number",
           "plot_columns"]

JSON_KEYS = ("first_check", "reasons", "loss", "ema", "residual", "reason", "plateau", "k",
             "k_adjoint", "checkpoint")
_INT64_MAX = 2**63 - 1


class ColumnError(ValueError):
    """A bad history field: ``path`` leads to it from the history (e.g. ``("loss", 3)``)."""

    def __init__(self, path: tuple[Any, ...], message: str) -> None:
        super().__init__(f"{self.render('history', path)} {message}")
        self.path = path
        self.detail = message

    @staticmethod
    def render(root: str, path: tuple[Any, ...]) -> str:
        """``root['loss'][3]`` for the path ``("loss", 3)``."""
        return root + "".join(f"[{step!r}]" for step in path)


def describe(value: Any) -> str:
    """A short ``repr (type)`` of a received value for an error message."""
    text = repr(value)
    return f"{text[:60]}... ({type(value).__name__})" if len(text) > 60 else (
        f"{text} ({type(value).__name__})")


def as_list(
    path: tuple[Any, ...], values: Any, length: int | None
) -> list[Any] | tuple[Any, ...]:
    """``values`` if it is a list (or tuple) of ``length`` entries (any when ``None``)."""
    if not isinstance(values, (list, tuple)):
        raise ColumnError(path, f"must be a list; received {describe(values)}.")
    if length is not None and len(values) != length:
        raise ColumnError(path, f"must have {length} entries (one per check, like `loss`); "
                                f"received {len(values)}.")
    return values


def is_number(value: Any, optional: bool) -> bool:
    """Whether ``value`` is a finite real >= 0 (not a bool), or ``None`` when ``optional``."""
    if value is None:
        return optional
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(value) and value >= 0
    except OverflowError:  # an int beyond the float range
        return False


def _float_column(
    path: tuple[Any, ...], values: Any, length: int | None, *, optional: bool = False
) -> array:
    """A float64 column (NaN for ``None``) of finite numbers >= 0, checked in bulk."""
    values = as_list(path, values, length)
    # Type checks per distinct type, value checks vectorised: O(n) in C, not per element in
    # Python, so a million-check history loads in well under a second.
    types = set(map(type, values))
    column = None
    if all((kind is type(None) and optional)
           or (kind is not bool and issubclass(kind, numbers.Real)) for kind in types):
        filled = [math.nan if v is None else v for v in values] if type(None) in types else values
        try:
            column = array("d", filled)
        except (TypeError, OverflowError):
            column = None
    if column is not None:
        numbers_ = np.frombuffer(column, dtype=np.float64)
        good = np.isfinite(numbers_) & (numbers_ >= 0)
        if type(None) in types:
            good |= np.fromiter((v is None for v in values), dtype=bool, count=len(values))
        if good.all():
            return column
    index = next(i for i, value in enumerate(values) if not is_number(value, optional))
    allowed = "a finite number >= 0" + (" or None" if optional else "")
    raise ColumnError((*path, index), f"must be {allowed}; received "
                                      f"{describe(values[index])}.")


def _code_column(
    path: tuple[Any, ...], values: Any, length: int, bound: int, meaning: str
) -> array:
    """A uint8 column of integers in ``range(bound)`` (bools only where ``bound == 2``)."""
    values = as_list(path, values, length)
    kinds = {int, bool} if bound == 2 else {int}
    column = None
    if set(map(type, values)) <= kinds:
        try:
            column = array("B", values)
        except OverflowError:
            column = None
    if column is not None and (not column or max(column) < bound):
        return column
    index = next(i for i, value in enumerate(values)
                 if type(value) not in kinds or not 0 <= value < bound)
    raise ColumnError((*path, index), f"must be {meaning}; received "
                                      f"{describe(values[index])}.")


def _count_value(path: tuple[Any, ...], value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _INT64_MAX:
        raise ColumnError(path, f"must be an iteration count (an integer >= 1); received "
                                f"{describe(value)}.")
    return value


def _checkpoint_value(path: tuple[Any, ...], value: Any) -> float:
    if not is_number(value, optional=True):
        raise ColumnError(path, f"must be a finite number >= 0 or None (no refinement yet); "
                                f"received {describe(value)}.")
    return math.inf if value is None else float(value)


def _run_column(path: tuple[Any, ...], runs: Any, length: int, typecode: str,
                value_of: Callable[[tuple[Any, ...], Any], Any]) -> array:
    """Expand ``[value, run length]`` pairs, checking each and that they cover every check."""
    column, total = array(typecode), 0
    for index, pair in enumerate(as_list(path, runs, None)):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ColumnError((*path, index), f"must be a [value, run length] pair; "
                                              f"received {describe(pair)}.")
        value, run = value_of((*path, index, 0), pair[0]), pair[1]
        if isinstance(run, bool) or not isinstance(run, int) or run < 1:
            raise ColumnError((*path, index, 1), f"must be a run length (an integer "
                                                 f">= 1); received {describe(run)}.")
        total += run
        if total > length:  # checked before expanding, so a huge run cannot exhaust memory
            break
        column.extend(array(typecode, [value]) * run)
    if total != length:
        raise ColumnError(path, f"run lengths must add up to the {length} checks of `loss`; "
                                f"they add up to {total}.")
    return column


def decode_json(data: Any, expected_end: int | None = None) -> tuple[dict[str, array], int]:
    """Columns and first check index of a saved history, each field checked on its own.

    ``expected_end``, when given, is the number of checks the history must end at.
    """
    if not isinstance(data, Mapping) or set(data) != set(JSON_KEYS):
        keys = sorted(map(str, data)) if isinstance(data, Mapping) else describe(data)
        raise ColumnError((), f"must be a dict with the keys {list(JSON_KEYS)} (as "
                              f"state_dict() saves it); received {keys}.")
    if not isinstance(data["reasons"], (list, tuple)) or list(data["reasons"]) != list(REASONS):
        raise ColumnError(("reasons",), f"must be the legend {list(REASONS)}; received "
                                        f"{describe(data['reasons'])}.")
    first = data["first_check"]
    if isinstance(first, bool) or not isinstance(first, int) or first < 0:
        raise ColumnError(("first_check",), f"must be an integer >= 0; received "
                                            f"{describe(first)}.")
    loss = _float_column(("loss",), data["loss"], None)
    length = len(loss)
    if expected_end is not None and first + length != expected_end:
        raise ColumnError(("first_check",), f"the history covers checks {first} to "
                                            f"{first + length - 1}, but the state has `checks` = "
                                         f"{expected_end}; it must end at the last check.")
    columns = {
        "loss": loss,
        "ema": _float_column(("ema",), data["ema"], length),
        "checkpoint": _run_column(("checkpoint",), data["checkpoint"], length, "d",
                                  _checkpoint_value),
        "residual": _float_column(("residual",), data["residual"], length, optional=True),
        "k": _run_column(("k",), data["k"], length, "q", _count_value),
        "k_adjoint": _run_column(("k_adjoint",), data["k_adjoint"], length, "q", _count_value),
        "reason": _code_column(("reason",), data["reason"], length, len(REASONS),
                               f"a reason code 0..{len(REASONS) - 1} (see `reasons`)"),
        "plateau": _code_column(("plateau",), data["plateau"], length, 2, "0 or 1"),
    }
    return columns, first


def plot_columns(history: Any) -> dict[str, list[Any]]:
    """``check``, ``loss``, ``ema``, ``k``, ``k_adjoint`` and ``decision`` lists of a history
    given as ``PRDPController.history`` (entry dicts) or ``state_dict()["history"]``, each
    field checked (types, finiteness, allowed decisions) but not against a controller.

    Raises
    ------
    ColumnError
        Naming the first bad field or entry.
    """
    if isinstance(history, Mapping):
        columns, first = decode_json(history)
        codes = columns["reason"].tolist()
        return {
            "check": list(range(first, first + len(codes))),
            "loss": columns["loss"].tolist(), "ema": columns["ema"].tolist(),
            "k": columns["k"].tolist(), "k_adjoint": columns["k_adjoint"].tolist(),
            "decision": [DECISION_OF[REASONS[code]] for code in codes],
        }
    keys = ("check", "loss", "ema", "k", "k_adjoint", "decision")
    out: dict[str, list[Any]] = {key: [] for key in keys}
    for index, row in enumerate(as_list((), history, None)):
        if not isinstance(row, Mapping) or not set(keys) <= set(row):
            raise ColumnError((index,), f"must be a dict with at least the keys {list(keys)}; "
                                        f"received {describe(row)}.")
        check, decision = row["check"], row["decision"]
        if isinstance(check, bool) or not isinstance(check, int) or check < 0:
            raise ColumnError((index, "check"), f"must be an integer >= 0; received "
                                      f"{describe(check)}.")
        for key in ("loss", "ema"):
            if not is_number(row[key], optional=False):
                raise ColumnError((index, key), f"must be a finite number >= 0; received "
                                                f"{describe(row[key])}.")
        for key in ("k", "k_adjoint"):
            _count_value((index, key), row[key])
        if decision not in ("refine", "hold", "stop"):
            raise ColumnError((index, "decision"), f"must be 'refine', 'hold' or 'stop'; "
                                      f"received {describe(decision)}.")
        for key in keys:
            out[key].append(row[key])
    return out
