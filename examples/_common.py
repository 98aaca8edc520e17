"""Shared plumbing of the PRDP examples: command line, the compare harness, reporting.

Every example describes its training problem as a :class:`Trainer` (how to build a fresh
model, how to run one epoch at a given iteration count, how to validate) and hands it to
:func:`compare`, which trains twice in the same process with the same seeds and epochs:

* the **baseline**: a fixed, fully converged iteration count ``K_conv`` for every solve;
* **PRDP**: the count chosen by a :class:`prdp_ops.PRDPController` from the validation
  metric, checked once per epoch (once per gradient step where an example's unit is a step:
  :attr:`Trainer.unit`).

Solver work is accounted from the counts actually run: with ``rtol = atol = 0`` a solve with
``maxiter=K`` runs exactly ``K`` iterations, so an epoch's iterations are the number of solves
times the forward count plus the adjoint count (implicit adjoint: ``k_adjoint`` iterations of
the transposed solve; unrolled adjoint: a reverse sweep over the same ``K`` iterations;
``adjoint="none"``: nothing). Each example states what one epoch costs in
``Trainer.iterations_per_epoch``.

The controller's default rule (``rule="fidelity"``) also reads the *gradient fidelity*: when
the Trainer offers ``gradient`` (the loss gradient on a validation batch at given counts),
:func:`train` compares it at ``k`` with the one at ``k' = min(2k, k_max)`` after an epoch and
passes :func:`prdp_ops.gradient_fidelity` of the two to ``update``. The two extra gradients are
solver work, counted in PRDP's iterations. They are measured only when the controller asks
(``PRDPController.wants_fidelity``: at the first check at new counts, and where the rule's
extrapolation of the last measurement comes within a factor 2 of its tolerance), and again at
the same counts only while the signal's cumulative cost stays within :data:`SIGNAL_BUDGET`
(20%) of the training's.

Before the first step, while the controller's start search is open
(``PRDPController.starting``) and the Trainer offers ``raw_gradient``, :func:`train` measures
the raw gradient fidelity at the initial parameters at ``k`` against ``min(2k, k_max)`` and
passes it to ``PRDPController.start``, which raises ``k`` until it is at most the tolerance:
the count the first step runs with. Those gradients (each computed once: the search doubles
``k``, so one measurement's refined gradient is often the next one's coarse one) are counted
in PRDP's iterations too. ``--no-start-search`` skips the search (the ablation).
``--rule plateau`` runs the paper's rule instead (loss only, no extra gradients).

``--sweep`` trains fixed-``K`` runs over a grid of counts and PRDP in one process (the paper's
accuracy-versus-cost figure, :func:`sweep`), and reports ``k_sufficient``: the smallest fixed
``K`` whose final metric is within 5% of the converged run's -- the best fixed count chosen in
hindsight, the oracle PRDP is measured against.

Wall time is measured around the training loop (training plus the per-epoch validation both
runs do) after one warm-up call has compiled everything: the iteration count reaches the
jitted code as a traced integer, so neither run recompiles when ``K`` changes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "SIGNAL_BUDGET",
    "EpochRecord",
    "FixedSchedule",
    "RunResult",
    "Trainer",
    "add_common_arguments",
    "compare",
    "converged_iterations",
    "default_out",
    "enable_x64",
    "finish",
    "make_figure",
    "plot_runs",
    "positive_int",
    "print_result_line",
    "rule_options",
    "search_start",
    "signal_functions",
    "summary",
    "sweep",
    "sweep_grid",
    "train",
]

#: Largest fraction of training's solver iterations that the fidelity signal may spend.
SIGNAL_BUDGET = 0.2
#: A fixed K is "sufficient" when its final metric is within this factor of the converged one.
SUFFICIENT_RATIO = 1.05


# ---------------------------------------------------------------------------- set-up


def enable_x64() -> None:
    """Switch JAX to double precision (before any array is created).

    The examples compare errors down to ~1e-6 and a converged solve to a relative residual
    of 1e-8; single precision would blur both.
    """
    import jax

    jax.config.update("jax_enable_x64", True)


def add_common_arguments(parser: argparse.ArgumentParser, example: str, *,
                         plots: str | None = None, unit: str = "epoch") -> None:
    """Add the options every example shares: ``--full``, ``--compare``, ``--out``, ...

    Without ``--out`` the plot goes to ``out/<example>.png``. An example that names its plot
    after other flags passes ``plots``, the names it writes (for ``--help``), and sets
    ``args.out`` itself where it is ``None`` (see :func:`default_out`). ``unit`` is what one
    controller check follows: ``"epoch"``, or ``"step"`` (one gradient step), which names the
    count option ``--steps`` (``--epochs`` stays as an alias).
    """
    parser.add_argument("--full", action="store_true",
                        help="run at the paper's sizes (slow on a laptop CPU)")
    parser.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                        help="also train the converged fixed-K baseline (default: on)")
    if unit == "step":
        parser.add_argument("--steps", "--epochs", dest="epochs", type=int, default=None,
                            metavar="STEPS",
                            help="override the number of gradient steps (the controller "
                                 "checks after each; --epochs is an alias)")
    else:
        parser.add_argument("--epochs", type=int, default=None,
                            help="override the number of epochs (the controller checks after "
                                 "each)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data and initial weights")
    parser.add_argument("--rule", choices=("fidelity", "plateau"), default="fidelity",
                        help="PRDP's refinement rule: fidelity (default: refine while the "
                             "gradient at K differs from the one at 2K by more than 10%%) or "
                             "plateau (the paper's rule, on the validation metric alone)")
    parser.add_argument("--fidelity-tol", type=float, default=0.1,
                        help="the fidelity rule's tolerance (default 0.1, the library's; "
                             "other values only for the ablation in examples/RESULTS.md)")
    parser.add_argument("--fidelity-power", type=float, default=None,
                        help="the fidelity rule's tolerance shrinks as (metric / first "
                             "metric) ** power (default: the library's)")
    parser.add_argument("--growth", type=float, default=2.0,
                        help="the fidelity rule's growth factor of K per refinement "
                             "(default 2, the library's)")
    parser.add_argument("--signal", choices=("update", "gradient"), default="update",
                        help="what the fidelity compares at K and 2K: the optimiser's update "
                             "(default; for Adam, the per-coordinate normalised step) or the "
                             "raw gradient")
    parser.add_argument("--start-search", action=argparse.BooleanOptionalAction, default=True,
                        help="before the first step, choose the starting K from the raw "
                             "gradient fidelity at the initial parameters (default: on; "
                             "--no-start-search starts at k_min, for the ablation)")
    parser.add_argument("--start-signal", choices=("update", "gradient"), default="update",
                        help="what the start search compares at K and 2K: the optimiser's "
                             "update from a state primed with the 2K gradient (default; for "
                             "Adam, each coordinate at the reference's scale) or the raw "
                             "gradients")
    parser.add_argument("--sweep", action="store_true",
                        help="train fixed-K runs over a grid of K and PRDP, plot the final "
                             "metric against solver iterations, and report k_sufficient "
                             "(the smallest fixed K within 5%% of the converged metric)")
    parser.add_argument("--sweep-ks", type=lambda text: [int(v) for v in text.split(",")],
                        default=None, metavar="K1,K2,...",
                        help="the fixed counts of --sweep (default: about 8 counts, "
                             "geometrically spaced up to the converged one)")
    parser.add_argument("--out", type=Path, default=None if plots else default_out(example),
                        help=f"where to write the PNG plot (default: {plots or '%(default)s'})")
    parser.add_argument("--quiet", action="store_true",
                        help=f"no per-{unit} progress lines on stderr")


def signal_functions(args: argparse.Namespace, optimizer: Any, loss_fn: Callable[..., Any]
                     ) -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
    """``(signal, raw, start_views)``; the first two ``(params, opt_state, *loss_args) ->
    pytree``, the third ``(params, opt_state, gradient, reference) -> (view, reference_view)``.

    ``raw`` is the raw gradient of ``loss_fn`` (what the start search compares: an optimiser's
    first update carries no magnitude). ``signal`` is what the checks' fidelity compares:
    ``--signal update`` (default), the update the optimiser would make from that gradient at
    its current state (``optimizer.update(g, opt_state, params)``; the optimiser state itself
    is not changed) -- for plain gradient descent ``-lr g``, the gradient up to a constant; for
    Adam the per-coordinate normalised step, in which a coordinate with a small gradient
    counts as much as one with a large gradient, as it does in the step taken;
    ``--signal gradient``: the raw gradient (then ``signal is raw``).

    ``start_views`` is what the start search compares (``--start-signal update``, default):
    two raw gradients at the initial parameters as the optimiser would step on them from a
    state that has seen the reference once (``optimizer.update(reference, opt_state)``'s
    state). A fresh optimiser's own first update carries no magnitude (Adam's is
    ``sign(g)``), but the state that first gradient leaves behind does: Adam's second-moment
    average keeps ``g_1**2`` per coordinate for about ``1 / (1 - b2)`` steps, so a coordinate
    whose first gradient the coarse physics got wrong steps at the wrong scale for most of the
    run (measured on the 127^2 Poisson inverse problem: one first step at ``K = 16`` ends the
    400-step run 19x behind, at ``K = 32`` 1.04x, though the raw gradients' fidelity at 16 is
    0.086). Primed with the reference, a coordinate counts as much as the optimiser's step
    makes it count: for plain gradient descent the views are ``-lr g`` (the raw fidelity), for
    Adam each coordinate is scaled by the reference's magnitude. ``--start-signal gradient``:
    the raw gradients.
    """
    import jax

    grad_fn = jax.grad(loss_fn)
    raw = jax.jit(lambda params, opt_state, *rest: grad_fn(params, *rest))

    @jax.jit
    def start_views(params: Any, opt_state: Any, gradient: Any, reference: Any) -> Any:
        if args.start_signal == "gradient":
            return gradient, reference
        _, seen = optimizer.update(reference, opt_state, params)
        return (optimizer.update(gradient, seen, params)[0],
                optimizer.update(reference, seen, params)[0])

    if args.signal == "gradient":
        return raw, raw, start_views

    @jax.jit
    def update(params: Any, opt_state: Any, *rest: Any) -> Any:
        updates, _ = optimizer.update(grad_fn(params, *rest), opt_state, params)
        return updates

    return update, raw, start_views


def rule_options(args: argparse.Namespace) -> dict[str, Any]:
    """The controller's rule settings from ``--rule``, ``--fidelity-tol`` and ``--growth``."""
    options = {"rule": args.rule, "fidelity_tol": args.fidelity_tol, "growth": args.growth}
    if args.fidelity_power is not None:
        options["fidelity_power"] = args.fidelity_power
    return options


