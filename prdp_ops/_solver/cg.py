"""Conjugate gradients (Hestenes-Stiefel), optionally preconditioned.

For Hermitian positive definite ``A`` (and ``M``), CG minimises the A-norm of the error over
the growing Krylov space. The recurrence, with ``z = M r`` and ``rho = <r, z>``:

    q = A p,  alpha = rho / <p, q>,  x' = x + alpha p,  r' = r - alpha q,
    z' = M r',  rho' = <r', z'>,  beta = rho' / rho,  p' = z' + beta p.

A step starts by forming its direction, ``p = z + beta_prev p_prev`` (``beta_prev = 0`` at
the first step), from the previous step's direction and ``beta`` kept in the state, rather
than ending with ``p'``: every read of ``p`` then happens after ``p`` was written in the same
step, so a JAX loop updates the direction in place (written at the end of the step, ``p'``
overwrote the ``p`` that ``x' = x + alpha p`` still read, an order XLA enforces with a copy
of ``p`` per step). Operation for operation this is ``scipy.sparse.linalg.cg`` (which also
forms ``p`` at the start of an iteration), so the iterates agree with SciPy's up to
rounding. ``<p, q> <= 0`` with a non-zero residual means ``A`` is not positive definite
along ``p``: the step length is meaningless and the solve is reported as a breakdown.
"""

from __future__ import annotations

from typing import Any

from prdp_ops._array_ops import ArrayOps
from prdp_ops._solver.base import IterativeSolver, State, cotangent, precondition, precondition_T

__all__ = ["CG"]


