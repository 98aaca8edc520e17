r"""Scalar signals for the PRDP controller, computed from a training step's arrays.

The controller (:mod:`prdp_ops._controller`) reads plain scalars only. The functions here turn
what a training loop has -- gradients computed through ``k`` and through more solver
iterations -- into such a scalar, for any array backend: they use nothing but the arrays' own
arithmetic (``-``, ``*``, ``.sum()``) and ``float``, so NumPy, CuPy and JAX arrays (and
pytrees of them) all work without this module importing a backend.

Gradient fidelity
-----------------
With :math:`g_k` the gradient of the training loss through ``k`` iterations and
:math:`g_{k'}` the one through :math:`k' > k` (a more refined solve),

.. math::

    \delta_k = \frac{\lVert g_k - g_{k'} \rVert_2}
                    {\max(\lVert g_k \rVert_2,\ \lVert g_{k'} \rVert_2)} \in [0, 2],

the norms taken over all leaves of the gradient pytree together. For small differences this is
:math:`\lVert g_k - g_{k'} \rVert / \lVert g_{k'} \rVert` to first order; the maximum in the
denominator keeps it finite where either gradient vanishes (``0/0`` is 0: two zero gradients
agree). :math:`\delta_k = 1` where :math:`g_k = 0 \ne g_{k'}`: training has reached the
stationary point of the truncated physics, which converged physics does not share.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["gradient_fidelity"]


def _leaves(tree: Any) -> list[Any]:
    """The array leaves of a pytree of (nested) tuples, lists and dicts, in a fixed order."""
    if isinstance(tree, Mapping):
        return [leaf for key in sorted(tree, key=repr) for leaf in _leaves(tree[key])]
    if isinstance(tree, (tuple, list)):
        return [leaf for item in tree for leaf in _leaves(item)]
    return [tree]


def _sum_of_squares(x: Any) -> float:
    # |x|^2 summed in the array's own backend; abs() keeps complex leaves real.
    return float((abs(x) ** 2).sum()) if hasattr(x, "sum") else float(abs(x) ** 2)


def gradient_fidelity(gradient: Any, reference: Any) -> float:
    r"""Relative distance between a gradient and a more refined one (the controller's signal).

    Parameters
    ----------
    gradient : array or pytree of arrays
        :math:`g_k`: the gradient of the loss (normally on a validation batch) through ``k``
        solver iterations (forward ``k``, adjoint ``k_adjoint``).
    reference : array or pytree of arrays
        :math:`g_{k'}`: the same gradient through :math:`k' > k` iterations, e.g.
        :math:`k' = \min(2k, k_\text{max})`; same structure and shapes as ``gradient``.

    Returns
    -------
    float
        :math:`\lVert g_k - g_{k'} \rVert / \max(\lVert g_k \rVert, \lVert g_{k'} \rVert)`,
        in ``[0, 2]`` (0 when both are zero): pass it to
        ``PRDPController.update(loss, fidelity=...)``.

    Raises
    ------
    ValueError
        When the two do not have the same number of leaves or a leaf's shapes differ, or a
        gradient is not finite.
    """
    leaves, references = _leaves(gradient), _leaves(reference)
    if len(leaves) != len(references):
        raise ValueError(f"gradient_fidelity: gradient has {len(leaves)} leaves, reference "
                         f"{len(references)}; pass two gradients of the same parameters.")
    difference = norm = norm_ref = 0.0
    for index, (leaf, ref) in enumerate(zip(leaves, references, strict=True)):
        if getattr(leaf, "shape", ()) != getattr(ref, "shape", ()):
            raise ValueError(f"gradient_fidelity: leaf {index} has shape "
                             f"{getattr(leaf, 'shape', ())} in gradient but "
                             f"{getattr(ref, 'shape', ())} in reference.")
        difference += _sum_of_squares(leaf - ref)
        norm += _sum_of_squares(leaf)
        norm_ref += _sum_of_squares(ref)
    if not all(math.isfinite(v) for v in (difference, norm, norm_ref)):
        raise ValueError("gradient_fidelity: a gradient is not finite (NaN or inf); check the "
                         "training run for divergence.")
    scale = math.sqrt(max(norm, norm_ref))
    return 0.0 if scale == 0 else min(2.0, math.sqrt(difference) / scale)
