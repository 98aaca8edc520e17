"""Saving and restoring a :class:`~prdp_ops.PRDPController`: ``state_dict`` and its parser.

A state (format ``"prdp_ops.PRDPController"``, version 5) is a dict of JSON-serialisable plain
values in two parts:

- the **resume state**, O(1) in the number of checks and enough to continue exactly:
  ``hyperparameters`` (the constructor arguments, resolved), ``checks``, ``recent_emas`` (the
  last ``min(checks, lookback)`` averages), ``k``, ``k_adjoint``, ``checkpoint`` (``None``
  before the first refinement, as JSON has no infinity), ``stopped``, ``solver_converged``,
  ``fidelity`` (the gradient fidelity given at the current counts, or ``None``) and
  ``signal_seen`` (whether any was ever given), ``first_ema`` (the first check's average) and
  ``fidelity_ema`` (the average at the check that gave ``fidelity``: ``None`` exactly when
  ``fidelity`` is), ``level_start`` (the index of the first check at the current counts) and
  ``measured_check`` (the index of the check that gave ``fidelity``, ``None`` with it) -- the
  last three new in version 4, read from a version-3 state as if the fidelity had been given
  at the last check, which began its level; ``searching`` (whether the start search is open),
  ``start_k`` and ``start_k_adjoint`` (the counts of the first check) and ``start_fidelity``
  (the last fidelity the search was given, or ``None``) -- new in version 5, read from an
  older state as a controller that never searched (counts from ``k_min``) and, before its
  first check under rule ``"fidelity"``, as a fresh one (its search still open);
- the **history**, ``None`` when left out (``state_dict(include_history=False)``) or the
  columnar dict of :meth:`prdp_ops._controller_history.History.to_json`: about 50 bytes of JSON
  per check kept (at most ``history_limit`` of them).

:func:`parse_state` checks every field, and the history against the resume state, before
anything is changed. It also reads version-1 states, whose history is a list of entry dicts,
and version-1 and -2 states, saved before the rule was a setting: their hyperparameters lack
``rule``, ``fidelity_tol`` and ``growth`` and are read as ``rule="plateau"`` (the only rule
there was) with the default fidelity settings, and their resume state as one without a
fidelity signal.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from prdp_ops._controller_columns import ColumnError, as_list, decode_json, describe
from prdp_ops._controller_history import ROW_KEYS, History, run_lengths
from prdp_ops._controller_rule import (
    DEFAULT_FIDELITY_POWER,
    DEFAULT_FIDELITY_TOL,
    DEFAULT_GROWTH,
    REASON_CODE,
    REASONS,
    ControllerState,
    Hyperparameters,
    at_caps,
)
from prdp_ops._controller_state_check import check_history

__all__ = ["STATE_FORMAT", "STATE_VERSION", "encode_state", "parse_state"]

STATE_FORMAT = "prdp_ops.PRDPController"
STATE_VERSION = 5
_READABLE_VERSIONS = (1, 2, 3, 4, 5)
_STATE_KEYS_V2 = frozenset(
    {"format", "version", "hyperparameters", "checks", "recent_emas", "k", "k_adjoint",
     "checkpoint", "stopped", "solver_converged", "history"}
)
_STATE_KEYS_V3 = _STATE_KEYS_V2 | {"fidelity", "signal_seen", "first_ema"}
_STATE_KEYS_V4 = _STATE_KEYS_V3 | {"fidelity_ema", "level_start", "measured_check"}
_STATE_KEYS = _STATE_KEYS_V4 | {"searching", "start_k", "start_k_adjoint", "start_fidelity"}
# What a state saved before the rule was a setting (versions 1 and 2) was run with.
_PRE_RULE_HYPERPARAMETERS = {"rule": "plateau", "fidelity_tol": DEFAULT_FIDELITY_TOL,
                             "growth": DEFAULT_GROWTH,
                             "fidelity_power": DEFAULT_FIDELITY_POWER}
# Settings that shape only the bookkeeping, not the decisions: a state may be loaded into a
# controller whose value differs (the loaded history is then cut to this controller's limit).
_BOOKKEEPING = ("history_limit",)
_FIX_STATE = ("Pass a dict returned by PRDPController.state_dict() unmodified (a json.dumps/"
              "json.loads round trip is fine).")
_FIX_HISTORY = ("The saved history is corrupt: set state['history'] = None to resume without "
                "it (the decisions stay exact), or restore an intact copy.")


def encode_state(
    hyperparameters: Mapping[str, Any], state: ControllerState, history: History | None
) -> dict[str, Any]:
    """The version-5 state dict of ``state`` and, unless ``None``, ``history``."""
    return {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "hyperparameters": dict(hyperparameters),
        "checks": state.checks,
        "recent_emas": list(state.recent_emas),
        "k": state.k,
        "k_adjoint": state.k_adjoint,
        "checkpoint": None if math.isinf(state.checkpoint) else state.checkpoint,
        "stopped": state.stopped,
        "solver_converged": state.solver_converged,
        "fidelity": state.fidelity,
        "signal_seen": state.signal_seen,
        "first_ema": state.first_ema,
        "fidelity_ema": state.fidelity_ema,
        "level_start": state.level_start,
        "measured_check": state.measured_check,
        "searching": state.searching,
        "start_k": state.start_k,
        "start_k_adjoint": state.start_k_adjoint,
        "start_fidelity": state.start_fidelity,
        "history": None if history is None else history.to_json(),
    }


def _error(field: str, message: str, fix: str = _FIX_STATE) -> ValueError:
    return ValueError(f"PRDPController.load_state_dict: {field} {message} {fix}")


def _received(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 60 else text[:60] + "..."
    return f"received {text} ({type(value).__name__})."


def _int_field(saved: Mapping[str, Any], name: str, minimum: int) -> int:
    value = saved[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _error(f"state[{name!r}]", f"must be an integer >= {minimum}; {_received(value)}")
    return value


def _number(field: str, value: Any) -> float:
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not (math.isfinite(value) and value >= 0)):
        raise _error(field, f"must be a finite number >= 0; {_received(value)}")
    return float(value)


def _check_hyperparameters(
    saved: Any, version: int, hyperparameters: Mapping[str, Any]
) -> None:
    """Refuse a state saved by a controller with a different rule."""
    expected = {name: value for name, value in hyperparameters.items()
                if version > 1 or name not in _BOOKKEEPING}
    if not isinstance(saved, Mapping):
        raise _error("state['hyperparameters']", f"must be a dict; {_received(saved)}")
    if version < 3:
        saved = {**saved, **_PRE_RULE_HYPERPARAMETERS}
    if set(saved) != set(expected):
        raise _error("state['hyperparameters']", f"must have the keys {sorted(expected)}; "
                     f"received {sorted(map(str, saved))}.")
    limit = saved.get("history_limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise _error("state['hyperparameters']['history_limit']",
                     f"must be None or an integer >= 0; {_received(limit)}")
    differing = sorted(name for name in expected
                       if name not in _BOOKKEEPING and saved[name] != expected[name])
    if differing:
        raise _error(
            "state['hyperparameters']",
            f"differ from this controller's in {differing} (saved "
            f"{[saved[name] for name in differing]}, this controller "
            f"{[expected[name] for name in differing]}).",
            "Construct the controller with the saved hyperparameters: "
            "PRDPController(**state['hyperparameters']).",
        )


def _count(saved: Mapping[str, Any], name: str, minimum: int, step: int,
           cap: int | None) -> int:
    """A saved iteration count, which must be one the schedule can reach."""
    value = _int_field(saved, name, minimum)
    if cap is not None and value > cap:
        raise _error(f"state[{name!r}]", f"= {value} exceeds its cap {cap}.")
    if value != cap and (value - minimum) % step:
        raise _error(f"state[{name!r}]", f"= {value} is not reachable from {minimum} in steps "
                     f"of {step} (nor the cap {cap}).")
    return value


def parse_state(
    saved: Any, hp: Hyperparameters, history_limit: int | None
) -> tuple[ControllerState, History]:
    """Validate a state from ``state_dict()`` for a controller with settings ``hp`` and
    ``history_limit``; return the resume state and the history to continue with.

    Raises
    ------
    TypeError
        When ``saved`` is not a mapping.
    ValueError
        Naming the first bad field, what was received and what to do.
    """
    if not isinstance(saved, Mapping):
        raise TypeError("PRDPController.load_state_dict: state must be a dict from "
                        f"state_dict(); received {type(saved).__name__}.")
    keys = set(saved)
    saved_version = saved.get("version") if type(saved.get("version")) is int else None
    expected_keys = {1: _STATE_KEYS_V2, 2: _STATE_KEYS_V2, 3: _STATE_KEYS_V3,
                     4: _STATE_KEYS_V4}.get(saved_version, _STATE_KEYS)
    if keys != expected_keys:
        missing, unknown = sorted(expected_keys - keys), sorted(map(str, keys - expected_keys))
        raise _error("state", f"is not a PRDPController state (missing keys {missing}, "
                     f"unknown keys {unknown}).")
    version = saved["version"]
    if saved["format"] != STATE_FORMAT or type(version) is not int or (
            version not in _READABLE_VERSIONS):
        raise _error("state", f"has the unsupported format {saved['format']!r} version "
                     f"{version!r}; expected {STATE_FORMAT!r} version "
                     f"{' or '.join(map(str, _READABLE_VERSIONS))}.")
    _check_hyperparameters(saved["hyperparameters"], version,
                           {**hp.as_dict(), "history_limit": history_limit})
    checks = _int_field(saved, "checks", 0)
    k = _count(saved, "k", hp.k_min, hp.k_step, hp.k_max)
    k_adjoint = _count(saved, "k_adjoint", hp.k_adjoint_min, hp.k_adjoint_step,
                       hp.k_adjoint_max)
    recent = saved["recent_emas"]
    kept = min(checks, hp.lookback)
    if not isinstance(recent, (list, tuple)) or len(recent) != kept:
        raise _error("state['recent_emas']", f"must be a list of min(checks, lookback) = {kept} "
                     f"averages; {_received(recent)}")
    recent_emas = tuple(_number(f"state['recent_emas'][{i}]", v) for i, v in enumerate(recent))
    checkpoint = saved["checkpoint"]
    checkpoint = math.inf if checkpoint is None else _number("state['checkpoint']", checkpoint)
    searching, start_k, start_k_adjoint, start_fidelity = _parse_start(
        saved, version, hp, checks, k, k_adjoint)
    # Every refinement changes a count (a due one at both caps is held), and only a refinement
    # at a check sets the checkpoint: "no checkpoint" is exactly "both counts where the first
    # check ran them" (the minima, or where the start search ended).
    if math.isinf(checkpoint) != ((k, k_adjoint) == (start_k, start_k_adjoint)):
        raise _error("state['checkpoint']", f"= {saved['checkpoint']!r} contradicts k = {k}, "
                     f"k_adjoint = {k_adjoint} (None exactly while both are at their start, "
                     f"{start_k} and {start_k_adjoint}).")
    flags = {}
    for name in ("stopped", "solver_converged"):
        if not isinstance(saved[name], bool):
            raise _error(f"state[{name!r}]", f"must be True or False; {_received(saved[name])}")
        flags[name] = saved[name]
    fidelity, signal_seen, first_ema, fidelity_ema = None, False, None, None
    if version >= 3:
        # None before the first check; also later in a state resumed from version 1 or 2
        # (rule "plateau", which does not read it).
        if saved["first_ema"] is not None and checks == 0:
            raise _error("state['first_ema']", f"= {saved['first_ema']!r} contradicts checks = 0 "
                                               "(None before the first check).")
        if saved["first_ema"] is not None:
            first_ema = _number("state['first_ema']", saved["first_ema"])
        if not isinstance(saved["signal_seen"], bool):
            raise _error("state['signal_seen']",
                         f"must be True or False; {_received(saved['signal_seen'])}")
        signal_seen = saved["signal_seen"]
        if saved["fidelity"] is not None:
            fidelity = _number("state['fidelity']", saved["fidelity"])
            if not signal_seen:
                raise _error("state['fidelity']", f"= {fidelity!r} contradicts signal_seen = "
                                                  "False (a fidelity was given).")
    if version >= 4 and (saved["fidelity_ema"] is None) != (fidelity is None):
        raise _error("state['fidelity_ema']", f"= {saved['fidelity_ema']!r} contradicts "
                     f"fidelity = {fidelity!r} (None exactly when fidelity is None).")
    # Unknown before version 4: a level of the fidelity rule taken to begin now (its next
    # measurement is then asked for at once); the paper's rule keeps 0.
    level_start, measured_check = (checks if hp.rule == "fidelity" else 0), None
    if version >= 4:
        level_start = _int_field(saved, "level_start", 0)
        if level_start > checks:
            raise _error("state['level_start']", f"= {level_start} exceeds checks = {checks}.")
        if (saved["measured_check"] is None) != (fidelity is None):
            raise _error("state['measured_check']", f"= {saved['measured_check']!r} "
                         f"contradicts fidelity = {fidelity!r} (None exactly when fidelity "
                         "is None).")
        if fidelity is not None:
            fidelity_ema = _number("state['fidelity_ema']", saved["fidelity_ema"])
            measured_check = _int_field(saved, "measured_check", level_start)
            if measured_check >= checks:
                raise _error("state['measured_check']", f"= {measured_check} must be below "
                                                        f"checks = {checks}.")
    elif fidelity is not None:
        # Version 3 did not record them: as if the fidelity had been given at the last check
        # (where the harness of the examples measured it), which began its level.
        fidelity_ema = recent_emas[-1] if recent_emas else None
        level_start = measured_check = max(0, checks - 1)
    state = ControllerState(checks=checks, recent_emas=recent_emas, k=k, k_adjoint=k_adjoint,
                            checkpoint=checkpoint, **flags, fidelity=fidelity,
                            signal_seen=signal_seen, first_ema=first_ema,
                            fidelity_ema=fidelity_ema, level_start=level_start,
                            measured_check=measured_check, searching=searching,
                            start_k=start_k, start_k_adjoint=start_k_adjoint,
                            start_fidelity=start_fidelity)
    return state, _parse_history(saved["history"], version, hp, history_limit, state)


def _parse_start(
    saved: Mapping[str, Any], version: int, hp: Hyperparameters, checks: int, k: int,
    k_adjoint: int,
) -> tuple[bool, int, int, float | None]:
    """The start search's fields (version 5), or what an older state implies: no search ran,
    and a state saved before its first check under rule ``"fidelity"`` is a fresh one."""
    if version < 5:
        searching = hp.rule == "fidelity" and checks == 0 and not at_caps(hp, k, k_adjoint)
        return searching, hp.k_min, hp.k_adjoint_min, None
    if not isinstance(saved["searching"], bool):
        raise _error("state['searching']", f"must be True or False; "
                                           f"{_received(saved['searching'])}")
    searching = saved["searching"]
    if searching and (hp.rule != "fidelity" or checks > 0 or at_caps(hp, k, k_adjoint)):
        raise _error("state['searching']", f"= True contradicts rule = {hp.rule!r}, checks = "
                     f"{checks}, k = {k} (the search is open only under rule 'fidelity', "
                     f"before the first check and below the caps).")
    start_k = _count(saved, "start_k", hp.k_min, hp.k_step, hp.k_max)
    start_k_adjoint = _count(saved, "start_k_adjoint", hp.k_adjoint_min, hp.k_adjoint_step,
                             hp.k_adjoint_max)
    if start_k > k or start_k_adjoint > k_adjoint or (
            checks == 0 and (start_k, start_k_adjoint) != (k, k_adjoint)):
        raise _error("state['start_k']", f"= {start_k} (start_k_adjoint = {start_k_adjoint}) "
                     f"contradicts k = {k}, k_adjoint = {k_adjoint} (the counts never fall, "
                     f"and before the first check they are the start counts).")
    start_fidelity = saved["start_fidelity"]
    if start_fidelity is not None:
        start_fidelity = _number("state['start_fidelity']", start_fidelity)
    moved = (start_k, start_k_adjoint) != (hp.k_min, hp.k_adjoint_min)
    if (moved and start_fidelity is None) or (hp.rule == "plateau" and (
            moved or start_fidelity is not None)):
        raise _error("state['start_fidelity']", f"= {start_fidelity!r} contradicts rule = "
                     f"{hp.rule!r}, start_k = {start_k} (a start above k_min comes from a "
                     f"measured fidelity; the paper's rule has no start search).")
    return searching, start_k, start_k_adjoint, start_fidelity


def _parse_history(
    saved: Any, version: int, hp: Hyperparameters, limit: int | None, state: ControllerState
) -> History:
    if saved is None:  # resumed without a history: it restarts at the next check
        return History(hp, limit, next_check=state.checks)
    try:
        if version == 1:  # a list of entry dicts, one per check since the start
            if not isinstance(saved, Sequence) or len(saved) != state.checks:
                raise ColumnError((), f"must be a list of `checks` = {state.checks} entries; "
                                      f"received {describe(saved)}.")
            saved_rows, saved = saved, _rows_to_json(saved, 0)
        columns, first = decode_json(saved, expected_end=state.checks)
        check_history(columns, first, hp, state)
        if version == 1:
            derived = History.from_columns(columns, hp, None, state.checks).rows()
            for index, (entry, expected) in enumerate(zip(saved_rows, derived, strict=True)):
                for key in ROW_KEYS:
                    if entry[key] != expected[key]:
                        raise ColumnError((index, key), f"= {entry[key]!r} contradicts the rest "
                                                        f"of the entry, which gives "
                                                        f"{expected[key]!r}.")
    except ColumnError as error:
        raise _error(ColumnError.render("state['history']", error.path), error.detail,
                     _FIX_HISTORY) from None
    # A longer saved history than this controller keeps: the most recent entries.
    return History.from_columns(columns, hp, limit, state.checks)


def _rows_to_json(rows: Any, first_check: int) -> dict[str, Any]:
    """The version-2 form of a version-1 history (a list of entry dicts with the keys
    :data:`ROW_KEYS`) that starts at check ``first_check``. Only the stored fields are taken:
    :func:`_parse_history` compares the derived ones with :meth:`History.rows`."""
    rows = as_list((), rows, None)
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping) or set(row) != set(ROW_KEYS):
            raise ColumnError((index,), f"must be a dict with the keys {list(ROW_KEYS)}; "
                                        f"received {describe(row)}.")
        if not isinstance(row["reason"], str) or row["reason"] not in REASON_CODE:
            raise ColumnError((index, "reason"), f"must be one of {list(REASONS)}; received "
                                      f"{describe(row['reason'])}.")

    def column(key: str) -> list[Any]:
        return [row[key] for row in rows]

    return {
        "first_check": first_check, "reasons": list(REASONS), "loss": column("loss"),
        "ema": column("ema"), "residual": column("residual"),
        "reason": [REASON_CODE[row["reason"]] for row in rows], "plateau": column("plateau"),
        "k": run_lengths(column("k")), "k_adjoint": run_lengths(column("k_adjoint")),
        "checkpoint": run_lengths(column("checkpoint")),
    }
