"""The abstract :class:`IterativeSolver`: what a solver implements, once, for every backend."""

from __future__ import annotations

import abc
from typing import Any, ClassVar

from prdp_ops._array_ops import ArrayOps

__all__ = ["IterativeSolver", "State", "cotangent", "precondition", "precondition_T",
           "residual_init_vjp"]

#: A solver's loop state: a flat dict of arrays (a JAX pytree with a fixed structure).
State = dict[str, Any]


def precondition(M: Any, r: Any) -> Any:
    """``M r``, or ``r`` without a preconditioner."""
    return r if M is None else M.matvec(r)


def precondition_T(M: Any, ctx: Any, z_bar: Any) -> Any:
    """Reverse of :func:`precondition`: ``M^T z_bar`` (``M`` is a constant), or ``z_bar``."""
    return z_bar if M is None else ctx.precond_T(z_bar)


def residual_init_vjp(state_bar: State, x0: Any, ctx: Any) -> Any:
    """Reverse of an ``init`` that sets ``x = x0`` and ``r = b - A x0``: returns ``x0_bar``
    and gives ``b`` and ``A`` their shares through ``ctx``."""
    r_bar = cotangent(state_bar, "r", x0)
    ctx.add_b(r_bar)
    return cotangent(state_bar, "x", x0) + ctx.matvec_T(x0, -r_bar)


def cotangent(state_bar: State, key: str, like: Any) -> Any:
    """``state_bar[key]``, or zeros shaped like ``like`` when that cotangent is absent."""
    value = state_bar.get(key)
    return value if value is not None else like * 0


