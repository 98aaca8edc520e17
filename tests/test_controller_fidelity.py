"""The default refinement rule (``rule="fidelity"``) and its signal, ``po.gradient_fidelity``.

Three kinds of checks:

* the rule's decisions on hand-made signal sequences (refine above ``fidelity_tol`` by the
  growth factor on the ``k_min + j * k_step`` grid, hold below it, drop a fidelity measured at
  older counts, refine on every plateau while no signal was ever given, never stop), its
  validation and its exact resume;
* the signal against a dense reference: Jacobi on an eigenvector of a 1D Laplacian, where the
  gradient through ``K`` iterations has a closed form, and the unrolled gradient computed by
  ``po.solve_vjp`` against ``np.linalg.solve``'s;
* two synthetic training problems with known answers, trained with the controller in the loop:
  one whose floor is set by the "network" (noise the model cannot fit: refining beyond a known
  ``K`` buys nothing, and the rule must stop near it), and one with no floor but the physics
  (the rule must reach the converged ``K`` before training ends, where the paper's rule
  stalls).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import prdp_ops as po
from prdp_ops._controller_rule import growth_steps, next_count

# --------------------------------------------------------------------------- the rule


def test_default_rule_is_fidelity_with_one_setting():
    hyper = po.PRDPController().hyperparameters()
    assert (hyper["rule"], hyper["fidelity_tol"], hyper["growth"], hyper["fidelity_power"]) == (
        "fidelity", 0.1, 2.0, 0.5)


def test_refines_above_tolerance_geometrically_on_the_grid():
    controller = po.PRDPController(k_min=3, k_step=2, k_max=40, lookback=2)
    ks = []
    # A measured fidelity decides from the first check: the warm-up holds only the loss-only
    # fallback, which needs lookback averages to test a plateau.
    for _ in range(4):
        assert controller.update(1.0, fidelity=0.3) == "refine"
        ks.append(controller.k)
        assert controller.fidelity is None  # measured at the old count: dropped
    # 0.3 < sqrt(0.1): the contraction estimate ln(0.1) / ln(0.3) = 1.91 asks for less than
    # the growth factor, so k + 2 * max(1, round(k / 2)): 3 -> 7 -> 15 -> 31 -> 40 (the cap),
    # on the 3 + 2j grid.
    assert ks == [7, 15, 31, 40]
    assert controller.update(1.0, fidelity=0.9) == "hold"
    assert controller.history[-1]["reason"] == "at k_max"
    assert not controller.wants_fidelity  # nothing a measurement could change at the cap


def test_jump_is_sized_from_the_contraction_estimate():
    """delta_k ~ rho^k: one measurement gives k* = k ln(tol) / ln(delta_k), the jump's factor
    k* / k lies between growth and growth ** 3."""
    controller = po.PRDPController(k_min=10, k_max=10_000, lookback=2, use_ema=False,
                                   fidelity_power=0)
    assert controller.update(1.0, fidelity=0.5) == "refine"
    # ln(0.1) / ln(0.5) = 3.32: 10 + round(2.32 * 10) = 33
    assert controller.k == 33
    assert controller.update(1.0, fidelity=0.99) == "refine"
    # ln(0.1) / ln(0.99) = 229 > 8 = growth ** 3: 33 + round(7 * 33) = 264
    assert controller.k == 264
    assert controller.update(1.0, fidelity=2.0) == "refine"  # delta >= 1: the largest jump
    assert controller.k == 264 * 8
    assert controller.update(1.0, fidelity=0.11) == "refine"  # just above: at least growth
    assert controller.k == 264 * 16


def test_fidelity_is_extrapolated_as_the_metric_falls():
    """The physics' displacement of the optimum stays while k does; its share of the error
    grows as the metric falls: delta_n = delta_m * max(1, e_m / e_n), no new measurement."""
    controller = po.PRDPController(lookback=2, use_ema=False, fidelity_power=0)
    assert controller.update(1.0, fidelity=0.05) == "hold"
    assert controller.update(0.5) == "hold"     # 0.05 * 2 = 0.1 <= 0.1
    assert controller.history[-1]["reason"] == "fidelity ok"
    assert controller.update(0.49) == "refine"  # 0.05 / 0.49 = 0.102 > 0.1
    # A rising metric does not lower the measured value.
    rising = po.PRDPController(lookback=2, use_ema=False, fidelity_power=0)
    assert rising.update(1.0, fidelity=0.11) == "refine"
    assert rising.update(1.0, fidelity=0.09) == "hold"
    # 0.09 at 4.0 (not 0.09 / 4), and 0.09 / 0.85 = 0.106 > 0.1 once it falls below 0.9.
    assert rising.update(4.0) == "hold" and rising.update(0.85) == "refine"


def test_measurements_are_asked_for_only_where_they_can_change_a_decision():
    controller = po.PRDPController(lookback=2, use_ema=False, fidelity_power=0)
    assert controller.wants_fidelity  # nothing known at the first counts
    controller.update(1.0, fidelity=0.04)
    assert not controller.wants_fidelity  # 0.04 <= 0.1 / 2
    controller.update(0.8)
    assert not controller.wants_fidelity  # 0.04 / 0.8 = 0.05: not above 0.1 / 2
    controller.update(0.7)
    assert controller.wants_fidelity  # 0.04 / 0.7 = 0.057: within a factor 2 of 0.1
    controller.update(0.7, fidelity=0.2)  # refines: nothing known at the new counts
    assert controller.k == 2 and controller.wants_fidelity
    assert not po.PRDPController(rule="plateau").wants_fidelity


def test_holds_at_or_below_tolerance_and_waits_after_refining():
    controller = po.PRDPController(lookback=2, fidelity_tol=0.25, fidelity_power=0)
    got = [controller.update(1.0, fidelity=f) for f in (0.25, 0.25, 0.26)]
    assert got == ["hold", "hold", "refine"]
    # No new measurement at the new count: hold, whatever the loss does (no "stop" either).
    got = [controller.update(loss) for loss in (1.0, 1.0, 5.0, 5.0)]
    assert got == ["hold"] * 4
    assert [row["reason"] for row in controller.history[-4:]] == ["awaiting signal"] * 4
    # A fidelity given once is kept until the next refinement.
    assert controller.update(1.0, fidelity=0.1) == "hold"
    assert controller.fidelity == 0.1
    assert controller.update(1.0) == "hold"
    assert controller.history[-1]["reason"] == "fidelity ok"


def test_without_a_signal_every_plateau_refines_and_nothing_stops():
    # The paper's rule stops here (the second refinement did not pay off); the loss-only
    # fallback of the fidelity rule cannot tell why training plateaued, and refines.
    losses = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    plateau = po.PRDPController(rule="plateau", lookback=2, use_ema=False, latch=False)
    fallback = po.PRDPController(lookback=2, use_ema=False)
    assert [plateau.update(x) for x in losses] == ["hold", "hold", "refine", "stop", "stop",
                                                   "stop"]
    assert [fallback.update(x) for x in losses] == ["hold", "hold"] + ["refine"] * 4
    assert [row["k"] for row in fallback.history] == [1, 1, 1, 2, 4, 8]
    # No plateau, no refinement.
    falling = po.PRDPController(lookback=2, use_ema=False)
    assert [falling.update(0.5**n) for n in range(6)] == ["hold"] * 6


def test_residual_signal_holds_a_due_refinement():
    controller = po.PRDPController(lookback=2, residual_tol=1e-6)
    for _ in range(2):
        controller.update(1.0)
    assert controller.update(1.0, residual=1e-7, fidelity=0.9) == "hold"
    assert controller.history[-1]["reason"] == "solver converged"
    assert controller.update(1.0, residual=1e-3) == "refine"


def test_plateau_rule_ignores_the_fidelity_signal():
    rng = np.random.default_rng(0)
    losses = np.abs(np.cumsum(rng.normal(size=60))) + 0.1
    with_signal = po.PRDPController(rule="plateau", lookback=2, use_ema=False, latch=False)
    without = po.PRDPController(rule="plateau", lookback=2, use_ema=False, latch=False)
    for loss in losses:
        assert with_signal.update(loss, fidelity=rng.uniform(0, 2)) == without.update(loss)
    assert with_signal.state_dict() == without.state_dict()


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"rule": "paper"}, ValueError, r"rule must be one of \['fidelity', 'plateau'\]"),
    ({"rule": 1}, TypeError, "rule must be one of"),
    ({"fidelity_tol": 0.0}, ValueError, "fidelity_tol"),
    ({"fidelity_tol": math.nan}, ValueError, "fidelity_tol"),
    ({"growth": 0.5}, ValueError, "growth must be >= 1"),
    ({"growth": "2"}, TypeError, "growth"),
])
def test_rule_settings_are_validated(kwargs, error, match):
    with pytest.raises(error, match=match):
        po.PRDPController(**kwargs)


@pytest.mark.parametrize("bad", [-0.1, math.inf, math.nan, "0.2", np.ones(2)])
def test_bad_fidelity_leaves_the_state_unchanged(bad):
    controller = po.PRDPController(lookback=2)
    controller.update(1.0, fidelity=0.3)
    before = controller.state_dict()
    with pytest.raises((TypeError, ValueError), match="fidelity"):
        controller.update(1.0, fidelity=bad)
    assert controller.state_dict() == before


def test_growth_one_refines_by_k_step():
    hp = po.PRDPController(growth=1.0, k_step=3)._hp
    assert [next_count(hp, k, 3, None) for k in (1, 4, 100)] == [4, 7, 103]
    assert growth_steps(10, 1, 2.0) == 10 and growth_steps(1, 5, 2.0) == 1


def _signal_run(controller, seed=0, checks=80):
    rng = np.random.default_rng(seed)
    decisions = []
    for n in range(checks):
        fidelity = rng.uniform(0, 0.3) if n % 3 else None
        decisions.append(controller.update(1.0 / (n + 1), fidelity=fidelity,
                                           residual=rng.uniform(0, 1e-3)))
    return decisions


@pytest.mark.parametrize("cut", [0, 1, 5, 17, 40])
@pytest.mark.parametrize("include_history", [True, False])
def test_resume_is_exact_mid_run(cut, include_history):
    settings = {"k_min": 2, "k_step": 3, "k_max": 90, "lookback": 2, "residual_tol": 5e-4}
    uninterrupted = po.PRDPController(**settings)
    expected = _signal_run(uninterrupted)
    rng = np.random.default_rng(0)
    first = po.PRDPController(**settings)
    signals = [(1.0 / (n + 1), rng.uniform(0, 0.3) if n % 3 else None, rng.uniform(0, 1e-3))
               for n in range(80)]
    got = [first.update(loss, fidelity=f, residual=r) for loss, f, r in signals[:cut]]
    state = json.loads(json.dumps(first.state_dict(include_history=include_history)))
    resumed = po.PRDPController(**state["hyperparameters"])
    resumed.load_state_dict(state)
    got += [resumed.update(loss, fidelity=f, residual=r) for loss, f, r in signals[cut:]]
    assert got == expected
    assert "refine" in expected  # the sequence exercises refinements
    if include_history:
        assert resumed.history == uninterrupted.history
        assert resumed.state_dict() == uninterrupted.state_dict()


def test_version_3_states_load_with_the_fidelity_given_at_the_last_check():
    """Version 3 did not save where the fidelity was measured: it loads as if at the last
    check (the harness's practice), and decides as a controller measured there does."""
    controller = po.PRDPController(lookback=2)
    assert controller.update(1.0, fidelity=0.5) == "refine"  # the level begins at check 1
    assert controller.update(0.9, fidelity=0.06) == "hold"   # measured at its first check
    state = json.loads(json.dumps(controller.state_dict(include_history=False)))
    old = {key: value for key, value in state.items()
           if key not in ("fidelity_ema", "level_start", "measured_check", "searching",
                          "start_k", "start_k_adjoint", "start_fidelity")}
    resumed = po.PRDPController(lookback=2)
    resumed.load_state_dict({**old, "version": 3})
    assert resumed.state_dict(include_history=False) == state
    for loss in (0.5, 0.45, 0.2):
        assert resumed.wants_fidelity == controller.wants_fidelity
        assert resumed.update(loss) == controller.update(loss)


def test_measurements_back_off_while_a_level_holds():
    """Near the tolerance, a level held for N checks is measured O(log N) times: each time
    the checks since the last measurement reach half of those spent at the level."""
    controller = po.PRDPController(lookback=2, use_ema=False, fidelity_power=0)
    asked = []
    for _ in range(40):
        asked.append(controller.wants_fidelity)
        controller.update(1.0, fidelity=0.07 if asked[-1] else None)  # 0.07 in (0.05, 0.1]
    assert [n for n, a in enumerate(asked) if a] == [0, 1, 3, 7, 15, 31]
    assert controller.k == 1


def test_a_measurement_is_revised_after_a_decade_of_progress():
    """A fidelity that read ~0 extrapolates to ~0 however far the metric falls: once it fell
    tenfold since the measurement, the rule asks again (at most once per decade)."""
    controller = po.PRDPController(lookback=2, use_ema=False)
    controller.update(1.0, fidelity=0.0)
    asked = []
    for loss in (0.5, 0.2, 0.11, 0.1, 0.05):
        asked.append(controller.wants_fidelity)
        controller.update(loss)
    assert asked == [False, False, False, False, True]  # asked after the check at 0.1
    controller.update(0.05, fidelity=0.0)
    assert not controller.wants_fidelity  # the decade counts from the new measurement


def test_corrupt_fidelity_state_is_refused_by_name():
    controller = po.PRDPController(lookback=2)
    controller.update(1.0, fidelity=0.05)
    state = controller.state_dict()
    for field, value, match in (("fidelity", -1.0, r"state\['fidelity'\]"),
                                ("signal_seen", 1, r"state\['signal_seen'\]"),
                                ("fidelity_ema", None, r"state\['fidelity_ema'\]"),
                                ("fidelity_ema", -1.0, r"state\['fidelity_ema'\]"),
                                ("measured_check", None, r"state\['measured_check'\]"),
                                ("measured_check", 1, r"state\['measured_check'\]"),
                                ("level_start", 2, r"state\['level_start'\]")):
        bad = {**state, field: value}
        with pytest.raises(ValueError, match=match):
            po.PRDPController(lookback=2).load_state_dict(bad)
    with pytest.raises(ValueError, match=r"contradicts signal_seen"):
        po.PRDPController(lookback=2).load_state_dict({**state, "signal_seen": False})


def test_history_refuses_a_paper_reason_under_the_fidelity_rule():
    controller = po.PRDPController(lookback=2)
    for _ in range(4):
        controller.update(1.0, fidelity=0.5)
    state = json.loads(json.dumps(controller.state_dict()))
    state["history"]["reason"][3] = 2  # "improved": a reason of the paper's rule only
    with pytest.raises(ValueError, match="not one of rule 'fidelity'"):
        po.PRDPController(lookback=2).load_state_dict(state)


# --------------------------------------------------------------------------- the signal


def test_gradient_fidelity_definition_on_pytrees():
    g = {"w": np.array([3.0, 0.0]), "b": (np.array(4.0),)}
    ref = {"w": np.array([3.0, 1.0]), "b": (np.array(4.0),)}
    # |g - ref| = 1, max(|g|, |ref|) = sqrt(26)
    assert po.gradient_fidelity(g, ref) == pytest.approx(1 / math.sqrt(26), rel=1e-15)
    assert po.gradient_fidelity(g, g) == 0.0
    assert po.gradient_fidelity(np.zeros(3), np.zeros(3)) == 0.0
    assert po.gradient_fidelity(np.zeros(3), np.ones(3)) == 1.0  # stationary at K only
    assert po.gradient_fidelity(np.ones(3), -np.ones(3)) == 2.0  # the bound
    with pytest.raises(ValueError, match="leaves"):
        po.gradient_fidelity([np.ones(2)], [np.ones(2), np.ones(2)])
    with pytest.raises(ValueError, match="shape"):
        po.gradient_fidelity(np.ones(2), np.ones(3))
    with pytest.raises(ValueError, match="not finite"):
        po.gradient_fidelity(np.array([np.nan]), np.ones(1))


def test_gradient_fidelity_with_jax_arrays():
    jnp = pytest.importorskip("jax.numpy")
    g = {"w": jnp.array([3.0, 0.0]), "b": jnp.array(4.0)}
    ref = {"w": jnp.array([3.0, 1.0]), "b": jnp.array(4.0)}
    assert po.gradient_fidelity(g, ref) == pytest.approx(1 / math.sqrt(26), rel=1e-6)


def _jacobi_problem(n=30, theta=3.0, theta_ref=2.0):
    h = 1.0 / (n + 1)
    x = np.arange(1, n + 1) * h
    dense = (2 * np.eye(n) - np.eye(n, k=1) - np.eye(n, k=-1)) / h**2
    s = np.sin(2 * np.pi * x)
    u_ref = np.linalg.solve(dense, theta_ref * s)
    return dense, s, u_ref, theta, theta_ref, np.cos(2 * np.pi * h)


def _gradient_through(dense, s, u_ref, theta, k):
    """dL/dtheta of L = |u_K - u_ref|^2 / 2 through K unrolled Jacobi iterations (solve_vjp)."""
    result, vjp = po.solve_vjp(dense, theta * s, solver="jacobi", maxiter=k, rtol=0.0,
                               atol=0.0, adjoint="unrolled")
    return np.array([vjp(result.x - u_ref).b @ s])


@pytest.mark.parametrize("k", [5, 25, 80, 200])
def test_gradient_fidelity_against_dense_reference(k):
    """s is an eigenvector of A and of Jacobi's iteration matrix (eigenvalue g), so
    u_K = (1 - g^K) theta A^{-1} s and dL/dtheta = c_K (c_K theta - theta_ref) |A^{-1} s|^2
    with c_K = 1 - g^K; the converged gradient (c = 1) comes from a dense direct solve."""
    dense, s, u_ref, theta, theta_ref, g = _jacobi_problem()
    grad_k = _gradient_through(dense, s, u_ref, theta, k)
    v = np.linalg.solve(dense, s)
    u_inf = np.linalg.solve(dense, theta * s)
    grad_dense = np.array([(u_inf - u_ref) @ v])
    c = 1 - g**k
    closed = np.array([c * (c * theta - theta_ref) * (v @ v)])
    # Both gradients are sums of 30 terms of size ~|v|^2 computed in float64: agreement to a
    # few hundred ulps of the largest term.
    scale = np.abs(closed).max() + np.abs(grad_dense).max()
    assert np.abs(grad_k - closed).max() <= 1e-12 * scale
    delta = po.gradient_fidelity(grad_k, grad_dense)
    expected = abs(closed[0] - grad_dense[0]) / max(abs(closed[0]), abs(grad_dense[0]))
    assert delta == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # ... and through 2K iterations it approximates the dense one to first order in g^K.
    delta_2k = po.gradient_fidelity(grad_k, _gradient_through(dense, s, u_ref, theta, 2 * k))
    assert delta_2k == pytest.approx(expected, rel=3 * g**k + 1e-9, abs=1e-12)


# --------------------------------------------------------------------------- training problems


class ModeProblem:
    """A training problem with known answers, solved mode by mode.

    Parameters ``theta`` (one per mode) pass through "physics" that, after ``K`` iterations of
    a solver contracting mode ``i`` by ``rho_i``, scales it by ``c_i(K) = 1 - rho_i^K``. The
    training loss is ``|c(K) * theta - y|^2 / (2m)``; its minimiser ``y / c(K)`` is off by
    ``y rho^K / c(K)`` from the converged one, ``y``. The validation targets are ``y + sigma
    xi``: noise the model cannot fit (the "network's" floor, ``sigma^2 / 2`` in the metric
    ``|theta - y_val|^2 / (2m)``). With ``sigma = 0`` there is no floor but the physics.
    Plain gradient descent, ``steps`` steps per check.
    """

    def __init__(self, sigma, *, m=16, seed=0, lr=0.8, steps=5):
        rng = np.random.default_rng(seed)
        self.rho = rng.uniform(0.7, 0.9, m)
        self.y = rng.normal(size=m)
        self.y_val = self.y + sigma * rng.normal(size=m)
        self.m, self.lr, self.steps = m, lr, steps

    def c(self, k):
        return 1 - self.rho**k

    def train(self, theta, k):
        c = self.c(k)
        for _ in range(self.steps):
            theta = theta - self.lr * c * (c * theta - self.y)
        return theta

    def metric(self, theta):
        return float(np.sum((theta - self.y_val) ** 2) / (2 * self.m))

    def val_gradient(self, theta, k):
        c = self.c(k)
        return c * (c * theta - self.y_val) / self.m

    def run(self, schedule, checks, k_max):
        theta, ks = np.zeros(self.m), []
        for _ in range(checks):
            k = schedule.k
            ks.append(k)
            theta = self.train(theta, k)
            if isinstance(schedule, po.PRDPController) and schedule.rule == "fidelity":
                fidelity = po.gradient_fidelity(self.val_gradient(theta, k),
                                                self.val_gradient(theta, min(2 * k, k_max)))
                schedule.update(self.metric(theta), fidelity=fidelity)
            else:
                schedule.update(self.metric(theta))
        return self.metric(theta), ks


class Fixed:
    def __init__(self, k):
        self.k = k

    def update(self, loss):
        return "hold"


K_MAX = 200  # rho <= 0.9: 0.9^200 = 7e-10, converged for every purpose below
CHECKS = 120


def _k_sufficient(problem):
    """Smallest fixed K whose final metric is within 5% of the converged run's (the oracle)."""
    converged, _ = problem.run(Fixed(K_MAX), CHECKS, K_MAX)
    for k in range(1, K_MAX + 1):
        metric, _ = problem.run(Fixed(k), CHECKS, K_MAX)
        if metric <= 1.05 * converged:
            return k, converged
    raise AssertionError("unreachable: K_MAX is converged")


def test_floor_set_by_the_network_stops_near_the_sufficient_k():
    problem = ModeProblem(sigma=0.3)
    k_sufficient, converged = _k_sufficient(problem)
    controller = po.PRDPController(k_max=K_MAX, lookback=2)
    metric, ks = problem.run(controller, CHECKS, K_MAX)
    assert metric <= 1.05 * converged
    # Stops near the oracle: at most the growth factor (2) above it, far below K_MAX, and
    # more than 2.5 times cheaper than training converged throughout.
    assert ks[-1] <= 2 * k_sufficient < K_MAX / 4
    assert sum(ks) < CHECKS * K_MAX / 2.5


def test_no_floor_but_the_physics_reaches_the_converged_k():
    problem = ModeProblem(sigma=0.0)
    converged, _ = problem.run(Fixed(K_MAX), CHECKS, K_MAX)
    controller = po.PRDPController(k_max=K_MAX, lookback=2)
    metric, ks = problem.run(controller, CHECKS, K_MAX)
    # Every K short of convergence leaves a bias that the metric, falling geometrically with
    # converged physics, exposes: the rule must reach K_MAX, and early enough to match.
    assert ks.index(K_MAX) < CHECKS // 2
    assert metric <= 1.05 * converged
    # The paper's rule on the same problem stops refining: its metric is far off.
    plateau = po.PRDPController(rule="plateau", k_max=K_MAX, lookback=2, use_ema=False,
                                tau_step=0.92, latch=False)
    plateau_metric, plateau_ks = problem.run(plateau, CHECKS, K_MAX)
    assert plateau_ks[-1] < K_MAX and plateau_metric > 10 * converged


def test_tolerance_shrinks_with_the_metric_by_fidelity_power():
    """tol_n = fidelity_tol * min(1, ema_n / ema_0) ** fidelity_power: a fidelity of 0.05 is
    within 0.1 while the metric is at its start, and not once it fell fourfold (power 1/2:
    0.1 * (1/4) ** 0.5 = 0.05 is the boundary, so 0.051 refines)."""
    controller = po.PRDPController(lookback=2, use_ema=False, fidelity_power=0.5)
    assert [controller.update(1.0, fidelity=0.05) for _ in range(3)] == ["hold"] * 3
    assert controller.update(0.25, fidelity=0.05) == "hold"    # 0.05 <= 0.05
    assert controller.update(0.25, fidelity=0.051) == "refine"
    rising = po.PRDPController(lookback=2, use_ema=False, fidelity_power=0.5)
    # A metric above its first value does not loosen the tolerance beyond fidelity_tol.
    assert [rising.update(4.0 if n else 1.0, fidelity=0.09) for n in range(4)] == ["hold"] * 4
    with pytest.raises(ValueError, match="fidelity_power"):
        po.PRDPController(fidelity_power=-1)
