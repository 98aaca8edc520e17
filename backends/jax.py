"""The JAX backend: every registered solver under ``jit``, ``vmap`` and ``grad``.

:func:`solve` runs a solver's own ``init``/``step`` (the code NumPy runs) inside
``lax.while_loop`` and defines its derivative once, with ``jax.custom_vjp`` at the solve
boundary:

* ``adjoint="implicit"`` -- one adjoint solve with ``A^T`` (its own solver, iteration limit
  and tolerances), giving ``b_bar = lambda`` and A's parameter cotangents from the vjp of
  ``p -> A(p) x`` at ``-lambda``. The adjoint solve is itself differentiable, so second
  derivatives work.
* ``adjoint="unrolled"`` -- the exact derivative of the iterations that ran, derived by JAX
  from the solver's ``step``: the forward loop keeps the state before each step and the
  reverse loop applies ``jax.vjp`` of one step at a time.
* ``adjoint="none"`` -- the solve is a constant (``stop_gradient``).

``maxiter``, ``rtol`` and ``atol`` may be traced, so a jitted training step compiles once
and then runs with any iteration count (the PRDP controller changes it between epochs).

``backend="numpy"`` (or ``"cupy"``) runs the NumPy (CuPy) implementation instead, through
``jax.pure_callback`` and the same kind of ``custom_vjp`` (see :mod:`._jax_bridge`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from prdp_ops.backends import _jax_driver as driver
from prdp_ops.backends.numpy import report_failure

from prdp_ops._array_ops import ArrayOps
from prdp_ops._operators.base import LinearOperator
from prdp_ops._operators.convert import aslinearoperator
from prdp_ops._solution import SolveResult
from prdp_ops._solver.base import IterativeSolver
from prdp_ops._solver.registry import resolve_solver

__all__ = ["OPS", "JaxOps", "JaxSolveResult", "bcoo_diagonal", "solve"]

logger = logging.getLogger("prdp_ops")

ADJOINT_MODES = ("implicit", "unrolled", "none")
BACKENDS = ("jax", "numpy", "cupy")
FAILURE_POLICIES = ("warn", "raise", "ignore")

#: Above this size a BCOO triangular solve is refused rather than densified.
_DENSIFY_LIMIT = 4096


# -- the ops namespace ---------------------------------------------------------------------------
class JaxOps(ArrayOps):
    """:class:`~prdp_ops._array_ops.ArrayOps` for JAX arrays (traceable: no host reads)."""

    name = "jax"
    eager = False

    def __init__(self) -> None:
        super().__init__(jnp)

    def set_at(self, a: Any, index: Any, value: Any) -> Any:
        return a.at[index].set(value)

    def cond(self, pred: Any, true_fn: Callable, false_fn: Callable, *operands: Any) -> Any:
        return lax.cond(pred, true_fn, false_fn, *operands)

    def to_float(self, a: Any) -> float:
        if isinstance(a, jax.core.Tracer):
            raise TypeError(
                "a traced JAX value cannot be read as a Python float inside jit/vmap/grad; "
                "solver code must branch with ops.cond / ops.where instead of if"
            )
        return float(a)

    def solve_triangular(self, T: Any, rhs: Any, lower: bool) -> Any:
        """Return ``y`` with ``T y = rhs`` for a triangular ``T`` (dense, or a small BCOO)."""
        if _is_bcoo(T):
            n = T.shape[0]
            if n > _DENSIFY_LIMIT:
                raise NotImplementedError(
                    f"a triangular solve with a {n}x{n} BCOO matrix is not available in JAX "
                    f"(small ones, n <= {_DENSIFY_LIMIT}, are densified); use a Krylov solver "
                    "(cg, gmres, bicgstab) or jacobi for large sparse systems, or "
                    "backend='numpy' to run SOR with scipy.sparse"
                )
            T = T.todense()
        return jax.scipy.linalg.solve_triangular(T, rhs, lower=lower)


#: The :class:`JaxOps` instance ``prdp_ops.backends.get_ops("jax")`` returns.
OPS = JaxOps()


def _is_bcoo(a: Any) -> bool:
    return (type(a).__module__ or "").startswith("jax.experimental.sparse")


def bcoo_diagonal(matrix: Any) -> Any:
    """The main diagonal of a 2-D jax ``BCOO`` matrix (duplicate entries are summed)."""
    rows, cols = matrix.indices[:, 0], matrix.indices[:, 1]
    on_diagonal = jnp.where(rows == cols, matrix.data, jnp.zeros_like(matrix.data))
    n = min(matrix.shape)
    # Off-diagonal entries add zero at a clipped row index, so shapes stay static.
    return jnp.zeros(n, matrix.dtype).at[jnp.minimum(rows, n - 1)].add(on_diagonal)


# -- results -------------------------------------------------------------------------------------
@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["x", "converged", "iterations", "residual_norms", "status"],
                   meta_fields=["solver"])
@dataclasses.dataclass(frozen=True)
class JaxSolveResult:
    """A :class:`~prdp_ops.SolveResult` of jax arrays (a pytree: it leaves ``jit`` as is).

    Attributes
    ----------
    x
        The solution.
    converged
        Whether ``||b - A x|| <= max(rtol ||b||, atol)`` was met (a bool array).
    iterations
        Iterations run (int32), the failing one included when a failure stopped the solve.
    residual_norms
        Entry 0 the initial residual norm, entry ``k`` that after iteration ``k``. Its length
        is static: ``maxiter + 1`` for a concrete ``maxiter`` (``max_steps + 1`` for a traced
        one), NaN past ``iterations``; with a traced ``maxiter`` and no ``max_steps`` only
        ``[initial, final]``.
    status
        An int32 code: ``STATUSES[status]`` is the :class:`~prdp_ops.Status` (0 converged,
        1 maximum iterations, 2 breakdown, 3 non-finite).
    solver
        Name of the solver (static).
    """

    x: Any
    converged: Any
    iterations: Any
    residual_norms: Any
    status: Any
    solver: str = ""

    #: ``STATUSES[code]`` is the :class:`~prdp_ops.Status` of a status code.
    STATUSES = driver.STATUSES

    def to_solve_result(self) -> SolveResult:
        """The same result as a host :class:`~prdp_ops.SolveResult` (outside ``jit`` only)."""
        iterations = int(self.iterations)
        norms = np.asarray(self.residual_norms, dtype=np.float64)
        if norms.shape[0] > 2 or iterations <= 1:
            norms = norms[: iterations + 1]
        return SolveResult(x=self.x, converged=bool(self.converged), iterations=iterations,
                           residual_norms=norms, status=driver.STATUSES[int(self.status)],
                           solver=self.solver)


# -- operators -----------------------------------------------------------------------------------
class _ClosureOperator(LinearOperator):
    """A matvec function after ``jax.closure_convert``: the arrays it closes over that may
    carry gradients become the operator's parameters ``closure0``, ``closure1``, ..."""

    def __init__(self, fn: Callable, consts: tuple[Any, ...], n: int, dtype: Any,
                 hermitian: bool = False) -> None:
        super().__init__((n, n), dtype)
        self._fn, self._consts = fn, tuple(consts)
        self.hermitian = hermitian

    def _matvec(self, x: Any) -> Any:
        return self._fn(x, *self._consts)

    def _rmatvec(self, y: Any) -> Any:
        if self.hermitian:
            return self._matvec(y)
        # A^H y = conj(A^T conj(y)); JAX transposes the (linear) matvec for us.
        complex_data = jnp.issubdtype(self.dtype, jnp.complexfloating)
        conj = jnp.conj if complex_data else (lambda v: v)
        return conj(_linear_transpose(self._matvec, y)(conj(y)))

    def parameters(self) -> dict[str, Any]:
        return {f"closure{i}": c for i, c in enumerate(self._consts)}

    def with_parameters(self, params: dict[str, Any]) -> LinearOperator:
        consts = tuple(params[f"closure{i}"] for i in range(len(self._consts)))
        return _ClosureOperator(self._fn, consts, self.shape[0], self.dtype, self.hermitian)


