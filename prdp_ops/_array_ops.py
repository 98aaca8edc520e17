"""The array operations that solvers are written against.

A solver's ``init``/``step`` receive an :class:`ArrayOps` object and use it the way
array-api-compat code uses ``xp``: ``ops.xp`` is the array module (numpy, cupy or
jax.numpy) for the everyday functions, and the handful of methods below cover what the
array modules disagree on -- functional index updates (JAX arrays are immutable), branching
(a Python ``if`` on NumPy, ``lax.cond`` on JAX) and the complex-aware inner product.

Only the NumPy flavour lives here, so the core imports nothing but numpy. The CuPy and JAX
flavours subclass it in ``prdp_ops.backends`` and are looked up by :func:`ops_for` without
importing those libraries unless an array of theirs is actually passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["ArrayOps", "FactoredTriangle", "NumpyOps", "array_backend_name", "ops_for"]


class ArrayOps:
    """Backend operations shared by every solver implementation.

    Parameters
    ----------
    xp
        The array module: ``numpy``, ``cupy`` or ``jax.numpy``.
    """

    #: Short name of the backend ("numpy", "cupy" or "jax").
    name: str = "abstract"
    #: Whether Python control flow on array values is allowed (False under JAX tracing).
    eager: bool = True

    def __init__(self, xp: Any) -> None:
        self.xp = xp

    # -- linear algebra ---------------------------------------------------------------
    def vdot(self, a: Any, b: Any) -> Any:
        """Return ``sum(conj(a) * b)``, the Hermitian inner product, as a 0-d array."""
        return self.xp.vdot(a, b)

    def dot(self, a: Any, b: Any) -> Any:
        """Return ``sum(a * b)`` without conjugation (the bilinear product)."""
        return self.xp.sum(a * b)

    def conj(self, a: Any) -> Any:
        """Complex conjugate; ``a`` itself for real data (``xp.conj`` would copy it)."""
        return self.xp.conj(a) if self.xp.iscomplexobj(a) else a

    def norm(self, a: Any) -> Any:
        """Return the Euclidean norm of ``a`` as a real 0-d array."""
        return self.xp.sqrt(self.xp.real(self.vdot(a, a)))

    def solve_triangular(self, T: Any, rhs: Any, lower: bool) -> Any:
        """Return ``y`` with ``T y = rhs`` for a triangular ``T`` (SOR's sweep).

        Signature every backend keeps: ``solve_triangular(T, rhs, lower) -> y``, ``T`` a
        dense 2-D array or a sparse matrix of the backend holding a triangle with a non-zero
        diagonal (``lower=True``: the lower one), ``rhs`` 1-D. Here: a numpy array
        (``scipy.linalg.solve_triangular``) or a scipy.sparse matrix
        (``scipy.sparse.linalg.spsolve_triangular`` on CSR/CSC). No finiteness check, so a
        diverging iteration is reported by the driver rather than raising here.
        """
        import scipy.linalg  # lazy: scipy is only needed by the solvers that use this
        import scipy.sparse
        import scipy.sparse.linalg

        if isinstance(T, FactoredTriangle):
            return T.solve(rhs)
        if scipy.sparse.issparse(T):
            T = T if T.format in ("csr", "csc") else T.tocsr()
            return scipy.sparse.linalg.spsolve_triangular(T, rhs, lower=lower)
        return scipy.linalg.solve_triangular(T, rhs, lower=lower, check_finite=False)

    def prepare_triangular(self, T: Any, lower: bool) -> Any:
        """Return ``T`` in the form :meth:`solve_triangular` solves with fastest, for a
        triangle used in many solves (SOR's, once per solve); its ``.T`` is the transposed
        triangle. Here: ``T`` itself for a dense triangle; a scipy.sparse one is factored
        once (:class:`FactoredTriangle`), because ``spsolve_triangular`` rebuilds the
        matrix on every call (a copy, a product with the inverse diagonal, a duplicate sum).
        Backends whose ``solve_triangular`` takes only matrices return ``T``.
        """
        import scipy.sparse

        if type(self) is not NumpyOps or not scipy.sparse.issparse(T):
            return T
        return FactoredTriangle.factor(T, lower) or T

    # -- functional updates -----------------------------------------------------------
    def set_at(self, a: Any, index: Any, value: Any) -> Any:
        """Return a copy of ``a`` with ``a[index] = value`` (``a`` is left untouched)."""
        out = a.copy()
        out[index] = value
        return out

    def where(self, condition: Any, x: Any, y: Any) -> Any:
        """Elementwise select, ``x`` where ``condition`` holds and ``y`` elsewhere."""
        return self.xp.where(condition, x, y)

    def safe_divide(self, num: Any, den: Any) -> Any:
        """Return ``num / den``, or 0 where ``den == 0`` (no NaN, no warning).

        Solvers use it for step lengths whose denominator vanishes exactly when the
        residual does; breakdown (a zero denominator with a non-zero residual) is
        detected and reported separately.
        """
        xp = self.xp
        zero = den == 0
        return xp.where(zero, xp.zeros_like(num), num / xp.where(zero, xp.ones_like(den), den))

    # -- updates that may reuse a buffer (reverse sweeps) -------------------------------
    # Semantics every backend keeps: the method *returns* the result, and may (NumPy, CuPy)
    # or may not (JAX, whose arrays are immutable) have written it into ``y``'s buffer. So
    # callers always use the return value, and pass as ``y`` only an array that nothing else
    # holds (one they created themselves in the same reverse sweep).
    def axpy_(self, y: Any, a: Any, x: Any) -> Any:
        """Return ``y + a * x``; may overwrite ``y`` with it (functional here)."""
        return y + a * x

    def scale_(self, y: Any, a: Any) -> Any:
        """Return ``a * y``; may overwrite ``y`` with it (functional here)."""
        return a * y

    def set_at_(self, a: Any, index: Any, value: Any) -> Any:
        """Return ``a`` with ``a[index] = value``; may write into ``a`` (functional here)."""
        return self.set_at(a, index, value)

    def matmul_add_(self, y: Any, a: Any, b: Any) -> Any:
        """Return ``y + a @ b`` (``a`` a matrix, ``b`` and ``y`` both matrices or both
        vectors); may overwrite ``y`` with it (functional here).

        GMRES's reverse sweep adds a low-rank ``(j + 1) x k`` by ``k x n`` product to its
        basis cotangent with it: in place (NumPy: one BLAS ``gemm`` with ``beta = 1``) that
        is one read and one write of the ``(j + 1) x n`` rows, instead of a temporary of
        that size written, read back and added.
        """
        return y + a @ b

    def fresh_copy(self, a: Any) -> Any:
        """Return a copy of ``a`` that the caller owns, to update in place (``axpy_``) into a
        new vector of a forward step (eager backends; here ``a.copy()``).

        While the NumPy driver records a tape, the copy is made in tape memory, so that
        keeping the vector later (:meth:`keep`) costs no second copy: use it for the new
        vectors a step's ``record`` keeps.
        """
        return a.copy()

    def keep(self, a: Any) -> Any:
        """Return an array equal to ``a`` for a forward tape to hold (``solver.record``).

        Here ``a`` itself; the NumPy driver's taping ops copy it into memory reused from one
        solve to the next, which saves the page faults of fresh memory on every call (see
        :mod:`prdp_ops.backends._numpy_tape`). Never modify what it returns.
        """
        return a

    # -- control flow -----------------------------------------------------------------
    def cond(self, pred: Any, true_fn: Callable, false_fn: Callable, *operands: Any) -> Any:
        """Run ``true_fn(*operands)`` if ``pred`` else ``false_fn(*operands)``."""
        return true_fn(*operands) if bool(pred) else false_fn(*operands)

    def to_float(self, a: Any) -> float:
        """Return a Python float of a 0-d array (a device-to-host sync on GPUs)."""
        return float(a)

    def to_host(self, a: Any) -> Any:
        """Return ``a`` as a NumPy array (a device-to-host copy on GPUs)."""
        return np.asarray(a)

    def is_finite(self, a: Any) -> Any:
        """Return whether every entry of ``a`` is finite (a 0-d boolean)."""
        return self.xp.all(self.xp.isfinite(a))

    def asarray(self, a: Any, dtype: Any = None) -> Any:
        """Convert ``a`` to an array of this backend."""
        return self.xp.asarray(a, dtype=dtype)


class NumpyOps(ArrayOps):
    """:class:`ArrayOps` for NumPy arrays."""

    name = "numpy"

    def __init__(self) -> None:
        super().__init__(np)

    def dot(self, a: Any, b: Any) -> Any:
        # One BLAS call for vectors instead of a product array and a sum. For real data
        # through vdot (the same sum): np.dot of two vectors goes to OpenBLAS's threaded
        # ddot, which on a loaded machine was measured 1000x slower than vdot (9 ms against
        # 7 us at n = 65536 on 2 shared cores).
        if a.ndim == 1 and b.ndim == 1:
            if not (np.iscomplexobj(a) or np.iscomplexobj(b)):
                return np.vdot(a, b)
            return np.dot(a, b)
        return super().dot(a, b)

    def axpy_(self, y: Any, a: Any, x: Any) -> Any:
        # The common case first, with as few checks as it needs (a reverse step makes a dozen
        # of these): float64/complex128 vectors of one dtype and shape, a scalar coefficient.
        if (type(y) is np.ndarray and type(x) is np.ndarray and y.dtype is x.dtype
                and y.dtype in _FAST_AXPY and y.shape == x.shape and y.flags.c_contiguous
                and y.flags.writeable and np.ndim(a) == 0
                and (y.dtype.kind == "c" or not np.iscomplexobj(a))):
            coefficient = complex(a) if y.dtype.kind == "c" else float(a)
            if coefficient == 1:
                return np.add(y, x, out=y)
            if coefficient == -1:
                return np.subtract(y, x, out=y)
            # BLAS axpy: one fused pass (2 reads, 1 write) where NumPy's y += a * x writes
            # and reads back a temporary (3 reads, 2 writes). In place: y is contiguous and of
            # the routine's type, so f2py hands BLAS y's own buffer.
            _FAST_AXPY[y.dtype](x.reshape(-1), y.reshape(-1), a=coefficient)
            return y
        if not _fits_in_place(y, a, x):
            return y + a * x
        # Unit coefficients (common: cotangents that pass through) take one pass, not two.
        if np.ndim(a) == 0 and a == 1:
            return np.add(y, x, out=y)
        if np.ndim(a) == 0 and a == -1:
            return np.subtract(y, x, out=y)
        # BLAS axpy: one fused pass (2 reads, 1 write), where NumPy's y += a * x writes and
        # reads back a temporary (3 reads, 2 writes) -- the reverse sweeps are made of these.
        axpy = _blas(y, "axpy", x) if np.ndim(a) == 0 and x.shape == y.shape else None
        if axpy is not None:
            coefficient = complex(a) if y.dtype.kind == "c" else float(np.real(a))
            out = axpy(x.reshape(-1), y.reshape(-1), a=coefficient)
            if not np.shares_memory(out, y):  # f2py copied (never expected): write it back
                y[...] = out.reshape(y.shape)
            return y
        y += a * x
        return y

    def matmul_add_(self, y: Any, a: Any, b: Any) -> Any:
        if getattr(y, "ndim", 0) == 1 and a.ndim == 2 and b.ndim == 1:
            # A vector: y += a @ b by BLAS gemv with beta = 1 (a Fortran-ordered a, e.g. the
            # transpose of GMRES's basis rows, is read in place), no temporary n-vector.
            gemv = _blas(y, "gemv", a, b) if a.flags.f_contiguous else None
            if gemv is not None:
                out = gemv(1.0, a, b, beta=1.0, y=y, overwrite_y=True)
                if not np.shares_memory(out, y):  # f2py copied (never expected)
                    y[...] = out
                return y
        gemm = (_blas(y, "gemm", a, b)
                if y.ndim == 2 and a.ndim == 2 and b.ndim == 2 else None)
        if gemm is None:
            if (isinstance(y, np.ndarray) and y.flags.writeable
                    and np.result_type(y, a, b) == y.dtype):
                y += a @ b
                return y
            return y + a @ b
        # BLAS is column-major: y (C order) is y^T (Fortran order), so y^T += b^T a^T is the
        # same update, written in place (overwrite_c) without a transposed copy of y.
        out = gemm(1.0, b.T, a.T, beta=1.0, c=y.T, overwrite_c=True)
        if not np.shares_memory(out, y):  # f2py copied (never expected): write it back
            y[...] = out.T
        return y

    def set_at_(self, a: Any, index: Any, value: Any) -> Any:
        a[index] = value
        return a

    def scale_(self, y: Any, a: Any) -> Any:
        if not _fits_in_place(y, a):
            return a * y
        y *= a
        return y

    def safe_divide(self, num: Any, den: Any) -> Any:
        # Scalars (step lengths) are the common case: a plain branch is much cheaper than
        # the masked array expression, which matters for small problems.
        if np.ndim(den) == 0:
            # Also a vector over a scalar (GMRES's new basis vector): one pass, not five.
            return num / den if den != 0 else num * 0
        return super().safe_divide(num, den)


class FactoredTriangle:
    """A sparse triangle ``T`` factored once by SuperLU, in its own order and without
    pivoting, so that ``L U = T`` with one factor diagonal: a solve is the two triangular
    substitutions, the same arithmetic as ``spsolve_triangular`` (which also scales by the
    inverse diagonal) without rebuilding ``T`` each time. ``.T`` solves with ``T^T``
    (transposed, not conjugated)."""

    def __init__(self, lu: Any, transposed: bool = False) -> None:
        self._lu, self._transposed = lu, transposed

    @classmethod
    def factor(cls, T: Any, lower: bool) -> FactoredTriangle | None:
        """The factored ``T``, or None if SuperLU permuted it (then solve ``T`` itself)."""
        import scipy.sparse
        import scipy.sparse.linalg

        # diag_pivot_thresh=0 keeps the diagonal pivots, NATURAL the column order: a
        # triangle then factors without fill-in. T is stored lower; an upper one is
        # factored as its transpose.
        matrix = scipy.sparse.csc_matrix(T if lower else T.T)
        lu = scipy.sparse.linalg.splu(matrix, permc_spec="NATURAL", diag_pivot_thresh=0.0,
                                      options={"SymmetricMode": True})
        n = matrix.shape[0]
        identity = np.arange(n)
        if not (np.array_equal(lu.perm_r, identity) and np.array_equal(lu.perm_c, identity)):
            return None
        return cls(lu, transposed=not lower)

    @property
    def T(self) -> FactoredTriangle:
        return FactoredTriangle(self._lu, not self._transposed)

    def solve(self, rhs: Any) -> Any:
        return self._lu.solve(np.asarray(rhs), trans="T" if self._transposed else "N")


_BLAS_TYPES = {np.dtype(t) for t in ("float32", "float64", "complex64", "complex128")}
_BLAS_CACHE: dict[tuple[str, str], Callable] = {}


def _axpy_routines() -> dict[np.dtype, Callable]:
    import scipy.linalg.blas  # lazy: the core imports numpy only at module level

    return {np.dtype(np.float64): scipy.linalg.blas.daxpy,
            np.dtype(np.complex128): scipy.linalg.blas.zaxpy}


class _LazyRoutines(dict):
    """``dtype -> BLAS axpy`` for the fast path of :meth:`NumpyOps.axpy_`, filled (scipy
    imported) on first use; membership is known without importing scipy."""

    def __contains__(self, dtype: object) -> bool:
        return dtype in (np.dtype(np.float64), np.dtype(np.complex128))

    def __missing__(self, dtype: np.dtype) -> Callable:
        self.update(_axpy_routines())
        return dict.__getitem__(self, dtype)


_FAST_AXPY = _LazyRoutines()


def _blas(y: Any, name: str, *operands: Any) -> Callable | None:
    """The BLAS routine ``name`` for ``y``'s dtype, or None: ``y`` a C-contiguous writeable
    NumPy array of a BLAS type and every operand a NumPy array of that dtype (BLAS takes no
    mixed types; the caller then falls back to NumPy)."""
    if not (isinstance(y, np.ndarray) and y.dtype in _BLAS_TYPES
            and y.flags.c_contiguous and y.flags.writeable):
        return None
    if not all(isinstance(o, np.ndarray) and o.dtype == y.dtype for o in operands):
        return None
    key = (name, y.dtype.char)
    if key not in _BLAS_CACHE:
        import scipy.linalg.blas  # lazy: the core imports numpy only at module level

        _BLAS_CACHE[key] = scipy.linalg.blas.get_blas_funcs(name, dtype=y.dtype)
    return _BLAS_CACHE[key]


def _fits_in_place(y: Any, *operands: Any) -> bool:
    """Whether the result of an elementwise expression of ``y`` and ``operands`` has ``y``'s
    shape and dtype, so it can be written into ``y`` with the same value as a new array."""
    if not (isinstance(y, np.ndarray) and y.flags.writeable):
        return False
    if np.result_type(y, *operands) != y.dtype:
        return False
    return all(np.ndim(o) == 0 or np.shape(o) == y.shape for o in operands)


_NUMPY_OPS = NumpyOps()


def array_backend_name(a: Any) -> str:
    """Return "numpy", "cupy" or "jax" for an array, without importing cupy or jax.

    Anything that is neither a cupy nor a jax array (lists, scalars, numpy arrays,
    scipy.sparse matrices) counts as "numpy".
    """
    module = type(a).__module__ or ""
    root = module.split(".", 1)[0]
    if root in ("cupy", "cupyx"):
        return "cupy"
    if root in ("jax", "jaxlib"):
        return "jax"
    return "numpy"


def ops_for(*arrays: Any) -> ArrayOps:
    """Return the :class:`ArrayOps` of the given arrays' backend.

    Raises
    ------
    TypeError
        If the arrays come from different backends.
    """
    names = {array_backend_name(a) for a in arrays if a is not None}
    if len(names) > 1:
        raise TypeError(
            f"arrays from different backends were mixed: {sorted(names)}; convert them to one "
            "array library (e.g. numpy.asarray, cupy.asarray or jax.numpy.asarray) first"
        )
    name = names.pop() if names else "numpy"
    if name == "numpy":
        return _NUMPY_OPS
    from prdp_ops.backends import get_ops  # lazy: imports cupy / jax only when needed

    return get_ops(name)
