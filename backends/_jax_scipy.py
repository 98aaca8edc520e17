"""``jax.scipy.sparse.linalg``'s solvers, solved by prdp_ops: swap one import, keep your code.

``from prdp_ops.backends.jax import cg, bicgstab, gmres`` in place of ``from
jax.scipy.sparse.linalg import cg, bicgstab, gmres``: the same signatures (``x0``
positional, ``tol``, ``atol``, ``maxiter``, ``M`` and GMRES's ``restart`` and
``solve_method`` keyword-only, with JAX's defaults), the same inputs (``A`` and ``M`` as a
matrix, a ``@``-able object or a function of pytrees, ``b`` and ``x0`` any pytree of
arrays), ``x`` in ``b``'s structure, shapes and dtypes (weak types kept), and the return
value ``(x, None)``. Checked by JAX's own ``tests/lax_scipy_sparse_test.py`` run on these
functions. Each function is a thin wrapper over :func:`prdp_ops.backends.jax.solve`: a
pytree ``b`` is raveled into one vector and ``A`` applied to it through unravel/ravel (which
JAX differentiates), and the solve itself is prdp_ops's.

What switching gains
--------------------
* **Gradients your way.** ``adjoint="implicit"`` (default) is the derivative of ``x = A^-1
  b`` by one adjoint solve, as JAX's ``custom_linear_solve``, in both reverse mode
  (``jax.grad``) and forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``), reaching
  ``b``, a matrix ``A``'s entries and the arrays a matvec function closes over; its own
  iteration limit and tolerances (``adjoint_maxiter``, ``adjoint_rtol``, ``adjoint_atol``).
  ``adjoint="unrolled"`` is the exact derivative of the iterations that ran, which is what
  training with a small, fixed iteration count needs (the implicit gradient assumes a
  converged solve); ``adjoint="none"`` makes the solve a constant.
* **A traced iteration count.** ``maxiter`` may be a traced integer, so a jitted training
  step compiles once and the :class:`prdp_ops.PRDPController` changes the count between
  epochs without recompiling (``max_steps`` bounds it statically where a buffer needs it).
* **Adjoint diagnostics.** ``adjoint_callback(result)`` receives the adjoint solve's
  :class:`prdp_ops.SolveResult` (iterations, residual history, status) every time a
  gradient is computed, inside ``jit`` too: how exact the gradient is.
* **Failures are never silent.** A breakdown or a NaN is logged (``on_failure="warn"``,
  default) or raised as :class:`prdp_ops.SolverError` (``on_failure="raise"``), in the
  forward, tangent and adjoint solves alike; JAX's solvers return whatever the loop held.
* **Convergence confirmed on the true residual.** The solve stops when ``||b - A x||``,
  computed from the iterate, meets ``max(tol ||b||, atol)``; JAX's CG and BiCGSTAB test a
  recursive residual and its GMRES a left-preconditioned estimate.
* **The road on.** :func:`prdp_ops.backends.jax.solve` takes the same problem with any
  registered solver, returns the convergence information (``return_result=True``) and runs
  the NumPy/CuPy implementation from JAX code (``backend="numpy"``).

Documented differences from ``jax.scipy.sparse.linalg``
-------------------------------------------------------
Each one is pinned by a test in ``tests/test_jax_scipy_dropin.py``.

1. **GMRES is preconditioned on the right** (``A M u = b``, ``x = M u``), minimising
   ``||b - A x||``; JAX's (and SciPy's) minimises ``||M (b - A x)||``. Without ``M``, or with
   an exact ``M``, the iterates agree; with another ``M`` they differ after a fixed number
   of iterations, while both converge to the solution.
2. **GMRES ``solve_method``**: ``"incremental"`` and ``"batched"`` are both accepted and
   both run prdp_ops's GMRES, which keeps the least-squares problem in QR form (Givens
   rotations, like JAX's ``"incremental"``) and stops within a cycle once the true residual
   meets the tolerance. Another value is a ValueError, as in JAX.
3. **GMRES returns ``(x, None)``** like CG and BiCGSTAB; JAX's GMRES returns an ``info``
   array (``-1`` when ``x`` has a NaN). Failures are reported through ``on_failure``
   instead. GMRES's ``maxiter`` counts restart cycles, as JAX's does (default ``10 n``
   cycles), and is passed to the core as ``maxiter * min(restart, n)`` Arnoldi steps.
4. **Dtypes.** ``x`` has each leaf of ``b``'s dtype, except that an integer leaf gives the
   solve's floating dtype and a real leaf of a complex solve the complex dtype (the solve
   computes in ``jnp.linalg.solve``'s dtype for ``A`` and ``b``); JAX's solvers fail or
   truncate there. Under ``jax_numpy_dtype_promotion="strict"`` a matrix ``A`` must have
   ``b``'s dtype. A Python-scalar ``b`` gives a weakly typed ``x`` from all three (JAX's
   BiCGSTAB and GMRES keep the weak type too; its CG drops it).
5. **Stricter arguments.** ``tol`` and ``atol`` must be finite and ``>= 0`` (JAX accepts
   anything and never converges on a NaN), ``maxiter`` a non-negative int or traced integer
   scalar, ``restart`` an int ``>= 1``. Errors keep JAX's wording (``"x0 and b must have
   matching tree structure"``, ``"must be a square matrix"``, ...) and name the argument.
6. **Products with A.** Each solve computes ``b - A x0`` once, even for ``x0 = 0``, and each
   convergence claim costs one product to confirm it on the true residual.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["bicgstab", "cg", "gmres"]

SOLVE_METHODS = ("incremental", "batched")


# -- pytrees as one vector ----------------------------------------------------------------------
def _weakly_typed(leaf: Any) -> bool:
    from jax._src.dtypes import is_weakly_typed  # what jax.scipy and its tests use

    return bool(is_weakly_typed(leaf))


def _weak(x: Any) -> Any:
    """``x`` as a weakly typed array of its dtype (how JAX keeps a Python scalar's type)."""
    from jax._src.lax.lax import _convert_element_type  # what jax.scipy itself uses

    return _convert_element_type(x, x.dtype, weak_type=True)


class _Flat:
    """Ravel a pytree of arrays into one vector and back (differentiably).

    Leaves are raveled and cast to the solve's dtype; :meth:`unravel` gives each leaf back
    its shape and dtype (see the module's difference 4) and its weak type.
    """

    def __init__(self, tree: Any, name: str) -> None:
        leaves, self.treedef = jax.tree_util.tree_flatten(tree)
        if not leaves:
            raise ValueError(f"{name} must hold at least one array; got {tree!r}")
        self.leaves = [jnp.asarray(leaf) for leaf in leaves]
        self.weak = [_weakly_typed(leaf) for leaf in self.leaves]
        self.shapes = [leaf.shape for leaf in self.leaves]
        self.sizes = [math.prod(shape) for shape in self.shapes]
        self.size = sum(self.sizes)
        self.dtype = jnp.result_type(*self.leaves)

    def ravel(self, tree: Any, dtype: Any) -> Any:
        leaves = jax.tree_util.tree_leaves(tree)
        return jnp.concatenate([jnp.ravel(jnp.asarray(leaf)).astype(dtype) for leaf in leaves])

    def unravel(self, v: Any, dtypes: list[Any] | None = None) -> Any:
        dtypes = [leaf.dtype for leaf in self.leaves] if dtypes is None else dtypes
        out, start = [], 0
        for shape, size, dtype in zip(self.shapes, self.sizes, dtypes, strict=True):
            out.append(v[start:start + size].reshape(shape).astype(dtype))
            start += size
        return jax.tree_util.tree_unflatten(self.treedef, out)

    def result(self, x: Any) -> Any:
        """The solution vector as ``b``'s pytree: b's dtypes (see difference 4), weak types
        kept."""
        dtypes = []
        for leaf in self.leaves:
            dtype = leaf.dtype
            if not jnp.issubdtype(dtype, jnp.inexact) or (
                    jnp.issubdtype(x.dtype, jnp.complexfloating)
                    and not jnp.issubdtype(dtype, jnp.complexfloating)):
                dtype = x.dtype
            dtypes.append(dtype)
        tree = self.unravel(x, dtypes)
        leaves = [_weak(leaf) if weak and leaf.dtype == orig.dtype else leaf
                  for leaf, weak, orig in zip(jax.tree_util.tree_leaves(tree), self.weak,
                                              self.leaves, strict=True)]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def _dot(A: Any, x: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda leaf: jnp.dot(A, leaf, precision=lax.Precision.HIGHEST), x)


def _as_matvec(A: Any, name: str) -> Callable[[Any], Any]:
    """JAX's ``_normalize_matvec``: a function as is, a matrix or ``@``-able object as its
    product (applied to each leaf of the pytree), anything else a TypeError."""
    if callable(A):
        return A
    if isinstance(A, (np.ndarray, jax.Array)):
        if A.ndim != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"{name}: linear operator must be a square matrix, but has shape: "
                             f"{A.shape}")
        return lambda x: _dot(A, x)
    if hasattr(A, "__matmul__"):
        shape = getattr(A, "shape", None)
        if shape is not None and (len(shape) != 2 or shape[0] != shape[1]):
            raise ValueError(f"{name}: linear operator must be a square matrix, but has shape: "
                             f"{shape}")
        return lambda x: jax.tree_util.tree_map(lambda leaf: operator.matmul(A, leaf), x)
    raise TypeError(f"{name}: linear operator must be either a function or ndarray (or an "
                    f"object with @); got {type(A).__name__} {A!r}")


