"""The bridge: a NumPy (or CuPy) solve called from jitted JAX code.

``prdp_ops.backends.jax.solve(..., backend="numpy")`` runs ``po.solve`` on the host through
``jax.pure_callback`` and gives it a ``jax.custom_vjp``:

* forward: one callback runs the NumPy driver and returns ``x`` with its convergence
  information;
* ``adjoint="implicit"``: a second callback runs the adjoint solve with the forward's ``x``
  (the forward is not repeated) -- the core's implicit vjp, with its transposed
  preconditioner, rescaled right-hand side and failure policy;
* ``adjoint="unrolled"``: the backward callback reruns the forward solve with a tape and
  sweeps it in reverse (``po.solve_vjp``): about two forward solves plus the reverse sweep.
  Nothing is kept on the host between the two callbacks, so jit, vmap and grad compose.
  ``x0`` receives its cotangent here (in implicit mode it has none: at convergence ``x``
  does not depend on ``x0``), as on the native JAX path.

Same policy, same outcome as native JAX. A concrete ``b`` or ``x0`` with NaN/inf is refused
at trace time (ValueError), as natively. Traced ones reach the host callbacks, which must
not raise for data (a raise there is an opaque ``JaxRuntimeError`` of the whole call): the
NumPy solve runs on them and reports :attr:`~prdp_ops.Status.NONFINITE` with ``x = x0``,
under ``on_failure`` -- a warning logged for "warn", nothing for "ignore", and a
:class:`~prdp_ops.SolverError` for "raise" (which inside ``jit`` surfaces as the runtime
error of the call, as natively; an eager call with nothing traced runs the host function
directly and raises the SolverError itself, as natively). Errors in the arguments
themselves (a matvec function returning the wrong shape, a non-callable
``adjoint_callback``) are raised at trace time.
An empty system (``n = 0``) is solved by the empty vector without a callback.

Under ``vmap`` both callbacks receive the whole batch (``vmap_method="expand_dims"``): a batch
of right-hand sides with everything else shared is one block solve on the host (one product
of ``A`` with the ``k`` columns per iteration; :mod:`prdp_ops.backends._jax_bridge_batch`),
any other batch is solved one problem at a time. ``maxiter`` and the tolerances travel as
callback operands, so they may be traced here too.

A may be a dense jax array, a jax BCOO matrix, a ``po.LinearOperator`` whose parameters are
jax arrays (gradients reach all of these), or anything ``po.aslinearoperator`` takes (a
scipy.sparse matrix, a NumPy array, a SciPy LinearOperator: a constant, no gradient).
``x0`` and ``M`` are constants on the bridge.

CuPy hook: with ``backend="cupy"`` the same host functions run on CuPy arrays, and the
transport is ``prdp_ops.backends.cupy.jax_callback(fn, result_shape_dtypes, *args,
vmap_method=...)``: the contract of ``jax.pure_callback``, except that ``fn`` receives and
returns CuPy arrays that share device memory with JAX's buffers (DLPack; no host round trip).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from prdp_ops.backends import _jax_args as jax_args
from prdp_ops.backends import _jax_bridge_batch as batch
from prdp_ops.backends import _jax_driver as driver

import prdp_ops as po
from prdp_ops import _solve as core
from prdp_ops import _solve_args as solve_args
from prdp_ops._array_ops import array_backend_name
from prdp_ops._operators.base import LinearOperator
from prdp_ops._solver.base import IterativeSolver

__all__ = ["bridge_solve", "empty_solve"]


# -- operators on the host -----------------------------------------------------------------------
def _is_bcoo(a: Any) -> bool:
    return (type(a).__module__ or "").startswith("jax.experimental.sparse")


@dataclasses.dataclass(frozen=True, eq=False)
class _HostOperator:
    """How to rebuild A on the host from the arrays the callback receives, and how its
    cotangent maps back to those arrays.

    ``kind``: "dense" (a jax matrix), "bcoo" (jax BCOO: ``data`` differentiable,
    ``indices`` a constant operand), "operator" (a LinearOperator with jax parameters) or
    "constant" (anything else ``po.aslinearoperator`` takes, kept in the closure).
    """

    kind: str
    shape: tuple[int, int]
    dtype: Any
    params: dict[str, Any]  # jax arrays that receive cotangents
    constants: tuple[Any, ...]  # jax arrays passed to the callback without cotangents
    template: Any = None  # the LinearOperator ("operator") or the constant A

    def build(self, params: dict[str, Any], constants: tuple[Any, ...]) -> LinearOperator:
        if self.kind == "dense":
            return po.DenseOperator(params["matrix"])
        if self.kind == "bcoo":
            return po.SparseOperator(_sparse_matrix(params["data"], constants[0], self.shape))
        if self.kind == "operator":
            return self.template.with_parameters(params)
        return po.aslinearoperator(self.template)

    def param_cotangents(self, A_bar: Any, params: dict[str, Any],
                        constants: tuple[Any, ...]) -> dict[str, Any]:
        """Turn ``Cotangents.A`` into cotangents of :attr:`params` (host arrays)."""
        if self.kind == "dense":
            return {"matrix": A_bar}
        if self.kind == "bcoo":
            indices = constants[0]
            # A_bar has the canonical CSR's pattern; every BCOO entry (duplicates included)
            # receives the cotangent of the position it adds to.
            values = A_bar[indices[:, 0], indices[:, 1]]
            return {"data": _xp(params["data"]).asarray(values).reshape(-1)}
        if self.kind == "operator":
            if isinstance(A_bar, dict):
                return A_bar
            # Operators whose format_cotangent is not a dict (a dense/sparse wrapper).
            return {name: A_bar for name in params}
        return {}


def _xp(a: Any) -> Any:
    if array_backend_name(a) == "cupy":
        import cupy

        return cupy
    return np


def _sparse_matrix(data: Any, indices: Any, shape: tuple[int, int]) -> Any:
    """A scipy (or cupyx) COO matrix from BCOO data and indices; CSR conversion sums repeats."""
    if array_backend_name(data) == "cupy":
        import cupyx.scipy.sparse as sparse
    else:
        import scipy.sparse as sparse
    return sparse.coo_matrix((data, (indices[:, 0], indices[:, 1])), shape=shape)


def _host_operator(A: Any, name: str, probe: bool = True) -> _HostOperator:
    """How ``A`` crosses to the host; ``probe``: check a matrix-free NumPy operator's
    output shape now (see :func:`_probe_matvec`; not for CuPy, whose operators would
    receive a NumPy vector)."""
    if isinstance(A, (po.DenseOperator, po.SparseOperator)) and array_backend_name(
            A.matrix) == "jax":
        A = A.matrix  # the matrix itself, so its cotangent maps back entry by entry
    if isinstance(A, LinearOperator):
        params = A.parameters()
        if any(array_backend_name(v) == "jax" for v in params.values()):
            return _HostOperator("operator", A.shape, A.dtype, params, (), A)
        if probe:
            _probe_matvec(A, name)
        return _HostOperator("constant", A.shape, A.dtype, {}, (), A)
    if _is_bcoo(A):
        return _HostOperator("bcoo", A.shape, A.dtype, {"data": A.data}, (A.indices,))
    if isinstance(A, jax.Array):
        if A.ndim != 2:
            raise ValueError(f"{name} must be a 2-D matrix; got an array of shape {A.shape}")
        return _HostOperator("dense", A.shape, A.dtype, {"matrix": A}, ())
    if callable(A) and not hasattr(A, "shape"):
        raise TypeError(
            f"{name}: a matvec function cannot cross the bridge to NumPy; pass a matrix, a "
            "po.LinearOperator (e.g. po.FunctionOperator for a NumPy function), or use "
            "backend='jax'"
        )
    op = solve_args.as_operator(A, name)  # the core's checks and messages
    if probe:
        _probe_matvec(op, name)
    return _HostOperator("constant", op.shape, op.dtype, {}, (), A)


def _probe_matvec(op: LinearOperator, name: str) -> None:
    """Apply a matrix-free operator once, to a zero vector, at trace time.

    Its matvec is user code (a ``po.FunctionOperator``, a SciPy LinearOperator, a sum or
    product of them) whose output shape nothing else guarantees. On the host inside
    ``jit`` a wrong shape would surface as an opaque callback error of the whole call;
    native JAX checks it at trace time (``jax.eval_shape``), and so does this, at the cost
    of one matvec per trace. Matrices are exempt: their shape is the check.
    """
    if isinstance(op, (po.DenseOperator, po.SparseOperator)) or op.shape[1] == 0:
        return
    try:
        op.matvec(np.zeros(op.shape[1], dtype=op.dtype))
    except (TypeError, ValueError) as err:
        raise type(err)(f"{name}: {err}") from None


# -- the bridge ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class _Bridge:
    """Static description of one bridged solve."""

    A: _HostOperator
    M: _HostOperator | None
    solver: IterativeSolver
    adjoint_solver: IterativeSolver
    adjoint: str
    on_failure: str
    n: int
    dtype: Any
    history_size: int | None
    transport: Callable
    adjoint_callback: Callable | None

    # -- host side (runs inside the callbacks) ------------------------------------------------
    def problem(self, params: dict, constants: tuple, m_params: dict, m_constants: tuple,
                b: Any, x0: Any, controls: Any) -> core._Problem:
        maxiter, rtol, atol = int(controls[0]), float(controls[1]), float(controls[2])
        A = self.A.build(params, constants)
        M = None if self.M is None else self.M.build(m_params, m_constants)
        # check_finite=False: a NaN here came from a traced b or x0 (concrete ones were
        # refused at trace time) and is reported as NONFINITE, not raised (see above).
        return core._Problem(A, b, self.solver, x0, maxiter, rtol, atol, M, self.on_failure,
                             1, {}, check_finite=False)

    def forward_host(self, *args: Any) -> tuple:
        """The forward callback: one problem, or a batch under ``vmap`` (see
        :mod:`prdp_ops.backends._jax_bridge_batch`)."""
        if np.ndim(args[4]) > 1:
            return batch.batched_forward(self, args)
        return self.forward_one(*args)

    def backward_host(self, *args: Any) -> tuple:
        """The backward callback: one problem, or a batch under ``vmap``."""
        if np.ndim(args[4]) > 1:
            return batch.batched_backward(self, args)
        return self.backward_one(*args)

    def forward_one(self, params: dict, constants: tuple, m_params: dict,
                    m_constants: tuple, b: Any, x0: Any, controls: Any) -> tuple:
        problem = self.problem(params, constants, m_params, m_constants, b, x0, controls)
        result = problem.run().result
        return (_xp(b).asarray(result.x, dtype=self.dtype).reshape(self.n),
                *self.encode(result))

    def encode(self, result: po.SolveResult) -> tuple:
        """Iterations, status code and residual history as the callback declares them."""
        return _encode(result, self.history_size, np.finfo(self.dtype).dtype)

    @staticmethod
    def xp(a: Any) -> Any:
        """The array module of a host array (numpy or cupy)."""
        return _xp(a)

    def host_params_bar(self, A_bar: Any, params: dict, constants: tuple) -> dict:
        """``Cotangents.A`` as cotangents of the callback's parameter arrays."""
        xp = _xp(next(iter(params.values())))
        params_bar = self.A.param_cotangents(A_bar, params, constants)
        return {k: xp.asarray(v, dtype=params[k].dtype).reshape(params[k].shape)
                for k, v in params_bar.items()}

    def backward_one(self, params: dict, constants: tuple, m_params: dict,
                     m_constants: tuple, b: Any, x0: Any, controls: Any, x: Any,
                     x_bar: Any) -> tuple:
        """``(b_bar, params_bar)``, and ``x0_bar`` last in unrolled mode."""
        problem = self.problem(params, constants, m_params, m_constants, b, x0, controls)
        if self.adjoint == "unrolled":
            run = problem.run(keep_tape=True)
            cotangents = core._unrolled_vjp(problem, run)(x_bar)
        else:
            settings = core._adjoint_problem(problem, self.adjoint_solver, int(controls[3]),
                                             float(controls[4]), float(controls[5]))
            cotangents = core._implicit_vjp(problem, settings, x)(x_bar)
            if self.adjoint_callback is not None and cotangents.adjoint_result is not None:
                self.adjoint_callback(cotangents.adjoint_result)
        xp = _xp(b)
        params_bar = self.host_params_bar(cotangents.A, params, constants) if params else {}
        b_bar = xp.asarray(cotangents.b, dtype=self.dtype).reshape(self.n)
        if self.adjoint == "unrolled":
            return b_bar, params_bar, xp.asarray(cotangents.x0, dtype=self.dtype).reshape(self.n)
        return b_bar, params_bar

    # -- device side ----------------------------------------------------------------------------
    def result_shapes(self) -> tuple:
        real = jnp.finfo(self.dtype).dtype
        size = 2 if self.history_size is None else self.history_size + 1
        return (jax.ShapeDtypeStruct((self.n,), self.dtype),
                jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32),
                jax.ShapeDtypeStruct((size,), real), jax.ShapeDtypeStruct((), real))

    def function(self) -> Callable:
        """The bridged solve as a ``custom_vjp`` function."""

        def call_forward(params: dict, constants: tuple, m_params: dict, m_constants: tuple,
                         b: Any, x0: Any, controls: Any) -> tuple:
            return self.transport(self.forward_host, self.result_shapes(), params, constants,
                                  m_params, m_constants, b, x0, controls,
                                  vmap_method="expand_dims")

        @jax.custom_vjp
        def solve_fn(params: dict, constants: tuple, m_params: dict, m_constants: tuple,
                     b: Any, x0: Any, controls: Any) -> tuple:
            return call_forward(params, constants, m_params, m_constants, b, x0, controls)

        def fwd(*args: Any) -> tuple:
            out = call_forward(*args)
            return out, (*args, out[0])

        def bwd(residuals: tuple, cotangents: tuple) -> tuple:
            params, constants, m_params, m_constants, b, x0, controls, x = residuals
            vector = jax.ShapeDtypeStruct((self.n,), self.dtype)
            shapes = (vector,
                      {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in params.items()})
            if self.adjoint == "unrolled":
                shapes = (*shapes, vector)
            out = self.transport(
                self.backward_host, shapes, params, constants, m_params, m_constants, b, x0,
                controls, x, cotangents[0], vmap_method="expand_dims")
            b_bar, params_bar = out[:2]
            # Implicit: x0 has no cotangent (None is JAX's zero), as on the native path.
            x0_bar = out[2] if self.adjoint == "unrolled" else None
            none = jax.tree_util.tree_map(lambda _: None, (constants, m_params, m_constants))
            return (params_bar, *none, b_bar, x0_bar, None)

        solve_fn.defvjp(fwd, bwd)
        return solve_fn


