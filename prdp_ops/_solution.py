"""Structured results: what a solve returns and what a vector-Jacobian product returns."""

from __future__ import annotations

import collections
import dataclasses
import enum
import math
from typing import Any

import numpy as np

__all__ = ["BlockSolveResult", "Cotangents", "SolveResult", "SolverError", "Status"]


class Status(enum.Enum):
    """How an iterative solve ended. ``status.message`` says what to do about it."""

    CONVERGED = "converged"
    MAX_ITERATIONS = "max_iterations"
    BREAKDOWN = "breakdown"
    NONFINITE = "nonfinite"
    STAGNATED = "stagnated"
    INACCURATE = "inaccurate"
    PRECISION_LIMIT = "precision_limit"

    @property
    def message(self) -> str:
        """A sentence saying what happened and what to try."""
        return _MESSAGES[self]

    @property
    def is_failure(self) -> bool:
        """Whether the solve failed numerically (breakdown, NaN/inf, stagnation, or a
        residual the solver's recurrence claimed but ``b - A x`` does not confirm), not
        merely ran out of iterations. The ``on_failure`` policy applies to these."""
        return self not in (Status.CONVERGED, Status.MAX_ITERATIONS)


#: Iterations without a 0.1% decrease of the best residual norm after which a solve with a
#: tolerance is declared stagnated. Long enough for slow but steady methods (Jacobi on a
#: 1024^2 Poisson grid contracts by about 0.5% per 1000 iterations), short against a
#: ``maxiter`` of millions.
STAGNATION_WINDOW = 1000
#: The relative decrease of the best residual norm that counts as progress.
STAGNATION_DECREASE = 1e-3

_MESSAGES = {
    Status.CONVERGED: "The solve met its tolerance ||b - A x|| <= max(rtol ||b||, atol).",
    Status.MAX_ITERATIONS: (
        "The solve ran its maxiter iterations without meeting the tolerance. That is expected "
        "when the iteration count is set on purpose (PRDP training); otherwise raise maxiter, "
        "loosen rtol/atol, or add a preconditioner M."
    ),
    Status.BREAKDOWN: (
        "The solver broke down: a denominator of its recurrence vanished while the residual "
        "did not (for CG: p.Ap <= 0, so A is not symmetric positive definite; for BiCGSTAB: "
        "a lost bi-orthogonality). Use a solver suited to the matrix (gmres or bicgstab for "
        "non-symmetric A), or try another x0."
    ),
    Status.NONFINITE: (
        "The residual became NaN or infinite. Check b, x0 and the operator for non-finite "
        "values, and check that the solver suits the matrix (a stationary method such as "
        "jacobi diverges unless its iteration matrix has spectral radius < 1)."
    ),
    Status.STAGNATED: (
        "The residual norm stopped decreasing: it did not fall by 0.1% over the last "
        f"{STAGNATION_WINDOW} iterations, so more iterations would not help. A singular or "
        "inconsistent system (no exact solution), a restart too short for GMRES, or a "
        "stationary method whose iteration does not contract are the usual causes: check A "
        "and b, raise GMRES's restart, add a preconditioner M, or use another solver."
    ),
    Status.INACCURATE: (
        "The solver's recurrence claimed convergence but the true residual ||b - A x||, "
        "computed by the driver, does not meet the tolerance and stopped improving. A may "
        "be singular with b outside its range (no exact solution), the preconditioner M "
        "may be singular, or A too ill-conditioned for the dtype: check A, b and M, loosen "
        "rtol/atol to above result.true_residual_norm, or use float64."
    ),
    Status.PRECISION_LIMIT: (
        "The tolerance is below what the dtype can resolve: the recursive residual met it "
        "but the true residual ||b - A x|| stalled above it, at the level rounding allows. "
        "Loosen rtol/atol (no better than about 10 eps ||b|| for the dtype's eps) or solve "
        "in float64."
    ),
}

#: SciPy's ``info`` convention for the failure states (breakdown is negative).
_FAILURE_INFO = {Status.BREAKDOWN: -1, Status.NONFINITE: -2}


class SolverError(RuntimeError):
    """Raised instead of returning a failed :class:`SolveResult` when the caller asked to raise.

    The failed result is kept as ``error.result``.
    """

    def __init__(self, message: str, result: SolveResult | None = None) -> None:
        super().__init__(message)
        self.result = result


