"""Restarted GMRES (Saad and Schultz, 1986) with right preconditioning.

One iteration is one Arnoldi step (one product with ``A``), so ``maxiter`` counts
matrix-vector products and a restart cycle of ``restart`` steps is ``restart`` iterations.

Within a cycle started at ``x_c`` with residual ``r_c = b - A x_c``, ``beta = ||r_c||``, the
Arnoldi process on ``A M`` builds an orthonormal basis ``V`` (rows ``v_0 = r_c / beta``,
``v_1``, ...) and the Hessenberg matrix ``H`` with ``A M V_j = V_{j+1} H_j``. After ``j``
steps the iterate is

    x_j = x_c + M V_j y_j,   y_j = argmin_y || beta e_1 - H_j y ||,

whose residual ``b - A x_j = V_{j+1} (beta e_1 - H_j y_j)`` is the *true* residual (right
preconditioning), so the reported residual norm is ``||b - A x_j||`` and not a
preconditioned one. The least-squares problem is kept in QR form: ``Q`` accumulates the
Givens rotations with ``Q H_j = [R_j; 0]``, so ``||b - A x_j|| = beta |Q[j, 0]|`` is known
after every step without forming ``x_j``. When a cycle is full, the next step first restarts:
``x_c <- x_restart``, with the residual recomputed as ``b - A x_c`` (one extra product per
restart, which keeps the reported residual honest).

The state has fixed shapes (``V`` is ``(m + 1, n)`` with ``m = min(restart, n)``; rows not
yet in use are zero), so the same code runs inside ``jax.lax.while_loop``. Orthogonalisation
is classical Gram-Schmidt, made of matrix-vector products with ``V`` instead of a loop over
its rows. Traced and GPU code (JAX, CuPy) applies it twice (CGS2), which is as accurate as
modified Gram-Schmidt. On NumPy the second pass is made only when it is needed (DGKS: Daniel,
Gragg, Kaufman and Stewart, 1976): after one pass ``w1 = w - V^T conj(V) w``, the rounding
left in ``w1`` along the basis is about ``eps ||w||``, i.e. ``eps ||w|| / ||w1||`` relative to
``w1``. While ``||w1|| >= ||w|| / sqrt(2)`` (:data:`REORTHOGONALISE_BELOW`) that is at most
``sqrt(2) eps``, as orthogonal as a second pass would make it; when the projection removed
more (a nearly invariant Krylov space, an ill-conditioned ``A``), the second pass runs. Each
pass reads the basis twice, so a skipped pass halves the step's traffic over the basis. How
often it is skipped depends on ``A``: on the Poisson stencils ``||w1|| / ||w||`` is about 0.4
(``A v_j`` lies mostly in the span of ``v_j`` and ``v_{j-1}``) and both passes run at nearly
every step; on a matrix whose ``A v_j`` is mostly new (a random one) most steps make one. A
lower threshold is not safe for classical Gram-Schmidt: at 0.1-0.25 a random matrix shifted by
``3 I`` lost all orthogonality within 60 steps. (SciPy's modified Gram-Schmidt reads the basis
once from memory per step but loses orthogonality as the solve converges.) A happy
breakdown (``h_{j+1,j} <= eps ||A M v_j||``: the Krylov space is invariant, up to rounding,
and ``x_j`` is exact) is convergence, not failure; a pivot ``R_jj <= eps ||A M v_j||`` while
the residual is non-zero (``A M`` singular on the Krylov space) is reported as breakdown.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

from prdp_ops._array_ops import ArrayOps
from prdp_ops._solver.base import IterativeSolver, State, cotangent, precondition, precondition_T

__all__ = ["GMRES", "REORTHOGONALISE_BELOW"]

#: DGKS criterion (NumPy): the second Gram-Schmidt pass of an Arnoldi step runs when the first
#: one left ``||w1|| < REORTHOGONALISE_BELOW * ||w||`` (the projection cancelled more than a
#: factor ``sqrt(2)`` of ``w``'s norm); see the module docstring. Traced/GPU code always
#: makes both passes.
REORTHOGONALISE_BELOW = 1 / math.sqrt(2)


class ArnoldiStep(NamedTuple):
    """What one Arnoldi step computed (eager backends only, in the state under
    ``"arnoldi"``): ``w = A M v_j``, which the reverse sweep keeps, the first pass's
    coefficients ``h1`` and, when the second pass ran, its coefficients ``h2`` (else
    ``None``: whether it ran)."""

    w: Any
    h1: Any
    h2: Any


def _safe_sqrt(ops: ArrayOps, square: Any) -> Any:
    """``sqrt(square)`` for ``square >= 0`` whose derivative is 0, not NaN, at 0.

    Exact zeros are not rare here (a zero residual, the basis past a happy breakdown), and
    under JAX's automatic differentiation a plain sqrt there turns every gradient into NaN.
    A NaN ``square`` gives NaN (not 0), so a NaN in ``A`` or ``b`` is reported, not hidden.
    """
    xp = ops.xp
    if ops.eager and getattr(square, "ndim", 0) == 0 and ops.name == "numpy":
        # A NumPy scalar: a plain branch (no derivative to guard), same values, several
        # times cheaper than the masked expression (six per step).
        return xp.sqrt(square) if square > 0 else square * 0
    positive = square > 0
    # ``square * 0`` rather than ``0``: a NaN must stay NaN so the driver sees it.
    return xp.where(positive, xp.sqrt(xp.where(positive, square, 1)), square * 0)


def _safe_norm(ops: ArrayOps, v: Any) -> Any:
    """The Euclidean norm, with a derivative that is finite at ``v = 0``."""
    return _safe_sqrt(ops, ops.xp.real(ops.vdot(v, v)))


def _cycle_length(state: State) -> int:
    """Arnoldi steps per cycle, ``min(restart, n)`` (a static shape of the state)."""
    return state["H"].shape[1]


def _masked_triangle(ops: ArrayOps, R: Any, j: Any) -> Any:
    """``R`` (``m x m``, upper triangular) with its trailing block past ``j`` replaced by ``I``.

    Solving with it gives the ``j x j`` triangular solution padded with zeros, at a fixed
    size. A zero pivot (only after a happy breakdown, whose later columns are zero, or a
    reported breakdown) is replaced by 1 so the solve stays finite.
    """
    xp = ops.xp
    m = R.shape[0]
    active = xp.arange(m, dtype=xp.int32) < j  # j is int32: no int64/int32 mix (strict JAX)
    block = xp.logical_and(active[:, None], active[None, :])
    diag_fix = xp.logical_or(xp.logical_not(active), xp.diagonal(R) == 0)
    return xp.where(block, R, 0) + xp.diag(xp.where(diag_fix, 1, 0).astype(R.dtype))


def _cycle_solution(ops: ArrayOps, state: State) -> tuple[Any, Any, Any]:
    """The least-squares solution ``y`` of the current cycle (zero-padded to the cycle
    length), with the masked triangular factor and right-hand side it came from."""
    xp = ops.xp
    Q, H, j = state["Q"], state["H"], state["j"]
    m = H.shape[1]
    R = _masked_triangle(ops, (Q @ H)[:m], j)
    # beta is real, Q complex for complex data: the cast is explicit for strict JAX.
    g = xp.where(xp.arange(m, dtype=xp.int32) < j, state["beta"].astype(Q.dtype) * Q[:m, 0],
                 0)
    return xp.linalg.solve(R, g), R, g


def _start_cycle(ops: ArrayOps, A: Any, b: Any, x: Any, m: int) -> State:
    """The state of a fresh cycle at ``x``: ``v_0 = r / ||r||`` with ``r = b - A x``."""
    xp = ops.xp
    r = b - A.matvec(x)
    beta = _safe_norm(ops, r)
    V = ops.set_at_(xp.zeros((m + 1, *r.shape), dtype=r.dtype), 0, ops.safe_divide(r, beta))
    return {"x_cycle": x, "V": V, "H": xp.zeros((m + 1, m), dtype=r.dtype),
            "Q": xp.eye(m + 1, dtype=r.dtype), "beta": beta, "j": xp.asarray(0, dtype=xp.int32)}


def _rows_in_use(ops: ArrayOps, V: Any, j: Any) -> Any:
    """The basis rows ``v_0 .. v_j`` to orthogonalise against, or all of ``V``.

    The rows past ``j`` are still zero (a cycle starts from a zero basis and step ``j`` fills
    row ``j + 1``), so projecting against all of ``V`` is the same projection at a fixed
    shape, which traced code (JAX) needs. On NumPy, where reading ``j`` is free, only the rows
    in use are touched: about half the work at the default restart. (CuPy keeps the fixed
    shape: reading ``j`` there would be a device-to-host sync per step.)
    """
    if ops.name == "numpy":
        return V[: int(j) + 1]
    return V


def _orthogonalise(ops: ArrayOps, V: Any, w: Any) -> tuple[Any, Any, Any, Any]:
    """Project ``w`` off the rows of ``V``: twice (CGS2), or on NumPy once when that is
    enough (the DGKS test, :data:`REORTHOGONALISE_BELOW`).

    Returns ``(h1, h2, w2, h_next)``: the coefficient vectors of each pass (``h2`` is
    ``None`` when the second pass did not run), the vector after the last pass and
    ``||w2||``, the unnormalised new basis vector's norm (``h1 + h2`` is the Hessenberg
    column).
    """
    h1 = _adjoint_product(ops, V, w)
    if ops.name != "numpy":
        w1 = w - V.T @ h1
        h2 = _adjoint_product(ops, V, w1)
        w2 = w1 - V.T @ h2
        return h1, h2, w2, _safe_norm(ops, w2)
    # NumPy: w1 = w - V^T h1 by one in-place gemv on a copy of w (w itself is kept for the
    # reverse sweep): no n-vector temporaries, whose fresh pages cost as much as the pass
    # when the allocator hands them back to the kernel between steps.
    w1 = ops.matmul_add_(w.copy(), V.T, -h1)
    # Both norms are one pass over an n-vector each; the second projection reads the
    # (j + 1) x n basis twice. ||w1|| is the new h_{j+1,j} when the pass is skipped.
    w1_norm = _safe_norm(ops, w1)
    if float(w1_norm) >= REORTHOGONALISE_BELOW * float(_safe_norm(ops, w)):
        return h1, None, w1, w1_norm
    h2 = _adjoint_product(ops, V, w1)
    w2 = ops.matmul_add_(w1, V.T, -h2)  # w1 is this function's own: updated in place
    return h1, h2, w2, _safe_norm(ops, w2)


def _adjoint_product(ops: ArrayOps, V: Any, w: Any) -> Any:
    """``conj(V) @ w`` (the inner products ``<v_i, w>``), conjugating vectors, not ``V``
    (``ops.conj``: no copies for real data)."""
    return ops.conj(V @ ops.conj(w))


class GMRES(IterativeSolver):
    """Restarted GMRES with right preconditioning, for general square ``A``.

    Parameters
    ----------
    restart
        Arnoldi steps per cycle (the Krylov basis holds ``restart + 1`` vectors of length
        ``n``). Default 20, as in SciPy; like SciPy, a cycle never exceeds ``n`` steps.

    Notes
    -----
    One iteration is one Arnoldi step, i.e. one product with ``A``; each restart costs one
    more product for the explicit residual. The preconditioner ``M`` is applied on the right
    (``A M u = b``, ``x = M u``), so the reported residual norms are those of ``b - A x``.
    (``scipy.sparse.linalg.gmres`` preconditions on the left and tests ``M (b - A x)``;
    without ``M`` the two give the same iterates cycle for cycle.)
    The unrolled reverse sweep (NumPy/CuPy) works step by step: the forward tape keeps, per
    step, ``w = A M v_j``, and one basis per cycle (``O(iterations * n)`` memory), so a
    reverse step takes one product with ``A^T`` and recomputes nothing of the forward step
    (with ``M``: one product with ``M`` to rebuild ``M v_j``).
    """

    supports_preconditioner = True

    def __init__(self, restart: int = 20) -> None:
        if isinstance(restart, bool) or not isinstance(restart, numbers.Integral):
            raise TypeError(f"restart must be an int >= 1 (Arnoldi steps per cycle); got "
                            f"{restart!r}")
        if restart < 1:
            raise ValueError(f"restart must be an int >= 1 (Arnoldi steps per cycle); got "
                             f"{restart}")
        super().__init__(restart=int(restart))

    @property
    def restart(self) -> int:
        """Arnoldi steps per cycle."""
        return self.options["restart"]

    def init(self, ops: ArrayOps, A: Any, b: Any, x0: Any, M: Any) -> State:
        # A cycle longer than n cannot help (the Krylov space is at most n-dimensional), so,
        # as in SciPy, a cycle has min(restart, n) steps.
        state = _start_cycle(ops, A, b, x0, min(self.restart, b.shape[0]))
        state = {**state, "rnorm": state["beta"], "breakdown": ops.xp.asarray(False)}
        if ops.eager:  # a key of every eager state (the structure never changes)
            state["arnoldi"] = None
        return state

    def step(self, ops: ArrayOps, A: Any, b: Any, state: State, M: Any) -> State:
        xp = ops.xp
        m = _cycle_length(state)

        def restart_cycle(s: State) -> State:
            return {**s, **_start_cycle(ops, A, b, self.iterate(ops, A, b, s, M), m)}

        state = ops.cond(state["j"] == m, restart_cycle, lambda s: s, state)
        V, H, Q, beta, j = state["V"], state["H"], state["Q"], state["beta"], state["j"]

        # Arnoldi: w = A M v_j, orthogonalised against v_0 .. v_j.
        w = A.matvec(precondition(M, V[j]))
        rows = _rows_in_use(ops, V, j)
        h1, h2, w2, h_next = _orthogonalise(ops, rows, w)
        column = ops.set_at(xp.zeros(m + 1, dtype=V.dtype), slice(0, rows.shape[0]),
                            h1 if h2 is None else h1 + h2)
        # ||w|| from the column (V is orthonormal, so ||w||^2 = ||h||^2 + h_next^2): the
        # scale against which "zero" is judged. Exact zeros are rare in floating point: a
        # Krylov space invariant up to rounding leaves h_next ~ eps ||w||, whose direction
        # is noise. Like SciPy (h_{j+1,j} <= eps h0), such an h_next is a happy breakdown.
        w_norm = _safe_sqrt(ops, xp.real(ops.vdot(column, column)) + h_next**2)
        eps = float(xp.finfo(h_next.dtype).eps)
        h_next = xp.where(h_next <= eps * w_norm, h_next * 0, h_next)
        column = ops.set_at(column, j + 1, h_next)
        # Row j + 1 of the basis, written into V itself on NumPy (set_at_): a copy of the whole
        # (m + 1) x n basis per step made GMRES 2-2.6x slower than SciPy's. The state before
        # this step shares the buffer, which is safe because nothing reads a row past a
        # state's own j from it (iterate and the reverse use the rows in use; a cycle's
        # finished basis, which the tape keeps, is never written again: a restart starts
        # a new one).
        V = ops.set_at_(V, j + 1, ops.safe_divide(w2, h_next))
        H = ops.set_at(H, (slice(None), j), column)

        # Givens: rotate the new column by the previous rotations (Q), then annihilate its
        # subdiagonal entry with G = [[conj(c), conj(s)], [-s, c]], c = a / rho, s = h / rho.
        rotated = Q @ column
        a = rotated[j]
        rho = _safe_sqrt(ops, xp.real(xp.conj(a) * a) + h_next**2)
        c = xp.where(rho == 0, xp.ones_like(a), ops.safe_divide(a, rho))
        s = ops.safe_divide(h_next, rho).astype(a.dtype)
        q_j, q_next = Q[j], Q[j + 1]
        Q = ops.set_at(ops.set_at(Q, j, xp.conj(c) * q_j + xp.conj(s) * q_next),
                       j + 1, c * q_next - s * q_j)
        # ||b - A x_{j+1}|| = beta |e_{j+1}^T Q e_0|; before the step it was beta |Q[j, 0]|.
        residual_before = beta * xp.abs(q_j[0])
        # A new pivot rho ~ eps ||w|| means A M is singular on the Krylov space (up to
        # rounding): the least-squares solution would divide by noise. While the residual is
        # not zero that is a breakdown; the driver keeps the state before this step.
        breakdown = xp.logical_and(rho <= eps * w_norm, residual_before > 0)
        q = Q[j + 1, 0]
        new = {"x_cycle": state["x_cycle"], "V": V, "H": H, "Q": Q, "beta": beta,
               "j": j + 1, "rnorm": beta * _safe_sqrt(ops, xp.real(xp.conj(q) * q)),
               "breakdown": breakdown}
        if ops.eager:
            # For the reverse sweep's record (it keeps w: no product with A and no
            # projection recomputed) and for diagnostics (whether the second pass ran).
            new["arnoldi"] = ArnoldiStep(w, h1, h2)
        return new

    def iterate(self, ops: ArrayOps, A: Any, b: Any, state: State, M: Any) -> Any:
        y, _, _ = _cycle_solution(ops, state)
        if ops.name == "numpy":
            # The rows in use only: the rows past j may already hold a later step's vector
            # (set_at_ above), and y is zero there, but 0 * NaN is not 0.
            J = int(state["j"])
            return state["x_cycle"] + precondition(M, state["V"][:J].T @ y[:J])
        return state["x_cycle"] + precondition(M, state["V"][:-1].T @ y)

    # -- reverse sweep (NumPy/CuPy), step by step -----------------------------------------
    # The forward keeps, per step, w = A M v_j and references to its cycle's basis, so a
    # reverse step recomputes no forward quantity: it needs one A^T product and four reads of
    # the rows in use (two products with the basis, one read and write of its cotangent),
    # against the forward's two (one pass) or four (two passes).
    # Each Arnoldi step is reversed as the projection it is in exact arithmetic,
    # w2 = w - V^T h with h = conj(V) w, whether one or two Gram-Schmidt passes computed it:
    # on orthonormal V the second pass is the identity (h2 = conj(V) w1 = 0), so both maps
    # agree for every w, and their derivatives in V agree along every perturbation that keeps
    # V orthonormal -- the only ones the earlier steps produce (V is orthonormal as a function
    # of A and b). The gradient is therefore the same to rounding (tests: against JAX's
    # derivative of the traced two-pass steps, and finite differences), and the reverse
    # neither keeps w1 nor pays for the second pass's two products with the basis.
    # The cotangent passed between the steps of a cycle is that of the cycle's basis "V"
    # (rows <= j + 1 meaningful), of its Hessenberg matrix "H" ((J + 1) x J, from the cycle's
    # least-squares solve), of "beta" and of the cycle's start "x_cycle". The end point of a
    # cycle, x_c + M V_J y_J, is reversed by iterate_vjp for the last cycle and, for each
    # finished one, by the step that began the next cycle with a restart (after it reversed
    # the new cycle's start, v_0 = r / ||r||, r = b - A x_c).
    # Cotangents follow JAX's convention (the pairing Re sum(z_bar * dz), no conjugation).

    def record(self, ops: ArrayOps, A: Any, b: Any, M: Any, before: State,
               after: State) -> Any:
        if not ops.eager:
            # Traced code (JAX) differentiates step itself: the record reads j on the host.
            raise NotImplementedError("GMRES's reverse step runs on eager backends only")
        step = after["arnoldi"]
        j = int(ops.to_float(after["j"])) - 1
        m = _cycle_length(before)
        return {
            "j": j,
            "V": after["V"],  # the cycle's basis (a reference: rows <= j + 1 are final)
            "column": after["H"][: j + 2, j],
            "beta": after["beta"],
            "x_cycle": after["x_cycle"],
            "w": ops.keep(step.w),
            # A step that began with a restart keeps the finished cycle's state (references):
            # its end point is the new cycle's x_c.
            "finished": before if int(ops.to_float(before["j"])) == m else None,
        }

    def step_vjp(self, ops: ArrayOps, A: Any, b: Any, M: Any, record: Any,
                 state_bar: State, ctx: Any) -> State:
        xp = ops.xp
        j, V = record["j"], record["V"]
        x_cycle_bar = cotangent(state_bar, "x_cycle", b)
        V_bar, H_bar = state_bar.get("V"), state_bar.get("H")
        beta_bar = state_bar.get("beta")
        if V_bar is None:  # nothing reached this cycle's basis
            V_bar = xp.zeros_like(V)
        column_bar = (H_bar[: j + 2, j] if H_bar is not None
                      else xp.zeros(j + 2, dtype=V.dtype))
        work = state_bar.get("work")
        if work is None:
            work = xp.empty((2, *V.shape[1:]), dtype=V.dtype)
        self._arnoldi_vjp(ops, M, record, column_bar, V_bar, work, ctx)
        if j > 0:
            return {"x_cycle": x_cycle_bar, "V": V_bar, "H": H_bar, "beta": beta_bar,
                    "work": work}
        # The cycle's start: v_0 = r / beta, beta = ||r||, r = b - A x_c.
        v0, beta = V[0], record["beta"]
        beta_bar = 0.0 if beta_bar is None else beta_bar
        beta_bar = beta_bar - xp.real(ops.dot(V_bar[0], v0)) * ops.safe_divide(1.0, beta)
        r_bar = ops.axpy_(ops.safe_divide(V_bar[0], beta), beta_bar, ops.conj(v0))
        ctx.add_b(r_bar)
        x_cycle_bar = x_cycle_bar + ctx.matvec_T(record["x_cycle"], -r_bar)
        if record["finished"] is None:  # the first cycle: x_c = x0 (init_vjp)
            return {"x_cycle": x_cycle_bar}
        # x_c is the finished cycle's end point; its basis cotangent reuses this buffer.
        return self._end_point_vjp(ops, M, record["finished"], x_cycle_bar, ctx,
                                   (V_bar, work))

    def init_vjp(self, ops: ArrayOps, A: Any, b: Any, x0: Any, M: Any, state_bar: State,
                 ctx: Any) -> Any:
        # The first cycle's start was reversed by the first step (a run of no steps leaves
        # x = x0: only x_cycle's cotangent).
        return cotangent(state_bar, "x_cycle", x0)

    def iterate_vjp(self, ops: ArrayOps, A: Any, b: Any, M: Any, state: State, x_bar: Any,
                    ctx: Any) -> State:
        return self._end_point_vjp(ops, M, state, x_bar, ctx, None)

    def _end_point_vjp(self, ops: ArrayOps, M: Any, state: State, x_bar: Any, ctx: Any,
                       buffer: Any) -> State:
        """Reverse of a cycle's end point ``x_c + M V_J y_J``: the cotangents of ``x_c``,
        ``V``, ``H`` and ``beta``. ``buffer``, when given, is ``(V_bar, work)`` of the cycle
        after this one, reused (``V``'s cotangent is written into it)."""
        xp = ops.xp
        V, H, beta = state["V"], state["H"], state["beta"]
        J = int(ops.to_float(state["j"]))
        if J == 0:  # x = x_c
            return {"x_cycle": x_bar}
        y, R, _ = _cycle_solution(ops, state)
        y, R = y[:J], R[:J, :J]
        H_J = H[: J + 1, :J]
        # x_end = x_c + M u,  u = V_J^T y
        u_bar = precondition_T(M, ctx, x_bar)
        # V_bar is the sweep's own accumulator (NumPy/CuPy only), updated in place.
        # The sweep's own accumulators, reused from cycle to cycle: V_bar and a 2 x n work
        # array for the vectors of each step's rank-2 update (no fresh memory per step).
        V_bar, work = ((xp.empty_like(V), xp.empty((2, *V.shape[1:]), dtype=V.dtype))
                       if buffer is None else buffer)
        xp.multiply(y[:, None], u_bar[None, :], out=V_bar[:J])
        V_bar[J:] = 0
        y_bar = V[:J] @ u_bar
        # y = argmin ||c - H_J y||, c = beta e_1, H_J = Q^H [R; 0]. With eta solving
        # R^H R eta = conj(y_bar) and the least-squares residual l = c - H_J y:
        # c_bar = conj(H_J eta),  H_bar = -conj(H_J eta) y^T + conj(l) eta^T.
        eta = xp.linalg.solve(R, xp.linalg.solve(xp.conj(R.T), xp.conj(y_bar)))
        c = xp.zeros(J + 1, dtype=H.dtype)
        c[0] = beta
        c_bar = xp.conj(H_J @ eta)
        H_bar = -c_bar[:, None] * y[None, :] + xp.conj(c - H_J @ y)[:, None] * eta[None, :]
        return {"x_cycle": x_bar, "V": V_bar, "H": H_bar, "beta": xp.real(c_bar[0]),
                "work": work}

    def _arnoldi_vjp(self, ops: ArrayOps, M: Any, record: Any, column_bar: Any, V_bar: Any,
                     work: Any, ctx: Any) -> None:
        """Reverse of Arnoldi step ``j``: add its inputs' share to ``V_bar`` (in place).

        ``column_bar`` is the cotangent of ``H[:j+2, j]``; ``V_bar[j+1]`` must already hold
        the full cotangent of the basis vector this step created. ``work`` (2 x n) is
        scratch memory.
        """
        xp = ops.xp
        conj = ops.conj
        j, V, w = record["j"], record["V"], record["w"]
        h = record["column"][: j + 1]  # h1 (+ h2): the projection's coefficients
        V_active = V[: j + 1]
        h_next = xp.real(record["column"][j + 1])
        v_new = V[j + 1]
        v_new_bar = V_bar[j + 1]
        # v_new = w2 / h_next,  h_next = ||w2||
        h_next_bar = xp.real(column_bar[j + 1]) - xp.real(ops.dot(v_new_bar, v_new)) * \
            ops.safe_divide(1.0, h_next)
        w2_bar = ops.axpy_(ops.safe_divide(v_new_bar, h_next), h_next_bar, conj(v_new))
        # w2 = w - V^T h,  h = conj(V) w  (the Hessenberg column's first j + 1 entries)
        h_total_bar = column_bar[: j + 1] - V_active @ w2_bar
        w_bar = ops.axpy_(_adjoint_product(ops, V_active.T, h_total_bar), 1, w2_bar)
        # V's share: -h w2_bar^T + conj(h_bar w^T), one (j+1) x 2 by 2 x n product.
        coefficients = xp.stack([-h, conj(h_total_bar)], axis=1)
        vectors = work
        vectors[0], vectors[1] = w2_bar, conj(w)
        rows = V_bar[: j + 1]
        updated = ops.matmul_add_(rows, coefficients, vectors)
        if updated is not rows:  # a functional matmul_add_ (CuPy inherits the default)
            rows[...] = updated
        # w = A z,  z = M v_j
        z = precondition(M, V[j])
        z_bar = ctx.matvec_T(z, w_bar)
        V_bar[j] += precondition_T(M, ctx, z_bar)
