"""PRDPController persistence: O(1) resume state, bounded compact history, strict loading.

The rule itself is tested against an exact reference in test_controller.py; here the question
is whether a saved and restored controller is the same controller: the same decisions as an
uninterrupted run (with or without the history, with any history_limit), a state whose size
does not grow with the run unless the history is asked for, and a load that refuses every
corrupt field by name instead of passing it on to a plot.
"""

from __future__ import annotations

import copy
import functools
import json
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import prdp_ops as po
from prdp_ops._controller import cumulative_iterations

# These tests pin the paper's rule (rule="plateau"); the default rule, "fidelity", has its
# own tests in tests/test_controller_fidelity.py.
plateau_controller = functools.partial(po.PRDPController, rule="plateau")

# Covers every reason but "stopped" (which needs latch=True): see test_fixture_covers_reasons.
SETTINGS = {"k_max": 4, "k_adjoint_step": 2, "k_adjoint_max": 7, "lookback": 2,
            "use_ema": False, "latch": False, "residual_tol": 1e-3}
LOSSES = [4.0, 3.0, 2.97, 1.0, 0.995, 0.99, 0.985, 1.2, 1.3, 0.5, 0.499]
RESIDUALS = [1e-2] * 4 + [1e-4] + [1e-2] * 4 + [None, None]


def run(controller, losses, residuals=None):
    residuals = [None] * len(losses) if residuals is None else residuals
    return [controller.update(loss, residual=r) for loss, r in zip(losses, residuals,
                                                                    strict=True)]


def fixture_controller(**overrides):
    controller = plateau_controller(**{**SETTINGS, **overrides})
    run(controller, LOSSES, RESIDUALS)
    return controller


def long_losses(n):
    """A deterministic, non-monotone loss curve with plateaus, rises and refinements."""
    return [1.0 + 0.5 * ((i * 7919) % 13) / 13 + 1.0 / (1 + i) for i in range(n)]


def test_fixture_covers_reasons():
    reasons = [entry["reason"] for entry in fixture_controller().history]
    assert reasons == ["warm-up", "warm-up", "improved", "no plateau", "solver converged",
                       "improved", "no gain", "worsened", "at k_max", "no plateau", "at k_max"]


# --------------------------------------------------------------------------- size


def test_resume_state_is_o1_and_small():
    controller = plateau_controller(k_max=200)
    sizes = {}
    for n, loss in enumerate(long_losses(100_000), start=1):
        controller.update(loss)
        if n in (10, 100_000):
            sizes[n] = len(json.dumps(controller.state_dict(include_history=False)))
    assert controller.k > 1, "the run must have refined, or it tests little"
    assert sizes[100_000] < 1024
    # Only the digits of `checks` and of the counts may differ.
    assert abs(sizes[100_000] - sizes[10]) <= 8


def test_full_history_is_compact():
    controller = plateau_controller(k_max=200)
    run(controller, long_losses(100_000))
    text = json.dumps(controller.state_dict(), allow_nan=False)
    # One entry dict per check took ~280 bytes; two floats and three small ints take ~52.
    assert len(text) < 60 * 100_000


def test_history_limit_bounds_the_saved_state():
    controller = plateau_controller(k_max=200, history_limit=100)
    run(controller, long_losses(100_000))
    history = controller.history
    assert len(history) == 100
    assert history[0]["check"] == 100_000 - 100 and history[-1]["check"] == 100_000 - 1
    assert len(json.dumps(controller.state_dict())) < 100 * 60 + 1024


def test_history_limit_bounds_the_memory_held():
    # A pickle holds every stored column: with a limit, old entries must really be dropped
    # (in blocks), not only hidden from the views.
    limited, full = plateau_controller(history_limit=100), plateau_controller()
    losses = long_losses(100_000)
    run(limited, losses)
    run(full, losses)
    assert len(pickle.dumps(limited)) < 100_000  # at most 2 * 100 + 1024 entries of 50 bytes
    assert len(pickle.dumps(full)) > 50 * 100_000
    assert pickle.loads(pickle.dumps(limited)).history == limited.history
    loaded = plateau_controller(history_limit=100)
    loaded.load_state_dict(full.state_dict())  # a longer saved history is cut on load
    assert len(pickle.dumps(loaded)) < 100_000
    assert loaded.history == limited.history


