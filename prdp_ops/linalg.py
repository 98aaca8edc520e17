"""SciPy's iterative solvers, solved by prdp_ops: swap one import, keep your code.

``from prdp_ops.linalg import cg, bicgstab, gmres`` in place of ``from scipy.sparse.linalg
import cg, bicgstab, gmres``: the same signatures (``x0`` positional, the rest keyword-only),
the same defaults, the same return value ``(x, info)`` and the same meaning of every
argument, checked against ``scipy/sparse/linalg/_isolve/tests/test_iterative.py`` run on
these functions. Each function is a thin wrapper over :func:`prdp_ops.solve`, so the solve
itself is prdp_ops's. The other registered solvers come in the same form: :func:`jacobi`,
:func:`sor`, :func:`richardson` and :func:`steepest_descent`, with their options as
keyword-only arguments.

What switching gains
--------------------
* **Convergence confirmed on the true residual.** ``info == 0`` means that ``||b - A x||``,
  computed from the returned ``x`` (not a solver's recurrence, which drifts from it), meets
  ``max(rtol ||b||, atol)``. SciPy's CG and BiCGSTAB test their recursive residual, and its
  GMRES tests a left-preconditioned estimate inside each cycle, so a SciPy ``info == 0`` can
  hide a residual above the tolerance (a singular system, a tolerance below what the dtype
  can resolve).
* **Stagnation ends the solve.** A residual that has not fallen by 0.1% over 1000
  iterations ends it with ``info > 0`` rather than running a huge ``maxiter`` out.
* **Failures are never silent.** A breakdown or a NaN gives ``info < 0`` and is logged on
  the ``"prdp_ops"`` logger; ``x`` is the last finite iterate, never NaN.
* **The road on.** The same call with :func:`prdp_ops.solve` returns a
  :class:`prdp_ops.SolveResult` (status with an explanation, residual history, true residual
  norm) and takes the failure policy ``on_failure="raise" | "warn" | "ignore"``;
  :func:`prdp_ops.solve_vjp` adds gradients on NumPy/CuPy with respect to ``b``, ``x0`` and
  ``A``'s entries, implicit (one adjoint solve, whose own :class:`~prdp_ops.SolveResult` is
  returned as a diagnostic) or unrolled (the exact derivative of the iterations run, for
  training with a small fixed iteration count); ``prdp_ops.backends.jax.solve`` does the
  same under ``jax.jit``/``jax.grad``/``jax.vmap`` with a traced iteration count, which is
  what :class:`prdp_ops.PRDPController` changes during training without recompiling.

Documented differences from SciPy
---------------------------------
Each one is pinned by a test in ``tests/test_linalg_scipy.py``.

1. **GMRES is preconditioned on the right** (``A M u = b``, ``x = M u``). Without ``M`` the
   iterates are SciPy's, cycle for cycle. With ``M`` they differ (SciPy minimises ``||M (b -
   A x)||``, this GMRES ``||b - A x||``), and a ``'pr_norm'``/``'legacy'`` callback receives
   the true relative residual ``||b - A x_k|| / ||b||`` where SciPy passes its
   preconditioned estimate ``||M (b - A x_k)|| / ||b||``. Such a callback costs one extra
   product with ``A`` per step, to compute it.
2. **Negative ``info`` codes** are prdp_ops's: ``-1`` for a breakdown (any solver; CG's
   ``p^H A p <= 0`` included, where SciPy's CG runs on) and ``-2`` for NaN/inf, where SciPy's
   BiCGSTAB returns ``-10``/``-11`` and its GMRES reports a breakdown as ``info > 0``.
3. **Positive ``info``** is the number of iterations actually run (restart cycles for GMRES,
   Arnoldi steps with ``callback_type='legacy'``), which is ``maxiter`` when the limit was
   hit and fewer when the solve ended early (stagnation, or a convergence claim that the
   true residual did not confirm). It is at least 1: ``maxiter=0`` with an unconverged
   ``x0`` gives ``info = 1``, where SciPy's CG and BiCGSTAB return 0 (a false success).
4. **Products with A.** Every solve computes ``r = b - A x0`` once, even for ``x0 = 0``
   (SciPy skips it), and each convergence claim costs one product for the true-residual
   check. One BiCGSTAB iteration is a whole step (two products); SciPy can stop after the
   first half step. So a solve that SciPy finishes in one product (an exact
   preconditioner) takes three to four here.
5. **Stricter arguments.** A negative or NaN ``rtol`` or a NaN ``atol`` is a ValueError (SciPy
   accepts them and never converges), a ``maxiter`` that is not a non-negative int a
   TypeError or ValueError, an ``x0`` string other than ``'Mb'`` a ValueError, and GMRES's
   ``restart`` must be an int >= 1. As in SciPy, ``atol=None``, ``atol='legacy'`` and a
   negative ``atol`` are ValueErrors, and ``rtol=inf`` or ``atol=inf`` returns ``x0`` as
   converged (``info = 0``) without iterating.
6. **Inputs** are NumPy and SciPy objects, as for SciPy (use :func:`prdp_ops.solve` or
   ``prdp_ops.backends.jax.solve`` for CuPy and JAX arrays); ``A`` may also be a
   :class:`prdp_ops.LinearOperator`. ``x`` is always a new array: for ``b = 0`` SciPy returns
   ``b`` itself.

Callback semantics are SciPy's: ``callback(xk)`` after every iteration (a copy of the
iterate, which SciPy does not make), and for GMRES ``callback_type`` ``'x'`` (the iterate,
once per restart cycle), ``'pr_norm'`` (the relative residual norm, every Arnoldi step) or
``'legacy'`` (as ``'pr_norm'``, and ``maxiter`` then counts Arnoldi steps, not cycles); a
callback without ``callback_type`` is ``'legacy'`` with a DeprecationWarning, as in SciPy.
GMRES's ``maxiter`` counts restart cycles, as SciPy's does, and is passed to the core as
``maxiter * min(restart, n)`` Arnoldi steps (one Arnoldi step is one iteration of
:func:`prdp_ops.solve`).
"""