def empty_solve(b_in: Any, dtype: Any, history_size: int | None, return_result: bool,
                solver: IterativeSolver) -> Any:
    """``prdp_ops.backends.jax.solve`` of an empty system (``n = 0``), native and bridged.

    The empty vector solves it exactly, in 0 iterations, so no solver runs (a Krylov
    recurrence would index its first basis vector, a max-norm of an empty cotangent has no
    identity). ``x`` depends on nothing, so every cotangent is an empty zero. The result
    has the shapes a solve would have: ``history_size + 1`` residual norms (0, then NaN),
    or ``[initial, final]``.
    """
    x = jnp.zeros(jnp.shape(b_in), dtype)
    if not return_result:
        return x
    from prdp_ops.backends import jax as pj

    real = jnp.finfo(dtype).dtype
    history = (jnp.zeros(2, real) if history_size is None
               else jnp.full(history_size + 1, jnp.nan, real).at[0].set(0))
    return x, pj.JaxSolveResult(x, jnp.asarray(True), jnp.asarray(0, jnp.int32), history,
                                jnp.asarray(driver.STATUSES.index(po.Status.CONVERGED),
                                            jnp.int32),
                                solver.name or type(solver).__name__, jnp.zeros((), real))


def _encode(result: po.SolveResult, history_size: int | None, real: Any) -> tuple:
    """Iterations, status code, residual history and true residual norm (NaN when the
    driver computed none; in the solve's real dtype ``real``, as the callback's result shapes
    declare them) as fixed-shape host arrays."""
    norms = np.asarray(result.residual_norms, dtype=np.float64)
    if history_size is None:
        history = np.array([norms[0], norms[-1]])
    else:
        history = np.full(history_size + 1, np.nan)
        history[: norms.size] = norms[: history_size + 1]
    true = np.nan if result.true_residual_norm is None else result.true_residual_norm
    return (np.int32(result.iterations), np.int32(driver.STATUSES.index(result.status)),
            history.astype(real), np.asarray(true, dtype=real))


