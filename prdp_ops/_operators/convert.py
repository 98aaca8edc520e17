"""``aslinearoperator``: one entry point that turns whatever a user holds into an operator."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse
import scipy.sparse.linalg

from prdp_ops._array_ops import array_backend_name
from prdp_ops._operators.base import LinearOperator
from prdp_ops._operators.dense import DenseOperator, SparseOperator
from prdp_ops._operators.function import FunctionOperator, ScipyLinearOperator

__all__ = ["aslinearoperator"]


def _is_cupy_sparse(A: Any) -> bool:
    return type(A).__module__.startswith("cupyx.scipy.sparse")


def _is_jax_sparse(A: Any) -> bool:
    return type(A).__module__.startswith("jax.experimental.sparse")


def aslinearoperator(
    A: Any,
    *,
    shape: int | tuple[int, int] | None = None,
    dtype: Any = None,
    hermitian: bool = False,
) -> LinearOperator:
    """Return ``A`` as a :class:`LinearOperator`.

    Parameters
    ----------
    A
        A 2-D numpy, cupy or jax array; a scipy.sparse matrix or array; a cupyx.scipy.sparse
        matrix; a jax ``BCOO`` matrix; a ``scipy.sparse.linalg.LinearOperator``; a
        :class:`LinearOperator` (returned as is); or a callable ``x -> A @ x`` (then
        ``shape`` is required).
    shape, dtype
        Only for a callable ``A``.
    hermitian
        Declare ``A`` Hermitian (symmetric if real). Not checked; lets a matrix-free
        operator without ``rmatvec`` serve the implicit adjoint.

    Raises
    ------
    TypeError
        If ``A`` is none of the above.
    ValueError
        If an array ``A`` is not 2-D.
    """
    if isinstance(A, LinearOperator):
        return A
    if scipy.sparse.issparse(A) or _is_cupy_sparse(A) or _is_jax_sparse(A):
        return SparseOperator(A, hermitian=hermitian)
    if isinstance(A, scipy.sparse.linalg.LinearOperator):
        return ScipyLinearOperator(A, hermitian=hermitian)
    if isinstance(A, np.ndarray) or (
        array_backend_name(A) != "numpy" and hasattr(A, "ndim") and hasattr(A, "dtype")
    ):
        if isinstance(A, np.matrix):
            A = np.asarray(A)
        return DenseOperator(A, hermitian=hermitian)
    if callable(A):
        if shape is None:
            raise TypeError(
                "A is a function; pass shape=(m, n) (or wrap it in po.FunctionOperator) so its "
                "size is known"
            )
        return FunctionOperator(A, shape, dtype if dtype is not None else np.float64,
                                hermitian=hermitian)
    raise TypeError(
        "A must be a matrix (numpy/cupy/jax array, scipy.sparse, cupyx sparse or jax BCOO), a "
        "scipy LinearOperator, a prdp_ops LinearOperator, or a matvec function; got "
        f"{type(A).__name__}"
    )