@pytest.mark.parametrize("limit", [0, 1, 3, 1100])
def test_limited_history_is_the_tail_of_the_full_one(limit):
    # 3000 checks pass the block in which a limited history drops old entries (2 limit + 1024).
    losses = long_losses(3000)
    full, limited = plateau_controller(), plateau_controller(history_limit=limit)
    assert run(full, losses) == run(limited, losses)
    expected = full.history[len(losses) - limit:] if limit else []
    assert limited.history == expected
    assert cumulative_iterations(limited.history) == cumulative_iterations(expected)


# --------------------------------------------------------------------------- exact resume


hyperparameters = st.fixed_dictionaries(
    {"k_step": st.integers(1, 3), "tau_step": st.sampled_from([0.8, 0.95, 0.98, 1.0]),
     "tau_stop": st.sampled_from([0.6, 0.9, 1.0]), "ema_window": st.integers(1, 8),
     "lookback": st.integers(2, 4), "latch": st.booleans(), "use_ema": st.booleans()},
    optional={"k_max": st.integers(1, 6), "residual_tol": st.sampled_from([0.0, 1e-3])},
)
signals = st.lists(st.tuples(st.floats(1e-3, 1e3), st.sampled_from([None, 1e-4, 1e-2])),
                   min_size=1, max_size=40)


@settings(max_examples=80, deadline=None)
@given(params=hyperparameters, steps=signals, data=st.data())
def test_resume_equals_uninterrupted(params, steps, data):
    split = data.draw(st.integers(0, len(steps)), label="split")
    include_history = data.draw(st.booleans(), label="include_history")
    saved_limit = data.draw(st.sampled_from([None, 0, 1, 5]), label="saved_limit")
    loaded_limit = data.draw(st.sampled_from([None, 0, 2, 50]), label="loaded_limit")
    losses, residuals = [s[0] for s in steps], [s[1] for s in steps]

    uninterrupted = plateau_controller(**params)
    expected = run(uninterrupted, losses, residuals)
    first = plateau_controller(**params, history_limit=saved_limit)
    got = run(first, losses[:split], residuals[:split])
    saved = json.loads(json.dumps(first.state_dict(include_history=include_history),
                                  allow_nan=False))
    resumed = plateau_controller(**params, history_limit=loaded_limit)
    resumed.load_state_dict(saved)
    got += run(resumed, losses[split:], residuals[split:])

    assert got == expected
    assert (resumed.k, resumed.k_adjoint, resumed.checkpoint, resumed.ema, resumed.stopped) == (
        uninterrupted.k, uninterrupted.k_adjoint, uninterrupted.checkpoint, uninterrupted.ema,
        uninterrupted.stopped)
    # The history holds what was saved and kept, then everything since the load.
    kept = split if saved_limit is None else min(split, saved_limit)
    kept = kept if include_history else 0
    start = split - kept
    if loaded_limit is not None:
        start = max(start, len(steps) - loaded_limit)
    assert resumed.history == uninterrupted.history[start:]
    full_resume = resumed.state_dict(include_history=False)
    assert full_resume == {**uninterrupted.state_dict(include_history=False),
                           "hyperparameters": resumed.hyperparameters()}


def test_resume_from_saved_history_continues_the_plot_data():
    controller = fixture_controller()
    state = json.loads(json.dumps(controller.state_dict()))
    resumed = plateau_controller(**state["hyperparameters"])
    resumed.load_state_dict(state)
    assert resumed.history == controller.history
    assert resumed.state_dict() == controller.state_dict()
    assert cumulative_iterations(state["history"], include_adjoint=True) == (
        cumulative_iterations(controller.history, include_adjoint=True))


_ADDED_IN_3 = ("rule", "fidelity_tol", "growth", "fidelity_power")


def _without_first_ema(state):
    """Versions 1 and 2 did not save the first average (the paper's rule does not read it)."""
    return {key: value for key, value in state.items() if key != "first_ema"}