class IterativeSolver(abc.ABC):
    """Abstract base of every iterative solver.

    A solver is written once, as pure functions over an :class:`~prdp_ops._array_ops.ArrayOps`
    ``ops`` (``ops.xp`` is numpy, cupy or jax.numpy), and a backend drives the loop: a Python
    loop on NumPy/CuPy, ``lax.while_loop`` on JAX. Stopping, history and failure reporting
    belong to the driver, not to the solver.

    Subclassing contract
    --------------------
    Required:

    ``init(ops, A, b, x0, M) -> state``
        Build the loop state, a flat ``dict`` of arrays. Under JAX its structure, shapes and
        dtypes must not change from step to step. It holds at least ``"x"`` (the iterate,
        unless :meth:`iterate` is overridden), ``"rnorm"`` (a real 0-d array, the residual
        norm of the current iterate) and, optionally, ``"breakdown"`` (a 0-d bool).
    ``step(ops, A, b, state, M) -> state``
        One iteration, returning a new state. Never modify arrays in place (use
        ``ops.set_at``; ``ops.set_at_``, which writes in place on NumPy, only into an array
        whose written part no earlier state reads); branch on array values only through
        ``ops.cond`` / ``ops.where``.
        ``A`` is a :class:`~prdp_ops.LinearOperator`; ``M`` a preconditioner operator or
        ``None``.

    Optional:

    ``iterate(ops, A, b, state, M)``
        The current solution estimate (default ``state["x"]``).
    ``step_vjp``, ``init_vjp``, ``iterate_vjp``
        The reverse sweep on NumPy/CuPy for ``adjoint="unrolled"`` (JAX derives it from
        ``step`` by automatic differentiation, so they are not needed there). See
        :meth:`step_vjp`.

    Class attributes describe what the solver can do, and ``po.solve`` checks them before it
    runs: :attr:`supports_complex`, :attr:`supports_preconditioner`,
    :attr:`needs_diagonal`, :attr:`needs_matrix`, :attr:`requires_hermitian`.

    Options are keyword arguments of ``__init__`` (e.g. ``GMRES(restart=20)``); validate them
    there with errors that name the option. Solvers compare equal and hash by class and
    options, so they can be static arguments of ``jax.jit``.

    Examples
    --------
    A weighted Richardson iteration, registered and used::

        @po.register_solver(name="my_richardson")
        class MyRichardson(po.IterativeSolver):
            def __init__(self, omega=1.0):
                super().__init__(omega=float(omega))

            def init(self, ops, A, b, x0, M):
                r = b - A.matvec(x0)
                return {"x": x0, "r": r, "rnorm": ops.norm(r)}

            def step(self, ops, A, b, state, M):
                x = state["x"] + self.options["omega"] * state["r"]
                r = b - A.matvec(x)
                return {"x": x, "r": r, "rnorm": ops.norm(r)}

        po.solve(A, b, solver="my_richardson", omega=0.5)
    """

    #: Registered name (set by :func:`prdp_ops.register_solver`).
    name: ClassVar[str | None] = None
    #: Whether complex dtypes are supported.
    supports_complex: ClassVar[bool] = True
    #: Whether a preconditioner ``M`` may be given.
    supports_preconditioner: ClassVar[bool] = False
    #: Whether ``A.diagonal()`` is used (Jacobi).
    needs_diagonal: ClassVar[bool] = False
    #: Whether the explicit matrix ``A.to_matrix()`` is used (SOR).
    needs_matrix: ClassVar[bool] = False
    #: Whether the solver assumes ``A`` Hermitian (CG); informational, not checked.
    requires_hermitian: ClassVar[bool] = False
    #: Whether ``init``/``step``/``step_vjp`` also run on a block of right-hand sides, ``b``
    #: of shape ``(n, k)`` (NumPy/CuPy). A solver sets it when every vector operation
    #: works column by column with the columns on the last axis: inner products through
    #: ``ops.vdot``/``ops.dot``/``ops.norm`` (which then return one value per column, shape
    #: ``(k,)``, broadcasting against ``(n, k)``), products through ``A.matvec``/``M.matvec``
    #: (which then apply to every column), no Python branching on array values, and every
    #: state entry either per column (the columns on its last axis) or the same for all
    #: columns and left unchanged by ``step``. Without it a block is solved one column at
    #: a time.
    supports_column_blocks: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        # A solver without an __init__ of its own takes no options: po.CG(tol=1e-8) must
        # fail, not run with the default tolerance.
        if options and type(self).__init__ is IterativeSolver.__init__:
            raise TypeError(
                f"solver {self.name or type(self).__name__!r} takes no options; got "
                f"{sorted(options)}. Tolerances and limits (rtol, atol, maxiter) are arguments "
                "of the solve function"
            )
        self.options: dict[str, Any] = dict(options)

    # -- to implement -----------------------------------------------------------------
    @abc.abstractmethod
    def init(self, ops: ArrayOps, A: Any, b: Any, x0: Any, M: Any) -> State:
        """Return the initial loop state for the initial guess ``x0``."""

    @abc.abstractmethod
    def step(self, ops: ArrayOps, A: Any, b: Any, state: State, M: Any) -> State:
        """Return the state after one iteration."""

    def iterate(self, ops: ArrayOps, A: Any, b: Any, state: State, M: Any) -> Any:
        """Return the solution estimate held by ``state``."""
        return state["x"]

    # -- reported quantities ----------------------------------------------------------
    def residual_norm(self, ops: ArrayOps, state: State) -> Any:
        """The residual norm of the current iterate (a real 0-d array)."""
        return state["rnorm"]

    def breakdown(self, ops: ArrayOps, state: State) -> Any:
        """Whether the recurrence broke down (a 0-d bool array, or ``False``)."""
        return state.get("breakdown", False)

    # -- unrolled reverse sweep on NumPy/CuPy -----------------------------------------
    @property
    def supports_unrolled_numpy(self) -> bool:
        """Whether :meth:`step_vjp` is implemented (unrolled adjoints on NumPy/CuPy)."""
        return type(self).step_vjp is not IterativeSolver.step_vjp

    def record(self, ops: ArrayOps, A: Any, b: Any, M: Any, before: State, after: State) -> Any:
        """What the forward pass keeps of one step for :meth:`step_vjp` (default: both states).

        States are never modified in place, so keeping references costs only the arrays a
        step creates. Override it to keep less (e.g. GMRES keeps one basis per cycle), and
        pass the vectors kept through ``ops.keep``: on NumPy the driver then copies them
        into tape memory reused from one solve to the next instead of holding fresh memory
        that the next call page-faults in again (an array named at two steps is copied
        once); elsewhere ``ops.keep`` is the identity.
        """
        return (before, after)

    def step_vjp(self, ops: ArrayOps, A: Any, b: Any, M: Any, record: Any,
                 state_bar: State, ctx: Any) -> State:
        """Reverse of one :meth:`step`: map the cotangent of the state after the step to the
        cotangent of the state before it.

        ``record`` is what :meth:`record` kept. ``state_bar`` maps state keys to cotangents
        (a missing key or ``None`` means zero). Cotangents follow JAX's convention (for
        ``y = A x``: ``x_bar = A^T y_bar``). Contributions that do not flow through the state
        go to ``ctx`` (:class:`prdp_ops.backends.numpy.ReverseContext`): ``ctx.matvec_T(v,
        y_bar)`` returns ``A^T y_bar`` and records the pair for A's cotangent,
        ``ctx.precond_T(z_bar)`` returns ``M^T z_bar``, ``ctx.add_b(b_bar)`` accumulates b's
        cotangent.

        The arrays of ``state_bar`` belong to the sweep (the driver passes ``x_bar`` as a
        private copy), so a reverse step may update them in place through ``ops.axpy_`` /
        ``ops.scale_`` (which return the result: in place on NumPy/CuPy, a new array on JAX)
        if it returns no array under two keys. Never write into the record's arrays, into
        what ``ctx`` returns (an identity ``M`` returns its argument), or into an array
        after passing it to ``ctx.matvec_T``/``ctx.record_pair`` (A's cotangent reads it
        later).
        """
        raise NotImplementedError(
            f"solver {self.name or type(self).__name__!r} has no reverse step on NumPy/CuPy, so "
            "adjoint='unrolled' is unavailable there: implement step_vjp/init_vjp, use "
            "adjoint='implicit', or run it through prdp_ops.backends.jax (which derives it)"
        )

    def init_vjp(self, ops: ArrayOps, A: Any, b: Any, x0: Any, M: Any, state_bar: State,
                 ctx: Any) -> Any:
        """Reverse of :meth:`init`: return ``x0_bar``; b's share goes to ``ctx.add_b``."""
        raise NotImplementedError(self.step_vjp.__doc__)

    def iterate_vjp(self, ops: ArrayOps, A: Any, b: Any, M: Any, state: State, x_bar: Any,
                    ctx: Any) -> State:
        """Reverse of :meth:`iterate` (default: the iterate is ``state["x"]``)."""
        return {"x": x_bar}

    # -- identity (for jax.jit static arguments) --------------------------------------
    def _key(self) -> tuple:
        return (type(self), tuple(sorted(self.options.items())))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IterativeSolver) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in sorted(self.options.items()))
        return f"{type(self).__name__}({opts})"
