"""The NumPy/CuPy loop driver, the tape it records, and the unrolled reverse sweep.

The same code drives NumPy and CuPy arrays: everything array-specific goes through the
``ops`` object. On CuPy, reading a residual norm back to the host synchronises the device,
so the convergence test can be made every ``check_every`` iterations instead of every one.

Tape memory (NumPy): what ``solver.record`` keeps through ``ops.keep``, and the cotangents the
reverse sweep keeps for A's deferred cotangent, are copied into blocks reused from one
unrolled solve to the next (:mod:`prdp_ops.backends._numpy_tape`), so repeated solves of one
shape do not page-fault fresh memory in on every call. A block is reused only once nothing
refers to any part of it. :func:`clear_tape_cache` frees the cached blocks,
:func:`set_tape_cache_limit` bounds them (default a quarter of physical memory,
:func:`tape_cache_limit`), and
:func:`cached_tape_bytes` reports them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from prdp_ops.backends._numpy_tape import (
    TapeArena,
    TapingOps,
    cached_tape_bytes,
    clear_tape_cache,
    set_tape_cache_limit,
    tape_cache_limit,
)

from prdp_ops._array_ops import ArrayOps, NumpyOps
from prdp_ops._operators.base import LinearOperator, add_cotangents
from prdp_ops._solution import (
    STAGNATION_DECREASE,
    STAGNATION_WINDOW,
    SolverError,
    SolveResult,
    Status,
)
from prdp_ops._solver.base import IterativeSolver, State
from prdp_ops._solver.contract import checked_init, checked_step, solver_label

__all__ = ["Monitor", "ReverseContext", "Run", "cached_tape_bytes", "clear_tape_cache",
           "run_solver", "set_tape_cache_limit", "tape_cache_limit", "unrolled_vjp"]

logger = logging.getLogger("prdp_ops")


class Run:
    """What :func:`run_solver` returns: the result, the final state and the tape."""

    def __init__(self, result: SolveResult, state: State, tape: list[Any] | None) -> None:
        self.result, self.state, self.tape = result, state, tape


def _host_norms(ops: ArrayOps, norms: list[Any]) -> np.ndarray:
    """Residual norms as one NumPy array, with one device-to-host transfer on GPUs."""
    if ops.name == "numpy":
        return np.asarray([float(v) for v in norms], dtype=np.float64)
    stacked = ops.xp.stack([ops.xp.asarray(v) for v in norms])
    return np.asarray(ops.to_host(stacked), dtype=np.float64)


def run_solver(
    solver: IterativeSolver,
    ops: ArrayOps,
    A: LinearOperator,
    b: Any,
    x0: Any,
    M: LinearOperator | None,
    *,
    maxiter: int,
    tol: float,
    stop_on_convergence: bool = True,
    callback: Callable[[Any], None] | None = None,
    keep_tape: bool = False,
    check_every: int = 1,
    on_failure: str = "warn",
) -> Run:
    """Run ``solver`` for at most ``maxiter`` iterations.

    The driver, not the solver, decides how the solve ended (:class:`Monitor`): a
    convergence claim of the solver's recurrence is confirmed on the true residual ``b - A
    x``, a non-finite residual or a breakdown stops the loop and keeps the last good state,
    and a residual that stopped decreasing ends a solve that has a tolerance.

    Parameters
    ----------
    tol
        Absolute residual tolerance, ``max(rtol ||b||, atol)``.
    stop_on_convergence
        False runs exactly ``maxiter`` iterations (the ``rtol = atol = 0`` case).
    keep_tape
        Record what the reverse sweep needs (``solver.record``) for each step; on NumPy
        ``record`` gets ops whose ``keep`` copies into reused tape memory.
    check_every
        Test convergence and failure every this many iterations (a host sync on GPUs).
        Steps past the point of convergence between two checks are not undone.
    on_failure
        "warn" (log a warning), "raise" (:class:`SolverError`) or "ignore", for the failure
        statuses (:attr:`Status.is_failure`). The result reports the failure in every case.
    """
    state = checked_init(solver, ops, A, b, x0, M)
    norms = [solver.residual_norm(ops, state)]
    tape: list[Any] | None = [] if keep_tape else None
    # What solver.record keeps through ops.keep goes into tape memory reused between solves
    # (NumPy only: CuPy has its own memory pool, JAX does not tape here).
    record_ops = (TapingOps(TapeArena(b.shape, b.dtype))
                  if keep_tape and type(ops) is NumpyOps else ops)
    monitor = Monitor(ops, A, b, tol, stop_on_convergence)
    iterations = 0
    status = monitor.start(ops.to_float(norms[0]), lambda: solver.iterate(ops, A, b, state, M))
    while status is Status.MAX_ITERATIONS and iterations < maxiter:
        # While taping, the step gets the taping ops too: its fresh_copy vectors are made in
        # tape memory, which record then keeps without a second copy.
        new_state = checked_step(solver, record_ops, A, b, state, M, iterations + 1)
        iterations += 1
        rnorm = solver.residual_norm(ops, new_state)
        norms.append(rnorm)
        checking = iterations % check_every == 0 or iterations == maxiter
        if checking:
            rnorm_value, broke = _read_back(solver, ops, new_state, rnorm)
            failure = (Status.NONFINITE if not np.isfinite(rnorm_value)
                       else Status.BREAKDOWN if broke else None)
            if failure is not None:
                # Keep the last good state: a NaN iterate would poison a training loop.
                status = failure
                break
        if tape is not None:
            tape.append(solver.record(record_ops, A, b, M, state, new_state))
        state = new_state
        if callback is not None:
            callback(solver.iterate(ops, A, b, state, M))
        if checking:
            status = monitor.update(iterations, rnorm_value,
                                    lambda s=state: solver.iterate(ops, A, b, s, M))
    x = solver.iterate(ops, A, b, state, M)
    status = monitor.finish(status, x, ops.to_float(norms[-1]))
    if status is Status.NONFINITE and not bool(ops.is_finite(x)):
        # The solver's residual hid a NaN (its recurrence masked it): x0 is the last
        # iterate known to be finite.
        x = x0
    result = SolveResult(
        x=x,
        converged=status is Status.CONVERGED,
        iterations=iterations,
        residual_norms=_host_norms(ops, norms),
        status=status,
        solver=solver_label(solver),
        true_residual_norm=monitor.true_norm,
    )
    report_failure(result, on_failure)
    return Run(result, state, tape)


class Monitor:
    """The driver's convergence rules, on host floats (NumPy and CuPy).

    * **Confirmation.** A solver's residual norm is usually a recurrence (CG's ``r' = r -
      alpha A p``), which drifts from ``b - A x`` by rounding and which GMRES's least-squares
      estimate gets wrong on singular systems. When it meets the tolerance, the driver
      computes ``||b - A x||`` (one product with ``A``). Met: converged. Not met: the loop
      goes on, and the next confirmation waits until the recursive residual has fallen
      another factor ``10``; if the true residual has not halved by then, the solve ends as
      :attr:`Status.PRECISION_LIMIT` (a tolerance under ``16 eps ||b||``) or
      :attr:`Status.INACCURATE`. The extra products are one per decade of recursive
      residual below the tolerance, at most.
    * **Stagnation.** With a tolerance set, a best residual norm that has not fallen by
      :data:`STAGNATION_DECREASE` (relative) over :data:`STAGNATION_WINDOW` iterations ends
      the solve as :attr:`Status.STAGNATED`: a huge ``maxiter`` does not run for hours.
    * **Non-finite values.** A NaN or inf true residual is :attr:`Status.NONFINITE`, also
      when the solver's own residual stayed finite; so is a non-finite ``x`` at the end.

    A fixed iteration count (``stop_on_convergence=False``) skips all three but the final
    finiteness check of ``x``: it costs no product with ``A``.
    """

    def __init__(self, ops: ArrayOps, A: LinearOperator, b: Any, tol: float,
                 stop_on_convergence: bool) -> None:
        self.ops, self.A, self.b, self.tol = ops, A, b, tol
        self.active = stop_on_convergence
        self.true_norm: float | None = None
        self._final_confirmed = False  # whether true_norm is that of the final x
        self._threshold = tol  # the recursive residual that triggers the next confirmation
        self._last_true = math.inf
        self._best = math.inf
        self._best_at = 0
        eps = float(np.finfo(np.result_type(b.dtype, np.float32)).eps)
        self._precision_floor = 16 * eps * float(ops.to_float(ops.norm(b)))

    def true_residual(self, x: Any) -> float:
        """``||b - A x||``, computed here (not by the solver), as a host float."""
        self.true_norm = self.ops.to_float(self.ops.norm(self.b - self.A.matvec(x)))
        return self.true_norm

    def start(self, rnorm0: float, iterate: Callable[[], Any]) -> Status:
        """The status before the first step (``iterate()`` gives ``x0``)."""
        if not math.isfinite(rnorm0):
            return Status.NONFINITE
        self._best = rnorm0
        return self.update(0, rnorm0, iterate)

    def update(self, iteration: int, rnorm: float, iterate: Callable[[], Any]) -> Status:
        """The status after a checked iteration with recursive residual norm ``rnorm``."""
        if not self.active:
            return Status.MAX_ITERATIONS
        if rnorm <= self._threshold:
            status = self._confirm(iterate(), rnorm)
            if status is not Status.MAX_ITERATIONS:
                return status
        if rnorm < self._best * (1 - STAGNATION_DECREASE):
            self._best, self._best_at = rnorm, iteration
        elif iteration - self._best_at >= STAGNATION_WINDOW:
            return Status.STAGNATED
        return Status.MAX_ITERATIONS

    def _confirm(self, x: Any, rnorm: float) -> Status:
        true = self.true_residual(x)
        self._final_confirmed = True  # unless the loop resumes below
        if not math.isfinite(true):
            return Status.NONFINITE
        if true <= self.tol:
            return Status.CONVERGED
        if true > 0.5 * self._last_true:
            return (Status.PRECISION_LIMIT if self.tol < self._precision_floor
                    else Status.INACCURATE)
        self._final_confirmed = False
        self._last_true = true
        self._threshold = rnorm / 10
        return Status.MAX_ITERATIONS

    def finish(self, status: Status, x: Any, rnorm: float) -> Status:
        """The final status: a fixed count is converged only at a zero residual; a solve
        with a tolerance reports the true residual of the ``x`` it returns (computed here
        unless a confirmation just did); a non-finite ``x`` is :attr:`Status.NONFINITE`
        whatever the solver's residual said."""
        if status is Status.MAX_ITERATIONS and not self.active:
            status = Status.CONVERGED if rnorm <= self.tol else status
        elif self.active and status is not Status.NONFINITE and not self._final_confirmed:
            # Every unconverged end with a tolerance reports ||b - A x|| of its x.
            if not math.isfinite(self.true_residual(x)):
                status = Status.NONFINITE
        if status is not Status.NONFINITE and not bool(self.ops.is_finite(x)):
            status = Status.NONFINITE
        return status