class CG(IterativeSolver):
    """Conjugate gradients for Hermitian positive definite ``A``.

    Takes no options. A preconditioner ``M`` (Hermitian positive definite, approximating
    ``A^-1``) may be given to ``solve``.
    """

    supports_preconditioner = True
    supports_column_blocks = True
    requires_hermitian = True

    def init(self, ops: ArrayOps, A: Any, b: Any, x0: Any, M: Any) -> State:
        r = b - A.matvec(x0)
        z = precondition(M, r)
        rho = ops.vdot(r, z)
        xp = ops.xp
        # "p" and "beta" are the last step's direction and the beta that forms the next one
        # (zero: the first direction is z); "q" (= A p) and "pq" (= <p, q>) of the last step
        # are kept for the reverse sweep. The state's structure must not change between
        # steps (JAX loops), so these start as zeros. z = M r is kept when M is given (the
        # next direction needs it; without M it is r).
        state = {"x": x0, "r": r, "p": xp.zeros_like(z), "beta": xp.zeros_like(rho),
                 "rho": rho, "rnorm": ops.norm(r), "breakdown": xp.asarray(False),
                 "q": xp.zeros_like(r), "pq": xp.zeros_like(rho)}
        return state if M is None else {**state, "z": z}

    def step(self, ops: ArrayOps, A: Any, b: Any, state: State, M: Any) -> State:
        xp = ops.xp
        x, r, rho = state["x"], state["r"], state["rho"]
        z = r if M is None else state["z"]
        if ops.eager:
            # Each new vector in a private copy updated in place (ops.axpy_: one BLAS axpy on
            # NumPy), as SciPy's cg updates its own: one new array per vector instead of a
            # product and a sum (measured 15% of a 512^2 forward in fresh temporaries). p
            # and r' are ops.fresh_copy: made in tape memory while the NumPy driver records,
            # so keeping them costs no second copy. x is copied first: the state before the
            # step (and the caller's x0) is never written.
            p = ops.axpy_(ops.fresh_copy(z), state["beta"], state["p"])
        else:
            p = z + state["beta"] * state["p"]
        q = A.matvec(p)
        pq = ops.vdot(p, q)
        alpha = ops.safe_divide(rho, pq)
        if ops.eager:
            x = ops.axpy_(x.copy(), alpha, p)
            r = ops.axpy_(ops.fresh_copy(r), -alpha, q)
        else:
            x = x + alpha * p
            r = r - alpha * q
        z = precondition(M, r)
        rho_new = ops.vdot(r, z)
        beta = ops.safe_divide(rho_new, rho)
        # Unpreconditioned, rho = <r, r> already is the squared residual norm.
        rnorm = ops.norm(r) if M is not None else ops.xp.sqrt(ops.xp.real(rho_new))
        # p.Ap <= 0 while the residual is not yet zero: A is not positive definite.
        breakdown = xp.logical_and(xp.real(pq) <= 0, state["rnorm"] > 0)
        new = {"x": x, "r": r, "p": p, "beta": beta, "rho": rho_new, "rnorm": rnorm,
               "breakdown": breakdown, "q": q, "pq": pq}
        return new if M is None else {**new, "z": z}

    # -- reverse sweep (NumPy/CuPy) ---------------------------------------------------
    # Cotangents follow JAX's convention. For s = <a, b> = sum(conj(a) b):
    # a_bar = conj(b s_bar), b_bar = conj(a) s_bar; for a real dtype the conj are no-ops.

    def record(self, ops: ArrayOps, A: Any, b: Any, M: Any, before: State,
               after: State) -> Any:
        # The reverse step needs the step's direction p, rho before the step, and r',
        # q = A p, rho' and <p, q> after it (not x: the step is affine in x; not r: only
        # r' = r - alpha q enters the reverse). Keeping q saves the reverse sweep one
        # product with A per step, keeping r' the recomputation of r - alpha q, keeping
        # <p, q> a reduction over two vectors. Memory: three n-vectors per iteration, the
        # least for a reverse without recomputation (no one of p, q, r' follows stably from
        # the other two and the scalars).
        return (ops.keep(after["p"]), ops.keep(after["q"]), ops.keep(after["r"]),
                before["rho"], after["rho"], after["pq"])

    def step_vjp(self, ops: ArrayOps, A: Any, b: Any, M: Any, record: Any,
                 state_bar: State, ctx: Any) -> State:
        # The chain is that of the recurrence q = A p, ..., p' = z' + beta p with p the
        # direction of this step: the formation of the next direction p' (which the next
        # step's forward does first) is reversed here, where p is at hand, so state_bar["p"]
        # is the cotangent of the next step's direction p' (zero after the last step) and
        # the "p" returned that of this step's direction; "beta", "z" get none. init_vjp
        # takes "p" as the cotangent of the first direction, z0.
        # state_bar's "r" and "p" are private to the sweep, so they are updated in place
        # (ops.axpy_/scale_, functional on JAX); x_bar passes through and is never written.
        conj = ops.conj
        p, q, r_new, rho, rho_new, pq = record
        # The step's scalars from the recorded ones (bit for bit the forward's).
        alpha = ops.safe_divide(rho, pq)
        beta = ops.safe_divide(rho_new, rho)

        x_bar = cotangent(state_bar, "x", r_new)  # x' = x + alpha p: x_bar passes through
        r_bar = cotangent(state_bar, "r", r_new)
        p_bar = cotangent(state_bar, "p", r_new)
        rho_bar_new = cotangent(state_bar, "rho", rho)

        # p' = z' + beta p ;  beta = rho' / rho
        beta_bar = ops.dot(p_bar, p)
        rho_bar_new = rho_bar_new + ops.safe_divide(beta_bar, rho)
        rho_bar = -beta_bar * ops.safe_divide(beta, rho)
        # rho' = <r', z'>,  z' = M r':  z_bar = p_bar' + conj(r') rho_bar',
        # r_bar = r_bar' + conj(z' rho_bar') + M^T z_bar.
        if M is None:
            # z' = r': r_bar = r_bar' + p_bar' + conj(r') 2 Re(rho_bar'), two passes.
            r_bar = ops.axpy_(r_bar, 1, p_bar)
            r_bar = ops.axpy_(r_bar, 2 * ops.xp.real(rho_bar_new), conj(r_new))
        else:
            z_new = precondition(M, r_new)
            z_bar = p_bar + conj(r_new) * rho_bar_new
            r_bar = ops.axpy_(r_bar, 1, conj(z_new * rho_bar_new))
            r_bar = ops.axpy_(r_bar, 1, precondition_T(M, ctx, z_bar))
        # r' = r - alpha q ;  x' = x + alpha p  (r_bar above is both r_bar' and r's share)
        alpha_bar = ops.dot(x_bar, p) - ops.dot(r_bar, q)
        # alpha = rho / pq ;  pq = <p, q>
        rho_bar = rho_bar + ops.safe_divide(alpha_bar, pq)
        pq_bar = -alpha_bar * ops.safe_divide(alpha, pq)
        q_bar = ops.axpy_(-alpha * r_bar, pq_bar, conj(p))
        # p_bar = beta p_bar' + alpha x_bar + conj(q pq_bar) + A^T q_bar  (q = A p), in the
        # buffer of p_bar'.
        p_bar = ops.scale_(p_bar, beta)
        p_bar = ops.axpy_(p_bar, alpha, x_bar)
        p_bar = ops.axpy_(p_bar, conj(pq_bar), conj(q))
        p_bar = ops.axpy_(p_bar, 1, ctx.matvec_T(p, q_bar))
        return {"x": x_bar, "r": r_bar, "p": p_bar, "rho": rho_bar}

    def init_vjp(self, ops: ArrayOps, A: Any, b: Any, x0: Any, M: Any, state_bar: State,
                 ctx: Any) -> Any:
        xp = ops.xp
        r = b - A.matvec(x0)
        z = precondition(M, r)
        x_bar = cotangent(state_bar, "x", r)
        r_bar = cotangent(state_bar, "r", r)
        rho_bar = cotangent(state_bar, "rho", ops.vdot(r, z))
        # rho = <r, z> ;  first direction p = z (state_bar["p"]: see step_vjp) ;  z = M r
        r_bar = r_bar + xp.conj(z * rho_bar)
        z_bar = cotangent(state_bar, "p", r) + xp.conj(r) * rho_bar
        r_bar = r_bar + precondition_T(M, ctx, z_bar)
        # r = b - A x0
        ctx.add_b(r_bar)
        return x_bar + ctx.matvec_T(x0, -r_bar)
