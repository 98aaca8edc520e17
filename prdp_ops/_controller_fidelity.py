r"""The fidelity rule's arithmetic: its tolerance, its extrapolated signal, its jump size.

Pure functions of scalars and the rule's hyperparameters (any object with the attributes
``fidelity_tol``, ``fidelity_power`` and ``growth``), used by
:func:`prdp_ops._controller_rule.update`; the rule they serve is described, with its maths,
in :mod:`prdp_ops._controller`.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["MAX_GROWTH_POWER", "jump_factor", "predicted_fidelity", "tolerance"]

#: Largest factor one refinement of the fidelity rule may multiply ``k`` by, in powers of
#: ``growth``: the jump sized from the contraction estimate is capped at ``growth ** 3`` (8
#: with the default doubling), so that one noisy measurement cannot send ``k`` to its cap.
MAX_GROWTH_POWER = 3


def tolerance(hp: Any, ema: float, first_ema: float) -> float:
    """The fidelity rule's tolerance at a check: ``fidelity_tol * min(1, ema / first_ema) **
    fidelity_power`` (``fidelity_tol`` when ``first_ema`` is 0 or the power is 0)."""
    if hp.fidelity_power == 0 or first_ema <= 0:
        return hp.fidelity_tol
    return hp.fidelity_tol * min(1.0, ema / first_ema) ** hp.fidelity_power


def jump_factor(hp: Any, predicted: float, tol: float) -> float:
    r"""The fidelity rule's growth factor for one refinement, sized from the contraction rate.

    A solver contracting by :math:`\rho` per iteration leaves a gradient error
    :math:`\delta_k \approx \rho^k` of the gradient (the solve from zero gives
    :math:`\delta_0 = 1`), so one measurement estimates :math:`\ln\rho \approx \ln\delta_k / k`
    and the count that meets the tolerance, :math:`k^* = k \ln\varepsilon_n / \ln\delta_k`.
    The factor is :math:`k^*/k`, at least ``growth`` and at most ``growth ** 3``.
    """
    largest = hp.growth**MAX_GROWTH_POWER
    if predicted >= 1.0 or tol >= 1.0:
        return largest if predicted >= 1.0 else hp.growth
    return min(largest, max(hp.growth, math.log(tol) / math.log(predicted)))


def predicted_fidelity(fidelity: float, measured_ema: float | None, ema: float) -> float:
    r"""The fidelity extrapolated from its measurement to the current check.

    :math:`\delta` estimates the physics' share of the remaining error; the physics' part (the
    displacement of the optimum by the truncated solve) does not change while ``k`` does not,
    and the error it is a share of shrinks with the metric, so
    :math:`\hat\delta_n = \delta_m \max(1, e_m / e_n)` (capped at 2, the bound of
    :math:`\delta`), :math:`m` the check of the measurement. It never predicts below the
    measurement: a rising metric is not taken as a reason to trust the physics more.
    """
    if measured_ema is None or measured_ema <= 0 or ema <= 0:
        return fidelity
    return min(2.0, fidelity * max(1.0, measured_ema / ema))