def _linear_transpose(matvec: Callable, like: Any) -> Callable:
    transposed = jax.linear_transpose(matvec, jax.ShapeDtypeStruct(like.shape, like.dtype))
    return lambda y: transposed(y)[0]


class _AutoTransposed(LinearOperator):
    """``A^T`` by ``jax.linear_transpose`` of ``A``'s matvec (for operators without rmatvec)."""

    def __init__(self, A: LinearOperator) -> None:
        super().__init__((A.shape[1], A.shape[0]), A.dtype)
        self.A = A

    def _matvec(self, x: Any) -> Any:
        return _linear_transpose(self.A.matvec, x)(x)

    def diagonal(self) -> Any:
        return self.A.diagonal()

    def to_matrix(self) -> Any:
        return self.A.to_matrix().T


def _transpose(A: LinearOperator, like: Any) -> LinearOperator:
    """``A^T`` (no conjugation): the operator's own transpose if it has one, else JAX's."""
    try:
        jax.eval_shape(A.T.matvec, like)
    except NotImplementedError:
        return _AutoTransposed(A)
    return A.T


class _StructuredAdjoint(LinearOperator):
    """``rebuild(params)`` whose matvec JAX differentiates with the operator's own structure.

    Plain autodiff of a stencil's matvec transposes every shifted slice into a padded copy;
    the operator usually knows better: its ``rmatvec`` (the matvec itself when Hermitian)
    for ``x_bar = A^T y_bar``, and its ``param_vjp`` for the parameters. The unrolled
    reverse sweep applies the solver's steps to this wrapper, so each reverse step costs
    one forward-speed product with ``A^T``.
    """

    def __init__(self, rebuild: Callable[[dict[str, Any]], LinearOperator],
                 params: dict[str, Any]) -> None:
        inner = rebuild(params)
        super().__init__(inner.shape, inner.dtype)
        self.inner, self.hermitian = inner, inner.hermitian
        self._apply = _structured_matvec(rebuild)
        self._params = params

    def _matvec(self, x: Any) -> Any:
        return self._apply(self._params, x)

    def _rmatvec(self, y: Any) -> Any:
        return self.inner._rmatvec(y)

    def diagonal(self) -> Any:
        return self.inner.diagonal()

    def to_matrix(self) -> Any:
        return self.inner.to_matrix()


