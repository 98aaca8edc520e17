"""Steepest descent for Hermitian positive definite ``A``, optionally preconditioned.

Each step minimises the A-norm of the error along the (preconditioned) residual:

    z = M r,  q = A z,  alpha = <r, z> / <z, q>,  x' = x + alpha z,  r' = r - alpha q,

one matvec per step (the residual is updated recursively, as in CG). The error contracts
by ``(kappa - 1) / (kappa + 1)`` per step in the A-norm, ``kappa`` the condition number of
``M A``. ``<z, q> <= 0`` with a non-zero residual means ``A`` is not positive definite
along ``z``: it is reported as a breakdown (the driver keeps the last good iterate), and a
zero ``<z, q>`` gives ``alpha = 0`` rather than NaN.

Reverse sweep (``adjoint="unrolled"`` on NumPy/CuPy): each step records the residual it
started from and ``q = A z``; the reverse step recomputes ``z = M r`` and the scalars from
them and needs no matvec besides the ``A^T`` product.
"""

from __future__ import annotations

from typing import Any

from prdp_ops._array_ops import ArrayOps
from prdp_ops._solver.base import (
    IterativeSolver,
    State,
    cotangent,
    precondition,
    precondition_T,
    residual_init_vjp,
)

__all__ = ["SteepestDescent"]


class SteepestDescent(IterativeSolver):
    """Steepest descent (the gradient method with exact line search) for Hermitian positive
    definite ``A``.

    Takes no options. A preconditioner ``M`` (Hermitian positive definite, approximating
    ``A^-1``) may be given to ``solve``.
    """

    supports_preconditioner = True
    supports_column_blocks = True
    requires_hermitian = True

    def init(self, ops: ArrayOps, A: Any, b: Any, x0: Any, M: Any) -> State:
        r = b - A.matvec(x0)
        # "q" (= A z of the last step) is kept for the reverse sweep; it starts as zeros so
        # the state's structure never changes (JAX loops).
        return {"x": x0, "r": r, "rnorm": ops.norm(r), "breakdown": ops.xp.asarray(False),
                "q": ops.xp.zeros_like(r)}

    def step(self, ops: ArrayOps, A: Any, b: Any, state: State, M: Any) -> State:
        xp = ops.xp
        r = state["r"]
        z = precondition(M, r)
        q = A.matvec(z)
        zq = ops.vdot(z, q)
        alpha = ops.safe_divide(ops.vdot(r, z), zq)
        x = state["x"] + alpha * z
        r_new = r - alpha * q
        breakdown = xp.logical_and(xp.real(zq) <= 0, state["rnorm"] > 0)
        return {"x": x, "r": r_new, "rnorm": ops.norm(r_new), "breakdown": breakdown, "q": q}

    # -- reverse sweep (NumPy/CuPy) ---------------------------------------------------
    # Cotangents follow JAX's convention. For s = <a, b> = sum(conj(a) b):
    # a_bar = conj(b s_bar), b_bar = conj(a) s_bar; for a real dtype the conj are no-ops.

    def record(self, ops: ArrayOps, A: Any, b: Any, M: Any, before: State,
               after: State) -> Any:
        return (before["r"], after["q"])

    def step_vjp(self, ops: ArrayOps, A: Any, b: Any, M: Any, record: Any,
                 state_bar: State, ctx: Any) -> State:
        xp = ops.xp
        r, q = record
        z = precondition(M, r)
        rz, zq = ops.vdot(r, z), ops.vdot(z, q)
        alpha = ops.safe_divide(rz, zq)

        x_bar = cotangent(state_bar, "x", r)
        r_bar_new = cotangent(state_bar, "r", r)
        # x' = x + alpha z ;  r' = r - alpha q
        alpha_bar = ops.dot(x_bar, z) - ops.dot(r_bar_new, q)
        z_bar = alpha * x_bar
        q_bar = cotangent(state_bar, "q", r) - alpha * r_bar_new
        r_bar = r_bar_new
        # alpha = rz / zq
        rz_bar = ops.safe_divide(alpha_bar, zq)
        zq_bar = -alpha_bar * ops.safe_divide(alpha, zq)
        # zq = <z, q> ;  rz = <r, z>
        z_bar = z_bar + xp.conj(q * zq_bar) + xp.conj(r) * rz_bar
        q_bar = q_bar + xp.conj(z) * zq_bar
        r_bar = r_bar + xp.conj(z * rz_bar)
        # q = A z
        z_bar = z_bar + ctx.matvec_T(z, q_bar)
        # z = M r
        r_bar = r_bar + precondition_T(M, ctx, z_bar)
        return {"x": x_bar, "r": r_bar}

    def init_vjp(self, ops: ArrayOps, A: Any, b: Any, x0: Any, M: Any, state_bar: State,
                 ctx: Any) -> Any:
        return residual_init_vjp(state_bar, x0, ctx)
