"""The JAX flavour of the solvers' array namespace, and the JAX solve result (private to
``prdp_ops.backends.jax``, which re-exports :class:`JaxOps`, :data:`OPS`,
:class:`JaxSolveResult` and :func:`bcoo_diagonal`)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from prdp_ops.backends import _jax_driver as driver

from prdp_ops._array_ops import ArrayOps
from prdp_ops._solution import SolveResult

__all__ = ["OPS", "JaxOps", "JaxSolveResult", "TracedHostReadError", "bcoo_diagonal", "is_bcoo"]

#: Above this size a BCOO triangular solve is refused rather than densified.
_DENSIFY_LIMIT = 4096


class TracedHostReadError(TypeError):
    """:meth:`JaxOps.to_float` of a traced value: solver code read an array on the host,
    which ``jit``/``vmap``/``grad`` cannot do (a ``TypeError``, as JAX's own errors for it)."""


class JaxOps(ArrayOps):
    """:class:`~prdp_ops._array_ops.ArrayOps` for JAX arrays (traceable: no host reads)."""

    name = "jax"
    eager = False

    def __init__(self) -> None:
        super().__init__(jnp)

    def set_at(self, a: Any, index: Any, value: Any) -> Any:
        return a.at[index].set(_widen_to_complex(value, a.dtype))

    def safe_divide(self, num: Any, den: Any) -> Any:
        # A complex vector over a real norm (GMRES's r / ||r||) is an exact widening that
        # strict promotion only accepts when written out.
        num = _widen_to_complex(num, jnp.result_type(den))
        return super().safe_divide(num, _widen_to_complex(den, jnp.result_type(num)))

    def cond(self, pred: Any, true_fn: Callable, false_fn: Callable, *operands: Any) -> Any:
        return lax.cond(pred, true_fn, false_fn, *operands)

    # The reverse steps' buffer-reusing updates (NumPy may overwrite ``y``) are functional
    # here: JAX arrays are immutable, so each returns a new array and XLA reuses buffers.
    # A real coefficient of a complex vector is widened explicitly, as strict promotion
    # requires (the exact cast standard promotion makes).
    def axpy_(self, y: Any, a: Any, x: Any) -> Any:
        """Return ``y + a * x`` (a new array; ``y`` is untouched)."""
        ax = _widen_to_complex(a, jnp.result_type(x)) * _widen_to_complex(
            x, jnp.result_type(a))
        return (_widen_to_complex(y, jnp.result_type(ax))
                + _widen_to_complex(ax, jnp.result_type(y)))

    def scale_(self, y: Any, a: Any) -> Any:
        """Return ``a * y`` (a new array; ``y`` is untouched)."""
        return _widen_to_complex(a, jnp.result_type(y)) * _widen_to_complex(
            y, jnp.result_type(a))

    def keep(self, a: Any) -> Any:
        """Return ``a`` for a tape to hold: the JAX tape is the loop's own buffer."""
        return a

    def to_float(self, a: Any) -> float:
        if isinstance(a, jax.core.Tracer):
            raise TracedHostReadError(
                "a traced JAX value cannot be read as a Python float inside jit/vmap/grad; "
                "solver code must branch with ops.cond / ops.where instead of if"
            )
        return float(a)

    def solve_triangular(self, T: Any, rhs: Any, lower: bool) -> Any:
        """Return ``y`` with ``T y = rhs`` for a triangular ``T`` (dense, or a small BCOO)."""
        if is_bcoo(T):
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


def _widen_to_complex(value: Any, dtype: Any) -> Any:
    """``value`` cast to the complex ``dtype`` when it is real of the same precision (the
    exact cast ``jnp`` makes under standard promotion, and refuses implicitly under
    ``jax_numpy_dtype_promotion="strict"``), else ``value`` unchanged."""
    if not jnp.issubdtype(dtype, jnp.complexfloating):
        return value
    if jnp.result_type(value) != jnp.finfo(dtype).dtype:
        return value
    return jnp.asarray(value).astype(dtype)


#: The :class:`JaxOps` instance ``prdp_ops.backends.get_ops("jax")`` returns.
OPS = JaxOps()


def is_bcoo(a: Any) -> bool:
    """Whether ``a`` is a ``jax.experimental.sparse`` matrix (without importing it)."""
    return (type(a).__module__ or "").startswith("jax.experimental.sparse")


def bcoo_diagonal(matrix: Any) -> Any:
    """The main diagonal of a 2-D jax ``BCOO`` matrix (duplicate entries are summed)."""
    rows, cols = matrix.indices[:, 0], matrix.indices[:, 1]
    on_diagonal = jnp.where(rows == cols, matrix.data, jnp.zeros_like(matrix.data))
    n = min(matrix.shape)
    # Off-diagonal entries add zero at a clipped row index, so shapes stay static.
    return jnp.zeros(n, matrix.dtype).at[jnp.minimum(rows, n - 1)].add(on_diagonal)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["x", "converged", "iterations", "residual_norms", "status",
                                "true_residual_norm"],
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
        is static: ``min(maxiter, H) + 1`` for a concrete ``maxiter`` (``min(max_steps, H) +
        1`` for a traced one), NaN past ``iterations``, where ``H = max(10 n, 100000)``
        bounds the buffer (a solve that runs longer keeps its final norm in the last entry);
        with a traced ``maxiter`` and no ``max_steps`` only ``[initial, final]``.
    status
        An int32 code: ``STATUSES[status]`` is the :class:`~prdp_ops.Status`.
    solver
        Name of the solver (static).
    true_residual_norm
        ``||b - A x||`` as the driver computed it to confirm a convergence claim or judge an
        unconverged end (a real 0-d array), NaN where it computed none (a fixed iteration
        count that ran out); ``None`` where the path that made the result does not carry
        it. What a failure message quotes, and :class:`~prdp_ops.SolveResult`'s field.
    """

    x: Any
    converged: Any
    iterations: Any
    residual_norms: Any
    status: Any
    solver: str = ""
    true_residual_norm: Any = None

    #: ``STATUSES[code]`` is the :class:`~prdp_ops.Status` of a status code.
    STATUSES = driver.STATUSES

    def to_solve_result(self) -> SolveResult:
        """The same result as a host :class:`~prdp_ops.SolveResult` (outside ``jit`` only)."""
        iterations = int(self.iterations)
        norms = np.asarray(self.residual_norms, dtype=np.float64)
        if norms.shape[0] > 2 or iterations <= 1:
            norms = norms[: iterations + 1]
        true = (None if self.true_residual_norm is None
                else float(np.asarray(self.true_residual_norm)))
        return SolveResult(x=self.x, converged=bool(self.converged), iterations=iterations,
                           residual_norms=norms, status=driver.STATUSES[int(self.status)],
                           solver=self.solver,
                           true_residual_norm=None if true is None or np.isnan(true) else true)