def zero_solution(solver: IterativeSolver, ops: ArrayOps, b: Any) -> Run:
    """The exact solution ``x = 0`` of ``A x = 0``, reported as converged in 0 iterations."""
    result = SolveResult(x=ops.xp.zeros_like(b), converged=True, iterations=0,
                         residual_norms=np.zeros(1), status=Status.CONVERGED,
                         solver=solver_label(solver), true_residual_norm=0.0)
    return Run(result, {"x": result.x}, [])


def _read_back(solver: IterativeSolver, ops: ArrayOps, state: State,
               rnorm: Any) -> tuple[float, bool]:
    """The residual norm and the breakdown flag as Python values: one device-to-host
    transfer on GPUs (both are read together), plain conversions on NumPy."""
    breakdown = solver.breakdown(ops, state)
    if ops.name == "numpy":
        return float(rnorm), bool(breakdown)
    xp = ops.xp
    both = ops.to_host(xp.stack([xp.asarray(rnorm, dtype=xp.float64),
                                 xp.asarray(breakdown, dtype=xp.float64)]))
    return float(both[0]), bool(both[1])


def report_failure(result: SolveResult, on_failure: str, what: str = "") -> None:
    """Apply the failure policy to a finished solve (never silent); ``what`` prefixes the
    message (e.g. "adjoint solve")."""
    if not result.status.is_failure or on_failure == "ignore":
        return
    message = f"{result.message} (after {result.iterations} iterations)"
    message = f"{what}: {message}" if what else message
    if on_failure == "raise":
        raise SolverError(message, result)
    logger.warning(message)


