r"""The PRDP controller: when to raise a solver's iteration count during training.

Progressively Refined Differentiable Physics (PRDP, Bhatia, Koehler and Thuerey, ICLR 2025)
trains through an iterative solver that runs only ``k`` iterations, and raises ``k`` only when
the physics, not the network or the optimiser, limits training. :class:`PRDPController` makes
that decision an object with plain Python state: it sees scalars once per *check* (normally
once per epoch) and answers ``"refine"``, ``"hold"`` or ``"stop"``. Two rules are available
by name: ``rule="fidelity"`` (the default) and ``rule="plateau"`` (the paper's).

The default rule: gradient fidelity (``rule="fidelity"``)
----------------------------------------------------------
Training minimises :math:`L_\infty(\theta)` (the loss through converged physics) but follows
:math:`g_k = \nabla L_k(\theta)`, the gradient through ``k`` solver iterations. At each check
the caller may pass the **gradient fidelity**

.. math::

    \delta_k = \frac{\lVert g_k - g_{k'} \rVert}
                    {\max(\lVert g_k \rVert, \lVert g_{k'} \rVert)} \in [0, 2],
    \qquad k' = \min(2k,\ k_\text{max}),

measured on a validation batch (:func:`prdp_ops.gradient_fidelity` computes it from the two
gradients; to first order it is :math:`\lVert g_k - g_{k'} \rVert / \lVert g_{k'} \rVert`, and
the maximum keeps it finite where a gradient vanishes). :math:`g_{k'}` stands in for
:math:`g_\infty`, whose distance from :math:`g_k` it underestimates by the factor
:math:`1 - \rho^k` of a solver contracting by :math:`\rho`.
Near a minimiser, with Hessian :math:`H`, the parameters' distance to the optimum is
:math:`H^{-1} g_\infty` and the displacement of the optimum caused by the truncated physics is
:math:`H^{-1}(g_\infty - g_k)`, so :math:`\delta_k` estimates *the share of the remaining
error that the physics causes* (exactly so in one parameter). That is the inexact-gradient
condition of bilevel optimisation (HOAG, Pedregosa 2016): the inner error must shrink with the
outer gradient. The rule keeps it below the tolerance :math:`\varepsilon_n` of check :math:`n`,
:math:`\varepsilon_n = \varepsilon\,\min(1, e_n / e_0)^p` with :math:`\varepsilon` =
``fidelity_tol``, :math:`p` = ``fidelity_power`` and :math:`e_n` the moving average of the loss
defined below (why it shrinks: further down).

*Between measurements* the rule extrapolates. While ``k`` stays, the displacement of the
optimum by the truncated physics, :math:`H^{-1}(g_\infty - g_k)`, stays too, but the error it is
a share of shrinks with the metric; a fidelity :math:`\delta_m` measured at check :math:`m` is
read at check :math:`n` as

.. math::

    \hat\delta_n = \min\!\big(2,\ \delta_m \max(1,\ e_m / e_n)\big)

(never below the measurement: a rising metric is no reason to trust the physics more). Without
it a measurement taken early at a level goes stale: in the inverse problems it held ``k`` for
tens of steps while the physics' share of the error grew tenfold.

- :math:`\hat\delta_n > \varepsilon_n`: **refine**, by a factor sized from the solver's
  contraction. A solve from zero contracting by :math:`\rho` leaves
  :math:`\delta_k \approx \rho^k` (:math:`\delta_0 = 1`), so one measurement estimates
  :math:`\ln\rho \approx \ln\hat\delta_n / k` and the count that meets the tolerance,
  :math:`k^* = k \ln\varepsilon_n / \ln\hat\delta_n`. The factor is
  :math:`f = \min(\gamma^3, \max(\gamma, k^*/k))` (:math:`\gamma^3` where
  :math:`\hat\delta_n \ge 1`), and
  :math:`k \leftarrow \min\big(k + s\,\max(1, \operatorname{round}((f - 1) k / s)),\
  k_\text{max}\big)` with :math:`s` = ``k_step`` and :math:`\gamma` = ``growth``: ``k`` stays on
  the :math:`k_\text{min} + j s` grid, grows at least geometrically (no 15-20 epoch detection
  lag per step), reaches the needed level in one refinement where the estimate holds, and one
  noisy measurement cannot send it further than :math:`\gamma^3` (8 by default). The adjoint
  count grows by the same factor with its own step and cap.
- :math:`\hat\delta_n \le \varepsilon_n`: **hold**; refining would change the gradient by less
  than :math:`\varepsilon_n` of itself. A plateau set by the network or the optimiser has a
  gradient that is large against the physics error, so it holds; a plateau set by the physics
  has :math:`g_k \to 0` while :math:`g_\infty` does not, so :math:`\delta_k \to 1` and it
  refines. In a problem with no floor but the physics, the error keeps falling and
  :math:`\hat\delta_n` keeps rising, so ``k`` follows it up to :math:`k_\text{max}`.

A measured fidelity decides from the first check (the warm-up below holds only the loss-only
fallback, which needs ``lookback`` averages). The fidelity costs solver work -- two gradients,
through ``k`` and ``k'`` -- so the rule asks for it only where it can change a decision
(:attr:`PRDPController.wants_fidelity`): at the first check at new counts, and when
:math:`\hat\delta` at the last check was above :math:`\varepsilon_n / 2`. A training loop
that measures only when asked pays for a few measurements per level instead of one per check.

The default :math:`\varepsilon = 0.1` follows from the target: with :math:`\delta_k \approx`
(physics share of the error), keeping the final validation metric within about 5% of the
converged baseline's asks for a share of a few percent at the end of training, and
:math:`\delta_k \le 0.1` holds the physics' share to ``~ 0.1`` of the error *while* training
and less once the optimiser's error shrinks. :math:`\gamma = 2` (doubling) bounds the overshoot
of a refinement the estimate does not size at a factor 2. The same values serve every example
in ``examples/``.

:math:`g` need not be the raw gradient: any step direction computed from it works, and the
examples pass the optimiser's update at its current state (for Adam the per-coordinate
normalised step, in which a coordinate with a small gradient counts as much as it does in the
step taken; for gradient descent the gradient up to a constant).

The tolerance shrinks with progress (default :math:`p = 1/2`). A gradient whose magnitude or
direction is off by a share :math:`\delta` slows the descent by about that share, so where the
metric keeps falling (no floor but the physics, an optimiser far from converged at the end)
the final metric is off by about :math:`\exp(\sum_n \delta_n r_n)`,
:math:`r_n = \ln(e_{n-1}/e_n)` the progress of check :math:`n`. With :math:`\hat\delta` growing
like :math:`1/e_n` at a fixed ``k``, each level left at :math:`\hat\delta \approx \varepsilon`
adds about :math:`\varepsilon` to that exponent, so a constant tolerance (:math:`p = 0`,
HOAG's condition at each check) lets the loss grow with the number of levels the run passes
while its metric falls. :math:`\varepsilon_n = \varepsilon\,\min(1, e_n/e_0)^p` bounds the sum
by :math:`\varepsilon / p` whatever the length of the run (HOAG's summable tolerances); the
rule refines once :math:`\delta_m e_m > \varepsilon e_n^{1+p} / e_0^p`. Where the network sets
the floor the metric falls a few e-folds after the first check and the tolerance stays within
a factor of a few of :math:`\varepsilon`. :math:`p = 1/2` is the smallest power measured (0,
1/4, 0.35, 1/2, 1) that keeps every configuration of ``examples/RESULTS.md`` within 5% of the
converged baseline; :math:`p = 0` saves about 20 points more on the emulators and ends the
Gauss-Seidel inverse problem (17 e-folds, three levels) 17% behind. With the start search
below, the default keeps the converged baseline's validation metric within 5% in all twelve
configurations measured there (0.90-1.04; the paper's rule in four) and saves 2-60% of the
solver iterations, its own signal included (the paper's rule 14-91%).

The fidelity given at a check is kept (and extrapolated) until the next refinement, after
which it describes other counts and is dropped: until the next measurement the rule holds
(``"awaiting signal"``). The rule never answers ``"stop"``. The ``residual`` signal and the
cap hold a due refinement as below.

Without any fidelity signal (``update(loss)`` only), the loss cannot tell a floor set by the
network from one set by the physics, and the rule errs on the side of accuracy: every plateau
(as defined below) refines geometrically, and none stops. That costs more iterations than the
paper's rule where the network sets the floor, but never stalls below the ``k`` the problem
needs.

The start search (before the first training step)
--------------------------------------------------
An optimiser with memory pays for its first steps over the whole run: Adam's second-moment
average (:math:`\beta_2 = 0.999`, a memory of about 1000 steps) keeps the scale of the
gradients it saw first, so steps taken through too coarse physics cost accuracy that a
refinement at the next check does not recover (measured in ``examples/RESULTS.md``: on the
127 x 127 Poisson inverse problem one first Adam step at ``k = 16`` ended the 400-step run 19x
behind the converged one, at ``k = 32`` 1.04x). The rule therefore chooses the count *before*
the first step, at the initial parameters :math:`\theta_0`, from the raw gradients and, for
an optimiser that scales each coordinate (Adam, RMSProp, Adagrad), from the gradients *as it
will step on them*: its updates for :math:`g_k` and :math:`g_{k'}` from a state that has seen
the reference :math:`g_{k'}` once, so that every coordinate counts at the scale the optimiser
will give it; :math:`\delta_k(\theta_0)` is the larger of the two fidelities. (The
optimiser's own first update carries no magnitude -- Adam's is
:math:`\operatorname{sign}(g)` per coordinate, whose fidelity reads about 0 -- and the raw
gradients' norm is dominated by the largest coordinates, while the state the first step leaves
keeps the magnitude of every coordinate's first gradient: at ``k = 16`` above, the raw
fidelity read 0.086, Adam's primed update 0.96. Conversely the primed update does not see a
coarse gradient that is a uniformly scaled-down copy of the reference, which the raw fidelity
does.) Then

.. math::

    k_0 = \min\{\, k \in \{k_\text{min},\ \gamma k_\text{min},\ \gamma^2 k_\text{min}, \dots\}
    :\ \delta_k(\theta_0) \le \varepsilon \,\},

the powers of :math:`\gamma` = ``growth`` rounded onto the ``k_min + j k_step`` grid and
capped (the search ends at the caps). At :math:`\theta_0` the whole error lies ahead, and
:math:`\delta_k(\theta_0) \le \varepsilon` is the inexact-gradient condition of the checks
applied to the first step: the truncated physics gets at most a share :math:`\varepsilon` of
the gradient wrong. The search grows ``k`` by :math:`\gamma`, not by the contraction estimate:
with :math:`\gamma = 2` the next :math:`g_k` is the last :math:`g_{k'}`, so each step of the
search costs one new gradient, and the whole search about four gradients at :math:`k_0`.

The controller reads only the scalar; the caller runs the loop
(``while controller.starting: controller.start(fidelity)``, see :meth:`PRDPController.start`),
then trains with the rule above from the first check, which measures again at :math:`k_0`
(there with the optimiser's update, if that is what the caller passes). A caller that never
calls ``start`` gets the rule without it: the first :meth:`PRDPController.update` closes the
search. The paper's rule has no start search.

The paper's rule (``rule="plateau"``)
--------------------------------------
Let :math:`\ell_n \ge 0` be the loss of check :math:`n = 0, 1, \dots`.

Smoothing. A recursive exponential moving average, seeded with the first value,

.. math::

    e_0 = \ell_0, \qquad e_n = e_{n-1} + \alpha\,(\ell_n - e_{n-1}),
    \qquad \alpha = \frac{2}{w + 1},

with ``w = ema_window`` (``use_ema=False`` sets :math:`e_n = \ell_n`). Each :math:`e_n` is a
convex combination of losses, so it stays finite for any number of checks; the closed form
:math:`e_n = (1-\alpha)^n \ell_0 + \alpha \sum_j (1-\alpha)^{n-j} \ell_j` evaluated with
:math:`(1-\alpha)^{-j}` weights (as in the paper's code) overflows after about 2,000 values.
Only the last ``lookback`` averages are kept: the state is O(1) in the number of checks.

Plateau. With :math:`L` = ``lookback``, no decision is taken while :math:`n < L` (that is,
until more than :math:`L` values have been seen). From then on check :math:`n` is a plateau
when

.. math::

    \frac{e_n}{e_{n-L+1}} > \tau_\text{step},

so a rise of the average counts as a plateau too (``0/0`` is read as 1).

Checkpoint. On a plateau the average is compared with the checkpoint :math:`c`, the average
stored at the last refinement (:math:`c = +\infty` before the first one):

- :math:`e_n < \tau_\text{stop}\,c` (the last refinement paid off) or :math:`e_n > c`
  (training got worse at this level: the physics is too coarse): **refine**,
  :math:`k \leftarrow \min(k + k_\text{step}, k_\text{max})`, the adjoint count likewise with
  its own step and cap, and :math:`c \leftarrow e_n`;
- otherwise refinement has stopped paying off: **stop**. With ``latch=True`` (default) the
  controller answers ``"hold"`` at every later check and never changes ``k`` again; with
  ``latch=False`` it keeps testing later plateaus against the same checkpoint, as the paper's
  reference code does, and may refine again.

Two cases turn a due refinement into ``"hold"`` without touching the checkpoint (both rules):

- the **cap**: ``k`` and ``k_adjoint`` are both at their maxima (``capped=True`` in history);
- the **residual signal**: ``update(loss, residual=r)`` with ``residual_tol`` set and
  :math:`r \le` ``residual_tol`` means the solve at the current ``k`` already meets the
  tolerance, so more iterations would not change the physics the network sees
  (``converged_at_k=True`` in history and :attr:`PRDPController.solver_converged`). This is
  not latched: if a later check reports a residual above the tolerance, a plateau refines
  again.

Every other check answers ``"hold"``.

State, history and persistence
------------------------------
The rule is a pure function of validated hyperparameters and a plain O(1) state
(:mod:`prdp_ops._controller_rule`, after optax's ``reduce_on_plateau``). Besides that state the
controller keeps a **history** for plots (:mod:`prdp_ops._controller_history`): compact
columns of 50 bytes per check in memory, all checks by default or the last
``history_limit``. :meth:`PRDPController.state_dict` returns the O(1) resume state (under
1 kB) plus, unless ``include_history=False``, that history as JSON columns (about 50 bytes
per check, 65 with residuals); :meth:`PRDPController.load_state_dict` validates both, each
field and the history against the resume state (:mod:`prdp_ops._controller_state`).
The decisions after a load are the ones an uninterrupted run makes, with or without the
history.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prdp_ops._controller_base import ControllerReadout, logger
from prdp_ops._controller_history import History, cumulative_iterations
from prdp_ops._controller_rule import (
    DECISION_OF,
    Decision,
    as_signal,
    check_bool,
    check_int,
    init_state,
    make_hyperparameters,
    start_update,
    update,
)
from prdp_ops._controller_state import encode_state, parse_state

__all__ = ["PRDPController", "cumulative_iterations"]

# Checks that log nothing: most of them, so update() skips the call.
_QUIET_REASONS = frozenset({"warm-up", "no plateau", "stopped", "fidelity ok",
                            "awaiting signal"})


class PRDPController(ControllerReadout):
    r"""Progressive refinement of a solver's iteration count from a loss signal.

    See the module documentation (:mod:`prdp_ops._controller`) for the rule with its maths.
    Call :meth:`update` once per check (normally once per epoch, with a validation loss that
    does not depend on the iteration count) and run the solver with :attr:`k` forward and
    :attr:`k_adjoint` adjoint iterations until the next check.

    Parameters
    ----------
    rule : {"fidelity", "plateau"}, default "fidelity"
        The refinement rule (see the module documentation): ``"fidelity"`` refines while the
        gradient fidelity passed to :meth:`update` exceeds ``fidelity_tol`` (and on every
        plateau while none was ever passed); ``"plateau"`` is the paper's rule.
    k_min : int, default 1
        Initial forward iteration count (1 to 2**31 - 1, like every count and step).
    k_step : int, default 1
        Increment of the forward count at each refinement (>= 1).
    k_max : int or None, default None
        Cap of the forward count (>= ``k_min``); ``None`` for no cap.
    tau_step : float, default 0.98
        Plateau threshold: check ``n`` is a plateau when ``ema[n] / ema[n - lookback + 1]``
        exceeds it (> 0; values >= 1 require a rise).
    tau_stop : float, default 0.9
        Payoff threshold (0 < tau_stop <= 1): on a plateau, refine again only when the average
        fell below ``tau_stop`` times the checkpoint (or rose above the checkpoint).
    ema_window : int, default 6
        Window ``w`` of the moving average, ``alpha = 2 / (w + 1)`` (>= 1; 1 means no
        smoothing).
    lookback : int, default 3
        The plateau test compares the average with the one ``lookback - 1`` checks earlier
        (>= 2). No decision is taken before more than ``lookback`` values were seen.
    k_adjoint_min, k_adjoint_step, k_adjoint_max : int or None, default None
        Schedule of the adjoint (backward) iteration count. Each defaults to its forward
        counterpart, so with none given ``k_adjoint == k`` at all times. Both counts advance at
        the same refinements, each by its own step up to its own cap.
    latch : bool, default True
        Whether a "stop" is final. ``False`` keeps testing later plateaus, as the paper's
        reference code does.
    use_ema : bool, default True
        ``False`` tests the raw loss instead of its average (the paper's Poisson setting).
    residual_tol : float or None, default None
        When set, a ``residual`` passed to :meth:`update` at or below it marks the solve as
        converged at the current count, and a refinement that would be due is answered with
        ``"hold"`` instead.
    fidelity_tol : float, default 0.1
        Rule ``"fidelity"``: refine while the gradient fidelity exceeds it (> 0).
    fidelity_power : float, default 0.5
        Rule ``"fidelity"``: the tolerance at check ``n`` is ``fidelity_tol * min(1, ema_n /
        ema_0) ** fidelity_power`` (>= 0): it shrinks as the monitored metric falls, which
        bounds the accuracy lost over a run whose metric keeps falling; ``0`` keeps it
        constant (more savings where the network sets the floor, less accuracy where only the
        physics does; see the module documentation).
    growth : float, default 2.0
        Rule ``"fidelity"``: the least factor by which one refinement multiplies ``k`` (>= 1,
        rounded to whole ``k_step``\ s, at least one); the contraction estimate may take it up
        to ``growth ** 3``.
    history_limit : int or None, default None
        How many of the most recent checks :attr:`history` (and the saved history) keeps:
        ``None`` keeps all (about 50 bytes per check in memory), ``0`` none. It never changes
        a decision, so a state saved with another limit loads (its history cut to this one).

    Examples
    --------
    >>> import prdp_ops as po
    >>> controller = po.PRDPController(k_min=1, k_step=1, k_max=50)
    >>> while controller.starting:  # before the first step     # doctest: +SKIP
    ...     k_ref = min(2 * controller.k, 50)  # raw gradients at the initial params
    ...     controller.start(po.gradient_fidelity(raw_grad(params, controller.k),
    ...                                           raw_grad(params, k_ref)))
    >>> for epoch in range(n_epochs):                                   # doctest: +SKIP
    ...     params = train_one_epoch(params, maxiter=controller.k)
    ...     k_ref = min(2 * controller.k, 50)
    ...     fidelity = po.gradient_fidelity(val_grad(params, controller.k),
    ...                                     val_grad(params, k_ref))
    ...     decision = controller.update(validation_loss(params), fidelity=fidelity)
    """

    def __init__(
        self,
        k_min: int = 1,
        k_step: int = 1,
        k_max: int | None = None,
        tau_step: float = 0.98,
        tau_stop: float = 0.9,
        ema_window: int = 6,
        lookback: int = 3,
        *,
        k_adjoint_min: int | None = None,
        k_adjoint_step: int | None = None,
        k_adjoint_max: int | None = None,
        latch: bool = True,
        use_ema: bool = True,
        residual_tol: float | None = None,
        rule: str = "fidelity",
        fidelity_tol: float = 0.1,
        growth: float = 2.0,
        fidelity_power: float = 0.5,
        history_limit: int | None = None,
    ) -> None:
        self._hp = make_hyperparameters(
            k_min, k_step, k_max, tau_step, tau_stop, ema_window, lookback,
            k_adjoint_min=k_adjoint_min, k_adjoint_step=k_adjoint_step,
            k_adjoint_max=k_adjoint_max, latch=latch, use_ema=use_ema,
            residual_tol=residual_tol, rule=rule, fidelity_tol=fidelity_tol, growth=growth,
            fidelity_power=fidelity_power,
        )
        self._history_limit = (
            None if history_limit is None else check_int("history_limit", history_limit, 0)
        )
        self._state = init_state(self._hp)
        self._history = History(self._hp, self._history_limit)

    def start(self, fidelity: Any) -> Decision:
        r"""One measurement of the start search, before the first training step.

        While :attr:`starting` is ``True``, measure the gradient fidelity at the *initial*
        parameters, :math:`\delta_k = \lVert g_k - g_{k'} \rVert / \max(\lVert g_k
        \rVert, \lVert g_{k'} \rVert)` with :math:`k' = \min(2k, k_\text{max})`
        (:func:`prdp_ops.gradient_fidelity` of the raw loss gradients through :attr:`k` and
        :math:`k'` iterations; for Adam and other per-coordinate optimisers, the larger of that
        and the fidelity of its updates for :math:`g_k` and :math:`g_{k'}` from the state one
        step on :math:`g_{k'}` leaves -- not its first update, which carries no magnitude),
        and pass it here. Above ``fidelity_tol`` the counts grow by ``growth``
        (on their grids, capped) and the search goes on; at or below it, or at the caps, it
        ends and :attr:`k` is the count training starts with. See the module documentation.

        Parameters
        ----------
        fidelity : float or 0-d array
            The start fidelity at the current counts, finite and non-negative.

        Returns
        -------
        {"refine", "hold"}
            ``"refine"``: :attr:`k` (and :attr:`k_adjoint`) were raised. ``"hold"``: the search
            ended at the current counts (:attr:`starting` is now ``False``).

        Raises
        ------
        RuntimeError
            When the search is not open (after it ended, after the first :meth:`update`, or
            under ``rule="plateau"``, which has no start search).
        ValueError, TypeError
            For a fidelity that is not a finite, non-negative real scalar; the state is
            unchanged.

        Examples
        --------
        >>> controller = po.PRDPController(k_max=64)               # doctest: +SKIP
        >>> while controller.starting:                              # doctest: +SKIP
        ...     k, k_ref = controller.k, min(2 * controller.k, 64)
        ...     g, g_ref = grad(params, k), grad(params, k_ref)
        ...     _, seen = adam.update(g_ref, adam.init(params), params)  # primed state
        ...     controller.start(max(po.gradient_fidelity(g, g_ref), po.gradient_fidelity(
        ...         adam.update(g, seen, params)[0], adam.update(g_ref, seen, params)[0])))
        """
        if not self._state.searching:
            why = ("rule 'plateau' has no start search" if self._hp.rule == "plateau"
                   else "the search already ended" if self._state.checks == 0
                   else "training has begun (update() was called)")
            raise RuntimeError(
                f"PRDPController.start: the start search is not open ({why}). Call start() "
                f"only while controller.starting is True, before the first update()."
            )
        fidelity = as_signal("fidelity", fidelity, "start")
        self._state, decision = start_update(self._hp, self._state, fidelity)
        if decision == "refine":
            logger.info("PRDP start: fidelity %.4g above fidelity_tol -> k %d, k_adjoint %d",
                        fidelity, self.k, self.k_adjoint)
        return decision

    def update(self, loss: Any, residual: Any = None, fidelity: Any = None) -> Decision:
        """Record one check and decide the iteration counts until the next one.

        Parameters
        ----------
        loss : float or 0-d array
            The monitored metric, finite and non-negative (Python, NumPy or JAX scalar).
        residual : float or 0-d array, optional
            Relative residual (or residual norm) of the solve at the current ``k``; used only
            when the controller has a ``residual_tol``.
        fidelity : float or 0-d array, optional
            Gradient fidelity at the current counts, :math:`\\lVert g_k - g_{k'} \rVert /
            \\lVert g_{k'} \rVert` (see :func:`prdp_ops.gradient_fidelity`); read by rule
            ``"fidelity"``, ignored by ``"plateau"``. It need not be given at every check:
            the last one given since the last refinement is used.

        Returns
        -------
        {"refine", "hold", "stop"}
            ``"refine"``: :attr:`k` (and :attr:`k_adjoint`) were raised. ``"stop"``: a
            plateau where the last refinement no longer paid off. ``"hold"``: anything else.

        Raises
        ------
        ValueError, TypeError
            For a loss or residual that is not a finite, non-negative real scalar. The state
            is left exactly as it was.
        """
        loss = as_signal("loss", loss)
        residual = None if residual is None else as_signal("residual", residual)
        fidelity = None if fidelity is None else as_signal("fidelity", fidelity)
        # The rule is pure: nothing is committed until it returned, so a failure (or a bad
        # value above) never leaves the controller half-updated.
        check = self._state.checks
        self._state, record = update(self._hp, self._state, loss, residual, fidelity)
        self._history.append(record)
        if record.reason not in _QUIET_REASONS:
            self._log(check, record)
        return DECISION_OF[record.reason]

    # ------------------------------------------------------------------ persistence

    def state_dict(self, *, include_history: bool = True) -> dict[str, Any]:
        """Everything needed to resume exactly, as JSON-serialisable plain Python values.

        Parameters
        ----------
        include_history : bool, default True
            Also save :attr:`history` (the kept checks), as JSON columns of about 50 bytes per
            check. ``False`` saves only the resume state, whose size does not grow with the
            number of checks (under 1 kB); the decisions after a load are the same either way.

        Returns
        -------
        dict
            The hyperparameters (so that :meth:`load_state_dict` can refuse a state from a
            differently configured controller), the resume state, and ``"history"``: the
            columns, or ``None``. ``+inf`` (no checkpoint yet) is stored as ``None``. The layout
            is described in :mod:`prdp_ops._controller_state`.
        """
        include_history = check_bool("include_history", include_history)
        return encode_state(self.hyperparameters(), self._state,
                            self._history if include_history else None)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (possibly through ``json.dumps``/``loads``).

        The controller must have the same hyperparameters as the one that saved it
        (``history_limit`` may differ). Every field is validated, and the history against the
        resume state, before anything is changed; ``state`` is not modified or kept. States
        saved by earlier versions (a list of entry dicts as history) load too.

        Raises
        ------
        TypeError
            When ``state`` is not a mapping.
        ValueError
            When ``state`` is not a valid state of this controller, naming the field, what was
            received and what to do. A corrupt history can be dropped
            (``state["history"] = None``) without changing the decisions to come.
        """
        self._state, self._history = parse_state(state, self._hp, self._history_limit)
