"""A block of right-hand sides on NumPy/CuPy: ``A X = B`` with ``B`` of shape ``(n, k)``.

The solvers are not rewritten for blocks. They are written over ``ops`` and ``A.matvec``, so
the same ``init``/``step``/``step_vjp`` run on a block when

* :class:`ColumnOps` returns one inner product per column (``vdot``, ``dot``, ``norm`` give
  shape ``(k,)``), and a ``(k,)`` step length broadcasts against the ``(n, k)`` vectors
  along their last axis: column ``j`` follows exactly the recurrence of a solve of ``b_j``;
* :class:`ColumnBlockOperator` turns ``matvec`` into ``matmat``: one sparse product (one
  stencil pass) for the ``k`` columns per iteration, which is where a block beats ``k``
  separate solves (one pass over ``A``'s entries instead of ``k``, and ``k`` times fewer
  Python-level steps).

Solvers opt in with :attr:`~prdp_ops.IterativeSolver.supports_column_blocks`; the others are
solved one column at a time (:func:`run_columns`).

Each column converges on its own. The driver applies the single-vector rules
(:class:`~prdp_ops.backends.numpy.Monitor`) column by column (:class:`ColumnMonitor`); a
column that has finished is *frozen*: the loop still steps the whole block (its shape is
fixed), and ``state <- where(keep, new, state)`` keeps a finished column's state. The tape
records the keep-mask of every step with a finished column, and the reverse sweep applies
the transpose of that select: a frozen column's cotangent passes through the step
unchanged, and what the discarded computation would contribute to ``b``'s and ``A``'s
cotangents is masked out (:class:`ColumnReverseContext`), so a NaN in a frozen column's
discarded step cannot reach the other columns' gradients.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from prdp_ops.backends._numpy_tape import TapeArena
from prdp_ops.backends.numpy import ReverseContext, run_solver

from prdp_ops._array_ops import ArrayOps, NumpyOps
from prdp_ops._operators.base import LinearOperator, add_cotangents
from prdp_ops._solution import (
    STAGNATION_DECREASE,
    STAGNATION_WINDOW,
    BlockSolveResult,
    SolverError,
    Status,
)
from prdp_ops._solver.base import IterativeSolver, State
from prdp_ops._solver.contract import checked_init, checked_step, solver_label

logger = logging.getLogger("prdp_ops")

__all__ = ["BlockRun", "ColumnBlockOperator", "ColumnMonitor", "ColumnOps",
           "ColumnReverseContext", "report_block_failure", "run_block", "run_columns",
           "unrolled_block_vjp"]


class ColumnOps(ArrayOps):
    """:class:`ArrayOps` for blocks of column vectors: reductions run down each column."""

    def __init__(self, base: ArrayOps, arena: TapeArena | None = None) -> None:
        super().__init__(base.xp)
        self.base = base
        self.name = base.name
        self.arena = arena

    def keep(self, a: Any) -> Any:
        # While a NumPy block solve records its tape: a copy into tape memory reused from one
        # solve to the next (as a single solve's, backends/_numpy_tape.py). An (n, k) block
        # is megabytes, which the allocator otherwise maps fresh, and page-faults in, on
        # every call.
        return a if self.arena is None else self.arena.keep(a)

    def vdot(self, a: Any, b: Any) -> Any:
        # ops.conj leaves real data alone (xp.conj would copy it).
        return self.dot(self.conj(a), b)

    def dot(self, a: Any, b: Any) -> Any:
        if a.ndim == 2 and b.ndim == 2:
            # One pass down the columns without an (n, k) temporary: 3x faster than
            # sum(a * b, axis=0) at n = 16384, k = 32.
            return self.xp.einsum("ij,ij->j", a, b)
        return self.xp.sum(a * b, axis=0)

    def solve_triangular(self, T: Any, rhs: Any, lower: bool) -> Any:
        return self.base.solve_triangular(T, rhs, lower)  # SciPy's take 2-D right-hand sides

    def cond(self, pred: Any, true_fn: Callable, false_fn: Callable, *operands: Any) -> Any:
        # Per column, as jax.vmap batches lax.cond: one branch when all columns agree,
        # both branches and a select otherwise.
        pred = self.to_host(pred).astype(bool)
        if pred.all():
            return true_fn(*operands)
        if not pred.any():
            return false_fn(*operands)
        keep = self.xp.asarray(pred)
        taken, other = true_fn(*operands), false_fn(*operands)
        return {key: self.where(keep, taken[key], other[key]) for key in taken}

    def to_host(self, a: Any) -> Any:
        return self.base.to_host(a)


class ColumnBlockOperator:
    """``A`` applied to every column of a block: what a solver sees as ``A`` in a block solve.

    ``matvec`` is ``A.matmat``; the diagonal comes as an ``(n, 1)`` column, so Jacobi's ``r
    / d`` divides every column by it; parameter cotangents sum over the columns.
    """

    def __init__(self, A: LinearOperator) -> None:
        self.A = A
        self.shape, self.dtype = A.shape, A.dtype

    def matvec(self, X: Any) -> Any:
        return self.A.matmat(X)

    def rmatvec(self, Y: Any) -> Any:
        return self.A.rmatmat(Y)

    @property
    def T(self) -> ColumnBlockOperator:
        return ColumnBlockOperator(self.A.T)

    @property
    def H(self) -> ColumnBlockOperator:
        return ColumnBlockOperator(self.A.H)

    def diagonal(self) -> Any:
        return self.A.diagonal().reshape(-1, 1)

    def to_matrix(self) -> Any:
        return self.A.to_matrix()

    def parameters(self) -> dict[str, Any]:
        return self.A.parameters()

    def param_vjp_batch(self, X: Any, Y_bar: Any, part: str = "full") -> dict[str, Any]:
        """Sum over pairs and columns: ``X``, ``Y_bar`` of shape ``(pairs, n, k)``."""
        n = self.A.shape[1]
        rows = X.transpose(0, 2, 1).reshape(-1, n)
        bars = Y_bar.transpose(0, 2, 1).reshape(-1, self.A.shape[0])
        return self.A.param_vjp_batch(rows, bars, part)


class BlockRun:
    """What :func:`run_block` returns: the result, the final state and the tape (a list of
    ``(record, keep)``, ``keep`` the step's column mask or None when every column took it)."""

    def __init__(self, result: BlockSolveResult, state: State | None,
                 tape: list[tuple[Any, Any]] | None, runs: list[Any] | None = None) -> None:
        self.result, self.state, self.tape, self.runs = result, state, tape, runs


class ColumnMonitor:
    """The single-vector driver's rules (see :class:`~prdp_ops.backends.numpy.Monitor`),
    column by column, on host arrays: confirmation of each convergence claim on the
    column's true residual, stagnation, non-finite values.

    ``status[j]`` stays :attr:`Status.MAX_ITERATIONS` while column ``j`` runs.
    """

    def __init__(self, ops: ArrayOps, A: ColumnBlockOperator, B: Any, tol: np.ndarray,
                 active: bool) -> None:
        self.ops, self.A, self.B, self.tol, self.active = ops, A, B, tol, active
        k = tol.shape[0]
        self.status = [Status.MAX_ITERATIONS] * k
        self.true_norm = np.full(k, np.nan)
        self.confirmed = np.zeros(k, dtype=bool)  # whether true_norm is of the final x
        self.threshold = tol.copy()
        self.last_true = np.full(k, np.inf)
        self.best = np.full(k, np.inf)
        self.best_at = np.zeros(k, dtype=np.int64)
        eps = float(np.finfo(np.result_type(B.dtype, np.float32)).eps)
        self.floor = 16 * eps * _host(ops, ops.norm(B))

    def running(self) -> np.ndarray:
        return np.array([s is Status.MAX_ITERATIONS for s in self.status], dtype=bool)

    def true_residuals(self, X: Any, columns: np.ndarray) -> np.ndarray:
        """``||b_j - A x_j||`` of the given columns (one block product), stored and returned."""
        index = self.ops.xp.asarray(columns)
        R = self.B[:, index] - self.A.matvec(X[:, index])
        self.true_norm[columns] = _host(self.ops, self.ops.norm(R))
        return self.true_norm[columns]

    def fail(self, columns: np.ndarray, status: Status) -> None:
        for j in np.flatnonzero(columns):
            self.status[j] = status

    def start(self, rnorm0: np.ndarray, iterate: Callable[[], Any]) -> None:
        self.fail(~np.isfinite(rnorm0), Status.NONFINITE)
        self.best = rnorm0.copy()
        self.update(0, rnorm0, iterate)

    def update(self, iteration: int, rnorm: np.ndarray, iterate: Callable[[], Any]) -> None:
        """Apply the rules after a checked iteration (``rnorm``: the recursive norms)."""
        if not self.active:
            return
        running = self.running()
        claims = np.flatnonzero(running & (rnorm <= self.threshold))
        if claims.size:
            self._confirm(claims, self.true_residuals(iterate(), claims), rnorm[claims])
        running = self.running()
        improved = running & (rnorm < self.best * (1 - STAGNATION_DECREASE))
        self.best[improved] = rnorm[improved]
        self.best_at[improved] = iteration
        self.fail(running & ~improved & (iteration - self.best_at >= STAGNATION_WINDOW),
                  Status.STAGNATED)

    def _confirm(self, columns: np.ndarray, true: np.ndarray, rnorm: np.ndarray) -> None:
        for j, t, r in zip(columns, true, rnorm, strict=True):
            self.confirmed[j] = True  # unless the column resumes below
            if not math.isfinite(t):
                self.status[j] = Status.NONFINITE
            elif t <= self.tol[j]:
                self.status[j] = Status.CONVERGED
            elif t > 0.5 * self.last_true[j]:
                self.status[j] = (Status.PRECISION_LIMIT if self.tol[j] < self.floor[j]
                                  else Status.INACCURATE)
            else:
                self.confirmed[j] = False
                self.last_true[j] = t
                self.threshold[j] = r / 10

    def finish(self, X: Any, last_rnorm: np.ndarray) -> None:
        """Final statuses, as :meth:`Monitor.finish` per column."""
        if not self.active:
            for j in np.flatnonzero(self.running() & (last_rnorm <= self.tol)):
                self.status[j] = Status.CONVERGED
        else:
            pending = np.array([not c and s is not Status.NONFINITE
                                for c, s in zip(self.confirmed, self.status, strict=True)])
            if pending.any():
                true = self.true_residuals(X, np.flatnonzero(pending))
                self.fail(_scatter(pending, ~np.isfinite(true)), Status.NONFINITE)
        finite = _host(self.ops, self.ops.xp.all(self.ops.xp.isfinite(X), axis=0))
        self.fail(~finite.astype(bool), Status.NONFINITE)


def _scatter(where: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = np.zeros(where.shape, dtype=values.dtype)
    out[where] = values
    return out


def _host(ops: ArrayOps, a: Any) -> np.ndarray:
    return np.asarray(ops.to_host(a), dtype=np.float64).reshape(-1)


def _per_column(ops: ArrayOps, a: Any, k: int) -> np.ndarray:
    """A state scalar (0-d before the first step, ``(k,)`` after) as ``k`` host values."""
    return np.broadcast_to(_host(ops, a), (k,)) if np.ndim(a) == 0 else _host(ops, a)


def _select(ops: ArrayOps, keep: Any, new: State, old: State) -> State:
    """``where(keep, new, old)`` per state entry; entries the step left alone stay as they
    are (the solver's contract: what is the same for every column is not changed)."""
    return {key: value if value is old.get(key) else ops.where(keep, value, old[key])
            for key, value in new.items()}


def run_block(solver: IterativeSolver, ops: ArrayOps, A: LinearOperator, B: Any, X0: Any,
              M: LinearOperator | None, *, maxiter: int, tol: np.ndarray, active: bool,
              callback: Callable[[Any], None] | None = None, keep_tape: bool = False,
              check_every: int = 1, on_failure: str = "warn") -> BlockRun:
    """Solve ``A X = B`` for a solver with ``supports_column_blocks``, one block step per
    iteration; ``tol`` holds each column's absolute tolerance, ``active=False`` runs
    exactly ``maxiter`` iterations (no tolerance). Arguments otherwise as
    :func:`run_solver`."""
    record_ops = ColumnOps(ops, TapeArena(B.shape, B.dtype)
                           if keep_tape and type(ops) is NumpyOps else None)
    ops = ColumnOps(ops)
    k = B.shape[1]
    A_block = ColumnBlockOperator(A)
    M_block = None if M is None else ColumnBlockOperator(M)
    state = checked_init(solver, ops, A_block, B, X0, M_block)
    norms = [_per_column(ops, solver.residual_norm(ops, state), k)]
    tape: list[tuple[Any, Any]] | None = [] if keep_tape else None
    monitor = ColumnMonitor(ops, A_block, B, tol, active=active)
    iterations = np.zeros(k, dtype=np.int64)
    last_rnorm = norms[0].copy()

    def iterate(s: State) -> Any:
        return solver.iterate(ops, A_block, B, s, M_block)

    with np.errstate(all="ignore"):  # a frozen column's discarded step may overflow
        monitor.start(norms[0], lambda: iterate(state))
        step = 0
        while step < maxiter and (running := monitor.running()).any():
            new = checked_step(solver, ops, A_block, B, state, M_block, step + 1)
            step += 1
            rnorm = _per_column(ops, solver.residual_norm(ops, new), k)
            checking = step % check_every == 0 or step == maxiter
            if checking:
                broke = _per_column(ops, solver.breakdown(ops, new), k).astype(bool)
                # Keep the last good state of a column that failed: a NaN iterate would
                # poison a training loop.
                monitor.fail(running & ~np.isfinite(rnorm), Status.NONFINITE)
                monitor.fail(running & np.isfinite(rnorm) & broke, Status.BREAKDOWN)
            keep = running & monitor.running() if checking else running
            keep_dev = None if keep.all() else ops.xp.asarray(keep)
            if tape is not None:
                tape.append((solver.record(record_ops, A_block, B, M_block, state, new),
                             keep_dev))
            state = new if keep_dev is None else _select(ops, keep_dev, new, state)
            iterations[keep] = step
            last_rnorm[keep] = rnorm[keep]
            norms.append(np.where(keep, rnorm, np.nan))
            if callback is not None:
                callback(iterate(state))
            if checking:
                monitor.update(step, last_rnorm, lambda s=state: iterate(s))
        X = iterate(state)
        monitor.finish(X, last_rnorm)
    X = _restore_nonfinite(ops, monitor, X, X0)
    result = BlockSolveResult(
        x=X, converged=np.array([s is Status.CONVERGED for s in monitor.status]),
        iterations=iterations, residual_norms=np.stack(norms), status=tuple(monitor.status),
        solver=solver_label(solver),
        true_residual_norm=monitor.true_norm if monitor.active else None,
    )
    report_block_failure(result, on_failure)
    return BlockRun(result, state, tape)


def _restore_nonfinite(ops: ColumnOps, monitor: ColumnMonitor, X: Any, X0: Any) -> Any:
    """``X`` with its non-finite columns replaced by ``X0``'s (the last finite iterate)."""
    finite = _host(ops, ops.xp.all(ops.xp.isfinite(X), axis=0)).astype(bool)
    if finite.all():
        return X
    return ops.where(ops.xp.asarray(finite), X, X0)


def run_columns(solver: IterativeSolver, ops: ArrayOps, A: LinearOperator, B: Any, X0: Any,
                M: LinearOperator | None, *, maxiter: int, tol: np.ndarray, active: bool,
                keep_tape: bool = False, check_every: int = 1,
                on_failure: str = "warn") -> BlockRun:
    """Solve ``A X = B`` one column at a time, for solvers without ``supports_column_blocks``
    (GMRES, whose Arnoldi basis is a matrix per column, and user solvers)."""
    runs = [run_solver(solver, ops, A, B[:, j], X0[:, j], M, maxiter=maxiter, tol=float(t),
                       stop_on_convergence=active, keep_tape=keep_tape,
                       check_every=check_every, on_failure="ignore")
            for j, t in enumerate(tol)]
    result = BlockSolveResult.from_columns([run.result for run in runs],
                                           ops.xp.stack([run.result.x for run in runs], axis=1))
    report_block_failure(result, on_failure)
    return BlockRun(result, None, None, runs)


class ColumnReverseContext(ReverseContext):
    """The reverse sweep's context for a block: while a step with frozen columns is swept
    (``keep`` set), what it contributes to ``b``'s and ``A``'s cotangents is masked to the
    columns that took the step."""

    keep: Any = None

    def _masked(self, v: Any) -> Any:
        return v if self.keep is None else self.ops.where(self.keep, v, 0)

    def record_pair(self, v: Any, y_bar: Any, part: str = "full") -> None:
        super().record_pair(self._masked(v), self._masked(y_bar), part)

    def add_b(self, b_bar: Any) -> None:
        super().add_b(self._masked(b_bar))

    def column_param_cotangents(self) -> list[dict[str, Any]]:
        """A's parameter cotangents of each column separately (a ``jax.vmap`` over the
        bridge needs them per example), from the same recorded pairs."""
        xp = self.ops.xp
        columns = self.b_bar.shape[1]
        totals: list[dict[str, Any]] = [{} for _ in range(columns)]
        for part, pairs in self._pairs.items():
            X = xp.stack([v for v, _ in pairs])
            Y_bar = xp.stack([y for _, y in pairs])
            for j in range(columns):
                totals[j] = add_cotangents(totals[j], self.A.A.param_vjp_batch(
                    X[:, :, j], Y_bar[:, :, j], part))
        return totals


def unrolled_block_vjp(solver: IterativeSolver, ops: ArrayOps, A: LinearOperator, B: Any,
                       X0: Any, M: LinearOperator | None, run: BlockRun,
                       X_bar: Any) -> tuple[Any, ColumnReverseContext, Any]:
    """Reverse sweep of :func:`run_block`'s tape: ``(B_bar, ctx, X0_bar)``, where
    ``ctx.param_cotangents()`` gives A's cotangent (summed over the columns) and
    ``ctx.column_param_cotangents()`` each column's. A frozen column's cotangent passes a
    step unchanged: the transpose of ``state <- where(keep, new, state)``."""
    ops = ColumnOps(ops)
    A_block = ColumnBlockOperator(A)
    M_block = None if M is None else ColumnBlockOperator(M)
    ctx = ColumnReverseContext(ops, A_block, M_block, B)
    with np.errstate(all="ignore"):
        state_bar = solver.iterate_vjp(ops, A_block, B, M_block, run.state, X_bar, ctx)
        for record, keep in reversed(run.tape):
            if keep is None:
                state_bar = solver.step_vjp(ops, A_block, B, M_block, record, state_bar, ctx)
                continue
            ctx.keep = keep
            taken = {key: ops.where(keep, value, 0) for key, value in state_bar.items()
                     if value is not None}
            before_bar = solver.step_vjp(ops, A_block, B, M_block, record, taken, ctx)
            ctx.keep = None
            state_bar = _pass_frozen(ops, keep, before_bar, state_bar)
        X0_bar = solver.init_vjp(ops, A_block, B, X0, M_block, state_bar, ctx)
    return ctx.b_bar, ctx, X0_bar


def _pass_frozen(ops: ArrayOps, keep: Any, before_bar: State, after_bar: State) -> State:
    """Cotangents before a step: the step's where a column took it, the unchanged ones
    where it was frozen."""
    xp = ops.xp
    out = {}
    for key in set(before_bar) | set(after_bar):
        took, through = before_bar.get(key), after_bar.get(key)
        if took is None and through is None:
            continue
        took = xp.zeros_like(through) if took is None else took
        through = xp.zeros_like(took) if through is None else through
        out[key] = ops.where(keep, took, through)
    return out


def report_block_failure(result: BlockSolveResult, on_failure: str, what: str = "") -> None:
    """The failure policy of :func:`~prdp_ops.backends.numpy.report_failure`, once for the
    block, naming the failed columns."""
    if not result.failed.any() or on_failure == "ignore":
        return
    message = f"{what}: {result.message}" if what else result.message
    if on_failure == "raise":
        raise SolverError(message, result)
    logger.warning(message)
