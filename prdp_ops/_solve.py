"""``solve`` and ``solve_vjp``: argument checking, then the backend driver and the adjoints.

Implicit adjoint. With ``A x = b`` solved, the implicit function theorem gives, for a
cotangent ``x_bar`` of ``x`` (JAX's convention, no conjugation),

    A^T lambda = x_bar,   b_bar = lambda,   A_bar = -lambda x^T,

one extra solve with the transpose. We solve it as ``A^H mu = conj(x_bar)``, ``lambda =
conj(mu)`` (identical for real data), which only needs ``rmatvec``, and with the
preconditioner's adjoint ``M^H``: an untransposed preconditioner is wrong for a
non-symmetric ``M`` and can slow the adjoint solve down by orders of magnitude.
The right-hand side is scaled to unit max-norm first: CG's ``rho = <r, r>`` of a cotangent
of size 1e-200 underflows to zero and would turn the gradient into 0/0 = NaN.

The initial guess. At convergence ``x`` solves ``A x = b`` whatever ``x0`` was, so the
implicit cotangent of ``x0`` is zero; the unrolled one is the exact derivative of the
``K`` iterations run (for a contracting stationary method it decays like ``rho^K``).

Ownership. ``b`` and ``x0`` are copied once on entry and the returned ``x`` is the caller's
own array: nothing the caller holds (the arrays passed in, ``result.x``, the iterates a
``callback`` receives) is referenced by the solve or its ``vjp``, so writing to them can
neither change a gradient nor be changed by one. ``A`` is the exception: an operator is
referenced, not copied (it may be a large matrix or a closure); do not modify it in place
between ``solve_vjp`` and calling its ``vjp``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from prdp_ops import _solve_block  # reads this module's helpers at call time
from prdp_ops._array_ops import ops_for
from prdp_ops._operators.base import LinearOperator
from prdp_ops._solution import Cotangents, SolveResult
from prdp_ops._solve_args import (
    as_array,
    as_operator,
    block_columns,
    check_callback,
    check_choice,
    check_count,
    check_tolerance,
    check_vector,
    copying,
    solve_dtype,
)
from prdp_ops._solver.base import IterativeSolver
from prdp_ops._solver.registry import resolve_solver
from prdp_ops.backends import numpy as numpy_backend

__all__ = ["solve", "solve_vjp"]

ADJOINT_MODES = ("implicit", "unrolled", "none")
FAILURE_POLICIES = ("warn", "raise", "ignore")


class _Problem:
    """Checked arguments of one solve.

    ``b`` and ``x0`` are held as private 1-D copies (their shapes as given are kept in
    ``b_shape`` and ``x0_shape`` for the results). ``check_finite=False`` lets a non-finite
    ``b`` or ``x0`` through to the driver, which reports it as :attr:`Status.NONFINITE`
    under the ``on_failure`` policy: the JAX bridge uses it for traced inputs, which native
    JAX cannot check at trace time either.
    """

    def __init__(self, A: Any, b: Any, solver: Any, x0: Any, maxiter: Any, rtol: Any,
                 atol: Any, M: Any, on_failure: str, check_every: int,
                 solver_options: dict[str, Any], *, check_finite: bool = True) -> None:
        self.solver = resolve_solver(solver, solver_options)
        self.check_finite = check_finite
        self.A = as_operator(A)
        n = self.A.shape[0]
        b = as_array(b)
        x0 = None if x0 is None else as_array(x0)
        self.ops = ops_for(b, x0, *self.A.parameters().values())
        self.dtype = solve_dtype(self.A, b, self.solver)
        #: ``k`` for a block of right-hand sides (``b`` of shape ``(n, k)``), else None.
        self.columns = block_columns(b)
        self.b = check_vector(self.ops, b, n, "b", self.dtype, check_finite=check_finite,
                               copy=True, columns=self.columns)
        self.b_shape = tuple(b.shape)
        self.x0 = (self.ops.xp.zeros(self.b.shape, dtype=self.dtype) if x0 is None
                   else check_vector(self.ops, x0, n, "x0", self.dtype,
                                      check_finite=check_finite, copy=True,
                                      columns=self.columns))
        # The default initial guess (zeros) gets a cotangent shaped like the solution.
        self.x0_shape = self.b_shape if x0 is None else tuple(x0.shape)
        # Read once (a device-to-host sync on GPUs): the tolerance and the x = 0 rule use it.
        self.bnorm = self.ops.to_float(self.ops.norm(self.b))
        self.maxiter = 10 * n if maxiter is None else check_count(maxiter, "maxiter")
        self.rtol = check_tolerance(rtol, "rtol")
        self.atol = check_tolerance(atol, "atol")
        self.on_failure = check_choice(on_failure, "on_failure", FAILURE_POLICIES)
        self.check_every = check_count(check_every, "check_every") or 1
        self.M = None
        if M is not None:
            if not self.solver.supports_preconditioner:
                raise ValueError(
                    f"solver {self.solver.name!r} takes no preconditioner M; use 'cg', "
                    "'gmres', 'bicgstab', 'richardson' or 'steepest_descent' with M"
                )
            self.M = as_operator(M, "M")
            if self.M.shape != self.A.shape:
                raise ValueError(f"M must have A's shape {self.A.shape}; got {self.M.shape}")

    @property
    def solved_by_zero(self) -> bool:
        """Whether ``x = 0`` is returned without iterating: ``n = 0`` (the empty vector
        solves the empty system) or, as in SciPy, ``b = 0`` with a tolerance (``x = 0``
        solves ``A x = 0`` exactly, whatever ``x0`` was). No iteration ran, so the unrolled
        cotangents are zero; the implicit ones are the implicit function theorem's, as for
        any other ``b``."""
        if self.A.shape[0] == 0:
            return True
        return self.bnorm == 0.0 and (self.rtol > 0 or self.atol > 0)

    def run(self, *, keep_tape: bool = False,
            callback: Callable | None = None) -> numpy_backend.Run:
        if self.solved_by_zero:
            return numpy_backend.zero_solution(self.solver, self.ops, self.b)
        # A non-finite b (only with check_finite off) has no meaningful tolerance: none is
        # set, and the driver reports the non-finite residual (NONFINITE, x = x0).
        tol = (max(self.rtol * self.bnorm, self.atol) if math.isfinite(self.bnorm)
               else 0.0)
        return numpy_backend.run_solver(
            self.solver, self.ops, self.A, self.b, self.x0, self.M,
            maxiter=self.maxiter, tol=tol, stop_on_convergence=tol > 0,
            callback=copying(callback, self.b_shape), keep_tape=keep_tape,
            check_every=self.check_every, on_failure=self.on_failure,
        )

    def user_result(self, result: SolveResult, *, copy: bool) -> SolveResult:
        """``result`` with ``x`` in ``b``'s shape. ``copy=True`` (solve_vjp) makes ``x`` the
        caller's own array: the solver's state, its tape and the vjp's residuals may hold
        the original, and writing to ``result.x`` must not change a gradient. Without a
        vjp nothing else holds it (``x0`` is the problem's own copy too)."""
        x = result.x.reshape(self.b_shape)
        return dataclasses.replace(result, x=x.copy() if copy else x)


# -- public functions -------------------------------------------------------------------------
def solve(
    A: Any,
    b: Any,
    solver: str | IterativeSolver = "cg",
    *,
    x0: Any = None,
    maxiter: int | None = None,
    rtol: float = 1e-5,
    atol: float = 0.0,
    M: Any = None,
    callback: Callable[[Any], None] | None = None,
    on_failure: str = "warn",
    check_every: int = 1,
    **solver_options: Any,
) -> SolveResult:
    """Solve ``A x = b`` iteratively.

    Parameters
    ----------
    A
        The operator: anything :func:`prdp_ops.aslinearoperator` takes.
    b
        Right-hand side, shape ``(n,)`` or ``(n, 1)``, or a block of ``k`` right-hand sides,
        shape ``(n, k)``, each column solved on its own (see Returns); numpy or cupy (jax
        arrays work but ``prdp_ops.backends.jax.solve`` is the fast path for them).
    solver
        A registered name (see :func:`prdp_ops.available_solvers`) or a solver instance.
    x0
        Initial guess (default zeros). Never modified.
    maxiter
        Iteration limit (default ``10 n``); with ``rtol = atol = 0`` exactly ``maxiter``
        iterations run. One GMRES iteration is one Arnoldi step.
    rtol, atol
        Stop once ``||b - A x|| <= max(rtol ||b||, atol)`` (SciPy's test).
    M
        Preconditioner approximating ``A^-1`` (Krylov solvers, Richardson, steepest descent).
    callback
        ``callback(xk)`` after every iteration, as in SciPy; ``xk`` is a copy of the
        iterate, in ``b``'s shape.
    on_failure
        What a breakdown or a NaN does besides being reported in the result: "warn" (log a
        warning, the default), "raise" (:class:`prdp_ops.SolverError`) or "ignore".
    check_every
        Test convergence every this many iterations (each test is a device-to-host sync on
        CuPy; a larger value trades a few extra iterations for fewer syncs).
    **solver_options
        Options of the solver, e.g. ``restart=20`` for GMRES, ``omega=0.8`` for Jacobi.

    Returns
    -------
    SolveResult or BlockSolveResult
        ``x`` (in ``b``'s shape, an array of the caller's own), ``converged``,
        ``iterations``, ``residual_norms``, ``status``, ``info``. An empty system (``n =
        0``) and, as in SciPy, ``b = 0`` with a tolerance are solved by ``x = 0`` in 0
        iterations. For ``b`` of shape ``(n, k)`` a :class:`~prdp_ops.BlockSolveResult`,
        one entry per column (column ``j`` is the solve of ``b[:, j]`` with its own
        tolerance ``max(rtol ||b_j||, atol)``); solvers with ``supports_column_blocks``
        step the whole block in one loop (one product of ``A`` with ``k`` columns per
        iteration), the others solve the columns in turn.

    Raises
    ------
    ValueError, TypeError, KeyError
        For bad input, naming the argument: a shape or dtype mismatch, a non-square
        operator, NaN or inf in ``b`` or ``x0``, an unknown solver, a bad ``maxiter``,
        tolerance, ``on_failure`` or ``callback``. A matvec function that returns the wrong
        shape raises a ValueError when first called.

    See Also
    --------
    prdp_ops.solve_vjp : the same solve plus a ``vjp`` for gradients w.r.t. ``b`` and ``A``
        (implicit or unrolled adjoint), on NumPy and CuPy.
    prdp_ops.backends.jax.solve : the solve as a JAX function, differentiable with
        ``jax.grad`` under ``jit`` and ``vmap``.
    """
    callback = check_callback(callback, "callback")
    problem = _Problem(A, b, solver, x0, maxiter, rtol, atol, M, on_failure, check_every,
                       solver_options)
    if problem.columns is not None:
        return _solve_block.solve(problem, callback)
    return problem.user_result(problem.run(callback=callback).result, copy=False)


def solve_vjp(
    A: Any,
    b: Any,
    solver: str | IterativeSolver = "cg",
    *,
    adjoint: str = "implicit",
    adjoint_maxiter: int | None = None,
    adjoint_rtol: float | None = None,
    adjoint_atol: float | None = None,
    adjoint_solver: str | IterativeSolver | None = None,
    x0: Any = None,
    maxiter: int | None = None,
    rtol: float = 1e-5,
    atol: float = 0.0,
    M: Any = None,
    callback: Callable[[Any], None] | None = None,
    on_failure: str = "warn",
    check_every: int = 1,
    **solver_options: Any,
) -> tuple[SolveResult, Callable[..., Cotangents]]:
    """Solve ``A x = b`` and return the result with its vector-Jacobian product.

    Parameters
    ----------
    adjoint
        ``"implicit"``: solve ``A^T lambda = x_bar`` (one solve with the transpose; exact at
        convergence), giving ``b_bar = lambda`` and ``A_bar = -lambda x^T``.
        ``"unrolled"``: the exact derivative of the iterations actually run (a reverse sweep
        over a tape of ``O(iterations * n)`` memory).
        ``"none"``: zero cotangents, for a solver used as a non-differentiable step.
    adjoint_maxiter, adjoint_rtol, adjoint_atol, adjoint_solver
        The implicit adjoint solve's own settings (default: the forward's). The adjoint
        uses ``M^H`` as its preconditioner.
    Other parameters
        As :func:`solve`.

    Returns
    -------
    (SolveResult, vjp)
        For ``b`` of shape ``(n, k)``: a :class:`~prdp_ops.BlockSolveResult`, and the
        cotangents of the columns (``.A`` summed over them; implicit mode solves the ``k``
        adjoint systems as one block).
        ``vjp(x_bar, *, adjoint_x0=None) -> Cotangents`` with ``.b`` (in ``b``'s shape),
        ``.x0`` (in ``x0``'s shape; ``b``'s when ``x0`` was not given), ``.A`` and, in
        implicit mode, ``.adjoint_result``. ``.x0`` is the exact derivative of the
        iterations run in unrolled mode, and zero in implicit mode (at convergence ``x``
        does not depend on ``x0``) and in mode "none". ``adjoint_x0`` warm-starts the
        adjoint solve, e.g. with the previous call's ``cotangents.b``.

    Notes
    -----
    ``result.x`` and every cotangent are the caller's own arrays, and ``b``, ``x0`` and
    ``x_bar`` are copied on entry: modifying any of them in place changes no gradient.
    ``A`` is referenced, not copied; do not modify it in place before calling ``vjp``.
    """
    adjoint = check_choice(adjoint, "adjoint", ADJOINT_MODES)
    callback = check_callback(callback, "callback")
    problem = _Problem(A, b, solver, x0, maxiter, rtol, atol, M, on_failure, check_every,
                       solver_options)
    if adjoint == "unrolled" and not problem.solver.supports_unrolled_numpy:
        raise NotImplementedError(
            f"solver {problem.solver.name!r} has no reverse step on NumPy/CuPy, so "
            "adjoint='unrolled' is unavailable there: implement its step_vjp/init_vjp, use "
            "adjoint='implicit', or call it through prdp_ops.backends.jax (which derives it)"
        )
    if adjoint == "implicit":  # checked before the forward solve runs
        adjoint_problem = _adjoint_problem(problem, adjoint_solver, adjoint_maxiter,
                                           adjoint_rtol, adjoint_atol)
    if problem.columns is not None:
        return _solve_block.solve_vjp(problem, adjoint,
                                      adjoint_problem if adjoint == "implicit" else None,
                                      callback)
    run = problem.run(keep_tape=adjoint == "unrolled", callback=callback)
    result = problem.user_result(run.result, copy=True)  # run.result.x stays the solve's
    if adjoint == "none":
        return result, _zero_vjp(problem)
    if adjoint == "unrolled":
        return result, _unrolled_vjp(problem, run)
    return result, _implicit_vjp(problem, adjoint_problem, run.result.x)


def _check_cotangent(problem: _Problem, x_bar: Any) -> Any:
    """``x_bar`` as a private copy (the reverse sweep may keep it; the caller may modify
    theirs): 1-D for one right-hand side, ``(n, k)`` for a block."""
    n = problem.A.shape[0]
    x_bar = as_array(x_bar)
    if problem.columns is not None:
        if getattr(x_bar, "shape", None) != problem.b.shape:
            raise ValueError(
                f"x_bar must have the solution's shape {problem.b.shape}; got shape "
                f"{getattr(x_bar, 'shape', None)}"
            )
        return x_bar.astype(problem.dtype, copy=True)
    if getattr(x_bar, "shape", None) not in ((n,), (n, 1)):
        raise ValueError(
            f"x_bar must have the solution's shape {problem.b_shape} (or ({n},)); got shape "
            f"{getattr(x_bar, 'shape', None)}"
        )
    return x_bar.reshape(-1).astype(problem.dtype, copy=True)


def _cotangents(problem: _Problem, b_bar: Any, x0_bar: Any, **kwargs: Any) -> Cotangents:
    """Cotangents in the shapes the caller passed ``b`` and ``x0`` in."""
    return Cotangents(b=b_bar.reshape(problem.b_shape), x0=x0_bar.reshape(problem.x0_shape),
                      **kwargs)


def _zero_vjp(problem: _Problem) -> Callable[..., Cotangents]:
    def vjp(x_bar: Any, **_: Any) -> Cotangents:
        _check_cotangent(problem, x_bar)
        xp = problem.ops.xp
        params = {k: xp.zeros_like(v) for k, v in problem.A.parameters().items()}
        return _cotangents(problem, xp.zeros_like(problem.b), xp.zeros_like(problem.x0),
                           A=problem.A.format_cotangent(params))

    return vjp


def _unrolled_vjp(problem: _Problem, run: numpy_backend.Run) -> Callable[..., Cotangents]:
    if problem.solved_by_zero:
        # x = 0 was returned without iterating (n = 0, or b = 0 with a tolerance): it
        # depends on nothing, and the run has no solver state to sweep back through.
        return _zero_vjp(problem)

    def vjp(x_bar: Any, **_: Any) -> Cotangents:
        x_bar = _check_cotangent(problem, x_bar)
        b_bar, params_bar, x0_bar = numpy_backend.unrolled_vjp(
            problem.solver, problem.ops, problem.A, problem.b, problem.x0, problem.M, run, x_bar
        )
        # x0_bar may be an array the reverse sweep recorded for A's (deferred) cotangent,
        # e.g. x_bar itself when init is x = x0: the caller gets a copy.
        return _cotangents(problem, b_bar, x0_bar.copy(),
                           A_thunk=lambda: problem.A.format_cotangent(params_bar()))

    return vjp


class _AdjointSettings:
    def __init__(self, solver: IterativeSolver, maxiter: int, rtol: float, atol: float,
                 M_H: LinearOperator | None) -> None:
        self.solver, self.maxiter, self.rtol, self.atol, self.M_H = solver, maxiter, rtol, atol, M_H


def _adjoint_problem(problem: _Problem, solver: Any, maxiter: Any, rtol: Any,
                     atol: Any) -> _AdjointSettings:
    return _AdjointSettings(
        solver=problem.solver if solver is None else resolve_solver(solver, {}),
        maxiter=problem.maxiter if maxiter is None else check_count(maxiter, "adjoint_maxiter"),
        rtol=problem.rtol if rtol is None else check_tolerance(rtol, "adjoint_rtol"),
        atol=problem.atol if atol is None else check_tolerance(atol, "adjoint_atol"),
        M_H=None if problem.M is None else problem.M.H,
    )


def _implicit_vjp(problem: _Problem, adj: _AdjointSettings, x: Any) -> Callable[..., Cotangents]:
    """The implicit vjp at the solution ``x`` (the solve's own array, not the caller's)."""
    ops, xp = problem.ops, problem.ops.xp
    complex_data = np.issubdtype(problem.dtype, np.complexfloating)
    conj = xp.conj if complex_data else (lambda v: v)
    A_H = problem.A.H

    def vjp(x_bar: Any, *, adjoint_x0: Any = None) -> Cotangents:
        x_bar = _check_cotangent(problem, x_bar)
        if problem.A.shape[0] == 0:
            return _zero_vjp(problem)(x_bar)
        # b = 0 (solved by x = 0 without iterating) is no exception: the implicit function
        # theorem still gives b_bar = A^-T x_bar there (and A_bar = -lambda x^T = 0), as on
        # the native JAX path; only the iterations' own derivative (unrolled) is zero.
        # The max-norm: the 2-norm itself would underflow for a cotangent of size 1e-300.
        scale = ops.to_float(xp.max(xp.abs(x_bar)))
        if scale == 0.0:
            return _zero_vjp(problem)(x_bar)
        if not math.isfinite(scale):
            if problem.check_finite:
                raise ValueError(
                    "x_bar contains NaN or inf: the gradient of the loss is not finite; check "
                    "the loss (and the solve's result.status) before calling vjp"
                )
            # On the bridge (traced inputs) the adjoint solve reports it instead, as
            # NONFINITE under the on_failure policy, as native JAX does.
            scale = 1.0
        rhs = conj(x_bar) / scale
        mu0 = (xp.zeros_like(rhs) if adjoint_x0 is None
               else conj(check_vector(ops, as_array(adjoint_x0), rhs.shape[0], "adjoint_x0",
                                       problem.dtype)) / scale)
        rhs_norm = ops.to_float(ops.norm(rhs))
        tol = (max(adj.rtol * rhs_norm, adj.atol / scale) if math.isfinite(rhs_norm)
               else 0.0)
        run = numpy_backend.run_solver(
            adj.solver, ops, A_H, rhs, mu0, adj.M_H, maxiter=adj.maxiter, tol=tol,
            stop_on_convergence=tol > 0, check_every=problem.check_every,
            on_failure=problem.on_failure,
        )
        lam = conj(run.result.x) * scale
        adjoint_result = SolveResult(
            x=lam.copy(), converged=run.result.converged, iterations=run.result.iterations,
            residual_norms=run.result.residual_norms * scale, status=run.result.status,
            solver=run.result.solver,
            true_residual_norm=(None if run.result.true_residual_norm is None
                                else run.result.true_residual_norm * scale),
        )
        # -lambda is A's cotangent's own array, so writing to .b cannot change .A.
        neg_lam = -lam
        return _cotangents(
            problem, lam, xp.zeros_like(problem.x0), adjoint_result=adjoint_result,
            A_thunk=lambda: problem.A.format_cotangent(problem.A.param_vjp(x, neg_lam)),
        )

    return vjp
