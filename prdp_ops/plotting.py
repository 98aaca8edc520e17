"""Plots of a PRDP run from :attr:`prdp_ops.PRDPController.history` (needs matplotlib).

The history may also be given as saved, ``PRDPController.state_dict()["history"]`` (columns);
either form is checked field by field before anything is drawn.

matplotlib is imported only when a plot is drawn, so ``import prdp_ops.plotting`` works
without it; install it with ``pip install prdp-ops[examples]``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from prdp_ops._controller import cumulative_iterations
from prdp_ops._controller_columns import ColumnError, plot_columns

__all__ = ["cumulative_iterations", "plot_prdp"]


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            "prdp_ops.plotting.plot_prdp needs matplotlib, which is not installed. Install it "
            "with `pip install prdp-ops[examples]` (or `pip install matplotlib`)."
        ) from error
    return plt


def _measured_totals(iterations_per_check: Sequence[Any], n_checks: int) -> list[float]:
    if len(iterations_per_check) != n_checks:
        raise ValueError(
            "plot_prdp: iterations_per_check must have one entry per check of the history "
            f"({n_checks}); received {len(iterations_per_check)}."
        )
    totals, total = [], 0.0
    for count in iterations_per_check:
        total += float(count)
        totals.append(total)
    return totals


def plot_prdp(
    history: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    *,
    baseline_k: int | None = None,
    solves_per_check: int = 1,
    include_adjoint: bool = False,
    iterations_per_check: Sequence[Any] | None = None,
    axes: Sequence[Any] | None = None,
    path: str | os.PathLike[str] | None = None,
    title: str | None = None,
) -> Any:
    """Draw a PRDP run: loss and EMA, the iteration count, and the iterations spent.

    Three panels over the checks (epochs): (1) loss and its moving average on a log scale,
    with refinements (triangles) and stops (crosses) marked; (2) the forward count ``k`` (and
    ``k_adjoint`` when it differs) in effect at each check; (3) cumulative solver iterations of
    the run against a fixed-count baseline.

    Parameters
    ----------
    history : sequence of dict, or dict
        :attr:`prdp_ops.PRDPController.history`, or ``state_dict()["history"]`` (the saved
        columns). With a ``history_limit``, or after a resume without the saved history, it
        starts later than check 0, and the iterations are counted from its first check.
    baseline_k : int, optional
        Iteration count of the fixed-count baseline to compare with (e.g. the count at which
        the solve converges). Not drawn when ``None``.
    solves_per_check : int, default 1
        Forward solves between two checks, used to turn counts into iterations (see
        :func:`cumulative_iterations`).
    include_adjoint : bool, default False
        Count the adjoint solves' iterations too (for the run and the baseline alike).
    iterations_per_check : sequence of numbers, optional
        Measured solver iterations of each check interval (e.g. summed
        ``SolveResult.iterations``); replaces the estimate from ``k`` for the PRDP curve.
    axes : sequence of three matplotlib Axes, optional
        Where to draw; a new figure with three stacked panels when ``None``.
    path : str or path-like, optional
        Save the figure there (format from the extension, e.g. ``.png``).
    title : str, optional
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
        The figure drawn on.

    Raises
    ------
    ImportError
        When matplotlib is not installed.
    ValueError
        For an empty or malformed history (naming the bad entry) or an
        ``iterations_per_check`` of the wrong length.
    """
    plt = _pyplot()
    try:
        columns = plot_columns(history)
    except ColumnError as error:
        raise ValueError(
            f"plot_prdp: {error.render('history', error.path)} {error.detail} Pass "
            "PRDPController.history or state_dict()['history'] unmodified."
        ) from None
    if not columns["check"]:
        raise ValueError("plot_prdp: history is empty; call PRDPController.update first.")
    if axes is None:
        figure, axes = plt.subplots(3, 1, figsize=(7.0, 8.0), sharex=True)
    else:
        if len(axes) != 3:
            raise ValueError(f"plot_prdp: axes must hold 3 Axes; received {len(axes)}.")
        figure = axes[0].figure
    _draw_losses(axes[0], columns)
    _draw_counts(axes[1], columns, include_adjoint)
    _draw_iterations(
        axes[2], history, columns, baseline_k=baseline_k, solves_per_check=solves_per_check,
        include_adjoint=include_adjoint, iterations_per_check=iterations_per_check,
    )
    axes[2].set_xlabel("check (epoch)")
    if title is not None:
        figure.suptitle(title)
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure


def _draw_losses(ax: Any, columns: Mapping[str, list[Any]]) -> None:
    checks, losses, emas = columns["check"], columns["loss"], columns["ema"]
    ax.plot(checks, losses, color="0.6", lw=1, label="loss")
    ax.plot(checks, emas, color="C0", lw=2, label="EMA")
    for decision, marker, color in (("refine", "^", "C2"), ("stop", "X", "C3")):
        marked = [i for i, made in enumerate(columns["decision"]) if made == decision]
        if marked:
            ax.scatter([checks[i] for i in marked], [emas[i] for i in marked], marker=marker,
                       color=color, s=50, zorder=3, label=decision)
    if all(loss > 0 for loss in losses):
        ax.set_yscale("log")
    ax.set_ylabel("monitored loss")
    ax.legend(loc="upper right", fontsize="small")


def _draw_counts(ax: Any, columns: Mapping[str, list[Any]], include_adjoint: bool) -> None:
    checks, forward, adjoint = columns["check"], columns["k"], columns["k_adjoint"]
    ax.step(checks, forward, where="post", color="C1", label="k (forward)")
    if include_adjoint or adjoint != forward:
        ax.step(checks, adjoint, where="post", color="C4", ls="--", label="k_adjoint")
        ax.legend(loc="upper left", fontsize="small")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("solver iterations per solve")


def _draw_iterations(
    ax: Any,
    history: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    columns: Mapping[str, list[Any]],
    *,
    baseline_k: int | None,
    solves_per_check: int,
    include_adjoint: bool,
    iterations_per_check: Sequence[Any] | None,
) -> None:
    checks = columns["check"]
    if iterations_per_check is None:
        spent = cumulative_iterations(
            history, solves_per_check=solves_per_check, include_adjoint=include_adjoint
        )
    else:
        spent = _measured_totals(iterations_per_check, len(checks))
    ax.plot(checks, spent, color="C0", lw=2, label="PRDP")
    if baseline_k is not None:
        per_check = solves_per_check * baseline_k * (2 if include_adjoint else 1)
        baseline = [per_check * (index + 1) for index in range(len(checks))]
        ax.plot(checks, baseline, color="k", ls="--", label=f"fixed k = {baseline_k}")
        saved = 1.0 - spent[-1] / baseline[-1]
        ax.set_title(f"{100 * saved:.0f}% of the baseline's iterations saved", fontsize="small")
    ax.set_ylabel("cumulative solver iterations")
    ax.legend(loc="upper left", fontsize="small")