def _old_state(state, version, history):
    """``state`` as version 1 or 2 wrote it: no rule settings, no fidelity fields."""
    dropped = _ADDED_IN_3 + (("history_limit",) if version == 1 else ())
    hyper = {name: value for name, value in state["hyperparameters"].items()
             if name not in dropped}
    old = {key: value for key, value in state.items()
           if key not in ("fidelity", "signal_seen", "first_ema", "fidelity_ema", "level_start",
                          "measured_check", "searching", "start_k", "start_k_adjoint",
                          "start_fidelity")}
    return {**old, "version": version, "hyperparameters": hyper, "history": history}


def test_version_1_states_still_load():
    controller = fixture_controller()
    state = controller.state_dict()
    old = _old_state(state, 1, controller.history)
    hyper = {name: value for name, value in old["hyperparameters"].items()}
    resumed = plateau_controller(**hyper)
    resumed.load_state_dict(json.loads(json.dumps(old)))
    assert _without_first_ema(resumed.state_dict()) == _without_first_ema(state)
    old["history"][4]["decision"] = "refine"  # the reason says "solver converged": a hold
    with pytest.raises(ValueError, match=r"state\['history'\]\[4\]\['decision'\]"):
        plateau_controller(**hyper).load_state_dict(old)


def test_version_2_states_load_as_the_plateau_rule():
    """A state saved before ``rule`` existed was run by the paper's rule: it resumes exactly
    into ``rule="plateau"``, and a controller with the fidelity rule refuses it by name."""
    controller = fixture_controller()
    state = controller.state_dict()
    old = json.loads(json.dumps(_old_state(state, 2, state["history"])))
    assert "rule" not in old["hyperparameters"]
    resumed = po.PRDPController(**old["hyperparameters"], rule="plateau")
    resumed.load_state_dict(old)
    assert _without_first_ema(resumed.state_dict()) == _without_first_ema(state)
    for loss in (0.3, 0.2999, 0.29985):
        assert resumed.update(loss) == controller.update(loss)
    with pytest.raises(ValueError, match=r"differ from this controller's in \['rule'\]"):
        po.PRDPController(**old["hyperparameters"]).load_state_dict(old)


# --------------------------------------------------------------------------- strict loading


def _set(path, value):
    def tamper(state):
        target = state
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value
    return tamper


def _pop(path):
    def tamper(state):
        target = state
        for step in path[:-1]:
            target = target[step]
        del target[path[-1]]
    return tamper


