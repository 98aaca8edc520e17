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
    "summary",
    "train",
]


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
    parser.add_argument("--out", type=Path, default=None if plots else default_out(example),
                        help=f"where to write the PNG plot (default: {plots or '%(default)s'})")
    parser.add_argument("--quiet", action="store_true",
                        help=f"no per-{unit} progress lines on stderr")


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
    """

    init_state: Callable[[], Any]
    run_epoch: Callable[[Any, int, int, int], Any]
    validate: Callable[[Any], float]
    iterations_per_epoch: Callable[[int, int], int]
    epochs: int
    unit: str = "epoch"

    def warmup(self) -> None:
        """Compile everything once before the timed runs: one epoch at ``k = 1`` and a
        validation (``k`` is a traced value, so other counts reuse the compiled code)."""
        self.validate(self.run_epoch(self.init_state(), 0, 1, 1))


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


def train(trainer: Trainer, schedule: Any, label: str, *, progress: bool = True) -> RunResult:
    """Train for ``trainer.epochs`` epochs, asking ``schedule`` for the counts each epoch.

    The progress lines (stderr) show the controller's decision; a schedule with ``decides =
    False`` (the baseline) makes none, and its lines show none.
    """
    decides = getattr(schedule, "decides", True)
    state = trainer.init_state()
    records: list[EpochRecord] = []
    iterations = 0
    start = time.perf_counter()
    for epoch in range(trainer.epochs):
        k, k_adjoint = schedule.k, schedule.k_adjoint
        state = trainer.run_epoch(state, epoch, k, k_adjoint)
        iterations += trainer.iterations_per_epoch(k, k_adjoint)
        val_error = float(trainer.validate(state))  # a host float: waits for the epoch
        decision = schedule.update(val_error)
        if not decides:
            decision = None
        elapsed = time.perf_counter() - start
        records.append(EpochRecord(epoch, k, k_adjoint, val_error, iterations, decision,
                                   elapsed))
        if progress:
            shown = f"{decision:6s} " if decision is not None else ""
            print(f"[{label:8s}] {trainer.unit:5s} {epoch + 1:4d}/{trainer.epochs}  K={k:<4d} "
                  f"K_adj={k_adjoint:<4d} val={val_error:.4e}  iters={iterations:<9d} "
                  f"{shown}{elapsed:7.2f}s", file=sys.stderr, flush=True)
    wall = time.perf_counter() - start
    return RunResult(label, records[-1].val_error, iterations, wall, schedule.k, records,
                     state, trainer.unit)


def compare(trainer: Trainer, controller: Any, baseline_k: int,
            baseline_k_adjoint: int | None = None, *, with_baseline: bool = True,
            progress: bool = True) -> tuple[RunResult | None, RunResult]:
    """Train the converged baseline (optional) and PRDP, same seeds and epochs.

    Returns ``(baseline, prdp)``; ``baseline`` is ``None`` when ``with_baseline`` is False.
    """
    trainer.warmup()
    baseline = None
    if with_baseline:
        baseline = train(trainer, FixedSchedule(baseline_k, baseline_k_adjoint), "baseline",
                         progress=progress)
    prdp = train(trainer, controller, "prdp", progress=progress)
    return baseline, prdp


# ---------------------------------------------------------------------------- reporting


def _percent_saved(baseline: float, prdp: float) -> float | None:
    """``100 (1 - prdp / baseline)``, rounded; ``None`` (JSON null) when the baseline is 0."""
    return round(100.0 * (1.0 - prdp / baseline), 2) if baseline > 0 else None


def summary(example: str, baseline: RunResult | None, prdp: RunResult) -> dict[str, Any]:
    """The result dict printed as the example's final JSON line."""
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
