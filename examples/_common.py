"""Shared plumbing of the PRDP examples: command line, the training and compare harness.

The harness is split in three modules (examples/ is not a package; each example puts its
directory on ``sys.path`` and imports ``_common``):

* ``_common`` (this module) -- set-up (:func:`enable_x64`, :func:`add_common_arguments`,
  :func:`rule_options`, :func:`default_out`, :func:`positive_int`), :class:`FixedSchedule`,
  :func:`converged_iterations`, the :class:`Trainer` description of a training problem,
  :class:`EpochRecord` and :class:`RunResult`, :func:`train`, :func:`compare` and the
  constants;
* ``_signals`` -- the fidelity signal and the start search: ``signal_functions``,
  ``measure_fidelity``, ``search_start`` (imported here: ``_common.signal_functions`` and
  ``_common.search_start`` work);
* ``_report`` -- reporting and the sweep: ``summary``, ``print_result_line``, ``make_figure``,
  ``plot_runs``, ``finish``, ``sweep_grid``, ``sweep`` and ``plot_sweep`` (the examples
  import it beside this module).

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

The controller's default rule (``rule="fidelity"``) also reads the *gradient fidelity* and,
before the first step, runs its start search: :mod:`_signals` computes both (its docstring
says how), :func:`train` feeds them to the controller, and their solver work is counted in
PRDP's iterations. ``--rule plateau`` runs the paper's rule instead (loss only, no extra
gradients).

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
from typing import Any

# examples/ is not a package: _signals sits beside this file (the examples put this directory
# on sys.path; the tests load this file by path, so make sure of it here).
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from _signals import (
    SIGNAL_BUDGET,
    measure_fidelity,
    reference_count,
    search_start,
    signal_functions,
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
    "positive_int",
    "rule_options",
    "search_start",
    "signal_functions",
    "train",
]

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
            k_ref = reference_count(k, caps[0])
            ka_ref = reference_count(k_adjoint, caps[1])
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