def _operand(A: Any, name: str, flat: _Flat) -> Any:
    """What :func:`prdp_ops.backends.jax.solve` gets for ``A`` (or ``M``): the matrix itself
    when ``b`` is one vector (its entries then get their cotangent directly), else the
    product on the raveled vector."""
    if (isinstance(A, (np.ndarray, jax.Array)) and len(flat.shapes) == 1
            and len(flat.shapes[0]) == 1 and A.shape == (flat.size, flat.size)):
        return A
    matvec = _as_matvec(A, name)

    def flat_matvec(v: Any) -> Any:
        return flat.ravel(matvec(flat.unravel(v, [v.dtype] * len(flat.leaves))), v.dtype)

    return flat_matvec


def _check_x0(x0: Any, b: Any) -> None:
    if jax.tree_util.tree_structure(x0) != jax.tree_util.tree_structure(b):
        raise ValueError("x0 and b must have matching tree structure: "
                         f"{jax.tree_util.tree_structure(x0)} vs "
                         f"{jax.tree_util.tree_structure(b)}")
    shapes_x0 = [np.shape(leaf) for leaf in jax.tree_util.tree_leaves(x0)]
    shapes_b = [np.shape(leaf) for leaf in jax.tree_util.tree_leaves(b)]
    if shapes_x0 != shapes_b:
        raise ValueError(f"arrays in x0 and b must have matching shapes: {shapes_x0} vs "
                         f"{shapes_b}")