from __future__ import annotations

import math
import numbers
import sys
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse.linalg

from prdp_ops._operators.base import LinearOperator
from prdp_ops._operators.convert import aslinearoperator
from prdp_ops._operators.function import FunctionOperator
from prdp_ops._solution import SolveResult, Status
from prdp_ops._solve import solve as _po_solve
from prdp_ops._solver.registry import get_solver

__all__ = ["bicgstab", "cg", "gmres", "jacobi", "richardson", "sor", "steepest_descent"]

#: GMRES's ``callback_type`` values, as in SciPy.
CALLBACK_TYPES = ("x", "pr_norm", "legacy")
#: Default GMRES restart (SciPy's).
DEFAULT_RESTART = 20


# -- the system, as scipy.sparse.linalg's make_system builds it -------------------------------
def _working_dtype(A_dtype: Any, b_dtype: Any) -> np.dtype:
    """SciPy's working precision: each dtype mapped into float32/float64/complex64/
    complex128 (anything else, e.g. an int or float16, counts as float64), then promoted."""
    def fd(dtype: Any) -> np.dtype:
        dtype = np.dtype(dtype)
        return dtype if dtype.char in "fdFD" else np.dtype(np.float64)

    return np.result_type(fd(A_dtype), fd(b_dtype))


def _operator(A: Any, name: str, func: str) -> LinearOperator:
    """``A`` as a prdp_ops operator: anything :func:`prdp_ops.aslinearoperator` takes, or
    anything ``scipy.sparse.linalg.aslinearoperator`` takes (an object with ``shape`` and
    ``matvec``, say)."""
    try:
        return aslinearoperator(A)
    except (TypeError, ValueError) as err:
        first = err
    try:
        return aslinearoperator(scipy.sparse.linalg.aslinearoperator(A))
    except (TypeError, ValueError):
        pass
    detail = "" if callable(A) else f" ({first})"
    raise type(first)(
        f"{func}: {name} must be a matrix (NumPy array, scipy.sparse matrix or array), a "
        "scipy.sparse.linalg.LinearOperator or a prdp_ops LinearOperator, as for "
        f"scipy.sparse.linalg; got {type(A).__name__}{detail}. Wrap a function x -> A @ x in "
        "scipy.sparse.linalg.LinearOperator(shape, matvec=...) or po.FunctionOperator"
    ) from None


