"""Weighted Jacobi iteration.

With ``D`` the diagonal of ``A``,

    x' = x + omega D^-1 (b - A x),

which converges for strictly diagonally dominant ``A`` when ``omega = 1``, and for
Hermitian positive definite ``A`` when ``0 < omega < 2 / lambda_max(D^-1 A)``.

Only ``A.diagonal()`` and matvecs are used, so a matrix-free operator works if it knows its
diagonal (``FunctionOperator(..., diagonal=d)``).

Reverse sweep: the transposed iteration (see :mod:`prdp_ops._solver.richardson`); besides
``A^T`` through the residual, ``A`` enters through ``D``: for ``z = D^-1 r`` with cotangent
``z_bar``, ``r_bar = D^-1 z_bar`` and ``D_bar = -diag(r_bar * z)``, recorded as the pair
``(z, -r_bar)`` on A's diagonal part.
"""

from __future__ import annotations

from typing import Any

from prdp_ops._array_ops import ArrayOps
from prdp_ops._solver.richardson import StationaryIteration

__all__ = ["Jacobi", "check_nonzero_diagonal"]


def check_nonzero_diagonal(ops: ArrayOps, d: Any, solver: str) -> None:
    """Raise a clear ValueError if ``d`` has a zero entry (only where values can be read).

    Under JAX tracing the check is skipped; a zero then shows up as a non-finite residual,
    which the driver reports.
    """
    if not ops.eager:
        return
    zeros = ops.xp.flatnonzero(d == 0)
    if zeros.size:
        raise ValueError(
            f"{solver} divides by the diagonal of A, but A has {int(zeros.size)} zero "
            f"diagonal entries (first at index {int(zeros[0])}); reorder the unknowns so the "
            "diagonal is non-zero, or use a Krylov solver (gmres, bicgstab, cg)"
        )


class Jacobi(StationaryIteration):
    """Weighted (damped) Jacobi: ``x' = x + omega D^-1 (b - A x)``.

    Needs ``A.diagonal()``: a dense or sparse matrix, a stencil operator, or a
    :class:`~prdp_ops.FunctionOperator` given ``diagonal=``; otherwise
    :class:`~prdp_ops.MatrixFreeError` is raised.

    Parameters
    ----------
    omega
        Relaxation factor, ``omega > 0`` (default 1.0, the plain Jacobi method; 2/3 is the
        usual smoother for the Laplacian).

    Notes
    -----
    The unrolled reverse sweep is the transposed iteration, ``x_bar <- x_bar - omega A^T
    D^-1 x_bar`` in effect, and keeps no tape besides the iterates, which A's cotangent
    needs.
    """

    needs_diagonal = True

    def prepare(self, ops: ArrayOps, A: Any, M: Any) -> Any:
        d = ops.xp.asarray(A.diagonal())
        check_nonzero_diagonal(ops, d, "jacobi")
        return d

    def correction(self, ops: ArrayOps, A: Any, M: Any, r: Any, P: Any) -> Any:
        return r / P

    def correction_vjp(self, ops: ArrayOps, A: Any, M: Any, z: Any, z_bar: Any,
                       ctx: Any, P: Any) -> Any:
        # z = D^-1 r:  r_bar = D^-1 z_bar,  D_bar = -r_bar z^T on the diagonal.
        r_bar = z_bar / P
        ctx.record_pair(z, -r_bar, part="diagonal")
        return r_bar
