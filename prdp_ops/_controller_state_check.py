"""The saved history checked against the rule and the resume state (``load_state_dict``).

:func:`check_history` is the vectorised part of :func:`prdp_ops._controller_state.parse_state`:
every column of a saved history (:mod:`prdp_ops._controller_history`) against what the rule
(:mod:`prdp_ops._controller_rule`) can produce and against the resume state it ends in, in
O(n) NumPy operations, so that a corrupt history is refused by name before it reaches a plot.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable, Mapping

import numpy as np

from prdp_ops._controller_columns import ColumnError
from prdp_ops._controller_fidelity import MAX_GROWTH_POWER
from prdp_ops._controller_history import converged
from prdp_ops._controller_rule import (
    DECISION_OF,
    REASON_CODE,
    REASONS,
    REFINE_REASONS,
    ControllerState,
    Hyperparameters,
)

__all__ = ["check_history"]

_REFINE_CODES = [REASON_CODE[reason] for reason in REFINE_REASONS]
_PLATEAU_REASONS = ("improved", "worsened", "no gain", "at k_max", "solver converged")
# The reasons each rule can give (REASONS lists them all, for the codes).
_RULE_REASONS = {
    "plateau": ("warm-up", "no plateau", "improved", "worsened", "no gain", "at k_max",
                "solver converged", "stopped"),
    "fidelity": ("warm-up", "no plateau", "at k_max", "solver converged", "plateau",
                 "fidelity", "fidelity ok", "awaiting signal"),
}

def _first(mask: np.ndarray) -> int | None:
    indices = np.flatnonzero(mask)
    return int(indices[0]) if indices.size else None


def check_history(
    columns: Mapping[str, array], first: int, hp: Hyperparameters, state: ControllerState
) -> None:
    """The fields against the rule and the resume state (vectorised; O(n) in C).

    Checks what a plot or :func:`cumulative_iterations` relies on: the counts change exactly
    at refinements, by the configured steps, and end at the resume state's counts; reasons
    agree with the warm-up, the plateau flag, the residual and the caps; the checkpoints
    follow the refinements; the last averages are the resume state's.
    """
    length = len(columns["loss"])
    if length == 0:
        return
    reason = np.frombuffer(columns["reason"], dtype=np.uint8)
    plateau = np.frombuffer(columns["plateau"], dtype=np.uint8).astype(bool)
    residual = np.frombuffer(columns["residual"], dtype=np.float64)
    ema = np.frombuffer(columns["ema"], dtype=np.float64)
    refine = np.isin(reason, _REFINE_CODES)

    def check(mask: np.ndarray, field: str, message: Callable[[int], str]) -> None:
        index = _first(mask)
        if index is not None:
            raise ColumnError((field, index), f"at check {first + index}: {message(index)}")

    def reason_at(index: int) -> str:
        return REASONS[reason[index]]

    allowed = _RULE_REASONS[hp.rule]
    check(~np.isin(reason, [REASON_CODE[name] for name in allowed]), "reason",
          lambda i: f"reason {reason_at(i)!r} is not one of rule {hp.rule!r}'s: {list(allowed)}.")
    early = first + np.arange(length) < hp.lookback
    warm_up = reason == REASON_CODE["warm-up"]
    if hp.rule == "fidelity":
        # A measured fidelity decides from the first check; the warm-up holds only the
        # loss-only fallback, so within the first lookback checks a check is either warm-up
        # or decided on a fidelity.
        decided = np.isin(reason, [REASON_CODE[name] for name in (
            "fidelity", "fidelity ok", "at k_max", "solver converged")])
        check((warm_up & ~early) | (early & ~warm_up & ~decided), "reason",
              lambda i: f"reason {reason_at(i)!r} contradicts the warm-up: the first lookback "
                        f"= {hp.lookback} checks are warm-up or decided on a fidelity, and "
                        f"no later one is warm-up.")
    else:
        check(warm_up != early, "reason",
              lambda i: f"reason {reason_at(i)!r} contradicts the warm-up, which is exactly "
                        f"the first lookback = {hp.lookback} checks.")
    # Under rule="fidelity" a held refinement ("at k_max", "solver converged") may be due to
    # the fidelity signal, without a plateau; only the loss-only "plateau" refinement needs one.
    plateau_reasons = _PLATEAU_REASONS if hp.rule == "plateau" else ("plateau",)
    needs = np.isin(reason, [REASON_CODE[name] for name in plateau_reasons])
    excludes = np.isin(reason, [REASON_CODE["warm-up"], REASON_CODE["no plateau"]])
    check((needs & ~plateau) | (excludes & plateau), "plateau",
          lambda i: f"plateau = {int(plateau[i])} contradicts the reason {reason_at(i)!r}.")
    tol = -1.0 if hp.residual_tol is None else hp.residual_tol  # NaN (no residual) <= tol: False
    check((reason == REASON_CODE["solver converged"]) & ~(residual <= tol), "reason",
          lambda i: f"'solver converged' needs a residual <= residual_tol ({hp.residual_tol}); "
                    f"the residual is {residual[i]}.")
    for name, start in (("k", state.start_k), ("k_adjoint", state.start_k_adjoint)):
        # The first check runs the counts the start search ended at (the minima without one).
        count = np.frombuffer(columns[name], dtype=np.int64)[:1]
        check(np.asarray([first == 0]) & (count != start), name,
              lambda i, name=name, count=count, start=start: (
                  f"{name} = {count[i]} at the first check, but the resume state's start "
                  f"count is {start}."))
    below_cap = np.zeros(length, dtype=bool)
    for name, minimum, step, cap, now in (
        ("k", hp.k_min, hp.k_step, hp.k_max, state.k),
        ("k_adjoint", hp.k_adjoint_min, hp.k_adjoint_step, hp.k_adjoint_max, state.k_adjoint),
    ):
        counts = np.frombuffer(columns[name], dtype=np.int64)
        check(counts < minimum, name, lambda i, name=name, counts=counts, minimum=minimum: (
            f"{name} = {counts[i]} is below its minimum {minimum}."))
        following = np.append(counts[1:], now)
        if hp.rule == "fidelity":
            # Geometric growth on the k_min + j * step grid, by a factor between growth and
            # growth ** MAX_GROWTH_POWER (the jump sized from the contraction estimate): the
            # next count must lie in that range (capped) and on the grid, or be the cap.
            def grow(factor: float, counts: np.ndarray = counts, step: int = step) -> np.ndarray:
                steps = np.maximum(1, np.round((factor - 1.0) * counts / step))
                return counts + step * steps.astype(np.int64)

            low, high = grow(hp.growth), grow(hp.growth**MAX_GROWTH_POWER)
            if cap is not None:
                low, high = np.minimum(low, cap), np.minimum(high, cap)
            on_grid = ((following - minimum) % step == 0) | (following == cap)
            fits = (following >= low) & (following <= high) & on_grid
            stepped = low
            after = np.where(refine & fits, following, np.where(refine, low, counts))
        else:
            stepped = counts + step if cap is None else np.minimum(counts + step, cap)
            after = np.where(refine, stepped, counts)
        check(after != following, name,
              lambda i, name=name, counts=counts, after=after, following=following: (
                  f"{name} = {counts[i]} with decision {DECISION_OF[reason_at(i)]!r} leaves "
                  f"{name} = {after[i]}, but "
                  f"{'the resume state' if i == length - 1 else 'the next entry'} has "
                  f"{name} = {following[i]}."))
        below_cap |= stepped != counts
    check((reason == REASON_CODE["at k_max"]) & below_cap, "reason",
          lambda i: "reason 'at k_max' while k or k_adjoint is below its cap.")
    checkpoint = np.frombuffer(columns["checkpoint"], dtype=np.float64)
    check(np.where(refine, ema, checkpoint) != np.append(checkpoint[1:], state.checkpoint),
          "checkpoint", lambda i: "the checkpoints do not follow the refinements (each "
                                  "refinement makes its ema the next checkpoint).")
    tail = min(length, len(state.recent_emas))
    check(np.append(np.zeros(length - tail, dtype=bool),
                    ema[length - tail:] != np.asarray(state.recent_emas[len(state.recent_emas)
                                                                        - tail:])),
          "ema", lambda i: "the last averages differ from the resume state's recent_emas.")
    check((reason == REASON_CODE["stopped"]) & (not hp.latch), "reason",
          lambda i: "reason 'stopped' needs latch=True.")
    last = np.zeros(length, dtype=bool)
    stopped = {"no gain": True, "stopped": True, "improved": False, "worsened": False}.get(
        reason_at(length - 1))
    last[-1] = stopped is not None and stopped != state.stopped
    check(last, "reason", lambda i: f"the last reason {reason_at(i)!r} contradicts "
                                    f"stopped = {state.stopped} of the resume state.")
    last_residual = None if math.isnan(residual[-1]) else float(residual[-1])
    last[-1] = converged(hp, last_residual) != state.solver_converged
    check(last, "residual", lambda i: f"the last residual contradicts solver_converged = "
                                      f"{state.solver_converged} of the resume state.")