def default_out(name: str) -> Path:
    """``out/<name>.png``: where an example writes its plot unless ``--out`` says otherwise."""
    return Path("out") / f"{name}.png"


def positive_int(name: str, value: int | None, default: int) -> int:
    """``value`` (or ``default`` when ``None``), checked to be a positive int."""
    value = default if value is None else value
    if int(value) != value or value < 1:
        raise SystemExit(f"{name} must be a positive integer; got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------- schedules


class FixedSchedule:
    """The converged baseline's "schedule": one iteration count, never changed.

    It offers the controller's interface (``k``, ``k_adjoint``, ``update``) so both runs go
    through the same loop; ``decides = False`` tells the progress lines that its answer is no
    decision.
    """

    decides = False

    def __init__(self, k: int, k_adjoint: int | None = None) -> None:
        self.k = int(k)
        self.k_adjoint = self.k if k_adjoint is None else int(k_adjoint)

    def update(self, loss: float) -> str:
        """Ignore the loss: the baseline never refines."""
        return "hold"


def converged_iterations(residual_at: Callable[[int], float], rtol: float,
                         k_cap: int) -> int:
    """Smallest ``K <= k_cap`` whose relative residual ``residual_at(K)`` is ``<= rtol``.

    Doubling then bisection, assuming the residual falls with ``K`` (true for the
    contracting stationary iterations and, up to small wiggles, for Krylov methods).
    ``k_cap`` is returned when even ``k_cap`` iterations do not reach ``rtol``.
    """
    if residual_at(k_cap) > rtol:
        return k_cap
    low, high = 0, 1
    while high < k_cap and residual_at(high) > rtol:
        low, high = high, min(2 * high, k_cap)
    while high - low > 1:  # invariant: residual_at(low) > rtol >= residual_at(high)
        middle = (low + high) // 2
        if residual_at(middle) <= rtol:
            high = middle
        else:
            low = middle
    return high


# ---------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class Trainer:
    """One example's training problem, as the compare harness sees it.

    Attributes
    ----------
    init_state
        ``() -> state``: fresh model parameters and optimiser state, from a fixed seed (so
        both runs start identically).
    run_epoch
        ``(state, epoch, k, k_adjoint) -> state``: one epoch of training with ``k`` forward
        and ``k_adjoint`` adjoint iterations per solve.
    validate
        ``state -> float``: the validation metric; it must not depend on ``k``.
    iterations_per_epoch
        ``(k, k_adjoint) -> int``: solver iterations one epoch spends at these counts.
    epochs
        Number of epochs (= controller checks).
    unit
        What one "epoch" of ``run_epoch`` is, for progress lines and plots: ``"epoch"``, or
        ``"step"`` where it is a single gradient step.
    gradient
        ``(state, k, k_adjoint) -> pytree`` or ``None``: the gradient of the training loss
        with respect to the parameters on a validation batch, through ``k`` forward and
        ``k_adjoint`` adjoint iterations (the fidelity signal's input).
    gradient_iterations
        ``(k, k_adjoint) -> int``: solver iterations one ``gradient`` (or ``raw_gradient``)
        call spends.
    raw_gradient
        ``(state, k, k_adjoint) -> pytree`` or ``None``: the raw gradient of the training loss
        on the same batch (the start search's input; ``gradient`` may be an optimiser's
        update instead). ``None``: no start search.
    start_views
        ``(state, gradient, reference) -> (view, reference_view)`` or ``None``: what the start
        search's fidelity compares, given two raw gradients (``signal_functions``'s
        ``start_views`` at the state's optimiser); ``None``: the raw gradients themselves.
    """

    init_state: Callable[[], Any]
    run_epoch: Callable[[Any, int, int, int], Any]
    validate: Callable[[Any], float]
    iterations_per_epoch: Callable[[int, int], int]
    epochs: int
    unit: str = "epoch"
    gradient: Callable[[Any, int, int], Any] | None = None
    gradient_iterations: Callable[[int, int], int] | None = None
    raw_gradient: Callable[[Any, int, int], Any] | None = None
    start_views: Callable[[Any, Any, Any], tuple[Any, Any]] | None = None

    def warmup(self) -> None:
        """Compile everything once before the timed runs: one epoch at ``k = 1`` and a
        validation (``k`` is a traced value, so other counts reuse the compiled code)."""
        state = self.run_epoch(self.init_state(), 0, 1, 1)
        self.validate(state)
        if self.gradient is not None:
            self.gradient(state, 1, 1)
        if self.raw_gradient is not None and self.raw_gradient is not self.gradient:
            raw = self.raw_gradient(state, 1, 1)
            if self.start_views is not None:
                self.start_views(state, raw, raw)


@dataclasses.dataclass
class EpochRecord:
    """What one epoch did: the counts in effect, the check's metric and the decision (``None``
    for a schedule that makes none, the baseline's)."""

    epoch: int
    k: int
    k_adjoint: int
    val_error: float
    iterations: int
    decision: str | None
    elapsed_s: float
    fidelity: float | None = None


@dataclasses.dataclass
class RunResult:
    """The outcome of one training run."""

    label: str
    val_error: float
    solver_iterations: int
    wall_s: float
    k_final: int
    records: list[EpochRecord]
    final_state: Any = dataclasses.field(repr=False, default=None)
    unit: str = "epoch"
    signal_iterations: int = 0
    k_start: int | None = None
    start_fidelities: list[tuple[int, float]] = dataclasses.field(default_factory=list)


def _reference_count(count: int, cap: int | None) -> int:
    """The fidelity signal's refined count: ``2 * count``, capped."""
    return 2 * count if cap is None else min(2 * count, cap)


def measure_fidelity(trainer: Trainer, state: Any, k: int, k_adjoint: int,
                     k_max: int | None, k_adjoint_max: int | None) -> tuple[float | None, int]:
    """The gradient fidelity at ``(k, k_adjoint)`` against ``(min(2k, k_max), ...)`` and the
    solver iterations it cost; ``(None, 0)`` when both counts are at their caps."""
    import prdp_ops as po

    k_ref = _reference_count(k, k_max)
    k_adjoint_ref = _reference_count(k_adjoint, k_adjoint_max)
    if (k_ref, k_adjoint_ref) == (k, k_adjoint) or trainer.gradient is None:
        return None, 0
    fidelity = po.gradient_fidelity(trainer.gradient(state, k, k_adjoint),
                                    trainer.gradient(state, k_ref, k_adjoint_ref))
    cost = trainer.gradient_iterations(k, k_adjoint) + trainer.gradient_iterations(
        k_ref, k_adjoint_ref)
    return fidelity, cost


def search_start(trainer: Trainer, controller: Any, state: Any,
                 caps: tuple[int | None, int | None], *, label: str = "prdp",
                 progress: bool = True) -> tuple[int, list[tuple[int, float]]]:
    """Run the controller's start search at the initial ``state``: while
    ``controller.starting``, the raw gradient fidelity at ``(k, k_adjoint)`` against
    ``(min(2k, k_max), min(2 k_adjoint, k_adjoint_max))`` goes to ``controller.start``.

    Returns the solver iterations the search spent (each gradient computed once: the one at
    the refined counts is kept for the next measurement, whose coarse counts it often is) and
    the ``(k, fidelity)`` pairs measured.
    """
    import prdp_ops as po

    cache: dict[tuple[int, int], Any] = {}
    cost, measured = 0, []
    while controller.starting:
        counts = (controller.k, controller.k_adjoint)
        reference = (_reference_count(counts[0], caps[0]), _reference_count(counts[1], caps[1]))
        if reference == counts:  # nothing more refined to compare with (the controller ends
            break                # its search at the caps itself; this guards a loop)
        gradients = []
        for at in (counts, reference):
            if at not in cache:
                cache[at] = trainer.raw_gradient(state, *at)
                cost += trainer.gradient_iterations(*at)
            gradients.append(cache[at])
        if trainer.start_views is not None:
            gradients = trainer.start_views(state, *gradients)
        fidelity = po.gradient_fidelity(*gradients)
        cache = {reference: cache[reference]}
        measured.append((counts[0], fidelity))
        decision = controller.start(fidelity)
        if progress:
            print(f"[{label:8s}] start K={counts[0]:<4d} K_adj={counts[1]:<4d} fid="
                  f"{fidelity:.3f} -> {decision} (K={controller.k})", file=sys.stderr,
                  flush=True)
    return cost, measured


def train(trainer: Trainer, schedule: Any, label: str, *, progress: bool = True,
          start: bool = True) -> RunResult:
    """Train for ``trainer.epochs`` epochs, asking ``schedule`` for the counts each epoch.

    The progress lines (stderr) show the controller's decision; a schedule with ``decides =
    False`` (the baseline) makes none, and its lines show none. A controller with
    ``rule="fidelity"`` gets the gradient fidelity (when the trainer offers ``gradient``)
    after the epochs at which it asks for one (``wants_fidelity``), at the same counts again
    only while the signal's cumulative cost, counted in the run's iterations, stays within
    :data:`SIGNAL_BUDGET` of the training's. With ``start`` (default) and a Trainer that
    offers ``raw_gradient``, the controller's start search (:func:`search_start`) runs first,
    counted in the same iterations.
    """
    decides = getattr(schedule, "decides", True)
    wants_signal = (getattr(schedule, "rule", None) == "fidelity"
                    and trainer.gradient is not None)
    caps = (schedule.hyperparameters()["k_max"], schedule.hyperparameters()["k_adjoint_max"]
            ) if wants_signal else (None, None)
    state = trainer.init_state()
    records: list[EpochRecord] = []
    iterations = training = signal = 0
    measured_at: tuple[int, int] | None = None
    started = time.perf_counter()
    start_fidelities: list[tuple[int, float]] = []
    if (wants_signal and start and trainer.raw_gradient is not None
            and getattr(schedule, "starting", False)):
        signal, start_fidelities = search_start(trainer, schedule, state, caps, label=label,
                                                progress=progress)
    k_start = schedule.k
    for epoch in range(trainer.epochs):
        k, k_adjoint = schedule.k, schedule.k_adjoint
        state = trainer.run_epoch(state, epoch, k, k_adjoint)
        training += trainer.iterations_per_epoch(k, k_adjoint)
        val_error = float(trainer.validate(state))  # a host float: waits for the epoch
        fidelity = None
        if wants_signal:
            k_ref = _reference_count(k, caps[0])
            ka_ref = _reference_count(k_adjoint, caps[1])
            cost = trainer.gradient_iterations(k, k_adjoint) + trainer.gradient_iterations(
                k_ref, ka_ref)
            # Only when the rule asks (the first check at new counts, and where the
            # extrapolated fidelity nears the tolerance); again at the same counts only while
            # the budget allows.
            asked = getattr(schedule, "wants_fidelity", True)
            if asked and (k_ref, ka_ref) != (k, k_adjoint) and (
                    measured_at != (k, k_adjoint) or signal + cost <= SIGNAL_BUDGET * training):
                fidelity, cost = measure_fidelity(trainer, state, k, k_adjoint, *caps)
                signal += cost
                measured_at = (k, k_adjoint)
        decision = (schedule.update(val_error, fidelity=fidelity) if fidelity is not None
                    else schedule.update(val_error))
        if not decides:
            decision = None
        iterations = training + signal
        elapsed = time.perf_counter() - started
        records.append(EpochRecord(epoch, k, k_adjoint, val_error, iterations, decision,
                                   elapsed, fidelity))
        if progress:
            shown = f"{decision:6s} " if decision is not None else ""
            delta = f"fid={fidelity:.3f} " if fidelity is not None else ""
            print(f"[{label:8s}] {trainer.unit:5s} {epoch + 1:4d}/{trainer.epochs}  K={k:<4d} "
                  f"K_adj={k_adjoint:<4d} val={val_error:.4e}  iters={iterations:<9d} "
                  f"{delta}{shown}{elapsed:7.2f}s", file=sys.stderr, flush=True)
    wall = time.perf_counter() - started
    return RunResult(label, records[-1].val_error, iterations, wall, schedule.k, records,
                     state, trainer.unit, signal, k_start, start_fidelities)


def compare(trainer: Trainer, controller: Any, baseline_k: int,
            baseline_k_adjoint: int | None = None, *, with_baseline: bool = True,
            progress: bool = True, start: bool = True) -> tuple[RunResult | None, RunResult]:
    """Train the converged baseline (optional) and PRDP, same seeds and epochs.

    Returns ``(baseline, prdp)``; ``baseline`` is ``None`` when ``with_baseline`` is False.
    ``start``: run PRDP's start search (:func:`train`).
    """
    trainer.warmup()
    baseline = None
    if with_baseline:
        baseline = train(trainer, FixedSchedule(baseline_k, baseline_k_adjoint), "baseline",
                         progress=progress)
    prdp = train(trainer, controller, "prdp", progress=progress, start=start)
    return baseline, prdp


# ---------------------------------------------------------------------------- reporting


def _percent_saved(baseline: float, prdp: float) -> float | None:
    """``100 (1 - prdp / baseline)``, rounded; ``None`` (JSON null) when the baseline is 0."""
    return round(100.0 * (1.0 - prdp / baseline), 2) if baseline > 0 else None


def summary(example: str, baseline: RunResult | None, prdp: RunResult) -> dict[str, Any]:
    """The result dict printed as the example's final JSON line."""
    # The line's keys are fixed (scripts read it); the start count and the signal's share are
    # on the progress lines and in the RunResult.
    prdp_part = {"val_error": prdp.val_error, "solver_iterations": prdp.solver_iterations,
                 "wall_s": round(prdp.wall_s, 4), "k_final": prdp.k_final}
    if baseline is None:
        return {"example": example, "baseline": None, "prdp": prdp_part,
                "iterations_saved_pct": None, "time_saved_pct": None, "val_error_ratio": None}
    ratio = (round(prdp.val_error / baseline.val_error, 4) if baseline.val_error > 0
             else None)
    return {
        "example": example,
        "baseline": {"val_error": baseline.val_error,
                     "solver_iterations": baseline.solver_iterations,
                     "wall_s": round(baseline.wall_s, 4)},
        "prdp": prdp_part,
        "iterations_saved_pct": _percent_saved(baseline.solver_iterations,
                                               prdp.solver_iterations),
        "time_saved_pct": _percent_saved(baseline.wall_s, prdp.wall_s),
        "val_error_ratio": ratio,
    }


def print_result_line(result: dict[str, Any]) -> None:
    """Print the result as one JSON line on stdout (the example's last line of output)."""
    print(json.dumps(result), flush=True)


def make_figure(runs: Sequence[RunResult], title: str,
                extra: Callable[[Any], None] | None = None,
                k_counts: Callable[[int], dict[str, int]] | None = None) -> Any:
    """The figure :func:`plot_runs` writes (matplotlib must be importable).

    ``k_counts`` maps the controller's ``K`` to the iterations each kind of solve runs at
    that ``K`` (e.g. ``{"GMRES": ..., "CG": ...}`` where each solve is capped at its own
    converged count); the iteration-count panel then shows one line per solve and run instead
    of ``K`` alone. Iteration counts and the x axis get integer ticks.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    unit = runs[0].unit if runs else "epoch"
    panels = 4 if extra is not None else 3
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6), constrained_layout=True)
    styles = ("-", "--", ":", "-.")
    for run in runs:
        epochs = [r.epoch + 1 for r in run.records]
        (line,) = axes[0].semilogy(epochs, [r.val_error for r in run.records], label=run.label)
        colour = line.get_color()
        if k_counts is None:
            axes[1].step(epochs, [r.k for r in run.records], where="post", label=run.label,
                         color=colour)
        else:
            per_solve = [k_counts(r.k) for r in run.records]
            for index, name in enumerate(per_solve[0]):
                axes[1].step(epochs, [counts[name] for counts in per_solve], where="post",
                             label=f"{run.label}: {name}", color=colour,
                             linestyle=styles[index % len(styles)])
        axes[2].plot(epochs, [r.iterations for r in run.records], label=run.label,
                     color=colour)
    axes[0].set(xlabel=unit, ylabel="validation metric", title="validation")
    axes[1].set(xlabel=unit, title="iteration count",
                ylabel="K (forward iterations)" if k_counts is None
                else "iterations per solve")
    axes[2].set(xlabel=unit, ylabel="solver iterations so far", title="solver work")
    for ax in axes[:3]:
        ax.legend()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].yaxis.set_major_locator(MaxNLocator(integer=True))
    if extra is not None:
        extra(axes[3])
    fig.suptitle(title)
    return fig


def plot_runs(path: Path, runs: Sequence[RunResult], title: str,
              extra: Callable[[Any], None] | None = None,
              k_counts: Callable[[int], dict[str, int]] | None = None) -> Path | None:
    """Write a PNG: validation metric, iteration count and cumulative solver iterations
    against the epoch (or step) for each run, plus an example-specific panel drawn by
    ``extra(ax)``; ``k_counts`` as in :func:`make_figure`.

    Returns the path, or ``None`` (with a note on stderr) when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
        return None
    fig = make_figure(runs, title, extra, k_counts)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def finish(example: str, baseline: RunResult | None, prdp: RunResult, out: Path, title: str,
           extra: Callable[[Any], None] | None = None,
           k_counts: Callable[[int], dict[str, int]] | None = None) -> dict[str, Any]:
    """Plot, print the JSON line, and return the summary (the tail of every ``main``)."""
    runs = [run for run in (baseline, prdp) if run is not None]
    written = plot_runs(out, runs, title, extra, k_counts)
    if written is not None:
        print(f"plot written to {written}", file=sys.stderr)
    result = summary(example, baseline, prdp)
    print_result_line(result)
    return result


# ---------------------------------------------------------------------------- the sweep


def sweep_grid(k_converged: int, k_min: int = 1, k_step: int = 1, count: int = 8) -> list[int]:
    """About ``count`` fixed counts from ``k_min`` to ``k_converged``, geometrically spaced
    on the ``k_min + j * k_step`` grid (the PRDP schedule's grid), ``k_converged`` included."""
    if k_converged <= k_min:
        return [k_converged]
    ratio = (k_converged / k_min) ** (1.0 / max(1, count - 1))
    ks = {k_converged}
    for index in range(count - 1):
        k = k_min * ratio**index
        ks.add(min(k_converged, k_min + k_step * round((k - k_min) / k_step)))
    return sorted(ks)


def sweep(example: str, trainer: Trainer, make_controller: Callable[[], Any],
          k_converged: int, ks: Sequence[int], out: Path, title: str, *,
          k_adjoint_of: Callable[[int], int] | None = None,
          progress: bool = True, start: bool = True) -> dict[str, Any]:
    """The paper's accuracy-versus-cost sweep: fixed-``K`` runs and PRDP, same seeds and epochs.

    Trains one run per count in ``ks`` (``k_converged`` is added: the converged reference)
    and one PRDP run from ``make_controller()``; ``k_sufficient`` is the smallest fixed ``K``
    whose final metric is at most :data:`SUFFICIENT_RATIO` times the converged run's (the
    oracle: the best fixed count chosen in hindsight), and PRDP's iterations and wall time are
    reported against that run's. Writes the figure to ``out`` (final metric against
    cumulative solver iterations and against wall time, PRDP marked), prints one JSON line
    and returns it as a dict.
    """
    trainer.warmup()
    ks = sorted(set(ks) | {k_converged})
    fixed = {}
    for k in ks:
        k_adjoint = k if k_adjoint_of is None else k_adjoint_of(k)
        fixed[k] = train(trainer, FixedSchedule(k, k_adjoint), f"K={k}", progress=progress)
    controller = make_controller()
    prdp = train(trainer, controller, "prdp", progress=progress, start=start)
    converged = fixed[k_converged].val_error
    k_sufficient = min(k for k in ks if fixed[k].val_error <= SUFFICIENT_RATIO * converged)
    oracle = fixed[k_sufficient]

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 4) if b > 0 else None

    result = {
        "example": example,
        "sweep": [{"k": k, "val_error": run.val_error, "solver_iterations": run.solver_iterations,
                   "wall_s": round(run.wall_s, 3)} for k, run in fixed.items()],
        "k_converged": k_converged,
        "k_sufficient": k_sufficient,
        "oracle": {"val_error": oracle.val_error, "solver_iterations": oracle.solver_iterations,
                   "wall_s": round(oracle.wall_s, 3)},
        "prdp": {"val_error": prdp.val_error, "solver_iterations": prdp.solver_iterations,
                 "signal_iterations": prdp.signal_iterations, "wall_s": round(prdp.wall_s, 3),
                 "k_final": prdp.k_final, "k_start": prdp.k_start,
                 "rule": getattr(controller, "rule", None)},
        "prdp_vs_oracle_iterations": ratio(prdp.solver_iterations, oracle.solver_iterations),
        "prdp_vs_oracle_wall": ratio(prdp.wall_s, oracle.wall_s),
        "prdp_vs_converged_iterations": ratio(prdp.solver_iterations,
                                              fixed[k_converged].solver_iterations),
        "val_error_ratio": ratio(prdp.val_error, converged),
    }
    written = plot_sweep(out, fixed, prdp, k_sufficient, k_converged, title)
    if written is not None:
        print(f"sweep plot written to {written}", file=sys.stderr)
    print_result_line(result)
    return result