H = "history"
BAD_STATES = [
    # The case: a string loss used to pass and break plot_prdp later.
    (_set((H, "loss", 3), "1.0"), r"\['loss'\]\[3\] must be a finite number >= 0; received '1.0'"),
    (_set((H, "loss", 0), float("nan")), r"\['loss'\]\[0\] must be a finite"),
    (_set((H, "loss", 1), -1.0), r"\['loss'\]\[1\]"),
    (_set((H, "loss", 1), True), r"\['loss'\]\[1\] .*\(bool\)"),
    (_set((H, "loss"), "oops"), r"\['history'\]\['loss'\] must be a list"),
    (_set((H, "ema", 2), float("inf")), r"\['ema'\]\[2\]"),
    (lambda s: s[H]["ema"].pop(), r"\['ema'\] must have 11 entries"),
    (_set((H, "residual", 0), "small"), r"\['residual'\]\[0\] must be .* or None"),
    (_set((H, "reason", 5), 12), r"\['reason'\]\[5\] must be a reason code 0\.\.11"),
    (_set((H, "reason", 5), 9), r"\['reason'\]\[5\] .*reason 'fidelity' is not one of rule "
                                r"'plateau'"),
    (_set((H, "reason", 5), 2.0), r"\['reason'\]\[5\]"),
    (_set((H, "reason", 5), "improved"), r"\['reason'\]\[5\]"),
    (_set((H, "plateau", 5), 2), r"\['plateau'\]\[5\] must be 0 or 1"),
    (_set((H, "k", 0), [1, 4]), r"\['k'\] run lengths must add up to the 11 checks"),
    (_set((H, "k", 0), [1, 0]), r"\['k'\]\[0\]\[1\] must be a run length"),
    (_set((H, "k", 0), [0, 3]), r"\['k'\]\[0\]\[0\] must be an iteration count"),
    (_set((H, "k", 0), [1, 10**12]), r"\['k'\] run lengths"),
    (_set((H, "k_adjoint", 1), 3), r"\['k_adjoint'\]\[1\] must be a \[value, run length\]"),
    (_set((H, "checkpoint", 1, 0), "2.97"), r"\['checkpoint'\]\[1\]\[0\]"),
    (_set((H, "first_check"), 1), r"\['first_check'\] the history covers checks 1 to 11"),
    (_set((H, "first_check"), -1), r"\['first_check'\] must be an integer >= 0"),
    (_set((H, "reasons"), ["hold"]), r"\['reasons'\] must be the legend"),
    (_pop((H, "plateau")), r"state\['history'\] must be a dict with the keys"),
    (_set((H,), [1, 2]), r"state\['history'\] must be a dict"),
    # Well-typed, but not what the rule produced:
    (_set((H, "k"), [[1, 4], [2, 2], [3, 2], [4, 3]]), r"\['k'\]\[2\] at check 2: k = 1 with "
                                                      r"decision 'refine' leaves k = 2, but the "
                                                      r"next entry has k = 1"),
    (_set((H, "k"), [[1, 3], [2, 3], [3, 2], [4, 2], [3, 1]]), r"\['k'\]\[9\]"),
    (_set((H, "reason", 3), 0), r"\['reason'\]\[3\] at check 3: reason 'warm-up'"),
    (_set((H, "reason", 0), 1), r"\['reason'\]\[0\] at check 0"),
    (_set((H, "plateau", 3), 1), r"\['plateau'\]\[3\] at check 3: plateau = 1 contradicts"),
    (_set((H, "residual", 4), 0.5), r"\['reason'\]\[4\] .*'solver converged' needs a residual"),
    (_set((H, "reason", 4), 5), r"\['reason'\]\[4\] .*'at k_max' while k or k_adjoint is below"),
    (_set((H, "reason", 9), 7), r"\['reason'\]\[9\] .*'stopped' needs latch=True"),
    (_set((H, "checkpoint", 2, 0), 0.5), r"\['checkpoint'\]\[\d+\] .*do not follow the refinem"),
    (_set((H, "ema", 10), 0.4), r"\['ema'\]\[10\] .*differ from the resume state's recent_emas"),
    # The resume state:
    (_set(("checks",), "11"), r"state\['checks'\] must be an integer >= 0; received '11'"),
    (_set(("checks",), 1), r"state\['recent_emas'\] must be a list of min\(checks, lookback\)"),
    (_set(("recent_emas", 0), "0.5"), r"state\['recent_emas'\]\[0\] must be a finite number"),
    (_set(("k",), 5), r"state\['k'\] = 5 exceeds its cap 4"),
    (_set(("k_adjoint",), 4), r"state\['k_adjoint'\] = 4 is not reachable from 1 in steps of 2"),
    (_set(("k",), 1.0), r"state\['k'\] must be an integer"),
    (_set(("checkpoint",), None), r"state\['checkpoint'\] = None contradicts k = 4"),
    (_set(("checkpoint",), -1.0), r"state\['checkpoint'\] must be a finite number >= 0"),
    (_set(("stopped",), 0), r"state\['stopped'\] must be True or False"),
    (_set(("solver_converged",), True), r"\['residual'\]\[10\] .*solver_converged = True"),
    (_set(("hyperparameters", "history_limit"), -1),
     r"state\['hyperparameters'\]\['history_limit'\] must be None or an integer >= 0"),
    (_set(("hyperparameters", "lookback"), 3), r"different|differ from this controller's in "
                                               r"\['lookback'\]"),
    (_pop(("hyperparameters", "latch")), r"state\['hyperparameters'\] must have the keys"),
    (_set(("format",), "torch"), r"unsupported format 'torch'"),
    (_set(("version",), True), r"unsupported format .* version True"),
    (_pop(("k",)), r"missing keys \['k'\]"),
]