class _System:
    """The checked arguments of one call, as SciPy's ``make_system`` builds them: ``b`` in
    the working precision, raveled; ``M`` (or ``A.psolve``); ``x0`` (``'Mb'`` resolved)."""

    def __init__(self, func: str, A: Any, b: Any, x0: Any, M: Any, *,
                 preconditioned: bool = True) -> None:
        self.func = func
        self.A = _operator(A, "A", func)
        if self.A.shape[0] != self.A.shape[1]:
            raise ValueError(
                f"{func}: A must be square (n, n) for a linear solve; got shape {self.A.shape}"
            )
        n = self.A.shape[0]
        b = np.asanyarray(b)
        if b.shape not in ((n,), (n, 1)):
            raise ValueError(
                f"{func}: b must have shape ({n},) or ({n}, 1) to match A of shape {self.A.shape}; "
                f"got shape {b.shape}"
            )
        self.dtype = _working_dtype(self.A.dtype, b.dtype)
        self.b = np.asarray(b, dtype=self.dtype).reshape(-1)
        self.bnorm = float(np.linalg.norm(self.b))
        self.n = n
        self.M = self._preconditioner(A, M) if preconditioned else None
        self.x0 = self._initial_guess(x0)

    def _preconditioner(self, A: Any, M: Any) -> LinearOperator | None:
        if M is not None:
            op = _operator(M, "M", self.func)
            if op.shape != self.A.shape:
                raise ValueError(
                    f"{self.func}: M must have A's shape {self.A.shape}; got shape {op.shape}"
                )
            return op
        # SciPy's convention: without M, a preconditioner attached to A as A.psolve.
        psolve, rpsolve = getattr(A, "psolve", None), getattr(A, "rpsolve", None)
        if psolve is None:
            return None
        return FunctionOperator(psolve, self.A.shape, self.A.dtype, rmatvec=rpsolve)

    def _initial_guess(self, x0: Any) -> Any:
        if x0 is None:
            return None
        if isinstance(x0, str):
            if x0 != "Mb":
                raise ValueError(
                    f"{self.func}: x0 must be an array, None or the string 'Mb' (start from "
                    f"M @ b); got {x0!r}"
                )
            return self.b.copy() if self.M is None else np.asarray(self.M.matvec(self.b))
        x0 = np.array(x0, dtype=self.dtype)
        if x0.shape not in ((self.n,), (self.n, 1)):
            raise ValueError(
                f"{self.func}: x0 must have shape ({self.n},) or ({self.n}, 1) to match A of "
                f"shape {self.A.shape}; got shape {x0.shape}"
            )
        return x0.reshape(-1)

    def zero_solution(self) -> tuple[np.ndarray, int]:
        """SciPy's answer for ``b = 0``: ``x = 0`` (whatever ``x0``), converged."""
        return np.zeros(self.n, dtype=self.dtype), 0


