"""Richardson iteration, and the stationary-iteration base that Jacobi and SOR share.

Every stationary method here is a preconditioned Richardson iteration

    x' = x + omega P r,   r = b - A x,

with its own fixed map ``P``: the preconditioner ``M`` (or the identity) for Richardson,
``D^-1`` for Jacobi, ``(D + omega L)^-1`` for SOR. The state keeps ``r = b - A x`` of the
current iterate, so a step costs one matvec and the reported residual is the true one.

Reverse sweep (``adjoint="unrolled"`` on NumPy/CuPy). The step is affine in ``(x, r)``, so
its transpose is the transposed iteration, run backwards:

    b_bar += r_bar',   x_bar = x_bar' - A^T r_bar',   r_bar = omega P^T x_bar,

(``x_bar`` on the right meaning the updated ``x_bar``) with no intermediate quantities to
store. The only thing recorded per step is the iterate ``x`` (a reference the forward pass
holds anyway): A's cotangent needs the vectors ``A`` multiplied, and ``z = P r`` is
recovered as ``(x' - x) / omega``. ``P`` is the same at every step: an eager backend
(NumPy, CuPy) records a reference to it; a traced one (JAX), whose tape copies every
recorded array into a row per step, records nothing and the reverse step rebuilds it (a
loop invariant, which XLA hoists out of the reverse loop). Cotangents follow JAX's
convention (bilinear, no conjugation), so ``P^T`` is a plain transpose also for complex
data.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, ClassVar

from prdp_ops._array_ops import ArrayOps
from prdp_ops._solver.base import (
    IterativeSolver,
    State,
    cotangent,
    precondition,
    precondition_T,
    residual_init_vjp,
)

__all__ = ["Richardson", "StationaryIteration", "check_omega"]


def check_omega(omega: Any, solver: str, upper: float | None = None) -> float:
    """Validate a relaxation factor: a finite real ``0 < omega`` (``< upper`` if given)."""
    bound = "0 < omega" if upper is None else f"0 < omega < {upper:g}"
    if isinstance(omega, bool) or not isinstance(omega, numbers.Real):
        raise TypeError(f"{solver}: omega must be a real number with {bound}; got {omega!r}")
    value = float(omega)
    if not math.isfinite(value) or value <= 0 or (upper is not None and value >= upper):
        raise ValueError(
            f"{solver}: omega must satisfy {bound}; got omega={value!r}. The iteration "
            "diverges or stalls outside that range; omega=1 is the unrelaxed method"
        )
    return value


class StationaryIteration(IterativeSolver):
    """Base of the stationary methods ``x' = x + omega P (b - A x)``.

    Subclasses implement :meth:`correction` (``z = P r``) and :meth:`correction_vjp` (its
    transpose, recording A's share through ``P`` in the reverse context), and may build
    what ``P`` needs once per solve in :meth:`prepare` (SOR's triangle ``D + omega L``,
    Jacobi's diagonal); it is carried in the state as ``"P"``, so a step neither rebuilds it
    nor, on a GPU, reads anything back to the host. The loop state, the residual
    bookkeeping and the reverse sweep live here.

    Parameters
    ----------
    omega
        Relaxation factor, ``0 < omega`` (``< omega_upper`` where a subclass sets it).
    """

    # x' = x + omega P r works column by column for P a matrix, a triangle or a diagonal
    # (the block operator gives the diagonal as a column); P is the same for every column.
    supports_column_blocks = True
    #: Exclusive upper bound of ``omega`` (None: unbounded).
    omega_upper: ClassVar[float | None] = None

    def __init__(self, omega: float = 1.0) -> None:
        solver = self.name or type(self).__name__
        super().__init__(omega=check_omega(omega, solver, upper=self.omega_upper))

    @property
    def omega(self) -> float:
        """The relaxation factor."""
        return self.options["omega"]

    # -- what a subclass supplies -----------------------------------------------------
    def prepare(self, ops: ArrayOps, A: Any, M: Any) -> Any:
        """Build what :meth:`correction` needs from ``A``, once per solve (default: nothing)."""
        return None

    def correction(self, ops: ArrayOps, A: Any, M: Any, r: Any, P: Any) -> Any:
        """Return ``z = P r``, the unrelaxed correction for the residual ``r``; ``P`` is
        what :meth:`prepare` built."""
        raise NotImplementedError

    def correction_vjp(self, ops: ArrayOps, A: Any, M: Any, z: Any, z_bar: Any,
                       ctx: Any, P: Any) -> Any:
        """Return ``r_bar = P^T z_bar`` for ``z = P r``; record A's cotangent through ``P``."""
        raise NotImplementedError

    # -- forward ----------------------------------------------------------------------
    def init(self, ops: ArrayOps, A: Any, b: Any, x0: Any, M: Any) -> State:
        r = b - A.matvec(x0)
        state = {"x": x0, "r": r, "rnorm": ops.norm(r)}
        P = self.prepare(ops, A, M)
        return state if P is None else {**state, "P": P}

    def step(self, ops: ArrayOps, A: Any, b: Any, state: State, M: Any) -> State:
        P = state.get("P")
        x = state["x"] + self.omega * self.correction(ops, A, M, state["r"], P)
        r = b - A.matvec(x)
        new = {"x": x, "r": r, "rnorm": ops.norm(r)}
        return new if P is None else {**new, "P": P}

    # -- reverse sweep (NumPy/CuPy) ---------------------------------------------------
    def record(self, ops: ArrayOps, A: Any, b: Any, M: Any, before: State,
               after: State) -> Any:
        # The iterates only (and, eagerly, a reference to the prepared P): the transposed
        # iteration needs no other forward quantity. ops.keep copies each iterate once (x'
        # of this step is the next step's x). A traced tape (JAX) would copy the constant P
        # (Jacobi's diagonal: one more n-vector per step) into every row: not recorded.
        return (ops.keep(before["x"]), ops.keep(after["x"]),
                before.get("P") if ops.eager else None)

    def step_vjp(self, ops: ArrayOps, A: Any, b: Any, M: Any, record: Any,
                 state_bar: State, ctx: Any) -> State:
        x, x_new, P = record
        if P is None:
            P = self.prepare(ops, A, M)
        x_bar = cotangent(state_bar, "x", x)
        r_bar_new = cotangent(state_bar, "r", x)
        # r' = b - A x'
        ctx.add_b(r_bar_new)
        x_bar = x_bar + ctx.matvec_T(x_new, -r_bar_new)
        # x' = x + omega z,  z = P r
        z = (x_new - x) / self.omega
        r_bar = self.correction_vjp(ops, A, M, z, self.omega * x_bar, ctx, P)
        return {"x": x_bar, "r": r_bar}

    def init_vjp(self, ops: ArrayOps, A: Any, b: Any, x0: Any, M: Any, state_bar: State,
                 ctx: Any) -> Any:
        return residual_init_vjp(state_bar, x0, ctx)


class Richardson(StationaryIteration):
    """Richardson iteration ``x' = x + omega M (b - A x)``, optionally preconditioned.

    Converges when the spectral radius of ``I - omega M A`` is below 1; for Hermitian
    positive definite ``M A`` that means ``0 < omega < 2 / lambda_max(M A)``.

    Parameters
    ----------
    omega
        Step size, ``omega > 0`` (default 1.0).

    Notes
    -----
    The unrolled reverse sweep is the transposed iteration and keeps no tape besides the
    iterates (see the module docstring).
    """

    supports_preconditioner = True

    def correction(self, ops: ArrayOps, A: Any, M: Any, r: Any, P: Any) -> Any:
        return precondition(M, r)

    def correction_vjp(self, ops: ArrayOps, A: Any, M: Any, z: Any, z_bar: Any,
                       ctx: Any, P: Any) -> Any:
        # M is a constant: no cotangent besides the transposed application.
        return precondition_T(M, ctx, z_bar)
