"""The fidelity signal and the start search of the PRDP examples' harness.

The controller's default rule (``rule="fidelity"``) also reads the *gradient fidelity*: when
the Trainer offers ``gradient`` (the loss gradient on a validation batch at given counts),
``_common.train`` compares it at ``k`` with the one at ``k' = min(2k, k_max)`` after an epoch and
passes :func:`prdp_ops.gradient_fidelity` of the two to ``update``. The two extra gradients are
solver work, counted in PRDP's iterations. They are measured only when the controller asks
(``PRDPController.wants_fidelity``: at the first check at new counts, and where the rule's
extrapolation of the last measurement comes within a factor 2 of its tolerance), and again at
the same counts only while the signal's cumulative cost stays within :data:`SIGNAL_BUDGET`
(20%) of the training's.

Before the first step, while the controller's start search is open
(``PRDPController.starting``) and the Trainer offers ``raw_gradient``, :func:`search_start`
measures the fidelity at the initial parameters at ``k`` against ``min(2k, k_max)`` -- the
larger of the raw gradients' and of the optimiser's view of them (``Trainer.start_views``) --
and passes it to ``PRDPController.start``, which raises ``k`` until it is at most the tolerance:
the count the first step runs with. Those gradients (each computed once: the search doubles
``k``, so one measurement's refined gradient is often the next one's coarse one) are counted
in PRDP's iterations too. ``--no-start-search`` skips the search (the ablation).

"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["SIGNAL_BUDGET", "measure_fidelity", "reference_count", "search_start",
           "signal_functions"]

#: Largest fraction of training's solver iterations that the fidelity signal may spend.
SIGNAL_BUDGET = 0.2


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


def reference_count(count: int, cap: int | None) -> int:
    """The fidelity signal's refined count: ``2 * count``, capped."""
    return 2 * count if cap is None else min(2 * count, cap)


def measure_fidelity(trainer: Any, state: Any, k: int, k_adjoint: int,
                     k_max: int | None, k_adjoint_max: int | None) -> tuple[float | None, int]:
    """The gradient fidelity at ``(k, k_adjoint)`` against ``(min(2k, k_max), ...)`` and the
    solver iterations it cost; ``(None, 0)`` when both counts are at their caps."""
    import prdp_ops as po

    k_ref = reference_count(k, k_max)
    k_adjoint_ref = reference_count(k_adjoint, k_adjoint_max)
    if (k_ref, k_adjoint_ref) == (k, k_adjoint) or trainer.gradient is None:
        return None, 0
    fidelity = po.gradient_fidelity(trainer.gradient(state, k, k_adjoint),
                                    trainer.gradient(state, k_ref, k_adjoint_ref))
    cost = trainer.gradient_iterations(k, k_adjoint) + trainer.gradient_iterations(
        k_ref, k_adjoint_ref)
    return fidelity, cost


def search_start(trainer: Any, controller: Any, state: Any,
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
        reference = (reference_count(counts[0], caps[0]), reference_count(counts[1], caps[1]))
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
