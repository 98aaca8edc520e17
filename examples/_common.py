"""Shared plumbing of the PRDP examples: command line, the training and compare harness.

The harness is split in two modules (examples/ is not a package; each example puts its
directory on ``sys.path`` and imports ``_common``):

* ``_common`` (this module) -- set-up (:func:`enable_x64`, :func:`add_common_arguments`,
  :func:`signal_functions`, :func:`rule_options`, :func:`default_out`, :func:`positive_int`),
  :class:`FixedSchedule`, :func:`converged_iterations`, the :class:`Trainer` description of a
  training problem, :class:`EpochRecord` and :class:`RunResult`, the fidelity signal
  (:func:`measure_fidelity`, :func:`search_start`), :func:`train`, :func:`compare` and the
  constants;
* ``_report`` -- reporting and the sweep: ``summary``, ``print_result_line``, ``make_figure``,
  ``plot_runs``, ``finish``, ``sweep_grid``, ``sweep`` and ``plot_sweep``. This module
  re-exports them (``_common.finish``, ``_common.sweep``, ...; see :func:`__getattr__` at its
  end), so the examples and tests keep one entry point.

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

Wall time is measured around the training loop (training plus the per-epoch validation both
runs do) after one warm-up call has compiled everything: the iteration count reaches the
jitted code as a traced integer, so neither run recompiles when ``K`` changes.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and linters; at run time see __getattr__ at the end
    from _report import (
        finish,
        make_figure,
        plot_runs,
        print_result_line,
        summary,
        sweep,
        sweep_grid,
    )

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
#: A fixed K is "sufficient" when its final metric is within this factor of the converged one
#: (used by the sweep, in ``_report``).
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
    Adam each coordinate is scaled by the reference's magnitude. The search takes the larger
    of this fidelity and the raw one (:func:`search_start`). ``--start-signal gradient``: the
    raw gradients only.
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
        search's fidelity compares besides the raw gradients, given two raw gradients
        (``signal_functions``'s ``start_views`` at the state's optimiser); ``None``: the raw
        gradients only.
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
    ``controller.starting``, the gradient fidelity at ``(k, k_adjoint)`` against
    ``(min(2k, k_max), min(2 k_adjoint, k_adjoint_max))`` goes to ``controller.start``: the
    larger of the raw gradients' fidelity and that of the trainer's ``start_views`` (the
    gradients as the optimiser will step on them). Each sees an error the other can miss: an
    optimiser that normalises each coordinate (Adam) does not see a coarse gradient that is
    a uniformly scaled-down copy of the reference (raw fidelity large, views' small), yet its
    state keeps the first gradient's magnitude; the raw norm does not see coordinates that
    are small but wrong, which such an optimiser steps on as much as the large ones (views'
    fidelity large, raw small).

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
        fidelity = po.gradient_fidelity(*gradients)
        if trainer.start_views is not None:
            fidelity = max(fidelity, po.gradient_fidelity(*trainer.start_views(state,
                                                                               *gradients)))
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


# ---------------------------------------------------------------------------- re-exports

#: The reporting and sweep functions that live in ``_report``; this module re-exports them so
#: that callers keep one entry point (``_common.finish``, ``_common.sweep``, ...).
_REPORT_NAMES = frozenset({"finish", "make_figure", "plot_runs", "plot_sweep",
                           "print_result_line", "summary", "sweep", "sweep_grid"})


def __getattr__(name: str) -> Any:
    """``_report``'s function ``name`` (PEP 562): the re-export, so that callers keep one entry
    point (``_common.finish``, ``_common.sweep``, ...).

    Looked up on first use, not imported at the bottom of this module: ``_report`` imports
    ``_common`` at its top, so an eager import fails (a partially initialised module) when
    ``_report`` is imported first, or when this file is loaded under another name (as the tests
    do) before ``_common`` is imported. Other names raise ``AttributeError``.
    """
    if name not in _REPORT_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    here = str(Path(__file__).resolve().parent)  # as the examples do: _report sits beside us
    if here not in sys.path:
        sys.path.insert(0, here)
    import _report

    return getattr(_report, name)


def __dir__() -> list[str]:
    """This module's names and the ones it re-exports from ``_report``."""
    return sorted(set(globals()) | _REPORT_NAMES)