def _isolve(solver: str, A: Any, b: Any, x0: Any, tol: Any, atol: Any, maxiter: Any, M: Any,
            hermitian: bool, options: dict[str, Any], extras: dict[str, Any]) -> tuple:
    from prdp_ops.backends.jax import solve  # imported here: that module re-exports ours

    flat = _Flat(b, "b")
    if x0 is not None:
        _check_x0(x0, b)
    A_op = _operand(A, "A", flat)
    M_op = None if M is None else _operand(M, "M", flat)
    b_vec = flat.ravel(b, flat.dtype)
    x0_vec = None if x0 is None else flat.ravel(x0, flat.dtype)
    x = solve(A_op, b_vec, solver, x0=x0_vec, maxiter=maxiter, rtol=tol, atol=atol, M=M_op,
              hermitian=hermitian, **options, **extras)
    return flat.result(x), None


_EXTRAS_DOC = """
    adjoint : {"implicit", "unrolled", "none"}
        How the solve is differentiated (prdp_ops's; JAX's is ``"implicit"``): see
        :func:`prdp_ops.backends.jax.solve`.
    adjoint_maxiter, adjoint_rtol, adjoint_atol
        The adjoint (and tangent) solve's own settings; default: the forward's.
    max_steps
        Static capacity for a traced ``maxiter`` (needed by ``adjoint="unrolled"``).
    checkpoint_every
        ``"unrolled"`` only: keep every ``c``-th state, recompute the rest.
    on_failure : {"warn", "raise", "ignore"}
        What a breakdown or a NaN does, in the forward, tangent and adjoint solves.
    adjoint_callback
        ``adjoint_callback(result)`` receives each adjoint solve's
        :class:`prdp_ops.SolveResult` on the host, inside ``jit`` too."""


