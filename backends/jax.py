"""The JAX backend: every registered solver under ``jit``, ``vmap``, ``grad`` and ``jvp``.

:func:`solve` runs a solver's own ``init``/``step`` (the code NumPy runs) inside
``lax.while_loop`` and defines its derivative once, at the solve boundary:

* ``adjoint="implicit"`` -- the ``lax.custom_linear_solve`` pattern: the tangent of ``x =
  A^-1 b`` is the solve ``A dx = db - dA x``, and its transpose is one adjoint solve with
  ``A^T`` (its own solver, iteration limit and tolerances). Forward mode (``jax.jvp``,
  ``jax.jacfwd``), reverse mode (``jax.grad``) and their compositions (``jax.hessian``) all
  work (see :mod:`._jax_solve`).
* ``adjoint="unrolled"`` -- the exact derivative of the iterations that ran: the forward
  loop keeps what each step's reverse needs and the reverse loop applies the solver's own
  ``step_vjp`` (:mod:`._jax_unrolled`), or ``jax.vjp`` of one ``step`` at a time for a
  solver without a traceable one; forward mode is ``jax.jvp`` of the loop. First
  derivatives only.
* ``adjoint="none"`` -- the solve is a constant (``stop_gradient``).

``maxiter``, ``rtol`` and ``atol`` may be traced, so a jitted training step compiles once
and then runs with any iteration count (the PRDP controller changes it between epochs).
Dtypes follow ``jnp.linalg.solve``, strict promotion included.

``backend="numpy"`` (or ``"cupy"``) runs the NumPy (CuPy) implementation instead, through
``jax.pure_callback`` and a ``custom_vjp`` (see :mod:`._jax_bridge`).

The implementation lives in private modules: :mod:`._jax_ops` (the ops namespace and the
result), :mod:`._jax_operators` (operators from what the user passes), :mod:`._jax_args`
(argument checks, dtypes, buffer sizes), :mod:`._jax_solve` (the differentiable core) and
:mod:`._jax_driver` (the loop and the ``jax.vjp`` unrolled sweep), :mod:`._jax_unrolled`
(the unrolled sweep from the solvers' own reverse steps).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from prdp_ops.backends import _jax_args as args
from prdp_ops.backends import _jax_driver as driver
from prdp_ops.backends._jax_operators import as_jax_operator, operand_dtype, rebuilder
from prdp_ops.backends._jax_ops import OPS, JaxOps, JaxSolveResult, bcoo_diagonal
from prdp_ops.backends._jax_scipy import bicgstab, cg, gmres
from prdp_ops.backends._jax_solve import Problem, report, solve_core

from prdp_ops._operators.base import LinearOperator
from prdp_ops._solution import SolveResult
from prdp_ops._solver.base import IterativeSolver
from prdp_ops._solver.registry import resolve_solver

__all__ = ["OPS", "JaxOps", "JaxSolveResult", "bcoo_diagonal", "bicgstab", "cg", "gmres",
           "solve"]

logger = logging.getLogger("prdp_ops")

ADJOINT_MODES = ("implicit", "unrolled", "none")
BACKENDS = ("jax", "numpy", "cupy")
FAILURE_POLICIES = ("warn", "raise", "ignore")

# The argument checks the bridge (``_jax_bridge``) shares with the native solve.
_vector, _count, _controls, _is_traced = args.vector, args.count, args.controls, args.is_traced


def solve(
    A: Any,
    b: Any,
    solver: str | IterativeSolver = "cg",
    *,
    x0: Any = None,
    maxiter: Any = None,
    rtol: Any = 1e-5,
    atol: Any = 0.0,
    M: Any = None,
    adjoint: str = "implicit",
    adjoint_maxiter: Any = None,
    adjoint_rtol: Any = None,
    adjoint_atol: Any = None,
    adjoint_solver: str | IterativeSolver | None = None,
    backend: str = "jax",
    return_result: bool = False,
    max_steps: int | None = None,
    checkpoint_every: int | None = None,
    on_failure: str = "warn",
    adjoint_callback: Callable[[SolveResult], None] | None = None,
    hermitian: bool = False,
    **solver_options: Any,
) -> Any:
    """Solve ``A x = b`` with a registered iterative solver, differentiably, in JAX.

    Parameters
    ----------
    A
        A dense jax array, a jax ``BCOO`` matrix, a :class:`~prdp_ops.LinearOperator` holding
        jax arrays (e.g. ``po.DiffusionStencil(c)``), or a function ``x -> A @ x``. Gradients
        reach every array leaf: a matrix's entries, a BCOO's ``data``, an operator's
        ``parameters()``, and the arrays a matvec function closes over (found by
        ``jax.closure_convert``). With ``backend="numpy"`` anything
        :func:`prdp_ops.aslinearoperator` takes is accepted too (a SciPy ``LinearOperator``
        or sparse matrix, say; gradients then reach b and the jax arrays only).
    b
        Right-hand side, shape ``(n,)`` or ``(n, 1)``; ``x`` has the same shape. The solve
        computes in ``jnp.result_type(A, b)`` as ``jnp.linalg.solve`` does: integers become
        JAX's default float (float64 with x64 enabled), and under
        ``jax_numpy_dtype_promotion="strict"`` A and b must have the same dtype.
    solver
        A registered name (:func:`prdp_ops.available_solvers`) or an instance.
    x0
        Initial guess (default zeros), cast to the solve's dtype. In ``"unrolled"`` mode it
        receives a cotangent.
    maxiter
        Iteration limit (default ``10 n``); may be a traced integer. With ``rtol = atol =
        0`` exactly ``maxiter`` iterations run.
    rtol, atol
        Stop once ``||b - A x|| <= max(rtol ||b||, atol)``; may be traced.
    M
        Preconditioner approximating ``A^-1`` (same forms as ``A``). A constant: it receives
        no cotangent. The adjoint solve uses its transpose.
    adjoint
        ``"implicit"``: the derivative of ``x = A^-1 b`` at the computed ``x``. Reverse mode
        runs one adjoint solve ``A^T lambda = x_bar``, then ``b_bar = lambda`` and A's
        cotangent is ``-lambda x^T`` (for a matrix; the vjp of ``p -> A(p) x`` at
        ``-lambda`` for parameters); forward mode runs one tangent solve ``A dx = db - dA
        x`` per tangent, with the forward's settings. Exact at convergence; memory ``O(n)``;
        derivatives of any order (``jax.hessian``).
        ``"unrolled"``: the exact derivative of the iterations that ran. Reverse mode runs
        the solver's own reverse step (``record``/``step_vjp``/``init_vjp``, as on NumPy)
        where it runs traced (CG, BiCGSTAB, steepest descent, Richardson, Jacobi), else
        ``jax.vjp`` of one ``step`` at a time (GMRES, whose record reads a value on the
        host; user solvers without ``step_vjp`` or whose class sets
        ``jax_traceable_reverse = False``); neither is autodiff of the loop. A reverse step
        that fails on traced arrays for any other reason raises a ``RuntimeError`` naming
        the solver. Forward mode (``jax.jvp``, ``jax.jacfwd``) is
        ``jax.jvp`` of the same iterations, and never runs in reverse mode. First
        derivatives only: a second derivative raises ``NotImplementedError`` (use
        ``"implicit"`` for ``jax.hessian``).
        Memory: one record per iteration (CG: ``r'``, ``p`` and ``q = A p``, ``3 n``
        numbers; the state entries ``step`` reads for the ``jax.vjp`` fallback), for a
        static capacity of ``maxiter`` iterations (``max_steps`` when ``maxiter`` is traced),
        allocated whether or not the solve stops early; with ``checkpoint_every=c``,
        ``maxiter / c`` states and ``c`` records, and one more forward pass. A tape the
        device cannot hold raises a ``MemoryError`` (with its size) before anything is
        allocated. The backward pass costs several forward passes (see
        ``benchmarks/jax_vs_peers.py``), and less memory and time than reverse-mode autodiff
        of a ``lax.scan`` of the same iterations.
        ``"none"``: no derivative (``stop_gradient``).
    adjoint_maxiter, adjoint_rtol, adjoint_atol, adjoint_solver
        The adjoint solve's own settings (default: the forward's).
    backend
        ``"jax"`` (native), ``"numpy"`` (the NumPy implementation through
        ``jax.pure_callback``; see :mod:`prdp_ops.backends._jax_bridge`) or ``"cupy"`` (the
        CuPy implementation on the GPU, arrays exchanged by DLPack; needs cupy and a GPU).
    return_result
        Also return a :class:`JaxSolveResult` (a pytree of jax arrays): ``(x, result)``.
        Residual history is kept only then, in a buffer of at most ``max(10 n, 100000) + 1``
        entries whatever ``maxiter`` is (a longer solve keeps its final norm in the last).
    max_steps
        Static capacity for a traced ``maxiter``: the residual history has ``max_steps + 1``
        entries (bounded as above) and ``"unrolled"`` keeps at most ``max_steps`` states
        (required there). The iteration count is capped at ``max_steps`` (a warning is
        logged when it bites).
    checkpoint_every
        ``"unrolled"`` only: keep every ``c``-th state and recompute the others during the
        backward pass. ``None`` (default): keep every state when ``maxiter`` (or
        ``max_steps``) is given and that tape takes at most an eighth of the device's
        memory (on CPU: at most 32 MiB, or the ``MALLOC_MMAP_THRESHOLD_`` the process
        was started with, as fresh memory costs more there than the extra forward pass),
        else ``c = ceil(sqrt(K))`` for a capacity of ``K`` iterations (about
        ``2 sqrt(K)`` states), so the default ``maxiter = 10 n`` does not size a tape of
        ``10 n`` states.
    on_failure
        What a breakdown or a NaN does besides being reported in the result, in the forward,
        tangent and adjoint solves alike: ``"warn"`` (log a warning, default), ``"raise"``
        (:class:`~prdp_ops.SolverError`; inside ``jit``, and always for the tangent and
        adjoint solves, which JAX stages, it surfaces as the runtime error of the call, from
        a host callback) or ``"ignore"``.
    adjoint_callback
        ``adjoint_callback(result)`` receives the adjoint solve's
        :class:`~prdp_ops.SolveResult` (``x`` is ``lambda``, residual norms unscaled) on the
        host each time a gradient is computed, inside ``jit`` too (``jax.debug.callback``):
        how exact the implicit gradient is.
    hermitian
        Declare a matrix or matvec-function ``A`` Hermitian (symmetric if real); not
        checked. The adjoint solve and the unrolled reverse sweep then apply ``A`` itself
        instead of JAX's transpose of the matvec, which is cheaper for stencils (lineax's
        ``symmetric_tag``). A ``po.LinearOperator`` carries its own ``hermitian`` flag and
        ``rmatvec``, which are used the same way.
    **solver_options
        Options of the solver, e.g. ``restart=20`` for GMRES.

    Returns
    -------
    x, or (x, JaxSolveResult)
        The solution; with ``return_result=True`` also the convergence information.

    Notes
    -----
    Call it inside ``jax.jit``: outside, every call traces and compiles its loop anew. The
    convergence information carries no derivative.

    Raises
    ------
    ValueError, TypeError, KeyError, MemoryError
        At trace time, for a bad shape or dtype, a non-square ``A``, an ``A`` that computes
        with NumPy/SciPy (use ``backend="numpy"``), an unknown solver, adjoint mode or
        backend, a missing ``max_steps``, or an unrolled tape larger than the device (see
        above).
    """
    adjoint = args.choice(adjoint, "adjoint", ADJOINT_MODES)
    backend = args.choice(backend, "backend", BACKENDS)
    on_failure = args.choice(on_failure, "on_failure", FAILURE_POLICIES)
    if adjoint_callback is not None and not callable(adjoint_callback):
        raise TypeError("adjoint_callback must be a function adjoint_callback(result) or None; "
                        f"got {type(adjoint_callback).__name__} {adjoint_callback!r}")
    solver = resolve_solver(solver, solver_options)
    adjoint_solver = solver if adjoint_solver is None else resolve_solver(adjoint_solver, {})
    if backend != "jax":
        from prdp_ops.backends import _jax_bridge

        return _jax_bridge.bridge_solve(
            A, b, solver, backend=backend, x0=x0, maxiter=maxiter, rtol=rtol, atol=atol, M=M,
            adjoint=adjoint, adjoint_maxiter=adjoint_maxiter, adjoint_rtol=adjoint_rtol,
            adjoint_atol=adjoint_atol, adjoint_solver=adjoint_solver,
            return_result=return_result, on_failure=on_failure,
            adjoint_callback=adjoint_callback)

    b_in = b
    if not hasattr(b, "shape"):
        b = jnp.asarray(b)
    if getattr(b, "ndim", None) not in (1, 2):
        raise ValueError(f"b must have shape (n,) or (n, 1); got shape {b.shape}")
    b_flat = jnp.asarray(b).reshape(-1)
    dtype = args.solve_dtype(operand_dtype(A, b_flat, "A"), b_flat.dtype, solver)
    op = as_jax_operator(A, b_flat, "A", dtype, hermitian)
    n = op.shape[0]
    b = args.vector(b, n, "b", dtype)
    x0 = jnp.zeros(n, dtype) if x0 is None else args.vector(x0, n, "x0", dtype)
    M_op = _preconditioner(M, solver, op, b)

    maxiter_given = maxiter is not None or max_steps is not None
    maxiter = 10 * n if maxiter is None else args.count(maxiter, "maxiter")
    controls = args.controls(maxiter, rtol, atol, adjoint_maxiter, adjoint_rtol, adjoint_atol,
                             args.real_dtype(dtype))
    capacity = args.capacity(maxiter, max_steps, adjoint)
    if checkpoint_every is not None:
        checkpoint_every = args.count(checkpoint_every, "checkpoint_every") or 1
        if args.is_traced(checkpoint_every):
            raise TypeError("checkpoint_every must be a static int (it sizes buffers); got a "
                            "tracer")
    # A concrete count, also when given as a jax array: it sizes the adjoint's history.
    adjoint_capacity = (maxiter if adjoint_maxiter is None
                        else args.count(adjoint_maxiter, "adjoint_maxiter"))
    history_size = args.history_size(capacity, n)
    if n == 0:  # the empty vector solves it; no solver runs (as on the bridge)
        from prdp_ops.backends._jax_bridge import empty_solve

        return empty_solve(b_in, dtype, history_size if return_result else None,
                           return_result, solver)
    problem = Problem(
        solver=solver, adjoint_solver=adjoint_solver, rebuild=rebuilder(op),
        rebuild_precond=None if M_op is None else rebuilder(M_op), mode=adjoint,
        on_failure=on_failure, tape_capacity=capacity, checkpoint_every=checkpoint_every,
        maxiter_given=maxiter_given, history_size=history_size if return_result else None,
        adjoint_history_size=(args.history_size(adjoint_capacity, n)
                              if adjoint_callback is not None
                              and not args.is_traced(adjoint_capacity) else None),
        adjoint_callback=adjoint_callback, what=f"{solver.name or type(solver).__name__} solve",
    )
    params = op.parameters()
    m_params = {} if M_op is None else M_op.parameters()
    x, (iterations, status, history, true_norm) = solve_core(problem, params, m_params, b, x0,
                                                             controls)
    result = JaxSolveResult(x, status == driver.CONVERGED, iterations, history, status,
                            problem.solver_name, true_norm)
    report(lax.stop_gradient(result), on_failure, problem.what)
    if capacity is not None and args.is_traced(maxiter):
        _warn_if_capped(maxiter, capacity, iterations, status)
    x = x.reshape(jnp.shape(b_in))
    if return_result:
        return x, dataclasses.replace(result, x=x)
    return x


def _preconditioner(M: Any, solver: IterativeSolver, op: LinearOperator,
                    b: Any) -> LinearOperator | None:
    if M is None:
        return None
    if not solver.supports_preconditioner:
        raise ValueError(
            f"solver {solver.name!r} takes no preconditioner M; use 'cg', 'gmres', 'bicgstab', "
            "'richardson' or 'steepest_descent' with M"
        )
    operand_dtype(M, b, "M")  # a NumPy-only M fails here, naming M
    M_op = as_jax_operator(M, b, "M", b.dtype)
    if M_op.shape != op.shape:
        raise ValueError(f"M must have A's shape {op.shape}; got {M_op.shape}")
    return M_op


def _warn_if_capped(maxiter: Any, capacity: int, iterations: Any, status: Any) -> None:
    def host(maxiter: Any, iterations: Any, status: Any) -> None:
        if int(maxiter) > capacity and int(iterations) >= capacity and int(status) == 1:
            logger.warning("maxiter=%d was capped at max_steps=%d; raise max_steps",
                           int(maxiter), capacity)

    jax.debug.callback(host, maxiter, iterations, status)