def _own_param_vjp(op: LinearOperator) -> bool:
    """Whether ``op`` implements ``param_vjp`` itself (not the closure or base default)."""
    method = type(op).param_vjp
    return method is not LinearOperator.param_vjp and not isinstance(op, _ClosureOperator)


def _like(cotangent: Any, param: Any) -> Any:
    """A cotangent shaped and typed like its (possibly real) parameter."""
    if cotangent is None:
        return jnp.zeros_like(param)
    cotangent = jnp.asarray(cotangent)
    if not jnp.issubdtype(param.dtype, jnp.complexfloating):
        cotangent = jnp.real(cotangent)
    return cotangent.astype(param.dtype).reshape(param.shape)


def _structured_matvec(rebuild: Callable) -> Callable:
    """``apply(params, x) = A(params) x``, differentiated with A's own transpose and
    parameter vjp."""

    @jax.custom_vjp
    def apply(params: dict[str, Any], x: Any) -> Any:
        return rebuild(params).matvec(x)

    def fwd(params: dict[str, Any], x: Any) -> tuple:
        return apply(params, x), (params, x)

    def bwd(residuals: tuple, y_bar: Any) -> tuple:
        params, x = residuals
        A = rebuild(params)
        x_bar = _transpose(A, x).matvec(y_bar)
        if not params:
            return {}, x_bar
        if _own_param_vjp(A):
            params_bar = {k: _like(A.param_vjp(x, y_bar).get(k), v) for k, v in params.items()}
        else:
            _, pull = jax.vjp(lambda p: rebuild(p).matvec(x), params)
            (params_bar,) = pull(y_bar)
        return params_bar, x_bar

    apply.defvjp(fwd, bwd)
    return apply


def _as_jax_operator(A: Any, b: Any, name: str, hermitian: bool = False) -> LinearOperator:
    """Turn what the user passed as ``A`` (or ``M``) into a LinearOperator of jax arrays."""
    if isinstance(A, LinearOperator):
        op = A
    elif isinstance(A, (jax.Array, np.ndarray)) or _is_bcoo(A):
        op = aslinearoperator(jnp.asarray(A) if isinstance(A, np.ndarray) else A,
                              hermitian=hermitian)
    elif _is_scipy_sparse(A):
        from jax.experimental import sparse as jax_sparse

        op = aslinearoperator(jax_sparse.BCOO.from_scipy_sparse(A), hermitian=hermitian)
    elif callable(A):
        op = _closure_operator(A, b, name, hermitian)
    else:
        raise TypeError(
            f"{name} must be a jax array, a jax BCOO matrix, a prdp_ops LinearOperator or a "
            f"matvec function x -> {name} @ x; got {type(A).__name__}. For other matrix types "
            "(scipy.sparse LinearOperator, ...) use backend='numpy'"
        )
    if not op.is_square:
        raise ValueError(
            f"{name} must be square for a linear solve; got shape {op.shape}. For a "
            "least-squares problem solve the normal equations (A^H A x = A^H b) instead"
        )
    return op


