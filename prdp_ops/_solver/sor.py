"""Successive over-relaxation (SOR); ``omega = 1`` is Gauss-Seidel.

With the splitting ``A = D + L + U`` (diagonal, strict lower, strict upper triangle), one
forward sweep solves ``(D + omega L) x' = omega b - (omega U + (omega - 1) D) x``, which is

    x' = x + omega T^-1 (b - A x),   T = D + omega L,

one triangular solve with ``T`` per step. It converges for strictly diagonally dominant
``A`` (``omega = 1``) and for Hermitian positive definite ``A`` whenever ``0 < omega < 2``
(Ostrowski-Reich).

SOR needs the explicit entries of ``A`` (``A.to_matrix()``: a dense array or a sparse
matrix); a matrix-free operator raises :class:`~prdp_ops.MatrixFreeError`.

Reverse sweep: the transposed iteration (see :mod:`prdp_ops._solver.richardson`). ``A``
enters through ``T`` as well as through the residual: for ``z = T^-1 r`` with cotangent
``z_bar``, ``r_bar = T^-T z_bar`` (one transposed, upper-triangular solve) and ``T_bar =
-r_bar z^T`` on T's lower triangle, so ``D_bar = -r_bar z^T`` on the diagonal and
``L_bar = -omega r_bar z^T`` on the strict lower triangle.
"""

from __future__ import annotations

from typing import Any

from prdp_ops._array_ops import ArrayOps
from prdp_ops._solver.jacobi import check_nonzero_diagonal
from prdp_ops._solver.richardson import StationaryIteration

__all__ = ["SOR", "sweep_matrix"]


def sweep_matrix(ops: ArrayOps, matrix: Any, omega: float) -> Any:
    """Return ``T = D + omega L``, the lower triangle of ``matrix`` with its strict part
    scaled by ``omega``, in the matrix's own form.

    ``matrix`` is a dense array of ``ops.xp``, a scipy.sparse or cupyx.scipy.sparse matrix
    (the result is CSR holding the lower triangle only), or a jax BCOO matrix (the entries
    above the diagonal are zeroed, not dropped, so shapes stay static under tracing).
    """
    xp = ops.xp
    if hasattr(matrix, "tocoo"):  # scipy.sparse, cupyx.scipy.sparse
        coo = matrix.tocoo()
        keep = coo.row >= coo.col
        row, col, data = coo.row[keep], coo.col[keep], coo.data[keep]
        data = xp.where(row > col, omega * data, data)
        return type(coo)((data, (row, col)), shape=matrix.shape).tocsr()
    if hasattr(matrix, "indices") and hasattr(matrix, "data"):  # jax BCOO
        row, col = matrix.indices[:, 0], matrix.indices[:, 1]
        data = xp.where(row > col, omega * matrix.data,
                        xp.where(row == col, matrix.data, xp.zeros_like(matrix.data)))
        return type(matrix)((data, matrix.indices), shape=matrix.shape)
    return omega * xp.tril(matrix, -1) + xp.diag(xp.diagonal(matrix))


class SOR(StationaryIteration):
    """Successive over-relaxation, one forward sweep per iteration.

    Parameters
    ----------
    omega
        Relaxation factor, ``0 < omega < 2`` (default 1.0, Gauss-Seidel).

    Notes
    -----
    Needs explicit entries (``needs_matrix``): pass a dense or sparse matrix; for a
    matrix-free operator use ``jacobi`` (with a known diagonal) or a Krylov solver.

    The unrolled reverse sweep is the transposed iteration (one transposed triangular
    solve and one ``A^T`` product per step) and keeps no tape besides the iterates, which
    A's cotangent needs; that cotangent includes A's share through ``D`` and ``L``.
    """

    needs_matrix = True
    omega_upper = 2.0

    def prepare(self, ops: ArrayOps, A: Any, M: Any) -> Any:
        matrix = A.to_matrix()  # a matrix-free operator fails here, saying why
        check_nonzero_diagonal(ops, A.diagonal(), "sor")
        # Built once per solve, and (scipy.sparse) factored once for the triangular solves
        # of every sweep and every reverse step (ops.prepare_triangular).
        return ops.prepare_triangular(sweep_matrix(ops, matrix, self.omega), lower=True)

    def correction(self, ops: ArrayOps, A: Any, M: Any, r: Any, P: Any) -> Any:
        return ops.solve_triangular(P, r, lower=True)

    def correction_vjp(self, ops: ArrayOps, A: Any, M: Any, z: Any, z_bar: Any,
                       ctx: Any, P: Any) -> Any:
        T = P
        # z = T^-1 r:  r_bar = T^-T z_bar,  T_bar = -r_bar z^T on T's lower triangle.
        r_bar = ops.solve_triangular(T.T, z_bar, lower=False)
        ctx.record_pair(z, -r_bar, part="diagonal")
        ctx.record_pair(z, -self.omega * r_bar, part="strict_lower")
        return r_bar
