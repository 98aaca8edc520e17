"""Operators with explicit entries: a dense matrix, and a sparse matrix (scipy.sparse,
cupyx.scipy.sparse or jax BCOO).

Both expose their entries for Jacobi and SOR and treat them as differentiable parameters:
a dense matrix's cotangent is ``outer(y_bar, x)``; a sparse matrix's is the same values
restricted to its pattern, so the gradient of a sparse matrix stays sparse.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from prdp_ops._array_ops import array_backend_name, ops_for
from prdp_ops._operators.base import PARTS, LinearOperator

__all__ = ["DenseOperator", "SparseOperator"]


def _is_complex(dtype: Any) -> bool:
    return np.issubdtype(np.dtype(dtype), np.complexfloating)


def _restrict_dense(M: Any, part: str) -> Any:
    """Keep the ``part`` of a dense matrix (see ``LinearOperator.param_vjp``)."""
    xp = ops_for(M).xp
    if part == "full":
        return M
    if part == "diagonal":
        return xp.diag(xp.diagonal(M))
    if part == "strict_lower":
        return xp.tril(M, -1)
    if part == "strict_upper":
        return xp.triu(M, 1)
    raise ValueError(f"part must be one of {PARTS}; got {part!r}")


def _restrict_sparse(values: Any, rows: Any, cols: Any, part: str) -> Any:
    """Zero the stored values outside the ``part`` (values are in ``data`` order)."""
    xp = ops_for(values).xp
    if part == "full":
        return values
    keep = {"diagonal": rows == cols, "strict_lower": rows > cols,
            "strict_upper": rows < cols}.get(part)
    if keep is None:
        raise ValueError(f"part must be one of {PARTS}; got {part!r}")
    return xp.where(keep, values, xp.zeros_like(values))


def _like_parameter(bar: Any, param: Any) -> Any:
    """A real parameter's cotangent is real: JAX's convention for a real input whose use
    meets complex vectors (the loss is real, so the imaginary part carries no gradient)."""
    if _is_complex(bar.dtype) and not _is_complex(param.dtype):
        return ops_for(bar).xp.real(bar)
    return bar


class DenseOperator(LinearOperator):
    """A dense matrix as an operator (numpy, cupy or jax array).

    Parameters
    ----------
    matrix
        A 2-D array. It is referenced, never modified.
    hermitian
        Declare the matrix Hermitian (symmetric if real). Not checked.
    """

    def __init__(self, matrix: Any, *, hermitian: bool = False) -> None:
        if getattr(matrix, "ndim", None) != 2:
            raise ValueError(
                f"A must be a 2-D matrix; got an array of shape {getattr(matrix, 'shape', None)}"
            )
        super().__init__(matrix.shape, matrix.dtype)
        self.matrix = matrix
        self.hermitian = hermitian

    def _matvec(self, x: Any) -> Any:
        return self.matrix @ x

    def _rmatvec(self, y: Any) -> Any:
        if _is_complex(self.dtype):
            # (y^H A)^H == A^H y, without materialising conj(A).
            return ops_for(y).xp.conj(ops_for(y).xp.conj(y) @ self.matrix)
        return y @ self.matrix

    def _matmat(self, X: Any) -> Any:
        return self.matrix @ X

    def _rmatmat(self, Y: Any) -> Any:
        if _is_complex(self.dtype):
            xp = ops_for(Y).xp
            return xp.conj(xp.conj(Y).T @ self.matrix).T
        return (Y.T @ self.matrix).T

    def diagonal(self) -> Any:
        return ops_for(self.matrix).xp.diagonal(self.matrix)

    def to_matrix(self) -> Any:
        return self.matrix

    def parameters(self) -> dict[str, Any]:
        return {"matrix": self.matrix}

    def with_parameters(self, params: dict[str, Any]) -> LinearOperator:
        return DenseOperator(params["matrix"], hermitian=self.hermitian)

    def param_vjp(self, x: Any, y_bar: Any, part: str = "full") -> dict[str, Any]:
        bar = _restrict_dense(ops_for(x).xp.outer(y_bar, x), part)
        return {"matrix": _like_parameter(bar, self.matrix)}

    def param_vjp_batch(self, X: Any, Y_bar: Any, part: str = "full") -> dict[str, Any]:
        # sum_k outer(y_bar_k, x_k) == Y_bar^T X: one matrix product instead of k outers.
        return {"matrix": _like_parameter(_restrict_dense(Y_bar.T @ X, part), self.matrix)}

    def format_cotangent(self, params_bar: dict[str, Any]) -> Any:
        return params_bar["matrix"] if params_bar else None


#: Values gathered at once when sparse cotangents are summed over a batch of pairs.
_BATCH_ELEMENTS = 1 << 22


class SparseOperator(LinearOperator):
    """A sparse matrix as an operator: scipy.sparse, cupyx.scipy.sparse or jax BCOO.

    SciPy and CuPy matrices are held in canonical CSR form (a copy; the caller's matrix is
    not touched); their ``data`` array is the differentiable parameter, so cotangents keep
    the sparsity pattern. A jax BCOO matrix keeps its format; its ``data`` is the parameter.

    Parameters
    ----------
    matrix
        A sparse matrix or array.
    hermitian
        Declare the matrix Hermitian (symmetric if real). Not checked.
    """

    def __init__(self, matrix: Any, *, hermitian: bool = False) -> None:
        self.backend = array_backend_name(matrix)
        if self.backend != "jax":
            matrix = matrix.tocsr(copy=True)
            matrix.sum_duplicates()  # canonical: one entry per (row, col), sorted indices
        super().__init__(matrix.shape, matrix.dtype)
        self.matrix = matrix
        self.hermitian = hermitian

    def _matvec(self, x: Any) -> Any:
        return self.matrix @ x

    def _rmatvec(self, y: Any) -> Any:
        xp = ops_for(y).xp
        if _is_complex(self.dtype):
            return xp.conj(self._transposed() @ xp.conj(y))
        return self._transposed() @ y

    # scipy.sparse (and cupyx, BCOO) multiply a matrix by a block of columns in one pass.
    _matmat = _matvec
    _rmatmat = _rmatvec

    def _transposed(self) -> Any:
        """``A^T`` in CSR form, built once: adjoint solves apply it at every iteration."""
        if self.backend == "jax":
            return self.matrix.T
        if getattr(self, "_matrix_T", None) is None:
            self._matrix_T = self.matrix.T.tocsr()
        return self._matrix_T

    def diagonal(self) -> Any:
        if self.backend == "jax":
            from prdp_ops.backends.jax import bcoo_diagonal

            return bcoo_diagonal(self.matrix)
        # Cached: Jacobi asks at every step, and extracting it costs more than a matvec.
        if getattr(self, "_diagonal", None) is None:
            self._diagonal = self.matrix.diagonal()
        return self._diagonal

    def to_matrix(self) -> Any:
        return self.matrix

    def _rows_cols(self) -> tuple[Any, Any]:
        """Row and column index of every stored value, in ``data`` order."""
        if self.backend == "jax":
            return self.matrix.indices[:, 0], self.matrix.indices[:, 1]
        xp = ops_for(self.matrix.data).xp
        # Entry k lies in the row whose indptr range holds k (stays on the device on GPUs).
        positions = xp.arange(self.matrix.indices.shape[0])
        rows = xp.searchsorted(self.matrix.indptr, positions, side="right") - 1
        return rows, self.matrix.indices

    def parameters(self) -> dict[str, Any]:
        return {"data": self.matrix.data}

    def with_parameters(self, params: dict[str, Any]) -> LinearOperator:
        new = type(self).__new__(type(self))
        LinearOperator.__init__(new, self.shape, params["data"].dtype)
        new.backend, new.hermitian = self.backend, self.hermitian
        if self.backend == "jax":
            new.matrix = type(self.matrix)((params["data"], self.matrix.indices),
                                           shape=self.shape)
        else:
            new.matrix = type(self.matrix)(
                (params["data"], self.matrix.indices, self.matrix.indptr), shape=self.shape
            )
        return new

    def param_vjp(self, x: Any, y_bar: Any, part: str = "full") -> dict[str, Any]:
        rows, cols = self._rows_cols()
        bar = _restrict_sparse(y_bar[rows] * x[cols], rows, cols, part)
        return {"data": _like_parameter(bar, self.matrix.data)}

    def param_vjp_batch(self, X: Any, Y_bar: Any, part: str = "full") -> dict[str, Any]:
        # data_bar[e] = sum_k Y_bar[k, row_e] X[k, col_e]: (Y_bar^T X) sampled on the pattern.
        # Gathered in chunks of entries so the temporaries stay near _BATCH_ELEMENTS values
        # instead of 2 k nnz.
        rows, cols = self._rows_cols()
        xp = ops_for(X).xp
        Y_t, X_t = Y_bar.T, X.T  # (n, k): the gathers below then read whole rows
        chunk = max(1, _BATCH_ELEMENTS // max(1, X.shape[0]))
        values = xp.concatenate([
            (Y_t[rows[s:s + chunk]] * X_t[cols[s:s + chunk]]).sum(axis=1)
            for s in range(0, rows.shape[0], chunk)
        ]) if rows.shape[0] else xp.zeros(0, dtype=xp.result_type(X, Y_bar))
        return {"data": _like_parameter(_restrict_sparse(values, rows, cols, part),
                                        self.matrix.data)}

    def format_cotangent(self, params_bar: dict[str, Any]) -> Any:
        if not params_bar:
            return None
        return self.with_parameters(params_bar).matrix