def _is_scipy_sparse(A: Any) -> bool:
    return (type(A).__module__ or "").startswith("scipy.sparse") and hasattr(A, "tocoo")


def _closure_operator(fn: Callable, b: Any, name: str, hermitian: bool) -> LinearOperator:
    try:
        out = jax.eval_shape(fn, b)
    except Exception as err:  # say which argument failed, then re-raise
        raise TypeError(f"{name}: calling the matvec function on b failed: {err}") from err
    if getattr(out, "shape", None) != b.shape:
        raise ValueError(
            f"{name}: the matvec function must map a vector of shape {b.shape} to the same "
            f"shape; it returned {getattr(out, 'shape', type(out).__name__)}"
        )
    example = b.astype(jnp.result_type(b.dtype, out.dtype))
    converted, consts = jax.closure_convert(fn, example)
    return _ClosureOperator(converted, tuple(consts), b.shape[0], jnp.result_type(out.dtype),
                            hermitian)


def _rebuilder(op: LinearOperator) -> Callable[[dict[str, Any]], LinearOperator]:
    if not op.parameters():
        return lambda params: op
    return op.with_parameters


# -- argument checking ---------------------------------------------------------------------------
def _choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")
    return value


def _is_traced(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


def _count(value: Any, name: str) -> Any:
    """A non-negative iteration count: a Python int, or an int32 scalar if traced."""
    if _is_traced(value):
        if value.shape != () or not jnp.issubdtype(value.dtype, jnp.integer):
            raise TypeError(f"{name} must be an integer scalar; got a traced {value.aval}")
        return value.astype(jnp.int32)
    if isinstance(value, bool) or not (
        isinstance(value, numbers.Integral)
        or (np.ndim(value) == 0 and np.issubdtype(np.asarray(value).dtype, np.integer))
    ):
        raise TypeError(f"{name} must be a non-negative int; got {value!r}")
    if int(value) < 0:
        raise ValueError(f"{name} must be a non-negative int; got {int(value)}")
    return int(value)


def _tolerance(value: Any, name: str) -> Any:
    """A tolerance: a Python float >= 0, or a real scalar if traced."""
    if _is_traced(value):
        if value.shape != () or not jnp.issubdtype(value.dtype, jnp.floating):
            raise TypeError(f"{name} must be a real scalar; got a traced {value.aval}")
        return value
    if isinstance(value, bool) or not (
        isinstance(value, numbers.Real) or (np.ndim(value) == 0 and np.isrealobj(value))
    ):
        raise TypeError(f"{name} must be a real number >= 0; got {value!r}")
    value = float(value)
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {value}")
    return value


def _solve_dtype(op: LinearOperator, b: Any, solver: IterativeSolver) -> Any:
    if not (jnp.issubdtype(b.dtype, jnp.number) and jnp.issubdtype(op.dtype, jnp.number)):
        raise TypeError(f"A and b must be numeric; got dtypes {op.dtype} and {b.dtype}")
    dtype = jnp.result_type(op.dtype, b.dtype, jnp.float32)
    if jnp.issubdtype(dtype, jnp.complexfloating) and not solver.supports_complex:
        raise TypeError(
            f"solver {solver.name!r} does not support complex data (dtype {dtype}); use "
            "'gmres', 'bicgstab' or 'cg' (Hermitian A), or split into real and imaginary parts"
        )
    return dtype


def _vector(v: Any, n: int, name: str, dtype: Any) -> Any:
    if isinstance(v, (list, tuple)) or isinstance(v, np.ndarray):
        v = jnp.asarray(v)
    shape = getattr(v, "shape", None)
    if shape not in ((n,), (n, 1)):
        raise ValueError(
            f"{name} must have shape ({n},) to match A of shape ({n}, {n}); got shape {shape}"
        )
    v = v.reshape(-1).astype(dtype)
    # A concrete vector is checked on the host (jnp ops would be staged under jit); a traced
    # one that is not finite is reported by the driver as a NaN residual.
    if not _is_traced(v) and not np.all(np.isfinite(np.asarray(v))):
        raise ValueError(f"{name} contains NaN or inf; pass finite values")
    return v


# -- failure reports -----------------------------------------------------------------------------
def _report(result: JaxSolveResult, on_failure: str, what: str,
            callback: Callable[[SolveResult], None] | None = None) -> None:
    """Apply the failure policy to a finished solve and hand it to ``callback``.

    Outside tracing this happens here; inside ``jit``/``vmap`` through ``jax.debug.callback``
    (a raised :class:`~prdp_ops.SolverError` then surfaces as a runtime error of the call),
    which only runs when the solve failed or a ``callback`` wants every result.
    """
    if on_failure == "ignore" and callback is None:
        return

    def host(res: JaxSolveResult) -> None:
        res = res.to_solve_result()
        if callback is not None:
            callback(res)
        report_failure(res, on_failure, what)

    if not any(_is_traced(leaf) for leaf in jax.tree_util.tree_leaves(result)):
        host(result)
        return
    if callback is None:
        # Only the numbers the message needs cross to the host, and only on failure.
        result = dataclasses.replace(result, x=jnp.zeros(()), residual_norms=jnp.zeros(1))
    needed = jnp.asarray(callback is not None) | (result.status >= driver.BREAKDOWN)
    lax.cond(needed, lambda: jax.debug.callback(host, result), lambda: None)


# -- the differentiable core ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class _Problem:
    """Everything static about one solve: the solver, how to build the operators from their
    parameters, the adjoint mode and the buffers' static sizes."""

    solver: IterativeSolver
    adjoint_solver: IterativeSolver
    rebuild: Callable[[dict[str, Any]], LinearOperator]
    rebuild_precond: Callable[[dict[str, Any]], LinearOperator] | None
    mode: str
    on_failure: str
    tape_capacity: int | None = None
    checkpoint_every: int = 1
    history_size: int | None = None
    adjoint_history_size: int | None = None
    adjoint_callback: Callable[[SolveResult], None] | None = None
    what: str = "solve"

    def operators(self, params: dict[str, Any], m_params: dict[str, Any]) -> tuple[Any, Any]:
        M = None if self.rebuild_precond is None else self.rebuild_precond(m_params)
        return self.rebuild(params), M

    def adjoint(self, like: Any) -> _Problem:
        """The problem ``A^T lambda = x_bar`` (implicit itself, so it is differentiable)."""
        rebuild, precond = self.rebuild, self.rebuild_precond
        return dataclasses.replace(
            self, solver=self.adjoint_solver, adjoint_solver=self.solver,
            rebuild=lambda p: _transpose(rebuild(p), like),
            rebuild_precond=None if precond is None else (lambda q: _transpose(precond(q), like)),
            mode="implicit", tape_capacity=None, history_size=self.adjoint_history_size,
            adjoint_history_size=self.history_size, adjoint_callback=None,
            what=f"adjoint of the {self.what}",
        )


def _forward(problem: _Problem, params: dict[str, Any], m_params: dict[str, Any], b: Any,
             x0: Any, controls: tuple, tape: driver.Tape | None = None) -> tuple:
    """Run the solve: ``(x, info, loop)`` with ``info = (iterations, status, history)``."""
    A, M = problem.operators(params, m_params)
    maxiter, rtol, atol = controls[:3]
    bnorm = OPS.norm(b)
    tol = jnp.maximum(rtol * bnorm, atol)
    # As SciPy: b = 0 with a tolerance is solved exactly by x = 0 in 0 iterations.
    zero_rhs = (bnorm == 0) & ((rtol > 0) | (atol > 0))
    tol = jnp.where(zero_rhs, jnp.ones_like(tol), tol)
    loop = driver.run_loop(problem.solver, OPS, A, M, b, x0, maxiter, tol,
                           history_size=problem.history_size, tape=tape)
    return loop.x, (loop.iterations, loop.status, loop.history), loop


def _solve_core(problem: _Problem, params: dict[str, Any], m_params: dict[str, Any], b: Any,
                x0: Any, controls: tuple) -> tuple[Any, tuple]:
    """``(x, info)`` with the derivative ``problem.mode`` asks for."""
    rtol, atol = controls[1:3]
    zero_rhs = (OPS.norm(b) == 0) & ((rtol > 0) | (atol > 0))
    x0 = jnp.where(zero_rhs, jnp.zeros_like(x0), x0)
    if problem.mode == "none":
        params, m_params, b, x0 = lax.stop_gradient((params, m_params, b, x0))
        x, info, _ = _forward(problem, params, m_params, b, x0, controls)
        return x, info
    return _differentiable(problem)(params, m_params, b, x0, controls)


def _differentiable(problem: _Problem) -> Callable:
    """The solve as a ``jax.custom_vjp`` function of ``(params, m_params, b, x0, controls)``."""

    @jax.custom_vjp
    def solve_fn(params: dict, m_params: dict, b: Any, x0: Any, controls: tuple) -> tuple:
        x, info, _ = _forward(problem, params, m_params, b, x0, controls)
        return x, info

    def implicit_fwd(params: dict, m_params: dict, b: Any, x0: Any, controls: tuple) -> tuple:
        # Calling solve_fn (not _forward) keeps this differentiable for second derivatives.
        x, info = solve_fn(params, m_params, b, x0, controls)
        return (x, info), (params, m_params, controls, x)

    def implicit_bwd(residuals: tuple, cotangents: tuple) -> tuple:
        params, m_params, controls, x = residuals
        params_bar, b_bar = _implicit_pullback(problem, params, m_params, controls, x,
                                               cotangents[0])
        return (params_bar, _zeros(m_params), b_bar, None, _nones(controls))

    def unrolled_fwd(params: dict, m_params: dict, b: Any, x0: Any, controls: tuple) -> tuple:
        A, M = problem.operators(params, m_params)
        state = problem.solver.init(OPS, A, b, x0, M)
        keys = driver.keys_read_by_step(problem.solver, OPS, A, M, b, state)
        tape = driver.Tape(max(problem.tape_capacity, 1), keys, problem.checkpoint_every)
        x, info, loop = _forward(problem, params, m_params, b, x0, controls, tape)
        return (x, info), (params, m_params, b, x0, controls, loop)

    def unrolled_bwd(residuals: tuple, cotangents: tuple) -> tuple:
        params, m_params, b, x0, controls, loop = residuals
        tape = driver.Tape(max(problem.tape_capacity, 1), tuple(loop.tape),
                           problem.checkpoint_every)
        _, M = problem.operators(params, m_params)
        structured = functools.partial(_StructuredAdjoint, problem.rebuild)
        params_bar, b_bar, x0_bar = driver.unrolled_pullback(
            problem.solver, OPS, structured, M, params, b, x0, loop, tape, cotangents[0])
        return (params_bar, _zeros(m_params), b_bar, x0_bar, _nones(controls))

    if problem.mode == "implicit":
        solve_fn.defvjp(implicit_fwd, implicit_bwd)
    else:
        solve_fn.defvjp(unrolled_fwd, unrolled_bwd)
    return solve_fn


def _zeros(tree: Any) -> Any:
    return jax.tree_util.tree_map(jnp.zeros_like, tree)


def _nones(controls: tuple) -> tuple:
    return tuple(None for _ in controls)


def _implicit_pullback(problem: _Problem, params: dict[str, Any], m_params: dict[str, Any],
                       controls: tuple, x: Any, x_bar: Any) -> tuple[dict[str, Any], Any]:
    """Solve ``A^T lambda = x_bar``; return ``(A's parameter cotangents, b_bar = lambda)``.

    As on NumPy, the right-hand side is scaled to unit max-norm (CG's ``rho = <r, r>`` of a
    cotangent of size 1e-200 would underflow to 0 and give 0/0 = NaN) and the absolute
    tolerance scaled with it. ``A^T lambda = x_bar`` is the NumPy side's ``A^H mu =
    conj(x_bar)``, ``lambda = conj(mu)``, written without the two conjugations.
    """
    maxiter, rtol, atol, adjoint_maxiter, adjoint_rtol, adjoint_atol = controls
    scale = jnp.max(jnp.abs(x_bar))
    safe = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    rhs = x_bar / safe
    adjoint = problem.adjoint(x)
    adjoint_controls = (adjoint_maxiter, adjoint_rtol, adjoint_atol / safe, maxiter, rtol, atol)
    lam, (iterations, status, history) = _solve_core(
        adjoint, params, m_params, rhs, jnp.zeros_like(rhs), adjoint_controls)
    lam = lam * safe
    result = JaxSolveResult(lam, status == driver.CONVERGED, iterations, history * safe, status,
                            adjoint.solver.name or type(adjoint.solver).__name__)
    _report(lax.stop_gradient(result), problem.on_failure, adjoint.what,
            problem.adjoint_callback)
    _, pull = jax.vjp(lambda p: problem.rebuild(p).matvec(x), params)
    (params_bar,) = pull(-lam)
    return params_bar, lam


# -- the public entry point ----------------------------------------------------------------------
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
    checkpoint_every: int = 1,
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
        :func:`prdp_ops.aslinearoperator` takes is accepted too (gradients then reach b and
        the jax arrays only).
    b
        Right-hand side, shape ``(n,)`` or ``(n, 1)``; ``x`` has the same shape.
    solver
        A registered name (:func:`prdp_ops.available_solvers`) or an instance.
    x0
        Initial guess (default zeros). In ``"unrolled"`` mode it receives a cotangent.
    maxiter
        Iteration limit (default ``10 n``); may be a traced integer. With ``rtol = atol =
        0`` exactly ``maxiter`` iterations run.
    rtol, atol
        Stop once ``||b - A x|| <= max(rtol ||b||, atol)``; may be traced.
    M
        Preconditioner approximating ``A^-1`` (same forms as ``A``). A constant: it receives
        no cotangent. The adjoint solve uses its transpose.
    adjoint
        ``"implicit"``: one adjoint solve ``A^T lambda = x_bar``, then ``b_bar = lambda`` and
        A's cotangent is the vjp of ``p -> A(p) x`` at ``-lambda`` (``-lambda x^T`` for a
        matrix). Exact at convergence; memory ``O(n)``; twice differentiable.
        ``"unrolled"``: the exact derivative of the iterations that ran, derived by JAX from
        the solver's ``step`` (a ``jax.vjp`` of one step at a time, not autodiff of the
        loop). Memory: one state per iteration, of the entries ``step`` reads (CG: ``r, p, x``
        and two scalars; XLA drops ``x``, which the reverse sweep does not need, so ``2 n``
        numbers per iteration), for a static capacity of ``maxiter`` iterations
        (``max_steps`` when ``maxiter`` is traced), allocated whether or not the solve stops
        early; with ``checkpoint_every=c``, ``maxiter / c + c`` states and one more forward
        pass. Each reverse step re-evaluates its forward step, so the backward pass costs
        several forward passes (see ``benchmarks/jax_vs_peers.py``), and less memory and
        time than reverse-mode autodiff of a ``lax.scan`` of the same iterations.
        ``"none"``: no gradient (``stop_gradient``).
    adjoint_maxiter, adjoint_rtol, adjoint_atol, adjoint_solver
        The adjoint solve's own settings (default: the forward's).
    backend
        ``"jax"`` (native), ``"numpy"`` (the NumPy implementation through
        ``jax.pure_callback``; see :mod:`prdp_ops.backends._jax_bridge`) or ``"cupy"`` (the
        CuPy implementation on the GPU, arrays exchanged by DLPack; needs cupy and a GPU).
    return_result
        Also return a :class:`JaxSolveResult` (a pytree of jax arrays): ``(x, result)``.
        Residual history is kept only then.
    max_steps
        Static capacity for a traced ``maxiter``: the residual history has ``max_steps + 1``
        entries and ``"unrolled"`` keeps at most ``max_steps`` states (required there). The
        iteration count is capped at ``max_steps`` (a warning is logged when it bites).
    checkpoint_every
        ``"unrolled"`` only: keep every ``c``-th state and recompute the others during the
        backward pass.
    on_failure
        What a breakdown or a NaN does besides being reported in the result, in the forward
        and in the adjoint solve alike: ``"warn"`` (log a warning, default), ``"raise"``
        (:class:`~prdp_ops.SolverError`; inside ``jit`` it surfaces as the runtime error of
        the call, from a host callback) or ``"ignore"``.
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
    Call it inside ``jax.jit``: outside, every call traces and compiles its loop anew.
    Differentiation is reverse mode (``jax.grad``, ``jax.vjp``); ``jax.jvp`` is not
    defined for a ``custom_vjp``. The convergence information does not carry gradients.

    Raises
    ------
    ValueError, TypeError, KeyError
        At trace time, for a bad shape or dtype, a non-square ``A``, an unknown solver,
        adjoint mode or backend, or a missing ``max_steps`` (see above).
    """
    adjoint = _choice(adjoint, "adjoint", ADJOINT_MODES)
    backend = _choice(backend, "backend", BACKENDS)
    on_failure = _choice(on_failure, "on_failure", FAILURE_POLICIES)
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
    op = _as_jax_operator(A, b.reshape(-1), "A", hermitian)
    n = op.shape[0]
    dtype = _solve_dtype(op, b, solver)
    b = _vector(b, n, "b", dtype)
    x0 = jnp.zeros(n, dtype) if x0 is None else _vector(x0, n, "x0", dtype)
    M_op = _preconditioner(M, solver, op, b)

    maxiter = 10 * n if maxiter is None else _count(maxiter, "maxiter")
    controls = _controls(maxiter, rtol, atol, adjoint_maxiter, adjoint_rtol, adjoint_atol)
    capacity = _capacity(maxiter, max_steps, adjoint)
    checkpoint_every = _count(checkpoint_every, "checkpoint_every") or 1
    adjoint_capacity = (adjoint_maxiter if adjoint_maxiter is not None else maxiter)
    if n == 0:  # the empty vector solves it; no solver runs (as on the bridge)
        from prdp_ops.backends._jax_bridge import empty_solve

        return empty_solve(b_in, dtype, capacity if return_result else None, return_result,
                           solver)
    problem = _Problem(
        solver=solver, adjoint_solver=adjoint_solver, rebuild=_rebuilder(op),
        rebuild_precond=None if M_op is None else _rebuilder(M_op), mode=adjoint,
        on_failure=on_failure, tape_capacity=capacity, checkpoint_every=checkpoint_every,
        history_size=capacity if return_result else None,
        adjoint_history_size=(adjoint_capacity if adjoint_callback is not None
                              and not _is_traced(adjoint_capacity) else None),
        adjoint_callback=adjoint_callback, what=f"{solver.name or type(solver).__name__} solve",
    )
    params = op.parameters()
    m_params = {} if M_op is None else M_op.parameters()
    x, (iterations, status, history) = _solve_core(problem, params, m_params, b, x0, controls)
    result = JaxSolveResult(x, status == driver.CONVERGED, iterations, history, status,
                            solver.name or type(solver).__name__)
    _report(lax.stop_gradient(result), on_failure, problem.what)
    if capacity is not None and _is_traced(maxiter):
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
    M_op = _as_jax_operator(M, b, "M")
    if M_op.shape != op.shape:
        raise ValueError(f"M must have A's shape {op.shape}; got {M_op.shape}")
    return M_op


def _controls(maxiter: Any, rtol: Any, atol: Any, adjoint_maxiter: Any, adjoint_rtol: Any,
              adjoint_atol: Any) -> tuple:
    """The six run-time numbers as jax scalars (traced or not: one compilation for all)."""
    rtol, atol = _tolerance(rtol, "rtol"), _tolerance(atol, "atol")
    adjoint_maxiter = maxiter if adjoint_maxiter is None else _count(adjoint_maxiter,
                                                                     "adjoint_maxiter")
    adjoint_rtol = rtol if adjoint_rtol is None else _tolerance(adjoint_rtol, "adjoint_rtol")
    adjoint_atol = atol if adjoint_atol is None else _tolerance(adjoint_atol, "adjoint_atol")
    real = jnp.result_type(float)
    return (jnp.asarray(maxiter, jnp.int32), jnp.asarray(rtol, real), jnp.asarray(atol, real),
            jnp.asarray(adjoint_maxiter, jnp.int32), jnp.asarray(adjoint_rtol, real),
            jnp.asarray(adjoint_atol, real))


def _capacity(maxiter: Any, max_steps: Any, adjoint: str) -> int | None:
    """The static number of iterations buffers are sized for (``None``: unknown)."""
    if max_steps is not None:
        max_steps = _count(max_steps, "max_steps")
        if _is_traced(max_steps):
            raise TypeError("max_steps must be a static int (it sizes buffers); got a tracer")
        if not _is_traced(maxiter) and maxiter > max_steps:
            raise ValueError(
                f"maxiter={maxiter} exceeds max_steps={max_steps}; raise max_steps or lower "
                "maxiter"
            )
    if not _is_traced(maxiter):
        return maxiter
    if max_steps is None and adjoint == "unrolled":
        raise ValueError(
            "adjoint='unrolled' with a traced maxiter needs a static max_steps=K (the most "
            "iterations any call will run): the reverse sweep keeps one state per iteration "
            "in a buffer whose size must be known when compiling"
        )
    return max_steps


def _warn_if_capped(maxiter: Any, capacity: int, iterations: Any, status: Any) -> None:
    def host(maxiter: Any, iterations: Any, status: Any) -> None:
        if int(maxiter) > capacity and int(iterations) >= capacity and int(status) == 1:
            logger.warning("maxiter=%d was capped at max_steps=%d; raise max_steps",
                           int(maxiter), capacity)

    jax.debug.callback(host, maxiter, iterations, status)


