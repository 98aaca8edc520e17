"""Reporting and the sweep of the PRDP examples: the JSON result line, the plots, ``--sweep``.

The examples' harness is split in two modules (examples/ is not a package; each example puts
its directory on ``sys.path`` and imports ``_common``):

* ``_common`` -- set-up (command line, float64, the fidelity signal's functions), the
  :class:`_common.Trainer` description of a training problem, :func:`_common.train` and
  :func:`_common.compare` (baseline against PRDP), and the constants;
* ``_report`` (this module) -- what turns finished runs into output: :func:`summary` and
  :func:`print_result_line` (the example's final JSON line), :func:`make_figure` and
  :func:`plot_runs` (the PNG), :func:`finish` (the tail of every ``main``), and the sweep
  (:func:`sweep_grid`, :func:`sweep`, :func:`plot_sweep`).

The examples import this module beside ``_common`` (``_report.finish``, ``_report.sweep``);
it imports ``_common`` for the training it runs and the types it reports on.

The result line of a comparison has fixed keys (scripts read it): each run's final
validation metric, solver iterations and wall time, PRDP's final ``K``, and the iterations and
wall time PRDP saved against the converged baseline, in percent.

``--sweep`` trains fixed-``K`` runs over a grid of counts and PRDP in one process (the paper's
accuracy-versus-cost figure, :func:`sweep`), and reports ``k_sufficient``: the smallest fixed
``K`` whose final metric is within 5% of the converged run's -- the best fixed count chosen in
hindsight, the oracle PRDP is measured against.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# examples/ is not a package: _common sits beside this file (the examples put this directory
# on sys.path; the tests load this file by path, so make sure of it here).
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common

__all__ = [
    "finish",
    "make_figure",
    "plot_runs",
    "plot_sweep",
    "print_result_line",
    "summary",
    "sweep",
    "sweep_grid",
]


# ---------------------------------------------------------------------------- reporting


def _percent_saved(baseline: float, prdp: float) -> float | None:
    """``100 (1 - prdp / baseline)``, rounded; ``None`` (JSON null) when the baseline is 0."""
    return round(100.0 * (1.0 - prdp / baseline), 2) if baseline > 0 else None


def summary(example: str, baseline: _common.RunResult | None,
            prdp: _common.RunResult) -> dict[str, Any]:
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


def make_figure(runs: Sequence[_common.RunResult], title: str,
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


def plot_runs(path: Path, runs: Sequence[_common.RunResult], title: str,
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


def finish(example: str, baseline: _common.RunResult | None, prdp: _common.RunResult,
           out: Path, title: str, extra: Callable[[Any], None] | None = None,
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


def sweep(example: str, trainer: _common.Trainer, make_controller: Callable[[], Any],
          k_converged: int, ks: Sequence[int], out: Path, title: str, *,
          k_adjoint_of: Callable[[int], int] | None = None,
          progress: bool = True, start: bool = True) -> dict[str, Any]:
    """The paper's accuracy-versus-cost sweep: fixed-``K`` runs and PRDP, same seeds and epochs.

    Trains one run per count in ``ks`` (``k_converged`` is added: the converged reference)
    and one PRDP run from ``make_controller()``; ``k_sufficient`` is the smallest fixed ``K``
    whose final metric is at most :data:`_common.SUFFICIENT_RATIO` times the converged run's
    (the oracle: the best fixed count chosen in hindsight), and PRDP's iterations and wall time
    are reported against that run's. Writes the figure to ``out`` (final metric against
    cumulative solver iterations and against wall time, PRDP marked), prints one JSON line
    and returns it as a dict.
    """
    trainer.warmup()
    ks = sorted(set(ks) | {k_converged})
    fixed = {}
    for k in ks:
        k_adjoint = k if k_adjoint_of is None else k_adjoint_of(k)
        fixed[k] = _common.train(trainer, _common.FixedSchedule(k, k_adjoint), f"K={k}",
                                 progress=progress)
    controller = make_controller()
    prdp = _common.train(trainer, controller, "prdp", progress=progress, start=start)
    converged = fixed[k_converged].val_error
    k_sufficient = min(k for k in ks
                       if fixed[k].val_error <= _common.SUFFICIENT_RATIO * converged)
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


def plot_sweep(path: Path, fixed: dict[int, _common.RunResult], prdp: _common.RunResult,
               k_sufficient: int, k_converged: int, title: str) -> Path | None:
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
        ax.axhspan(converged, converged * _common.SUFFICIENT_RATIO, color="tab:green",
                   alpha=0.15, label="within 5% of converged")
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