def _check_tolerances(func: str, rtol: Any, atol: Any) -> tuple[float, float]:
    """``rtol`` and ``atol`` as floats ``>= 0`` (``inf`` allowed, as in SciPy)."""
    if atol is None or isinstance(atol, str):
        raise ValueError(
            f"{func}: atol must be a real number >= 0; got {atol!r}. SciPy's former "
            "atol=None / atol='legacy' are gone there too: pass atol=0.0 for a purely relative "
            "test, or the absolute residual norm you accept"
        )
    for name, value in (("rtol", rtol), ("atol", atol)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{func}: {name} must be a real number >= 0; got {value!r}")
        if math.isnan(value) or value < 0:
            raise ValueError(
                f"{func}: {name} must be a real number >= 0 (inf accepts x0); got {value!r}"
            )
    return float(rtol), float(atol)


def _check_maxiter(func: str, maxiter: Any, default: int) -> int:
    if maxiter is None:
        return default
    if isinstance(maxiter, bool) or not isinstance(maxiter, numbers.Integral):
        raise TypeError(
            f"{func}: maxiter must be a non-negative int or None (default {default}); got "
            f"{maxiter!r}"
        )
    if maxiter < 0:
        raise ValueError(f"{func}: maxiter must be a non-negative int or None; got {maxiter}")
    return int(maxiter)


def _info(result: SolveResult, count: int) -> int:
    """SciPy's ``info``: 0 converged, ``count`` (>= 1) iterations without convergence, and
    prdp_ops's negative codes for a breakdown (-1) or NaN/inf (-2)."""
    if result.status is Status.CONVERGED:
        return 0
    if result.info < 0:
        return result.info
    return max(int(count), 1)


def _run(system: _System, solver: Any, rtol: float, atol: float, maxiter: int,
         callback: Callable[[Any], None] | None) -> SolveResult:
    """:func:`prdp_ops.solve` on the checked system. An infinite tolerance (accepted by
    SciPy, not by the core) becomes the largest finite one: the core then confirms that
    ``x0``'s residual is finite and returns ``x0`` as converged, without iterating."""
    if math.isinf(rtol) or math.isinf(atol):
        rtol, atol = 0.0, sys.float_info.max
    return _po_solve(system.A, system.b, solver, x0=system.x0, maxiter=maxiter, rtol=rtol,
                     atol=atol, M=system.M, callback=callback)


def _solve(func: str, solver: Any, A: Any, b: Any, x0: Any, rtol: Any, atol: Any,
           maxiter: Any, M: Any, callback: Callable[[Any], None] | None, *,
           preconditioned: bool = True) -> tuple[np.ndarray, int]:
    """The common body of every wrapper but :func:`gmres`."""
    system = _System(func, A, b, x0, M, preconditioned=preconditioned)
    rtol, atol = _check_tolerances(func, rtol, atol)
    maxiter = _check_maxiter(func, maxiter, 10 * system.n)
    if system.bnorm == 0.0:
        return system.zero_solution()
    result = _run(system, solver, rtol, atol, maxiter, callback)
    return np.asarray(result.x, dtype=system.dtype), _info(result, result.iterations)


# -- SciPy's solvers ------------------------------------------------------------------------
def cg(A: Any, b: Any, x0: Any = None, *, rtol: float = 1e-5, atol: float = 0.,
       maxiter: int | None = None, M: Any = None,
       callback: Callable[[np.ndarray], Any] | None = None) -> tuple[np.ndarray, int]:
    """Solve ``A x = b`` by conjugate gradients, as ``scipy.sparse.linalg.cg``.

    Parameters
    ----------
    A : sparse array, ndarray, LinearOperator
        Hermitian positive definite ``(n, n)`` operator: a NumPy array, a scipy.sparse
        matrix or array, a ``scipy.sparse.linalg.LinearOperator`` or a prdp_ops operator.
    b : ndarray
        Right-hand side, shape ``(n,)`` or ``(n, 1)``.
    x0 : ndarray or 'Mb', optional
        Initial guess (default zeros); ``'Mb'`` starts from ``M @ b``. Never modified.
    rtol, atol : float
        Converged when ``||b - A x|| <= max(rtol ||b||, atol)`` for the returned ``x``
        (checked on the true residual). ``inf`` returns ``x0`` as converged.
    maxiter : int, optional
        Iteration limit, default ``10 n``.
    M : sparse array, ndarray, LinearOperator, optional
        Hermitian positive definite preconditioner approximating ``A^-1`` (default: ``A.psolve``
        when ``A`` has one, else none).
    callback : callable, optional
        ``callback(xk)`` after every iteration, with a copy of the iterate.

    Returns
    -------
    x : ndarray
        The solution, shape ``(n,)``.
    info : int
        0 converged; > 0 not converged after ``info`` iterations; -1 breakdown (``A`` or
        ``M`` not positive definite); -2 NaN or inf.

    See Also
    --------
    prdp_ops.solve : ``po.solve(A, b, "cg", ...)``, the same solve with a full result.
    prdp_ops.solve_vjp : the same solve with its gradient.
    """
    return _solve("prdp_ops.linalg.cg", "cg", A, b, x0, rtol, atol, maxiter, M, callback)


def bicgstab(A: Any, b: Any, x0: Any = None, *, rtol: float = 1e-5, atol: float = 0.,
             maxiter: int | None = None, M: Any = None,
             callback: Callable[[np.ndarray], Any] | None = None) -> tuple[np.ndarray, int]:
    """Solve ``A x = b`` by BiCGSTAB, as ``scipy.sparse.linalg.bicgstab``.

    Parameters
    ----------
    A : sparse array, ndarray, LinearOperator
        Square ``(n, n)`` operator (see :func:`cg`).
    b : ndarray
        Right-hand side, shape ``(n,)`` or ``(n, 1)``.
    x0 : ndarray or 'Mb', optional
        Initial guess (default zeros); ``'Mb'`` starts from ``M @ b``. Never modified.
    rtol, atol : float
        Converged when ``||b - A x|| <= max(rtol ||b||, atol)`` for the returned ``x``.
    maxiter : int, optional
        Iteration limit, default ``10 n``. One iteration is a full step (two products
        with ``A``).
    M : sparse array, ndarray, LinearOperator, optional
        Preconditioner approximating ``A^-1``, applied as SciPy applies it.
    callback : callable, optional
        ``callback(xk)`` after every iteration, with a copy of the iterate.

    Returns
    -------
    x : ndarray
        The solution, shape ``(n,)``.
    info : int
        0 converged; > 0 not converged after ``info`` iterations; -1 breakdown; -2 NaN or
        inf (SciPy: -10 and -11 for its two breakdowns).

    See Also
    --------
    prdp_ops.solve : ``po.solve(A, b, "bicgstab", ...)``, the same solve with a full result.
    """
    return _solve("prdp_ops.linalg.bicgstab", "bicgstab", A, b, x0, rtol, atol, maxiter, M,
                  callback)


def gmres(A: Any, b: Any, x0: Any = None, *, rtol: float = 1e-5, atol: float = 0.,
          restart: int | None = None, maxiter: int | None = None, M: Any = None,
          callback: Callable[[Any], Any] | None = None,
          callback_type: str | None = None) -> tuple[np.ndarray, int]:
    """Solve ``A x = b`` by restarted GMRES, as ``scipy.sparse.linalg.gmres``.

    Parameters
    ----------
    A : sparse array, ndarray, LinearOperator
        Square ``(n, n)`` operator (see :func:`cg`).
    b : ndarray
        Right-hand side, shape ``(n,)`` or ``(n, 1)``.
    x0 : ndarray or 'Mb', optional
        Initial guess (default zeros); ``'Mb'`` starts from ``M @ b``. Never modified.
    rtol, atol : float
        Converged when ``||b - A x|| <= max(rtol ||b||, atol)`` for the returned ``x``.
    restart : int, optional
        Arnoldi steps per cycle, default 20; a cycle never exceeds ``n`` steps.
    maxiter : int, optional
        Limit on restart cycles (default ``10 n``); with ``callback_type='legacy'``, on
        Arnoldi steps. The core runs ``maxiter * min(restart, n)`` Arnoldi steps.
    M : sparse array, ndarray, LinearOperator, optional
        Preconditioner approximating ``A^-1``, applied on the right (SciPy: on the left).
    callback : callable, optional
        Called as selected by ``callback_type``.
    callback_type : {'x', 'pr_norm', 'legacy'}, optional
        ``'x'``: ``callback(xk)`` after every restart cycle. ``'pr_norm'``: ``callback(r)``
        after every Arnoldi step, with ``r = ||b - A x_k|| / ||b||`` (one extra product with
        ``A`` per step). ``'legacy'`` (the default when a callback is given, with a
        DeprecationWarning as in SciPy): as ``'pr_norm'``, and ``maxiter`` counts Arnoldi
        steps.

    Returns
    -------
    x : ndarray
        The solution, shape ``(n,)``.
    info : int
        0 converged; > 0 not converged after ``info`` restart cycles (Arnoldi steps under
        ``'legacy'``); -1 breakdown; -2 NaN or inf.

    See Also
    --------
    prdp_ops.solve : ``po.solve(A, b, "gmres", restart=..., maxiter=<Arnoldi steps>)``.
    """
    func = "prdp_ops.linalg.gmres"
    if callback is not None and callback_type is None:
        warnings.warn(
            f"{func} called without specifying `callback_type`: as in SciPy, the callback then "
            "gets the relative residual norm after every Arnoldi step and maxiter counts "
            "Arnoldi steps ('legacy'). Pass callback_type='x', 'pr_norm' or 'legacy' "
            "explicitly", DeprecationWarning, stacklevel=2)
        callback_type = "legacy"
    if callback_type is not None and callback_type not in CALLBACK_TYPES:
        raise ValueError(
            f"{func}: callback_type must be one of {CALLBACK_TYPES} or None; got "
            f"{callback_type!r}"
        )
    if callback is None:
        callback_type = None
    system = _System(func, A, b, x0, M)
    rtol, atol = _check_tolerances(func, rtol, atol)
    solver = get_solver("gmres", restart=DEFAULT_RESTART if restart is None else restart)
    cycle = max(min(solver.restart, system.n), 1)
    maxiter = _check_maxiter(func, maxiter, 10 * system.n)
    if system.bnorm == 0.0:
        return system.zero_solution()
    legacy = callback_type == "legacy"
    hook, finish = _gmres_callback(system, callback, callback_type, cycle)
    result = _run(system, solver, rtol, atol, maxiter if legacy else maxiter * cycle, hook)
    x = np.asarray(result.x, dtype=system.dtype)
    finish(result, x)
    count = result.iterations if legacy else -(-result.iterations // cycle)
    return x, _info(result, count)


def _gmres_callback(system: _System, callback: Callable[[Any], Any] | None,
                    callback_type: str | None, cycle: int
                    ) -> tuple[Callable[[Any], None] | None, Callable[[SolveResult, Any], None]]:
    """The per-iteration hook for the core (called after every Arnoldi step with a copy of
    the iterate) and the call to make once the solve has ended, for SciPy's callback types."""

    def nothing(result: SolveResult, x: Any) -> None:
        return None

    if callback is None:
        return None, nothing
    steps = [0]
    if callback_type == "x":
        def per_cycle(xk: Any) -> None:
            steps[0] += 1
            if steps[0] % cycle == 0:
                callback(xk)

        def last_cycle(result: SolveResult, x: Any) -> None:
            # SciPy calls back at the end of every cycle, the last (partial) one included.
            if result.iterations % cycle != 0:
                callback(x.copy())

        return per_cycle, last_cycle

    A, b, bnorm = system.A, system.b, system.bnorm

    def per_step(xk: Any) -> None:
        callback(np.float64(np.linalg.norm(b - A.matvec(xk)) / bnorm))

    return per_step, nothing


# -- the other registered solvers, in the same form -------------------------------------------
def jacobi(A: Any, b: Any, x0: Any = None, *, rtol: float = 1e-5, atol: float = 0.,
           maxiter: int | None = None, callback: Callable[[np.ndarray], Any] | None = None,
           omega: float = 1.0) -> tuple[np.ndarray, int]:
    """Solve ``A x = b`` by weighted Jacobi, ``x' = x + omega D^-1 (b - A x)``.

    Arguments and return value as :func:`cg` (no preconditioner; ``x0='Mb'`` starts from
    ``b``). ``A`` needs a known diagonal (a matrix, a stencil, or a
    :class:`prdp_ops.FunctionOperator` given ``diagonal=``). ``omega > 0`` is the relaxation
    factor (1: plain Jacobi). Converges for strictly diagonally dominant ``A``.
    """
    return _solve("prdp_ops.linalg.jacobi", get_solver("jacobi", omega=omega), A, b, x0, rtol,
                  atol, maxiter, None, callback, preconditioned=False)


def sor(A: Any, b: Any, x0: Any = None, *, rtol: float = 1e-5, atol: float = 0.,
        maxiter: int | None = None, callback: Callable[[np.ndarray], Any] | None = None,
        omega: float = 1.0) -> tuple[np.ndarray, int]:
    """Solve ``A x = b`` by successive over-relaxation (one forward sweep per iteration).

    Arguments and return value as :func:`cg` (no preconditioner; ``x0='Mb'`` starts from
    ``b``). ``A`` must have explicit entries (a dense or sparse matrix). ``0 < omega < 2``
    (1: Gauss-Seidel).
    """
    return _solve("prdp_ops.linalg.sor", get_solver("sor", omega=omega), A, b, x0, rtol, atol,
                  maxiter, None, callback, preconditioned=False)


def richardson(A: Any, b: Any, x0: Any = None, *, rtol: float = 1e-5, atol: float = 0.,
               maxiter: int | None = None, M: Any = None,
               callback: Callable[[np.ndarray], Any] | None = None,
               omega: float = 1.0) -> tuple[np.ndarray, int]:
    """Solve ``A x = b`` by Richardson iteration, ``x' = x + omega M (b - A x)``.

    Arguments and return value as :func:`cg`. Converges when the spectral radius of
    ``I - omega M A`` is below 1 (for Hermitian positive definite ``M A``:
    ``0 < omega < 2 / lambda_max(M A)``).
    """
    return _solve("prdp_ops.linalg.richardson", get_solver("richardson", omega=omega), A, b,
                  x0, rtol, atol, maxiter, M, callback)


def steepest_descent(A: Any, b: Any, x0: Any = None, *, rtol: float = 1e-5,
                     atol: float = 0., maxiter: int | None = None, M: Any = None,
                     callback: Callable[[np.ndarray], Any] | None = None
                     ) -> tuple[np.ndarray, int]:
    """Solve ``A x = b`` by (preconditioned) steepest descent, for Hermitian positive
    definite ``A`` and ``M``.

    Arguments and return value as :func:`cg`.
    """
    return _solve("prdp_ops.linalg.steepest_descent", "steepest_descent", A, b, x0, rtol,
                  atol, maxiter, M, callback)