def plot_sweep(path: Path, fixed: dict[int, RunResult], prdp: RunResult, k_sufficient: int,
               k_converged: int, title: str) -> Path | None:
    """Final metric against cumulative solver iterations and against wall time: the fixed-K
    runs as a labelled curve, PRDP as a star, the oracle ``k_sufficient`` circled and the
    5% band above the converged metric shaded. ``None`` when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
        return None
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.0), constrained_layout=True)
    converged = fixed[k_converged].val_error
    for ax, cost, label in ((axes[0], "solver_iterations", "cumulative solver iterations"),
                            (axes[1], "wall_s", "wall time [s]")):
        xs = [getattr(run, cost) for run in fixed.values()]
        ys = [run.val_error for run in fixed.values()]
        ax.loglog(xs, ys, "o-", color="tab:blue", label="fixed K")
        for k, x, y in zip(fixed, xs, ys, strict=True):
            ax.annotate(f"{k}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        oracle = fixed[k_sufficient]
        ax.plot(getattr(oracle, cost), oracle.val_error, "o", markersize=13,
                markerfacecolor="none", color="tab:green", label=f"k_sufficient = {k_sufficient}")
        ax.axhspan(converged, converged * SUFFICIENT_RATIO, color="tab:green", alpha=0.15,
                   label="within 5% of converged")
        ax.plot(getattr(prdp, cost), prdp.val_error, "*", markersize=15, color="tab:red",
                label=f"PRDP (final K = {prdp.k_final})")
        ax.set(xlabel=label, ylabel="final validation metric")
        ax.xaxis.set_minor_formatter(NullFormatter())  # log axes: label the decades only
        ax.legend(fontsize=7)
    fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