def cg(A: Any, b: Any, x0: Any = None, *, tol: Any = 1e-5, atol: Any = 0.0,
       maxiter: Any = None, M: Any = None, adjoint: str = "implicit",
       adjoint_maxiter: Any = None, adjoint_rtol: Any = None, adjoint_atol: Any = None,
       max_steps: int | None = None, checkpoint_every: int | None = None,
       on_failure: str = "warn",
       adjoint_callback: Callable[[Any], None] | None = None) -> tuple[Any, None]:
    """Conjugate gradients for a Hermitian positive definite ``A``, as
    ``jax.scipy.sparse.linalg.cg`` (see the module docstring for what switching gains and
    the documented differences).

    Parameters
    ----------
    A : array, ``@``-able object or function
        The matrix, or the linear map ``x -> A x`` on pytrees shaped like ``b``. Assumed
        Hermitian (as JAX's CG assumes): the adjoint solve applies ``A`` itself.
    b : array or pytree of arrays
        Right-hand side, any shapes.
    x0 : pytree like ``b``, optional
        Initial guess (default zeros).
    tol, atol : float
        Stop once ``||b - A x|| <= max(tol ||b||, atol)``; may be traced.
    maxiter : int, optional
        Iteration limit (default ``10 n``, ``n`` the total size of ``b``); may be traced.
    M : array, ``@``-able object or function, optional
        Preconditioner approximating ``A^-1``; a constant (no cotangent).
%s

    Returns
    -------
    x : pytree like ``b``
        The solution, in ``b``'s structure, shapes and dtypes (weak types kept).
    info : None
        As JAX's.
    """
    extras = dict(adjoint=adjoint, adjoint_maxiter=adjoint_maxiter, adjoint_rtol=adjoint_rtol,
                  adjoint_atol=adjoint_atol, max_steps=max_steps,
                  checkpoint_every=checkpoint_every, on_failure=on_failure,
                  adjoint_callback=adjoint_callback)
    return _isolve("cg", A, b, x0, tol, atol, maxiter, M, True, {}, extras)


def bicgstab(A: Any, b: Any, x0: Any = None, *, tol: Any = 1e-5, atol: Any = 0.0,
             maxiter: Any = None, M: Any = None, adjoint: str = "implicit",
             adjoint_maxiter: Any = None, adjoint_rtol: Any = None,
             adjoint_atol: Any = None, max_steps: int | None = None,
             checkpoint_every: int | None = None, on_failure: str = "warn",
             adjoint_callback: Callable[[Any], None] | None = None) -> tuple[Any, None]:
    """BiCGSTAB for a general ``A``, as ``jax.scipy.sparse.linalg.bicgstab`` (see the module
    docstring for what switching gains and the documented differences).

    Parameters
    ----------
    A : array, ``@``-able object or function
        The matrix, or the linear map ``x -> A x`` on pytrees shaped like ``b``.
    b : array or pytree of arrays
        Right-hand side, any shapes.
    x0 : pytree like ``b``, optional
        Initial guess (default zeros).
    tol, atol : float
        Stop once ``||b - A x|| <= max(tol ||b||, atol)``; may be traced.
    maxiter : int, optional
        Iteration limit (default ``10 n``); one iteration is a whole BiCGSTAB step (two
        products with ``A``). May be traced.
    M : array, ``@``-able object or function, optional
        Preconditioner approximating ``A^-1``; a constant (no cotangent).
%s

    Returns
    -------
    x : pytree like ``b``
        The solution, in ``b``'s structure, shapes and dtypes (weak types kept).
    info : None
        As JAX's.
    """
    extras = dict(adjoint=adjoint, adjoint_maxiter=adjoint_maxiter, adjoint_rtol=adjoint_rtol,
                  adjoint_atol=adjoint_atol, max_steps=max_steps,
                  checkpoint_every=checkpoint_every, on_failure=on_failure,
                  adjoint_callback=adjoint_callback)
    return _isolve("bicgstab", A, b, x0, tol, atol, maxiter, M, False, {}, extras)


