"""BiCGSTAB (van der Vorst, 1992), optionally preconditioned.

For a general (non-Hermitian) ``A``. With the shadow residual ``r_hat = r_0``, the
preconditioner ``M`` (approximating ``A^-1``) and ``<a, b> = sum(conj(a) b)``, one iteration
is one full BiCGSTAB step with two matrix-vector products:

    rho' = <r_hat, r>,  beta = (rho' / rho) (alpha / omega),  p' = r + beta (p - omega v),
    p_hat = M p',  v' = A p_hat,  alpha' = rho' / <r_hat, v'>,  s = r - alpha' v',
    s_hat = M s,  t = A s_hat,  omega' = <t, s> / <t, t>,
    x' = x + alpha' p_hat + omega' s_hat,  r' = s - omega' t.

The preconditioning is the same as ``scipy.sparse.linalg.bicgstab``'s (``M`` applied to
``p`` and ``s``, so ``r`` is the true, unpreconditioned residual), and the state starts from
``rho = alpha = omega = 1``, ``p = v = 0``, which makes the first step take ``p = r`` as
SciPy's does. Breakdown -- ``rho' = 0``, ``<r_hat, v'> = 0`` or ``omega' = 0`` while the
residual is not zero -- is reported in ``state["breakdown"]``; the divisions are guarded so
that it never produces NaN.
"""

from __future__ import annotations

from typing import Any

from prdp_ops._array_ops import ArrayOps
from prdp_ops._solver.base import IterativeSolver, State, cotangent, precondition, precondition_T

__all__ = ["BiCGSTAB"]