@dataclasses.dataclass(frozen=True)
class SolveResult:
    """The outcome of one iterative solve.

    Attributes
    ----------
    x
        The final iterate, an array of the backend of ``b``.
    converged
        Whether the stopping test ``||b - A x|| <= max(rtol ||b||, atol)`` was met.
    iterations
        Number of iterations run (for GMRES, Arnoldi steps, i.e. matrix-vector products).
    residual_norms
        1-D NumPy array, entry 0 the initial residual norm, then one entry per iteration.
        Krylov solvers report their recursively updated residual, as SciPy does.
    status
        A :class:`Status`; ``status.message`` explains it.
    solver
        Name of the solver that ran.
    true_residual_norm
        ``||b - A x||`` of the returned ``x``, computed by the driver (not the solver's
        recurrence) whenever a tolerance was set: every "converged" is confirmed on it.
        ``None`` for a fixed iteration count (``rtol = atol = 0``), where computing it
        would cost an extra product with ``A`` per solve.
    """

    x: Any
    converged: bool
    iterations: int
    residual_norms: Any
    status: Status
    solver: str = ""
    true_residual_norm: float | None = None

    @property
    def info(self) -> int:
        """SciPy's integer code: 0 converged, >0 iterations without convergence (the limit,
        stagnation, an unconfirmed residual), <0 breakdown (-1) or NaN/inf (-2)."""
        if self.status is Status.CONVERGED:
            return 0
        if self.status in _FAILURE_INFO:
            return _FAILURE_INFO[self.status]
        return max(int(self.iterations), 1)

    @property
    def message(self) -> str:
        """What happened, in words, with what to try."""
        text = f"{self.solver or 'solver'}: {self.status.message}"
        if self.status in (Status.INACCURATE, Status.PRECISION_LIMIT, Status.STAGNATED):
            true = float("nan") if self.true_residual_norm is None else self.true_residual_norm
            text += f" (recursive residual {self.residual_norm:.3g}, true residual {true:.3g})"
        return text

    def __repr__(self) -> str:
        true = ("" if self.true_residual_norm is None
                else f", true_residual_norm={self.true_residual_norm:.3g}")
        return (f"SolveResult(status={self.status.name}, converged={self.converged}, "
                f"iterations={self.iterations}, residual_norm={self.residual_norm:.3g}{true}, "
                f"solver={self.solver!r}, x=<{type(self.x).__name__} "
                f"shape={getattr(self.x, 'shape', None)}>)")

    @property
    def residual_norm(self) -> float:
        """The last recorded residual norm."""
        return float(self.residual_norms[-1])


class Cotangents:
    """Cotangents returned by the ``vjp`` of :func:`prdp_ops.solve_vjp`.

    Attributes
    ----------
    b
        Cotangent of the right-hand side, with ``b``'s shape.
    A
        Cotangent of the operator: an array of A's shape for a dense A, a sparse matrix with
        A's sparsity pattern for a scipy.sparse A, a dict ``{name: array}`` of parameter
        cotangents for a parameterised operator (e.g. ``{"c": ...}`` for a diffusion
        stencil), and ``None`` for an operator without differentiable entries (a plain
        matvec function). Computed on first access: a caller who needs only ``b`` does not
        pay for it (for an unrolled sparse solve it costs about one matvec per iteration).
    adjoint_result
        The :class:`SolveResult` of the adjoint solve ``A^T lambda = x_bar`` (implicit mode),
        so the caller can see how inexact the gradient is; ``None`` in the other modes.
    x0
        Cotangent of the initial guess, with ``x0``'s shape (``b``'s when no ``x0`` was
        given). Unrolled mode: the exact derivative of the iterations run. Implicit mode:
        zero, since at convergence the solution does not depend on ``x0``; mode "none":
        zero.
    """

    def __init__(self, b: Any, A: Any = None, adjoint_result: SolveResult | None = None, *,
                 A_thunk: Any = None, x0: Any = None) -> None:
        self.b = b
        self.x0 = x0
        self.adjoint_result = adjoint_result
        self._A = A
        self._A_thunk = A_thunk

    @property
    def A(self) -> Any:
        if self._A_thunk is not None:
            self._A, self._A_thunk = self._A_thunk(), None
        return self._A

    def __repr__(self) -> str:
        return f"Cotangents(b=<{getattr(self.b, 'shape', None)}>, A=<computed on access>)"


