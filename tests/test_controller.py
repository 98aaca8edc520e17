"""PRDPController: the rule of DESIGN.md against an independent exact re-implementation.

The reference below keeps the full list of losses, recomputes every moving average from the
closed form in exact rational arithmetic (``fractions.Fraction``), and walks the rule with
plain lists; the controller keeps O(1) float state. Where a comparison of the exact values
lies within a relative 1e-9 of its threshold, float rounding could legitimately flip it, and
such sequences are skipped (``hypothesis.assume``); everywhere else the decisions must agree
exactly, check by check.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import prdp_ops as po
from prdp_ops._controller import cumulative_iterations

# These tests pin the paper's rule (rule="plateau"); the default rule, "fidelity", has its
# own tests in tests/test_controller_fidelity.py.
plateau_controller = functools.partial(po.PRDPController, rule="plateau")

# --------------------------------------------------------------------------- the reference


class _NearTieError(Exception):
    """An exact comparison too close to its threshold for a float implementation to match."""


def _strictly_greater(a: Fraction, b: Fraction) -> bool:
    """``a > b``, refusing near-ties (relative gap in (0, 1e-9])."""
    gap = abs(a - b)
    if gap != 0 and gap <= Fraction(1, 10**9) * max(abs(a), abs(b)):
        raise _NearTieError
    return a > b


def _exact_ema(losses: list[Fraction], alpha: Fraction) -> Fraction:
    """Closed form of the recursive average seeded with the first value:
    e_n = (1-a)^n l_0 + a sum_{j=1..n} (1-a)^(n-j) l_j."""
    n = len(losses) - 1
    beta = 1 - alpha
    return beta**n * losses[0] + sum(alpha * beta ** (n - j) * losses[j] for j in range(1, n + 1))


def reference_run(loss_at, n_checks, residual_at=None, *, k_min=1, k_step=1, k_max=None,
                  tau_step=0.98, tau_stop=0.9, ema_window=6, lookback=3, k_adjoint_min=None,
                  k_adjoint_step=None, k_adjoint_max=None, latch=True, use_ema=True,
                  residual_tol=None):
    """Decisions and counts of the rule, closed loop: ``loss_at(check, k) -> loss``."""
    adjoint_min = k_min if k_adjoint_min is None else k_adjoint_min
    adjoint_step = k_step if k_adjoint_step is None else k_adjoint_step
    adjoint_max = k_max if k_adjoint_max is None else k_adjoint_max
    alpha = Fraction(2, ema_window + 1) if use_ema else Fraction(1)
    k, k_adj = k_min, adjoint_min
    losses, emas, out = [], [], []
    checkpoint = None  # None = +infinity
    stopped = False
    for check in range(n_checks):
        loss = loss_at(check, k)
        losses.append(Fraction(loss))
        emas.append(_exact_ema(losses, alpha))
        ema = emas[-1]
        residual = None if residual_at is None else residual_at(check, k)
        converged = residual_tol is not None and residual is not None and residual <= residual_tol
        decision = "hold"
        if len(emas) > lookback and not (stopped and latch):
            if _strictly_greater(ema / emas[-lookback], Fraction(tau_step)):
                paid_off = checkpoint is None or _strictly_greater(
                    Fraction(tau_stop) * checkpoint, ema)
                worse = checkpoint is not None and _strictly_greater(ema, checkpoint)
                if not (paid_off or worse):
                    decision, stopped = "stop", True
                else:
                    new_k = k + k_step if k_max is None else min(k + k_step, k_max)
                    new_adj = (k_adj + adjoint_step if adjoint_max is None
                               else min(k_adj + adjoint_step, adjoint_max))
                    if not converged and (new_k, new_adj) != (k, k_adj):
                        decision, stopped = "refine", False
                        k, k_adj, checkpoint = new_k, new_adj, ema
        out.append((decision, k, k_adj))
    return out


def run_controller(controller, loss_at, n_checks, residual_at=None):
    out = []
    for check in range(n_checks):
        residual = None if residual_at is None else residual_at(check, controller.k)
        decision = controller.update(loss_at(check, controller.k), residual=residual)
        out.append((decision, controller.k, controller.k_adjoint))
    return out


def from_list(losses):
    return lambda check, k: losses[check]


def decisions(controller, losses):
    return [controller.update(loss) for loss in losses]


# --------------------------------------------------------------------------- strategies

hyperparameters = st.fixed_dictionaries(
    {
        "k_min": st.integers(1, 3),
        "k_step": st.integers(1, 3),
        "tau_step": st.sampled_from([0.5, 0.8, 0.9, 0.92, 0.95, 0.98, 1.0, 1.05]),
        "tau_stop": st.sampled_from([0.3, 0.6, 0.9, 0.95, 1.0]),
        "ema_window": st.integers(1, 10),
        "lookback": st.integers(2, 5),
        "latch": st.booleans(),
        "use_ema": st.booleans(),
    },
    optional={
        "k_max": st.integers(3, 8),
        "k_adjoint_min": st.integers(1, 4),
        "k_adjoint_step": st.integers(1, 4),
        "k_adjoint_max": st.integers(4, 12),
    },
)

positive_losses = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False)


@st.composite
def piecewise_curves(draw):
    """Segments of geometric decay towards a floor, with jumps: plateaus and rises."""
    losses = []
    level = draw(st.floats(0.5, 10.0))
    for _ in range(draw(st.integers(1, 5))):
        length = draw(st.integers(1, 15))
        rate = draw(st.sampled_from([0.5, 0.8, 0.95, 0.99, 1.0, 1.02]))
        floor = draw(st.floats(0.0, 0.5)) * level
        for _ in range(length):
            level = floor + rate * (level - floor)
            losses.append(level)
        level *= draw(st.sampled_from([0.3, 0.7, 1.0, 1.3]))
    return losses


loss_sequences = st.one_of(st.lists(positive_losses, min_size=1, max_size=40), piecewise_curves())


def _make_valid(params):
    """Drop adjoint settings that would make an invalid configuration."""
    params = dict(params)
    k_max = params.get("k_max")
    if k_max is not None and k_max < params["k_min"]:
        params["k_max"] = params["k_min"]
    adjoint_min = params.get("k_adjoint_min", params["k_min"])
    adjoint_max = params.get("k_adjoint_max", params.get("k_max"))
    if adjoint_max is not None and adjoint_max < adjoint_min:
        params["k_adjoint_max"] = adjoint_min
    return params


# --------------------------------------------------------------------------- rule vs reference


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=hyperparameters, losses=loss_sequences)
def test_decisions_match_exact_reference(params, losses):
    params = _make_valid(params)
    try:
        expected = reference_run(from_list(losses), len(losses), **params)
    except _NearTieError:
        assume(False)
    controller = plateau_controller(**params)
    assert run_controller(controller, from_list(losses), len(losses)) == expected
    assert [entry["decision"] for entry in controller.history] == [e[0] for e in expected]


def _training_curve(k_converged, floor=0.02):
    """A synthetic training run: the loss decays towards a floor that only more solver
    iterations lower, until ``k_converged`` where the physics is exact."""
    def loss_at(check, k):
        physics_error = 1.0 / min(k, k_converged)
        return floor + physics_error * (0.5 + 0.5 * 0.85**check)
    return loss_at


@pytest.mark.parametrize("k_converged", [1, 3, 6])
@pytest.mark.parametrize("use_ema", [True, False])
def test_closed_loop_training_curve_refines_then_stops(k_converged, use_ema):
    params = {"k_min": 1, "k_step": 1, "tau_step": 0.98, "tau_stop": 0.9, "ema_window": 6,
              "lookback": 3, "use_ema": use_ema}
    loss_at = _training_curve(k_converged)
    controller = plateau_controller(**params)
    got = run_controller(controller, loss_at, 150)
    assert got == reference_run(loss_at, 150, **params)
    stops = [check for check, (decision, _, _) in enumerate(got) if decision == "stop"]
    assert len(stops) == 1, "a latched controller stops exactly once"
    # It refines while refinement lowers the floor by more than 10%, i.e. up to the level where
    # the physics converges, and at most one step beyond (the step that shows no gain).
    assert k_converged <= controller.k <= k_converged + 1
    assert controller.stopped


@settings(max_examples=100, deadline=None)
@given(params=hyperparameters, k_converged=st.integers(1, 8), floor=st.floats(0.0, 0.5))
def test_closed_loop_matches_reference(params, k_converged, floor):
    params = _make_valid(params)
    loss_at = _training_curve(k_converged, floor)
    try:
        expected = reference_run(loss_at, 80, **params)
    except _NearTieError:
        assume(False)
    assert run_controller(plateau_controller(**params), loss_at, 80) == expected


# --------------------------------------------------------------------------- hand-checked cases


def test_hand_computed_sequence_without_ema():
    # lookback 2: ratio to the previous value. check2: 8.9/9 > 0.92 plateau, no checkpoint
    # -> refine (c = 8.9); check3: 5/8.9 no plateau; check4: 4.9/5 plateau, 4.9 < 0.9*8.9
    # -> refine (c = 4.9); check5: 4.8/4.9 plateau, 0.9*4.9 <= 4.8 <= 4.9 -> stop.
    controller = plateau_controller(k_min=25, k_step=10, k_max=600, tau_step=0.92, lookback=2,
                                   use_ema=False)
    got = decisions(controller, [10, 9, 8.9, 5, 4.9, 4.8, 1.0, 1.0])
    assert got == ["hold", "hold", "refine", "hold", "refine", "stop", "hold", "hold"]
    assert controller.k == 45
    assert controller.checkpoint == 4.9
    assert [e["reason"] for e in controller.history] == [
        "warm-up", "warm-up", "improved", "no plateau", "improved", "no gain", "stopped",
        "stopped"]


def test_ema_is_recursive_and_seeded_with_first_value():
    controller = plateau_controller(ema_window=3)  # alpha = 1/2
    for loss in [4.0, 2.0, 8.0]:
        controller.update(loss)
    assert [e["ema"] for e in controller.history] == [4.0, 3.0, 5.5]


def test_no_decision_before_more_than_lookback_values():
    # Constant losses are a plateau from the start; the first decision is at check `lookback`.
    for lookback in (2, 3, 5):
        controller = plateau_controller(lookback=lookback)
        got = decisions(controller, [1.0] * (lookback + 1))
        assert got == ["hold"] * lookback + ["refine"]
        assert [e["plateau"] for e in controller.history] == [False] * lookback + [True]


def test_lookback_compares_with_lookback_minus_one_checks_ago():
    losses = [5.0, 4.0, 1.0, 1.0]  # last/previous = 1 (flat), last/two-ago = 0.25 (falling)
    assert decisions(plateau_controller(lookback=2, use_ema=False), losses)[-1] == "refine"
    assert decisions(plateau_controller(lookback=3, use_ema=False), losses)[-1] == "hold"


def test_tau_step_boundary_is_strict():
    losses = [1.0, 1.0, 0.5]  # ratio exactly 0.5 at check 2
    assert decisions(plateau_controller(tau_step=0.5, lookback=2, use_ema=False),
                     losses)[-1] == "hold"
    assert decisions(plateau_controller(tau_step=0.49, lookback=2, use_ema=False),
                     losses)[-1] == "refine"


def test_tau_stop_boundary_is_strict():
    # refine at check 2 (checkpoint 1.0); check 4 is a plateau at 0.5 = tau_stop * checkpoint.
    losses = [1.0, 1.0, 1.0, 0.5, 0.5]
    assert decisions(plateau_controller(tau_stop=0.5, lookback=2, use_ema=False),
                     losses)[-1] == "stop"
    assert decisions(plateau_controller(tau_stop=0.5000001, lookback=2, use_ema=False),
                     losses)[-1] == "refine"


def test_rise_counts_as_plateau_and_worse_than_checkpoint_refines():
    controller = plateau_controller(lookback=2, use_ema=False)
    got = decisions(controller, [1.0, 0.5, 0.25, 0.5, 0.6])
    # check3: rise 0.25 -> 0.5 is a plateau, first checkpoint -> refine (c = 0.5);
    # check4: rise again, 0.6 > c -> refine ("worsened").
    assert got == ["hold", "hold", "hold", "refine", "refine"]
    assert controller.history[-1]["reason"] == "worsened"
    assert controller.history[-1]["checkpoint"] == 0.5


def test_zero_losses_are_a_plateau():
    got = decisions(plateau_controller(lookback=2), [0.0, 0.0, 0.0, 0.0])
    assert got == ["hold", "hold", "refine", "stop"]


@pytest.mark.parametrize("latch", [True, False])
def test_latch(latch):
    # refine at check 2 (c = 1); stop at check 4 (0.95 is within 10% of c); later the loss
    # falls well below c and plateaus again at check 6.
    controller = plateau_controller(lookback=2, use_ema=False, latch=latch)
    got = decisions(controller, [1.0, 1.0, 1.0, 0.95, 0.95, 0.5, 0.5])
    assert got[:5] == ["hold", "hold", "refine", "hold", "stop"]
    if latch:
        assert got[5:] == ["hold", "hold"]
        assert controller.k == 2 and controller.stopped
    else:
        assert got[5:] == ["hold", "refine"]
        assert controller.k == 3 and not controller.stopped


def test_k_max_caps_and_holds():
    controller = plateau_controller(k_min=1, k_step=2, k_max=4, lookback=2, use_ema=False)
    got = decisions(controller, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # rising: every check refines
    assert got == ["hold", "hold", "refine", "refine", "hold", "hold"]
    assert [e["k"] for e in controller.history] == [1, 1, 1, 3, 4, 4]
    assert [e["capped"] for e in controller.history] == [False] * 4 + [True, True]
    assert controller.k == 4
    assert controller.checkpoint == 4.0, "a held refinement keeps the last checkpoint"


def test_adjoint_follows_forward_by_default():
    controller = plateau_controller(k_min=2, k_step=3, lookback=2, use_ema=False)
    decisions(controller, [1.0, 2.0, 3.0, 4.0, 5.0])
    assert controller.k == controller.k_adjoint == 11  # refined at checks 2, 3, 4
    assert all(e["k"] == e["k_adjoint"] for e in controller.history)


def test_adjoint_schedule_configured_separately():
    controller = plateau_controller(k_min=1, k_step=1, k_max=2, k_adjoint_min=1,
                                   k_adjoint_step=3, k_adjoint_max=10, lookback=2,
                                   use_ema=False)
    decisions(controller, [float(v) for v in range(1, 9)])
    counts = [(e["k_next"], e["k_adjoint_next"]) for e in controller.history]
    # The forward count caps at 2; the adjoint keeps refining to its own cap of 10.
    assert counts == [(1, 1), (1, 1), (2, 4), (2, 7), (2, 10), (2, 10), (2, 10), (2, 10)]
    assert [e["decision"] for e in controller.history][2:] == ["refine"] * 3 + ["hold"] * 3


# --------------------------------------------------------------------------- long runs


def test_ema_stays_finite_and_exact_over_long_runs():
    # The paper's closed form with (1-alpha)^-n weights overflows after ~2000 values; the
    # recursion converges to the 2-cycle of alternating losses a, b:
    #   e_a = (1-alpha) e_b + alpha a,  e_b = (1-alpha) e_a + alpha b.
    n, a, b, window = 100_000, 1.0, 3.0, 6
    alpha = 2 / (window + 1)
    controller = plateau_controller(ema_window=window)
    sizes = []
    for i in range(n):
        controller.update(a if i % 2 == 0 else b)
        if i in (10, n - 1):
            state = controller.state_dict()
            del state["history"]
            sizes.append(sorted((name, len(value)) for name, value in state.items()
                                if isinstance(value, (list, dict))))
    e_b = (alpha * b + (1 - alpha) * alpha * a) / (1 - (1 - alpha) ** 2)
    assert math.isfinite(controller.ema)
    assert controller.ema == pytest.approx(e_b, rel=1e-12)
    assert controller.num_checks == n
    assert sizes[0] == sizes[1], "the controller's state (without history) must be O(1)"
    assert ("recent_emas", 3) in sizes[1]


# --------------------------------------------------------------------------- resume


@settings(max_examples=60, deadline=None)
@given(params=hyperparameters, losses=st.lists(positive_losses, min_size=2, max_size=30),
       data=st.data())
def test_resume_from_state_dict_equals_uninterrupted(params, losses, data):
    params = _make_valid(params)
    split = data.draw(st.integers(0, len(losses)))
    uninterrupted = plateau_controller(**params)
    expected = decisions(uninterrupted, losses)

    first = plateau_controller(**params)
    got = decisions(first, losses[:split])
    saved = json.loads(json.dumps(first.state_dict()))
    resumed = plateau_controller(**saved["hyperparameters"])
    resumed.load_state_dict(saved)
    got += decisions(resumed, losses[split:])

    assert got == expected
    assert resumed.history == uninterrupted.history
    assert resumed.state_dict() == uninterrupted.state_dict()


def test_state_dict_is_plain_json_with_no_infinity():
    controller = plateau_controller()
    controller.update(np.float64(1.0))
    state = controller.state_dict()
    text = json.dumps(state, allow_nan=False)  # raises on inf/nan
    assert json.loads(text) == state
    assert state["checkpoint"] is None
    assert type(state["history"]["loss"][0]) is float


def test_load_state_dict_rejects_other_hyperparameters():
    state = plateau_controller(tau_step=0.9).state_dict()
    controller = plateau_controller(tau_step=0.95)
    before = controller.state_dict()
    with pytest.raises(ValueError, match="tau_step"):
        controller.load_state_dict(state)
    assert controller.state_dict() == before


@pytest.mark.parametrize(
    ("tamper", "match"),
    [
        (lambda s: s.pop("k"), "missing keys"),
        (lambda s: s.update(k=1000), "exceeds its cap"),
        (lambda s: s.update(k=0), r"state\['k'\] must be an integer"),
        (lambda s: s.update(recent_emas=[1.0]), "recent_emas"),
        (lambda s: s.update(recent_emas=[1.0, float("nan"), 1.0]), "finite"),
        (lambda s: s.update(history=[]), "history"),
        (lambda s: s.update(stopped="yes"), "stopped"),
        (lambda s: s.update(version=99), "version"),
    ],
)
def test_load_state_dict_validates(tamper, match):
    controller = plateau_controller(k_max=10)
    decisions(controller, [3.0, 2.0, 1.0, 1.0])
    state = controller.state_dict()
    tamper(state)
    fresh = plateau_controller(k_max=10)
    before = fresh.state_dict()
    with pytest.raises(ValueError, match=match):
        fresh.load_state_dict(state)
    assert fresh.state_dict() == before


def test_load_state_dict_rejects_non_mapping():
    with pytest.raises(TypeError, match="state must be a dict"):
        plateau_controller().load_state_dict([1, 2])


def test_load_state_dict_does_not_alias_the_input():
    controller = plateau_controller()
    decisions(controller, [1.0, 1.0])
    state = controller.state_dict()
    other = plateau_controller()
    other.load_state_dict(state)
    state["history"]["loss"][0] = 123.0
    assert other.history[0]["loss"] == 1.0


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"k_min": 0}, ValueError, "k_min"),
        ({"k_min": 1.5}, TypeError, "k_min"),
        ({"k_min": True}, TypeError, "k_min"),
        ({"k_step": 0}, ValueError, "k_step"),
        ({"k_min": 5, "k_max": 4}, ValueError, "k_max"),
        ({"k_max": 0}, ValueError, "k_max"),
        ({"tau_step": 0.0}, ValueError, "tau_step"),
        ({"tau_step": float("inf")}, ValueError, "tau_step"),
        ({"tau_step": "0.9"}, TypeError, "tau_step"),
        ({"tau_stop": 0.0}, ValueError, "tau_stop"),
        ({"tau_stop": 1.1}, ValueError, "tau_stop"),
        ({"tau_stop": float("nan")}, ValueError, "tau_stop"),
        ({"ema_window": 0}, ValueError, "ema_window"),
        ({"lookback": 1}, ValueError, "lookback"),
        ({"k_adjoint_min": 0}, ValueError, "k_adjoint_min"),
        ({"k_adjoint_step": 2.0}, TypeError, "k_adjoint_step"),
        ({"k_adjoint_min": 6, "k_adjoint_max": 5}, ValueError, "k_adjoint_max"),
        ({"k_adjoint_min": 6, "k_max": 5}, ValueError, "k_adjoint_max"),
        ({"latch": 1}, TypeError, "latch"),
        ({"use_ema": "no"}, TypeError, "use_ema"),
        ({"residual_tol": -1e-3}, ValueError, "residual_tol"),
        ({"residual_tol": float("nan")}, ValueError, "residual_tol"),
    ],
)
def test_bad_hyperparameters(kwargs, error, name):
    with pytest.raises(error, match=name):
        plateau_controller(**kwargs)


def test_numpy_integer_hyperparameters_are_accepted():
    controller = plateau_controller(k_min=np.int64(2), lookback=np.int32(4))
    assert controller.k == 2 and type(controller.k) is int
    json.dumps(controller.state_dict())


@pytest.mark.parametrize(
    ("loss", "error"),
    [
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (-float("inf"), ValueError),
        (-0.1, ValueError),
        (1 + 2j, ValueError),
        (np.complex128(1.0), ValueError),
        (np.array([1.0, 2.0]), ValueError),
        (np.float32("nan"), ValueError),
        ("1.0", TypeError),
        (None, TypeError),
        (True, TypeError),
    ],
)
def test_bad_loss_is_rejected_without_changing_state(loss, error):
    controller = plateau_controller(lookback=2, use_ema=False)
    decisions(controller, [3.0, 2.0, 2.0])
    before = controller.state_dict()
    with pytest.raises(error, match="loss"):
        controller.update(loss)
    assert controller.state_dict() == before
    # The run continues exactly as if the bad value had never been offered.
    reference = plateau_controller(lookback=2, use_ema=False)
    decisions(reference, [3.0, 2.0, 2.0])
    assert controller.update(1.9) == reference.update(1.9)


def test_bad_residual_is_rejected_without_changing_state():
    controller = plateau_controller(residual_tol=1e-6)
    controller.update(1.0)
    before = controller.state_dict()
    with pytest.raises(ValueError, match="residual"):
        controller.update(1.0, residual=float("nan"))
    assert controller.state_dict() == before


def test_array_scalars_from_numpy_and_jax():
    jnp = pytest.importorskip("jax.numpy")
    controller = plateau_controller()
    controller.update(np.float32(0.5))
    controller.update(np.array(0.25))
    controller.update(jnp.asarray(0.125), residual=jnp.asarray(1e-3))
    history = controller.history
    assert [e["loss"] for e in history] == [0.5, 0.25, 0.125]
    assert all(type(e["loss"]) is float for e in history)
    assert type(history[-1]["residual"]) is float
    json.dumps(controller.state_dict())


# --------------------------------------------------------------------------- residual signal


def test_residual_signal_suppresses_refinement_until_solve_unconverged():
    controller = plateau_controller(lookback=2, use_ema=False, residual_tol=1e-6)
    losses = [1.0, 1.0, 1.0, 1.0, 1.0]
    residuals = [1e-2, 1e-2, 1e-8, 1e-6, 1e-3]  # converged (<= tol) at checks 2 and 3
    got = [controller.update(loss, residual=r) for loss, r in zip(losses, residuals, strict=True)]
    assert got == ["hold", "hold", "hold", "hold", "refine"]
    history = controller.history
    assert [e["converged_at_k"] for e in history] == [False, False, True, True, False]
    assert [e["reason"] for e in history][2:4] == ["solver converged"] * 2
    assert history[3]["checkpoint"] is None, "a suppressed refinement stores no checkpoint"
    assert [e["residual"] for e in history] == residuals
    assert not controller.solver_converged and controller.k == 2
    controller.update(1.0, residual=0.0)
    assert controller.solver_converged


def test_residual_matches_reference():
    params = {"lookback": 2, "use_ema": False, "residual_tol": 1e-4}
    losses = [1.0, 0.9, 0.89, 0.5, 0.49, 0.3, 0.299, 0.298, 0.1, 0.1]
    def residual_at(check, k):
        return 10.0 ** (-k)  # converged from k = 4 on
    got = run_controller(plateau_controller(**params), from_list(losses), len(losses),
                         residual_at)
    assert got == reference_run(from_list(losses), len(losses), residual_at, **params)


def test_residual_is_recorded_but_ignored_without_tolerance():
    controller = plateau_controller(lookback=2, use_ema=False)
    got = [controller.update(1.0, residual=0.0) for _ in range(3)]
    assert got[-1] == "refine"
    assert controller.history[-1]["residual"] == 0.0
    assert not controller.history[-1]["converged_at_k"]


# --------------------------------------------------------------------------- logging, helpers


def test_logs_refine_and_stop_at_info(caplog):
    controller = plateau_controller(lookback=2, use_ema=False)
    with caplog.at_level(logging.INFO, logger="prdp_ops"):
        decisions(controller, [1.0, 1.0, 1.0, 1.0])
    messages = [r.getMessage() for r in caplog.records if r.name == "prdp_ops"]
    assert len(messages) == 2
    assert "refine k 1 -> 2" in messages[0]
    assert "stop at k 2" in messages[1]


def test_history_is_a_copy():
    controller = plateau_controller()
    controller.update(1.0)
    controller.history[0]["loss"] = 99.0
    assert controller.history[0]["loss"] == 1.0


def test_cumulative_iterations():
    controller = plateau_controller(k_min=2, k_step=3, k_adjoint_min=1, k_adjoint_step=1,
                                   lookback=2, use_ema=False)
    decisions(controller, [1.0, 1.0, 1.0, 1.0, 0.5])  # refine at check 2 only, stop at 3
    history = controller.history
    assert [(e["k"], e["k_adjoint"]) for e in history] == [(2, 1)] * 3 + [(5, 2)] * 2
    assert cumulative_iterations(history) == [2, 4, 6, 11, 16]
    assert cumulative_iterations(history, solves_per_check=10, include_adjoint=True) == [
        30, 60, 90, 160, 230]
    with pytest.raises(ValueError, match="solves_per_check"):
        cumulative_iterations(history, solves_per_check=0)


def test_repr_names_hyperparameters():
    assert "tau_step=0.9" in repr(plateau_controller(tau_step=0.9))


# --------------------------------------------------------------------------- plotting


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    from prdp_ops.plotting import plot_prdp

    controller = plateau_controller(k_adjoint_step=2)
    run_controller(controller, _training_curve(4), 60)
    path = tmp_path / "prdp.png"
    figure = plot_prdp(controller.history, baseline_k=20, solves_per_check=8,
                       include_adjoint=True, path=path, title="synthetic")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(figure.axes) == 3
    measured = [e["k"] * 8 for e in controller.history]
    plot_prdp(controller.history, iterations_per_check=measured, path=tmp_path / "m.png")
    with pytest.raises(ValueError, match="iterations_per_check"):
        plot_prdp(controller.history, iterations_per_check=measured[:-1])
    with pytest.raises(ValueError, match="history is empty"):
        plot_prdp([])
    import matplotlib.pyplot as plt
    plt.close("all")


def test_plot_without_matplotlib_says_how_to_install(monkeypatch):
    from prdp_ops.plotting import plot_prdp

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"pip install prdp-ops\[examples\]"):
        plot_prdp([{"check": 0}])