class BiCGSTAB(IterativeSolver):
    """Biconjugate gradients stabilised, for general square ``A``.

    Takes no options. A preconditioner ``M`` (approximating ``A^-1``) may be given to
    ``solve``; it is applied as in ``scipy.sparse.linalg.bicgstab``, and the reported
    residual norm is that of the true residual ``b - A x``. One iteration costs two
    matrix-vector products with ``A`` (and two applications of ``M``).
    """

    supports_preconditioner = True
    supports_column_blocks = True

    def init(self, ops: ArrayOps, A: Any, b: Any, x0: Any, M: Any) -> State:
        xp = ops.xp
        r = b - A.matvec(x0)
        one = xp.ones((), dtype=r.dtype)
        zeros = xp.zeros_like(r)
        # "t" (= A s_hat of the last step) is kept only for the reverse sweep; every key is
        # present from the start so that the state's structure never changes (JAX loops).
        state = {"x": x0, "r": r, "r_hat": r, "p": zeros, "v": zeros, "t": zeros,
                 "rho": one, "alpha": one, "omega": one, "rnorm": ops.norm(r),
                 "breakdown": xp.asarray(False)}
        if ops.eager:
            # Eager backends (NumPy, CuPy) also carry s = r - alpha' v' for the tape: kept, it
            # saves the reverse step its recomputation (3 reads, 2 writes) and A's deferred
            # cotangent a copy of it; and the step's <r_hat, v'> and <t, t>, two inner
            # products the reverse would otherwise recompute. Traced code (JAX) keeps its
            # state as it was.
            state.update(s=zeros, rv=one, tt=one)
        return state

    def step(self, ops: ArrayOps, A: Any, b: Any, state: State, M: Any) -> State:
        xp = ops.xp
        x, r, r_hat = state["x"], state["r"], state["r_hat"]
        rho_new = ops.vdot(r_hat, r)
        beta = ops.safe_divide(rho_new, state["rho"]) * ops.safe_divide(
            state["alpha"], state["omega"])
        # Eager backends build each new vector in a private copy updated in place
        # (ops.axpy_: BLAS axpy on NumPy), p' = r + beta p - beta omega v and x' likewise: 5
        # reads and 3 writes each instead of 6 and 4, and no temporaries. The copies of the
        # vectors the tape keeps (p', s, r') are ops.fresh_copy: made in tape memory while
        # the NumPy driver records, so keeping them costs no second copy. Traced code keeps
        # the plain expressions.
        eager = ops.eager
        if eager:
            p = ops.axpy_(ops.axpy_(ops.fresh_copy(r), beta, state["p"]),
                          -beta * state["omega"], state["v"])
        else:
            p = r + beta * (state["p"] - state["omega"] * state["v"])
        p_hat = precondition(M, p)
        v = A.matvec(p_hat)
        rv = ops.vdot(r_hat, v)
        alpha = ops.safe_divide(rho_new, rv)
        s = ops.axpy_(ops.fresh_copy(r), -alpha, v) if eager else r - alpha * v
        s_hat = precondition(M, s)
        t = A.matvec(s_hat)
        tt = ops.vdot(t, t)
        omega = ops.safe_divide(ops.vdot(t, s), tt)
        if eager:
            x = ops.axpy_(ops.axpy_(x.copy(), alpha, p_hat), omega, s_hat)
            r = ops.axpy_(ops.fresh_copy(s), -omega, t)
        else:
            x = x + alpha * p_hat + omega * s_hat
            r = s - omega * t
        # A vanishing rho' or <r_hat, v'> (lost bi-orthogonality), or omega' = 0 with s != 0
        # (the stabilising step stalls, and the next beta would divide by it), while the
        # residual is not yet zero: the recurrence cannot continue.
        lost = xp.logical_or(rho_new == 0, rv == 0)
        # With omega' = 0, r' = s, so ||r'|| stands for ||s|| (one pass fewer per step).
        rnorm = ops.norm(r)
        stalled = xp.logical_and(omega == 0, rnorm > 0)
        breakdown = xp.logical_and(xp.logical_or(lost, stalled), state["rnorm"] > 0)
        new = {"x": x, "r": r, "r_hat": r_hat, "p": p, "v": v, "t": t, "rho": rho_new,
               "alpha": alpha, "omega": omega, "rnorm": rnorm, "breakdown": breakdown}
        if "s" in state:
            new.update(s=s, rv=rv, tt=tt)
        return new

    # -- reverse sweep (NumPy/CuPy) ---------------------------------------------------
    # Cotangents follow JAX's convention. For s = <a, b> = sum(conj(a) b):
    # a_bar = conj(b s_bar), b_bar = conj(a) s_bar. For q = n / d: n_bar = q_bar / d,
    # d_bar = -q_bar q / d (both zero where safe_divide returned 0).

    def record(self, ops: ArrayOps, A: Any, b: Any, M: Any, before: State,
               after: State) -> Any:
        # The reverse needs the state before the step except x, and what the step made except
        # x' and r' (r' is the next step's "before"). Keeping t saves a matvec per reverse
        # step; M p' and M s are recomputed in the reverse.
        # ops.keep copies each vector once: p', v', t are the next step's p, v, t, and r_hat
        # is the same at every step.
        # s (eager backends) is kept too; it is not needed from "before".
        kept_before = {k: ops.keep(v) for k, v in before.items()
                       if k not in ("x", "s", "rv", "tt")}
        kept_after = {k: ops.keep(after[k]) for k in ("p", "v", "t", "s", "rho", "alpha",
                                                        "omega", "rv", "tt") if k in after}
        return (kept_before, kept_after)

    def step_vjp(self, ops: ArrayOps, A: Any, b: Any, M: Any, record: Any,
                 state_bar: State, ctx: Any) -> State:
        # The cotangents in state_bar (except x_bar, which passes through) and the arrays
        # made here are private to the sweep, so they are updated in place (ops.axpy_/scale_,
        # functional on JAX). Never written: x_bar, the tape's vectors, products returned
        # by ctx (an identity M returns its argument), and an array once recorded by
        # ctx.matvec_T.
        conj = ops.conj
        before, after = record
        r, r_hat, p_old, v_old = before["r"], before["r_hat"], before["p"], before["v"]
        rho, alpha_old, omega_old = before["rho"], before["alpha"], before["omega"]
        p, v, t = after["p"], after["v"], after["t"]
        rho_new, alpha, omega = after["rho"], after["alpha"], after["omega"]
        # Recompute the step's intermediate values.
        ratio_rho = ops.safe_divide(rho_new, rho)
        ratio_ao = ops.safe_divide(alpha_old, omega_old)
        beta = ratio_rho * ratio_ao
        p_hat = precondition(M, p)
        rv = after["rv"] if "rv" in after else ops.vdot(r_hat, v)
        s = after.get("s")
        if s is None:  # traced code: s = r - alpha' v' recomputed
            s = ops.axpy_(-alpha * v, 1, r)
        s_hat = precondition(M, s)
        tt = after["tt"] if "tt" in after else ops.vdot(t, t)

        x_bar = cotangent(state_bar, "x", r)
        r_bar_new = cotangent(state_bar, "r", r)
        omega_bar = cotangent(state_bar, "omega", omega)
        alpha_bar = cotangent(state_bar, "alpha", alpha)
        rho_new_bar = cotangent(state_bar, "rho", rho)
        v_bar = cotangent(state_bar, "v", r)
        p_bar_new = cotangent(state_bar, "p", r)
        r_hat_bar = cotangent(state_bar, "r_hat", r)

        # r' = s - omega' t   (s_bar takes over r_bar's buffer)
        t_bar = -omega * r_bar_new
        if state_bar.get("t") is not None:
            t_bar = ops.axpy_(t_bar, 1, state_bar["t"])
        omega_bar = omega_bar - ops.dot(r_bar_new, t)
        s_bar = r_bar_new
        # x' = x + alpha' p_hat + omega' s_hat
        alpha_bar = alpha_bar + ops.dot(x_bar, p_hat)
        omega_bar = omega_bar + ops.dot(x_bar, s_hat)
        # omega' = ts / tt
        ts_bar = ops.safe_divide(omega_bar, tt)
        tt_bar = -omega_bar * ops.safe_divide(omega, tt)
        # ts = <t, s>,  tt = <t, t>:  t_bar += conj(s ts_bar) + conj(t) 2 Re(tt_bar),
        # s_bar += conj(t) ts_bar
        t_bar = ops.axpy_(t_bar, conj(ts_bar), conj(s))
        t_bar = ops.axpy_(t_bar, 2 * ops.xp.real(tt_bar), conj(t))
        s_bar = ops.axpy_(s_bar, ts_bar, conj(t))
        # t = A s_hat ;  s_hat = M s ;  s_hat_bar = omega' x_bar + A^T t_bar
        s_hat_bar = ops.axpy_(omega * x_bar, 1, ctx.matvec_T(s_hat, t_bar))
        s_bar = ops.axpy_(s_bar, 1, precondition_T(M, ctx, s_hat_bar))
        # s = r - alpha' v'
        alpha_bar = alpha_bar - ops.dot(s_bar, v)
        v_bar = ops.axpy_(v_bar, -alpha, s_bar)
        # alpha' = rho' / rv
        rho_new_bar = rho_new_bar + ops.safe_divide(alpha_bar, rv)
        rv_bar = -alpha_bar * ops.safe_divide(alpha, rv)
        # rv = <r_hat, v'>
        r_hat_bar = ops.axpy_(r_hat_bar, conj(rv_bar), conj(v))
        v_bar = ops.axpy_(v_bar, rv_bar, conj(r_hat))
        # v' = A p_hat ;  p_hat = M p' ;  p_hat_bar = alpha' x_bar + A^T v_bar
        p_hat_bar = ops.axpy_(alpha * x_bar, 1, ctx.matvec_T(p_hat, v_bar))
        p_bar_new = ops.axpy_(p_bar_new, 1, precondition_T(M, ctx, p_hat_bar))
        # p' = r + beta w,  w = p - omega v  (beta_bar = <p_bar', w> as two products)
        r_bar = ops.axpy_(s_bar, 1, p_bar_new)
        p_bar_v_old = ops.dot(p_bar_new, v_old)
        beta_bar = ops.dot(p_bar_new, p_old) - omega_old * p_bar_v_old
        w_bar = ops.scale_(p_bar_new, beta)
        p_bar = w_bar
        v_bar_old = -omega_old * w_bar
        omega_bar_old = -beta * p_bar_v_old  # -<w_bar, v>, w_bar = beta p_bar
        # beta = (rho' / rho) (alpha / omega)
        ratio_rho_bar = beta_bar * ratio_ao
        ratio_ao_bar = beta_bar * ratio_rho
        rho_new_bar = rho_new_bar + ops.safe_divide(ratio_rho_bar, rho)
        rho_bar = -ratio_rho_bar * ops.safe_divide(ratio_rho, rho)
        alpha_bar_old = ops.safe_divide(ratio_ao_bar, omega_old)
        omega_bar_old = omega_bar_old - ratio_ao_bar * ops.safe_divide(ratio_ao, omega_old)
        # rho' = <r_hat, r>
        r_hat_bar = ops.axpy_(r_hat_bar, conj(rho_new_bar), conj(r))
        r_bar = ops.axpy_(r_bar, rho_new_bar, conj(r_hat))
        return {"x": x_bar, "r": r_bar, "r_hat": r_hat_bar, "p": p_bar, "v": v_bar_old,
                "rho": rho_bar, "alpha": alpha_bar_old, "omega": omega_bar_old}

    def init_vjp(self, ops: ArrayOps, A: Any, b: Any, x0: Any, M: Any, state_bar: State,
                 ctx: Any) -> Any:
        # r = r_hat = b - A x0; the other initial values are constants.
        r_bar = cotangent(state_bar, "r", x0) + cotangent(state_bar, "r_hat", x0)
        ctx.add_b(r_bar)
        return cotangent(state_bar, "x", x0) + ctx.matvec_T(x0, -r_bar)