def _numpy_transport(fn: Callable, result_shapes: Any, *args: Any, vmap_method: str) -> Any:
    """``jax.pure_callback`` with the callback's arguments as NumPy arrays."""

    def on_host(*host_args: Any) -> Any:
        return fn(*jax.tree_util.tree_map(np.asarray, host_args))

    return jax.pure_callback(on_host, result_shapes, *args, vmap_method=vmap_method)


def _transport(backend: str) -> Callable:
    if backend == "numpy":
        return _numpy_transport
    try:
        from prdp_ops.backends import cupy as cupy_backend
    except ImportError as err:
        raise RuntimeError(f"backend='cupy' needs CuPy and a CUDA GPU: {err}") from err
    reason = cupy_backend.gpu_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"backend='cupy' needs a CUDA GPU: {reason}")
    hook = getattr(cupy_backend, "jax_callback", None)
    if hook is None:
        raise NotImplementedError(
            "backend='cupy' needs prdp_ops.backends.cupy.jax_callback (the DLPack transport "
            "with jax.pure_callback's contract), which this installation lacks"
        )
    return hook


def bridge_solve(A: Any, b: Any, solver: IterativeSolver, *, backend: str, x0: Any,
                 maxiter: Any, rtol: Any, atol: Any, M: Any, adjoint: str,
                 adjoint_maxiter: Any, adjoint_rtol: Any, adjoint_atol: Any,
                 adjoint_solver: IterativeSolver, return_result: bool, on_failure: str,
                 adjoint_callback: Callable | None = None) -> Any:
    """``prdp_ops.backends.jax.solve`` for ``backend="numpy"``/``"cupy"`` (same arguments)."""
    from prdp_ops.backends import jax as pj

    transport = _transport(backend)
    if adjoint == "unrolled" and not solver.supports_unrolled_numpy:
        raise NotImplementedError(
            f"solver {solver.name!r} has no reverse step on NumPy/CuPy, so adjoint='unrolled' "
            "is unavailable on the bridge: use backend='jax' (which derives it) or "
            "adjoint='implicit'"
        )
    b_in = b if hasattr(b, "shape") else jnp.asarray(b)
    host_A = _host_operator(A, "A", probe=backend == "numpy")
    if host_A.shape[0] != host_A.shape[1]:
        raise ValueError(
            f"A must be square for a linear solve; got shape {host_A.shape}. For a "
            "least-squares problem solve the normal equations (A^H A x = A^H b) instead"
        )
    n = host_A.shape[0]
    # Promoted as on the native path (jnp.linalg.solve's rules, strict promotion honoured).
    dtype = jax_args.solve_dtype(host_A.dtype, b_in.dtype, solver)
    b = pj._vector(b_in, n, "b", dtype)
    x0 = jnp.zeros(n, dtype) if x0 is None else pj._vector(x0, n, "x0", dtype)
    host_M = None
    if M is not None:
        if not solver.supports_preconditioner:
            raise ValueError(f"solver {solver.name!r} takes no preconditioner M")
        host_M = _host_operator(M, "M", probe=backend == "numpy")
    maxiter = 10 * n if maxiter is None else pj._count(maxiter, "maxiter")
    controls = jnp.stack([c.astype(jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
                          for c in pj._controls(maxiter, rtol, atol, adjoint_maxiter,
                                                adjoint_rtol, adjoint_atol)])
    history_size = None if pj._is_traced(maxiter) or not return_result else maxiter
    if n == 0:
        return empty_solve(b_in, dtype, history_size, return_result, solver)
    bridge = _Bridge(host_A, host_M, solver, adjoint_solver, adjoint, on_failure, n, dtype,
                     history_size, transport, adjoint_callback)
    m_params = {} if host_M is None else host_M.params
    m_constants = () if host_M is None else host_M.constants
    args = (host_A.params, host_A.constants, m_params, m_constants, b, x0, controls)
    if adjoint == "none":
        args = jax.lax.stop_gradient(args)
    if backend == "numpy" and not any(pj._is_traced(a) for a in jax.tree_util.tree_leaves(args)):
        # Nothing to trace or differentiate: the host function runs directly, so that under
        # on_failure="raise" the caller gets the SolverError itself, as from a native eager
        # solve (through a callback it would be an opaque JaxRuntimeError).
        out = bridge.forward_host(*jax.tree_util.tree_map(np.asarray, args))
        x, iterations, status, history, true_norm = (
            jnp.asarray(o, s.dtype) for o, s in zip(out, bridge.result_shapes(), strict=True))
    else:
        x, iterations, status, history, true_norm = bridge.function()(*args)
    x = x.reshape(jnp.shape(b_in))
    if not return_result:
        return x
    return x, pj.JaxSolveResult(x, status == driver.CONVERGED, iterations, history, status,
                                solver.name or type(solver).__name__, true_norm)
