"""``solve`` and ``solve_vjp`` for a block of right-hand sides, ``b`` of shape ``(n, k)``.

Column ``j`` of the result is the solve of ``A x_j = b_j`` with the same settings: its own
tolerance ``max(rtol ||b_j||, atol)``, its own iterations and status, and, as in SciPy, ``x_j
= 0`` at once for ``b_j = 0`` with a tolerance. Solvers with
:attr:`~prdp_ops.IterativeSolver.supports_column_blocks` run the whole block in one loop (one
product of ``A`` with ``k`` columns per iteration: ``prdp_ops.backends._numpy_block``); the
others solve the columns one after another.

Gradients. The cotangents of the columns are independent, except ``A``'s, which sums over
them: implicit mode solves the ``k`` adjoint systems ``A^T lambda_j = x_bar_j`` as one block
(``A_bar = -sum_j lambda_j x_j^T``), unrolled mode sweeps the block's tape once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from prdp_ops import _solve as core
from prdp_ops import _solve_args as solve_args
from prdp_ops._operators.base import add_cotangents
from prdp_ops._solution import BlockSolveResult, Cotangents, Status
from prdp_ops.backends import _numpy_block as block_backend
from prdp_ops.backends import numpy as numpy_backend

__all__ = ["solve", "solve_vjp"]


def _host_column_norms(problem: Any, V: Any) -> np.ndarray:
    ops = problem.ops
    norms = ops.xp.sqrt(ops.xp.sum(ops.xp.abs(V) ** 2, axis=0))
    return np.asarray(ops.to_host(norms), dtype=np.float64).reshape(-1)


def _zero_columns(problem: Any, V: Any, tolerance_set: bool) -> np.ndarray:
    """Columns solved by ``x = 0`` without iterating: ``v_j = 0`` with a tolerance."""
    if not tolerance_set:
        return np.zeros(V.shape[1], dtype=bool)
    return _host_column_norms(problem, V) == 0


def _run(problem: Any, solver: Any, A: Any, B: Any, X0: Any, M: Any, *, maxiter: int,
         rtol: float, atol: Any, keep_tape: bool = False,
         callback: Callable | None = None) -> block_backend.BlockRun:
    """The block solve of ``A X = B``: per-column tolerances, zero columns, the loop.

    ``atol`` may be a ``(k,)`` array (the adjoint's, scaled per column).
    """
    ops = problem.ops
    tolerance_set = rtol > 0 or bool(np.any(np.asarray(atol) > 0))
    bnorms = _host_column_norms(problem, B)
    tol = np.maximum(rtol * bnorms, atol)
    tol = np.where(np.isfinite(bnorms), tol, 0.0)  # a non-finite column is reported NONFINITE
    zero = _zero_columns(problem, B, tolerance_set)
    if zero.any():
        # x_j = 0 solves A x_j = 0 exactly: starting there, the column converges at
        # iteration 0 (its residual, 0, is confirmed).
        X0 = ops.where(ops.xp.asarray(~zero), X0, 0)
    if solver.supports_column_blocks:
        run = block_backend.run_block(
            solver, ops, A, B, X0, M, maxiter=maxiter, tol=tol, active=tolerance_set,
            callback=callback, keep_tape=keep_tape, check_every=problem.check_every,
            on_failure=problem.on_failure)
    else:
        if callback is not None:
            raise NotImplementedError(
                f"callback with a block of right-hand sides needs a solver that steps the "
                f"whole block ({solver.name!r} solves it one column at a time); solve the "
                "columns one by one to watch each, or drop the callback"
            )
        run = block_backend.run_columns(
            solver, ops, A, B, X0, M, maxiter=maxiter, tol=tol, active=tolerance_set,
            keep_tape=keep_tape, check_every=problem.check_every,
            on_failure=problem.on_failure)
    run.zero_columns = zero
    return run


def _empty(problem: Any) -> BlockSolveResult:
    """The result of an empty block (``n = 0`` or ``k = 0``): converged in 0 iterations."""
    k = problem.b.shape[1]
    status = (Status.CONVERGED,) * k
    return BlockSolveResult(
        x=problem.ops.xp.zeros_like(problem.b), converged=np.ones(k, dtype=bool),
        iterations=np.zeros(k, dtype=np.int64), residual_norms=np.zeros((1, k)),
        status=status, solver=problem.solver.name or type(problem.solver).__name__,
        true_residual_norm=np.zeros(k))


def _is_empty(problem: Any) -> bool:
    return problem.b.shape[0] == 0 or problem.b.shape[1] == 0


def _forward(problem: Any, *, keep_tape: bool = False,
             callback: Callable | None = None) -> block_backend.BlockRun | None:
    if _is_empty(problem):
        return None
    return _run(problem, problem.solver, problem.A, problem.b, problem.x0, problem.M,
                maxiter=problem.maxiter, rtol=problem.rtol, atol=problem.atol,
                keep_tape=keep_tape, callback=solve_args.copying(callback, problem.b_shape))


def _user_result(problem: Any, run: block_backend.BlockRun | None) -> BlockSolveResult:
    """The caller's result: ``x`` their own array (nothing the vjp holds)."""
    result = _empty(problem) if run is None else run.result
    return dataclasses.replace(result, x=result.x.copy())


def solve(problem: Any, callback: Callable | None) -> BlockSolveResult:
    """:func:`prdp_ops.solve` of a checked block problem."""
    return _user_result(problem, _forward(problem, callback=callback))


def solve_vjp(problem: Any, adjoint: str, adjoint_settings: Any,
              callback: Callable | None) -> tuple[BlockSolveResult, Callable[..., Cotangents]]:
    """:func:`prdp_ops.solve_vjp` of a checked block problem."""
    run = _forward(problem, keep_tape=adjoint == "unrolled", callback=callback)
    result = _user_result(problem, run)
    if adjoint == "none" or run is None:
        return result, core._zero_vjp(problem)
    if adjoint == "unrolled":
        return result, _unrolled_vjp(problem, run)
    return result, _implicit_vjp(problem, adjoint_settings, run.result.x)


def _unrolled_vjp(problem: Any, run: block_backend.BlockRun) -> Callable[..., Cotangents]:
    def vjp(x_bar: Any, **_: Any) -> Cotangents:
        x_bar = core._check_cotangent(problem, x_bar)
        b_bar, x0_bar, column_params = unrolled_columns(problem, run, x_bar)
        return core._cotangents(problem, b_bar, x0_bar,
                           A_thunk=lambda: problem.A.format_cotangent(column_params(None)))

    return vjp


def unrolled_columns(problem: Any, run: block_backend.BlockRun,
                     x_bar: Any) -> tuple[Any, Any, Callable[[int | None], Any]]:
    """The unrolled reverse sweep of a block: ``(b_bar, x0_bar, params)``, where
    ``params(None)`` is A's cotangent summed over the columns and ``params(j)`` column
    ``j``'s (parameter dicts)."""
    ops, xp = problem.ops, problem.ops.xp
    if run.runs is None:
        b_bar, ctx, x0_bar = block_backend.unrolled_block_vjp(
            problem.solver, ops, problem.A, problem.b, problem.x0, problem.M, run, x_bar)
        per_column: list = []

        def params(j: int | None) -> dict:
            if j is None:
                return ctx.param_cotangents()
            if not per_column:
                per_column.extend(ctx.column_param_cotangents())
            return per_column[j]
    else:
        sweeps = [numpy_backend.unrolled_vjp(problem.solver, ops, problem.A, problem.b[:, j],
                                             problem.x0[:, j], problem.M, column_run,
                                             x_bar[:, j])
                  for j, column_run in enumerate(run.runs)]
        b_bar = xp.stack([s[0] for s in sweeps], axis=1)
        x0_bar = xp.stack([s[2] for s in sweeps], axis=1)

        def params(j: int | None) -> dict:
            if j is not None:
                return sweeps[j][1]()
            total: dict = {}
            for _, column_params, _ in sweeps:
                total = add_cotangents(total, column_params())
            return total
    # A zero column's x = 0 depends on nothing (its x0 was replaced by 0).
    keep = xp.asarray(~run.zero_columns)
    return ops.where(keep, b_bar, 0), ops.where(keep, x0_bar, 0), params


def _implicit_vjp(problem: Any, adj: Any, X: Any) -> Callable[..., Cotangents]:
    """The implicit vjp at the solutions ``X``: the ``k`` adjoint solves as one block."""
    ops, xp = problem.ops, problem.ops.xp
    complex_data = np.issubdtype(problem.dtype, np.complexfloating)
    conj = xp.conj if complex_data else (lambda v: v)
    A_H = problem.A.H

    def vjp(x_bar: Any, *, adjoint_x0: Any = None) -> Cotangents:
        x_bar = core._check_cotangent(problem, x_bar)
        # Per-column max-norm scaling, as for one right-hand side (an underflowing <r, r>).
        scale = np.asarray(ops.to_host(xp.max(xp.abs(x_bar), axis=0)), dtype=np.float64)
        if not np.isfinite(scale).all():
            if problem.check_finite:
                raise ValueError(
                    "x_bar contains NaN or inf: the gradient of the loss is not finite; check "
                    "the loss (and the solve's result.status) before calling vjp"
                )
            scale = np.where(np.isfinite(scale), scale, 1.0)
        scale = np.where(scale == 0, 1.0, scale)  # a zero column stays zero
        scale_dev = xp.asarray(scale, dtype=np.finfo(problem.dtype).dtype)
        rhs = conj(x_bar) / scale_dev
        mu0 = (xp.zeros_like(rhs) if adjoint_x0 is None
               else conj(solve_args.check_vector(ops, solve_args.as_array(adjoint_x0), rhs.shape[0],
                                            "adjoint_x0", problem.dtype,
                                            columns=rhs.shape[1])) / scale_dev)
        run = _run(problem, adj.solver, A_H, rhs, mu0, adj.M_H, maxiter=adj.maxiter,
                   rtol=adj.rtol, atol=adj.atol / scale)
        lam = conj(run.result.x) * scale_dev
        result = run.result
        true = result.true_residual_norm
        adjoint_result = BlockSolveResult(
            x=lam.copy(), converged=result.converged, iterations=result.iterations,
            residual_norms=result.residual_norms * scale, status=result.status,
            solver=result.solver, true_residual_norm=None if true is None else true * scale)
        neg_lam = -lam
        return core._cotangents(
            problem, lam, xp.zeros_like(problem.x0), adjoint_result=adjoint_result,
            A_thunk=lambda: problem.A.format_cotangent(_column_param_vjp(problem.A, X,
                                                                         neg_lam)),
        )

    return vjp


def _column_param_vjp(A: Any, X: Any, Y_bar: Any) -> dict[str, Any]:
    """``sum_j param_vjp(x_j, y_bar_j)``: A's cotangent of ``Y = A X`` in one batched call."""
    if not A.parameters():
        return {}
    return A.param_vjp_batch(X.T, Y_bar.T)