@dataclasses.dataclass(frozen=True)
class BlockSolveResult:
    """The outcome of a solve with a block of right-hand sides, ``b`` of shape ``(n, k)``.

    Every column is a solve of its own (its own iterations, convergence test and status);
    the fields hold one entry per column, as a ``jax.vmap``-ed solve's result does.
    :meth:`column` gives column ``j`` as a :class:`SolveResult`.

    Attributes
    ----------
    x
        The solutions, shape ``(n, k)``.
    converged
        Bool array ``(k,)``: whether column ``j`` met its tolerance (confirmed on its true
        residual).
    iterations
        Int array ``(k,)``: the iterations column ``j`` ran before it converged or failed.
    residual_norms
        Array ``(iterations.max() + 1, k)``: column ``j``'s residual norms, row 0 the initial
        one, NaN after the column finished.
    status
        Tuple of ``k`` :class:`Status` values.
    solver
        Name of the solver that ran.
    true_residual_norm
        Array ``(k,)`` of ``||b_j - A x_j||`` whenever a tolerance was set (as
        :attr:`SolveResult.true_residual_norm`), ``None`` for a fixed iteration count.
    """

    x: Any
    converged: Any
    iterations: Any
    residual_norms: Any
    status: tuple[Status, ...]
    solver: str = ""
    true_residual_norm: Any = None

    @classmethod
    def from_columns(cls, results: list[SolveResult], x: Any) -> BlockSolveResult:
        """The block result of ``k`` single-column results (``x`` already stacked)."""
        length = max((r.residual_norms.shape[0] for r in results), default=1)
        norms = np.full((length, len(results)), np.nan)
        for j, r in enumerate(results):
            norms[: r.residual_norms.shape[0], j] = r.residual_norms
        true = [r.true_residual_norm for r in results]
        return cls(
            x=x, converged=np.array([r.converged for r in results], dtype=bool),
            iterations=np.array([r.iterations for r in results], dtype=np.int64),
            residual_norms=norms, status=tuple(r.status for r in results),
            solver=results[0].solver if results else "",
            true_residual_norm=(None if results and all(t is None for t in true) else
                                np.array([np.nan if t is None else t for t in true])),
        )

    @property
    def columns(self) -> int:
        """The number of right-hand sides ``k``."""
        return len(self.status)

    @property
    def failed(self) -> np.ndarray:
        """Bool array ``(k,)``: whether column ``j`` ended in a failure status."""
        return np.array([s.is_failure for s in self.status], dtype=bool)

    @property
    def info(self) -> np.ndarray:
        """SciPy's integer code per column (see :attr:`SolveResult.info`)."""
        return np.array([self.column(j).info for j in range(self.columns)], dtype=np.int64)

    @property
    def residual_norm(self) -> np.ndarray:
        """The last recorded residual norm of each column."""
        return np.array([self._column_norms(j)[-1] for j in range(self.columns)])

    @property
    def message(self) -> str:
        """How many columns converged, and what happened to the others, with what to try."""
        done = int(np.sum(self.converged))
        text = f"{self.solver or 'solver'}: {done} of {self.columns} columns converged"
        others = [j for j in range(self.columns) if not self.converged[j]]
        for status in dict.fromkeys(self.status[j] for j in others):
            which = [j for j in others if self.status[j] is status]
            shown = ", ".join(map(str, which[:8])) + (", ..." if len(which) > 8 else "")
            text += f"; column{'s' if len(which) > 1 else ''} {shown}: {status.message}"
        return text

    def column(self, j: int) -> SolveResult:
        """Column ``j`` as a :class:`SolveResult` (its ``x`` a view of the block's)."""
        true = None if self.true_residual_norm is None else float(self.true_residual_norm[j])
        return SolveResult(
            x=self.x[:, j], converged=bool(self.converged[j]),
            iterations=int(self.iterations[j]), residual_norms=self._column_norms(j),
            status=self.status[j], solver=self.solver,
            true_residual_norm=None if true is not None and math.isnan(true) else true,
        )

    def _column_norms(self, j: int) -> np.ndarray:
        return np.asarray(self.residual_norms)[: int(self.iterations[j]) + 1, j]

    def __repr__(self) -> str:
        counts = ", ".join(f"{s.name}: {n}" for s, n in
                           collections.Counter(self.status).items())
        return (f"BlockSolveResult(columns={self.columns}, status={{{counts}}}, "
                f"iterations={int(np.max(self.iterations, initial=0))} (max), "
                f"solver={self.solver!r}, x=<{type(self.x).__name__} "
                f"shape={getattr(self.x, 'shape', None)}>)")