def gmres(A: Any, b: Any, x0: Any = None, *, tol: Any = 1e-5, atol: Any = 0.0,
          restart: int = 20, maxiter: Any = None, M: Any = None,
          solve_method: str = "batched", adjoint: str = "implicit",
          adjoint_maxiter: Any = None, adjoint_rtol: Any = None, adjoint_atol: Any = None,
          max_steps: int | None = None, checkpoint_every: int | None = None,
          on_failure: str = "warn",
          adjoint_callback: Callable[[Any], None] | None = None) -> tuple[Any, None]:
    """Restarted GMRES for a general ``A``, as ``jax.scipy.sparse.linalg.gmres`` (see the
    module docstring for what switching gains and the documented differences 1-3).

    Parameters
    ----------
    A : array, ``@``-able object or function
        The matrix, or the linear map ``x -> A x`` on pytrees shaped like ``b``.
    b : array or pytree of arrays
        Right-hand side, any shapes.
    x0 : pytree like ``b``, optional
        Initial guess (default zeros).
    tol, atol : float
        Stop once ``||b - A x|| <= max(tol ||b||, atol)`` (checked after every Arnoldi
        step); may be traced.
    restart : int
        Arnoldi steps per cycle (capped at ``n``), default 20.
    maxiter : int, optional
        Restart cycles (default ``10 n``), run as ``maxiter * min(restart, n)`` Arnoldi
        steps; may be traced (``max_steps``, if given, counts Arnoldi steps).
    M : array, ``@``-able object or function, optional
        Preconditioner approximating ``A^-1``, applied on the right; a constant.
    solve_method : {"batched", "incremental"}
        Accepted for compatibility; both run prdp_ops's GMRES (QR form, true-residual stop).
    adjoint_maxiter
        Counts Arnoldi steps (unlike ``maxiter``).
%s

    Returns
    -------
    x : pytree like ``b``
        The solution, in ``b``'s structure, shapes and dtypes (weak types kept).
    info : None
        Where JAX's GMRES returns an array (difference 3).
    """
    if solve_method not in SOLVE_METHODS:
        raise ValueError(f"solve_method: invalid solve_method {solve_method!r}, must be either "
                         "'incremental' or 'batched' (both run prdp_ops's GMRES)")
    if isinstance(restart, bool) or not isinstance(restart, (int, np.integer)) or restart < 1:
        raise ValueError(f"restart must be an int >= 1; got {restart!r}")
    size = sum(math.prod(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(b))
    cycle = max(min(int(restart), size), 1)
    if maxiter is None:
        maxiter = 10 * size
    from prdp_ops.backends import _jax_args

    steps = _jax_args.count(maxiter, "maxiter") * cycle
    extras = dict(adjoint=adjoint, adjoint_maxiter=adjoint_maxiter, adjoint_rtol=adjoint_rtol,
                  adjoint_atol=adjoint_atol, max_steps=max_steps,
                  checkpoint_every=checkpoint_every, on_failure=on_failure,
                  adjoint_callback=adjoint_callback)
    return _isolve("gmres", A, b, x0, tol, atol, steps, M, False, {"restart": cycle}, extras)


for _f in (cg, bicgstab, gmres):
    _f.__doc__ = _f.__doc__ % _EXTRAS_DOC.strip("\n")
del _f