@pytest.mark.parametrize(("tamper", "match"), BAD_STATES)
def test_every_corrupt_field_is_refused_by_name(tamper, match):
    state = json.loads(json.dumps(fixture_controller().state_dict()))
    tamper(state)
    fresh = plateau_controller(**SETTINGS)
    before = fresh.state_dict()
    original = copy.deepcopy(state)
    with pytest.raises(ValueError, match=match) as caught:
        fresh.load_state_dict(state)
    prefix, field = str(caught.value).split(" ")[:2]
    assert prefix == "PRDPController.load_state_dict:"
    # The message ends with what to do: drop a corrupt history, or save again.
    if field.startswith("state['history']"):
        assert "set state['history'] = None to resume without it" in str(caught.value)
    else:
        assert ("Pass a dict returned by PRDPController.state_dict()" in str(caught.value)
                or "PRDPController(**state['hyperparameters'])" in str(caught.value))
    assert fresh.state_dict() == before, "a refused state must change nothing"
    assert json.dumps(state) == json.dumps(original), "load_state_dict must not modify its input"


def test_a_corrupt_history_can_be_dropped_and_the_run_continues_exactly():
    losses = long_losses(60)
    uninterrupted = plateau_controller(k_max=20)
    expected = run(uninterrupted, losses)
    first = plateau_controller(k_max=20)
    got = run(first, losses[:30])
    state = json.loads(json.dumps(first.state_dict()))
    state["history"]["loss"][7] = "corrupt"
    resumed = plateau_controller(k_max=20)
    with pytest.raises(ValueError, match="history"):
        resumed.load_state_dict(state)
    state["history"] = None
    resumed.load_state_dict(state)
    assert got + run(resumed, losses[30:]) == expected
    assert resumed.history == uninterrupted.history[30:]


def test_history_limit_may_differ_on_load():
    state = fixture_controller().state_dict()
    short = plateau_controller(**SETTINGS, history_limit=3)
    short.load_state_dict(state)
    assert [entry["check"] for entry in short.history] == [8, 9, 10]
    longer = plateau_controller(**SETTINGS)
    longer.load_state_dict(short.state_dict())
    assert longer.history == short.history
    assert longer.hyperparameters()["history_limit"] is None


# --------------------------------------------------------------------------- arguments, plots


@pytest.mark.parametrize(("value", "error"), [(-1, ValueError), (1.5, TypeError),
                                              (True, TypeError)])
def test_bad_history_limit(value, error):
    with pytest.raises(error, match="history_limit"):
        plateau_controller(history_limit=value)


def test_include_history_must_be_a_bool():
    with pytest.raises(TypeError, match="include_history"):
        plateau_controller().state_dict(include_history="no")


def test_hyperparameters_round_trip_with_history_limit():
    controller = plateau_controller(k_max=9, history_limit=7)
    assert controller.hyperparameters()["history_limit"] == 7
    clone = plateau_controller(**controller.hyperparameters())
    assert clone.hyperparameters() == controller.hyperparameters()
    assert "history_limit=7" in repr(controller)


def test_cumulative_iterations_refuses_a_malformed_history():
    history = fixture_controller().history
    history[2]["k"] = "3"
    with pytest.raises(ValueError, match=r"history\[2\]\['k'\] must be an iteration count"):
        cumulative_iterations(history)


def test_plot_accepts_saved_columns_and_refuses_a_string_loss(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from prdp_ops.plotting import plot_prdp

    controller = fixture_controller()
    from_rows = plot_prdp(controller.history, baseline_k=4)
    from_columns = plot_prdp(controller.state_dict()["history"], baseline_k=4,
                             path=tmp_path / "columns.png")
    for rows_axes, columns_axes in zip(from_rows.axes, from_columns.axes, strict=True):
        for mine, theirs in zip(rows_axes.get_lines(), columns_axes.get_lines(), strict=True):
            assert list(mine.get_xdata()) == list(theirs.get_xdata())
            assert list(mine.get_ydata()) == list(theirs.get_ydata())
    history = controller.history
    history[2]["loss"] = "0.5"
    with pytest.raises(ValueError, match=r"plot_prdp: history\[2\]\['loss'\] must be a finite"):
        plot_prdp(history)
    columns = controller.state_dict()["history"]
    columns["reason"][3] = 99
    with pytest.raises(ValueError, match=r"plot_prdp: history\['reason'\]\[3\]"):
        plot_prdp(columns)
    plt.close("all")