class ReverseContext:
    """Collects what a reverse sweep produces besides the state cotangents.

    Solvers' ``step_vjp``/``init_vjp`` call it for every use of ``A``, ``M`` and ``b``; the
    pairs ``(v, y_bar)`` of each ``y = A v`` are kept (when ``A`` has parameters) and turned
    into A's cotangent by one batched :meth:`LinearOperator.param_vjp_batch` at the end.
    """

    def __init__(self, ops: ArrayOps, A: LinearOperator, M: LinearOperator | None,
                 b: Any) -> None:
        self.ops, self.A, self.M = ops, A, M
        self._A_T = A.T
        self._M_T = M.T if M is not None else None
        self._track = bool(A.parameters())
        self._pairs: dict[str, list[tuple[Any, Any]]] = {}
        # The pairs live until A's cotangent is asked for (an n-vector or two per product):
        # in reused tape memory on NumPy, as the forward tape (no page faults).
        # (NumPy, a block solve's ColumnOps over NumPy included; not CuPy, whose memory pool
        # reuses device memory anyway.)
        self._arena = (TapeArena(b.shape, b.dtype)
                       if self._track and (type(ops) is NumpyOps
                                           or getattr(ops, "base", None).__class__ is NumpyOps)
                       else None)
        self.b_bar = ops.xp.zeros_like(b)

    def matvec_T(self, v: Any, y_bar: Any) -> Any:
        """Return ``A^T y_bar`` for a forward ``y = A v``, recording the pair."""
        self.record_pair(v, y_bar)
        return self._A_T.matvec(y_bar)

    def record_pair(self, v: Any, y_bar: Any, part: str = "full") -> None:
        """Record that ``y = A_part v`` received cotangent ``y_bar`` (no product computed)."""
        if self._track:
            if self._arena is not None:
                # Both live until A's cotangent is computed: v is usually a view of memory
                # held anyway (a tape row, GMRES's basis: adopt keeps it as is); a vector
                # the reverse step recomputed (BiCGSTAB's s, Jacobi's z) is copied, like
                # every y_bar.
                v = self._arena.adopt(v)
                y_bar = self._arena.keep(y_bar)
            self._pairs.setdefault(part, []).append((v, y_bar))

    def precond_T(self, z_bar: Any) -> Any:
        """Return ``M^T z_bar`` for a forward ``z = M r`` (M is a constant)."""
        return self._M_T.matvec(z_bar)

    def add_b(self, b_bar: Any) -> None:
        """Accumulate a contribution to b's cotangent."""
        self.b_bar = self.b_bar + b_bar

    def param_cotangents(self) -> dict[str, Any]:
        """A's parameter cotangents from every recorded pair."""
        xp = self.ops.xp
        total: dict[str, Any] = {}
        for part, pairs in self._pairs.items():
            X = xp.stack([v for v, _ in pairs])
            Y_bar = xp.stack([y for _, y in pairs])
            total = add_cotangents(total, self.A.param_vjp_batch(X, Y_bar, part))
        return total


def unrolled_vjp(
    solver: IterativeSolver,
    ops: ArrayOps,
    A: LinearOperator,
    b: Any,
    x0: Any,
    M: LinearOperator | None,
    run: Run,
    x_bar: Any,
) -> tuple[Any, dict[str, Any], Any]:
    """Reverse sweep through the iterations of ``run``: the exact derivative of the map
    ``(b, A, x0) -> x_K`` that the forward pass computed.

    Returns ``(b_bar, params_bar, x0_bar)`` where ``params_bar()`` computes A's parameter
    cotangents from the recorded pairs (deferred: it costs about a matvec per pair).
    """
    ctx = ReverseContext(ops, A, M, b)
    state_bar = solver.iterate_vjp(ops, A, b, M, run.state, x_bar, ctx)
    for record in reversed(run.tape):
        state_bar = solver.step_vjp(ops, A, b, M, record, state_bar, ctx)
    x0_bar = solver.init_vjp(ops, A, b, x0, M, state_bar, ctx)
    return ctx.b_bar, ctx.param_cotangents, x0_bar
