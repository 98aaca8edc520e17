"""The fidelity rule's start search: the count the first training step runs with.

``PRDPController.start(fidelity)`` takes the raw gradient fidelity at the initial parameters,
``delta_k = |g_k - g_k'| / max(|g_k|, |g_k'|)`` with ``k' = min(2k, k_max)``, and grows ``k``
by ``growth`` on the ``k_min + j * k_step`` grid until ``delta_k <= fidelity_tol`` or the caps.
Checked here:

* on a quadratic through ``k`` Richardson iterations, whose gradient has a closed form, the
  count the search ends at (its gradients computed by ``po.solve_vjp``) is the smallest count
  of the sequence whose closed-form ``delta_k`` meets the tolerance;
* the sequence of counts on a grid that is not powers of two, the caps, the end of the search
  at the first ``update``, and that ``rule="plateau"`` has none;
* bad input refused by name with the state unchanged; ``state_dict`` round trips mid-search and
  after it, older versions load as a controller that never searched, and a corrupt start
  field is refused by name.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import prdp_ops as po
from prdp_ops._controller_rule import next_count

EPS = np.finfo(np.float64).eps


# --------------------------------------------------------------------------- a known answer


def _quadratic(seed: int = 3):
    """A = diag(a), Richardson with omega = 1 contracts coordinate i by (1 - a_i) per
    iteration; theta is the right-hand side; L = |u_k(theta) - u_star|^2 / 2."""
    rng = np.random.default_rng(seed)
    a = np.linspace(0.04, 1.0, 12)
    u_star = rng.normal(size=a.size)
    theta = np.ones(a.size)
    return a, u_star, theta


def _closed_form_gradient(a, u_star, theta, k):
    # u_k = M_k theta with M_k = diag((1 - (1 - a)^k) / a) (k Richardson steps from zero), so
    # the gradient of |M_k theta - u_star|^2 / 2 is M_k (M_k theta - u_star).
    m = (1.0 - (1.0 - a) ** k) / a
    return m * (m * theta - u_star)


def _library_gradient(a, u_star, theta, k):
    """The same gradient through po.solve_vjp: k Richardson iterations, unrolled adjoint."""
    result, vjp = po.solve_vjp(np.diag(a), theta, solver="richardson", maxiter=k, rtol=0.0,
                               adjoint="unrolled", omega=1.0)
    assert result.iterations == k
    return np.asarray(vjp(result.x - u_star).b)


def _delta(g, g_ref):
    return np.linalg.norm(g - g_ref) / max(np.linalg.norm(g), np.linalg.norm(g_ref))


def test_start_ends_at_the_smallest_count_that_meets_the_tolerance():
    a, u_star, theta = _quadratic()
    k_max, tol = 256, 0.1
    # Independent answer: the doubling sequence from k_min = 1 and its closed-form fidelities.
    sequence, expected = [1], None
    while expected is None:
        k = sequence[-1]
        delta = _delta(_closed_form_gradient(a, u_star, theta, k),
                       _closed_form_gradient(a, u_star, theta, min(2 * k, k_max)))
        if delta <= tol or k == k_max:
            expected = k
        else:
            sequence.append(min(2 * k, k_max))
    assert 1 < expected < k_max, "the problem must make the search move and stop early"

    controller = po.PRDPController(k_max=k_max, fidelity_tol=tol)
    assert controller.starting and controller.wants_fidelity
    seen = []
    while controller.starting:
        k = controller.k
        g, g_ref = (_library_gradient(a, u_star, theta, count) for count in (k, min(2 * k,
                                                                                   k_max)))
        measured = po.gradient_fidelity(g, g_ref)
        # Rounding: k Richardson steps add O(k) roundings of relative size eps to each
        # coordinate of u_k and of the reverse sweep; delta compares two such gradients.
        bound = 8 * 2 * k * EPS
        reference = _delta(_closed_form_gradient(a, u_star, theta, k),
                           _closed_form_gradient(a, u_star, theta, min(2 * k, k_max)))
        assert abs(measured - reference) <= bound
        assert abs(reference - tol) > bound, "the decision must not hinge on rounding"
        seen.append(k)
        controller.start(measured)
    assert seen == sequence
    assert controller.k == controller.k_adjoint == controller.k_start == expected
    assert controller.start_fidelity == pytest.approx(
        _delta(_closed_form_gradient(a, u_star, theta, expected),
               _closed_form_gradient(a, u_star, theta, 2 * expected)), abs=16 * expected * EPS)
    # Training then starts there: the first check runs at the start count, no checkpoint.
    assert controller.checkpoint is None
    controller.update(1.0, fidelity=0.01)
    assert controller.history[0]["k"] == expected and not controller.starting


# --------------------------------------------------------------------------- the sequence


def test_search_grows_on_the_grid_by_growth_and_stops_at_the_cap():
    controller = po.PRDPController(k_min=3, k_step=2, k_max=40)
    ks = []
    while controller.starting:
        assert controller.start(1.5) == "refine"
        ks.append(controller.k)
    # k + 2 * max(1, round(k / 2)): 3 -> 7 -> 15 -> 31 -> 40 (the cap ends the search).
    assert ks == [7, 15, 31, 40]
    assert ks == [next_count(controller._hp, k, 2, 40) for k in [3, 7, 15, 31]]
    assert not controller.wants_fidelity  # nothing left to compare with at the cap
    with pytest.raises(RuntimeError, match="the search already ended"):
        controller.start(0.0)


def test_search_holds_at_the_tolerance_and_moves_the_adjoint_count_too():
    controller = po.PRDPController(k_min=4, k_adjoint_min=2, k_adjoint_step=2,
                                   fidelity_tol=0.2)
    assert controller.start(0.2001) == "refine"
    assert (controller.k, controller.k_adjoint) == (8, 4)
    assert controller.start(0.2) == "hold"  # at the tolerance: meets it
    assert not controller.starting and controller.start_fidelity == 0.2
    assert (controller.k_start, controller.k, controller.k_adjoint) == (8, 8, 4)


def test_first_update_closes_the_search_and_changes_nothing_else():
    searched, plain = po.PRDPController(lookback=2), po.PRDPController(lookback=2)
    assert searched.starting and plain.starting
    for loss, fidelity in [(1.0, 0.5), (0.9, None), (0.8, 0.05), (0.5, None)]:
        assert searched.update(loss, fidelity=fidelity) == plain.update(loss,
                                                                          fidelity=fidelity)
        assert not searched.starting
    assert searched.state_dict() == plain.state_dict()
    with pytest.raises(RuntimeError, match=r"training has begun \(update\(\) was called\)"):
        searched.start(0.5)


def test_no_search_under_the_paper_rule_or_at_the_caps():
    plateau = po.PRDPController(rule="plateau")
    assert not plateau.starting
    with pytest.raises(RuntimeError, match="rule 'plateau' has no start search"):
        plateau.start(0.5)
    capped = po.PRDPController(k_min=5, k_max=5)
    assert not capped.starting and not capped.wants_fidelity


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("bad", "error", "match"), [
    ("0.5", TypeError, r"PRDPController\.start: fidelity must be a real scalar"),
    (None, TypeError, r"PRDPController\.start: fidelity must be a real scalar"),
    (float("nan"), ValueError, r"PRDPController\.start: fidelity must be finite"),
    (-0.1, ValueError, r"PRDPController\.start: fidelity must be finite and non-negative"),
    (np.ones(2), ValueError, r"PRDPController\.start: fidelity must be a scalar"),
    (1j, ValueError, r"PRDPController\.start: fidelity must be real"),
])
def test_bad_fidelity_is_refused_by_name_and_changes_nothing(bad, error, match):
    controller = po.PRDPController(k_max=50)
    controller.start(0.9)
    before = controller.state_dict()
    with pytest.raises(error, match=match):
        controller.start(bad)
    assert controller.state_dict() == before


# --------------------------------------------------------------------------- persistence


EVENTS = [("start", 0.5), ("start", 0.3), ("start", 0.05), ("update", 1.0, 0.3),
          ("update", 0.8, None), ("update", 0.5, 0.2), ("update", 0.4, None),
          ("update", 0.3, 0.04), ("update", 0.1, None)]


def _apply(controller, events):
    return [controller.start(event[1]) if event[0] == "start"
            else controller.update(event[1], fidelity=event[2]) for event in events]


@pytest.mark.parametrize("include_history", [True, False])
@pytest.mark.parametrize("cut", [0, 1, 3, 5])  # fresh, mid-search, searched, mid-training
def test_state_round_trips_and_resumes_exactly(cut, include_history):
    settings = {"k_max": 100, "lookback": 2}
    uninterrupted = po.PRDPController(**settings)
    expected = _apply(uninterrupted, EVENTS)
    assert expected[:3] == ["refine", "refine", "hold"] and uninterrupted.k_start == 4
    first = po.PRDPController(**settings)
    got = _apply(first, EVENTS[:cut])
    state = json.loads(json.dumps(first.state_dict(include_history=include_history)))
    assert state["version"] == 5
    resumed = po.PRDPController(**state["hyperparameters"])
    resumed.load_state_dict(state)
    assert resumed.state_dict(include_history=include_history) == state
    assert resumed.starting == first.starting == (cut < 3)
    got += _apply(resumed, EVENTS[cut:])
    assert got == expected
    assert resumed.state_dict(include_history=False) == uninterrupted.state_dict(
        include_history=False)
    if include_history:
        assert resumed.history == uninterrupted.history


def test_version_4_states_load_as_a_controller_that_never_searched():
    fresh = po.PRDPController(lookback=2).state_dict()
    trained = po.PRDPController(lookback=2)
    trained.update(1.0, fidelity=0.5)
    for state, searching in ((fresh, True), (trained.state_dict(), False)):
        old = {key: value for key, value in json.loads(json.dumps(state)).items()
               if key not in ("searching", "start_k", "start_k_adjoint", "start_fidelity")}
        resumed = po.PRDPController(lookback=2)
        resumed.load_state_dict({**old, "version": 4})
        assert resumed.starting is searching
        assert resumed.state_dict() == state
    with pytest.raises(ValueError, match=r"missing keys \['searching'"):
        po.PRDPController(lookback=2).load_state_dict({**old, "version": 5})


@pytest.mark.parametrize(("field", "value", "match"), [
    ("searching", 1, r"state\['searching'\] must be True or False"),
    ("searching", True, r"state\['searching'\] = True contradicts .* checks = 1"),
    ("start_k", 5, r"state\['start_k'\] = 5 is not reachable from 1 in steps of 3"),
    ("start_k", 7, r"state\['start_k'\] = 7 .*contradicts k = 4"),
    ("start_fidelity", None, r"state\['start_fidelity'\] = None contradicts"),
    ("start_fidelity", -1.0, r"state\['start_fidelity'\] must be a finite number >= 0"),
])
def test_corrupt_start_fields_are_refused_by_name(field, value, match):
    controller = po.PRDPController(k_step=3, k_max=40, lookback=2)
    controller.start(0.5)  # 1 -> 4
    controller.update(1.0, fidelity=0.05)
    state = json.loads(json.dumps(controller.state_dict()))
    state[field] = value
    fresh = po.PRDPController(k_step=3, k_max=40, lookback=2)
    before = fresh.state_dict()
    with pytest.raises(ValueError, match=match):
        fresh.load_state_dict(state)
    assert fresh.state_dict() == before


def test_history_must_begin_at_the_start_count():
    controller = po.PRDPController(k_max=40, lookback=2)
    controller.start(0.5)
    controller.update(1.0, fidelity=0.05)
    state = json.loads(json.dumps(controller.state_dict()))
    state["start_k"] = state["start_k_adjoint"] = 1
    state["start_fidelity"] = None
    state["checkpoint"] = 1.0  # consistent with a refinement at a check ...
    with pytest.raises(ValueError, match=r"\['k'\]\[0\] at check 0: k = 2 at the first check, "
                                         r"but the resume state's start count is 1"):
        po.PRDPController(k_max=40, lookback=2).load_state_dict(state)
