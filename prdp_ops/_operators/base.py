"""The abstract :class:`LinearOperator` (the algebra built on it, sums, products, scaling and
transposes, lives in :mod:`prdp_ops._operators.composite`).

Semantics follow ``scipy.sparse.linalg.LinearOperator``: ``matvec`` is ``A @ x``, ``rmatvec``
is ``A^H @ y`` (conjugate transpose), ``.T`` and ``.H`` are lazy operators, ``A @ B``
composes, ``A + B`` and ``c * A`` combine.

Differentiation adds two ideas. An operator may hold *parameters* -- the arrays its entries
are built from (a dense matrix, the values of a sparse matrix, the coefficient field of a
diffusion stencil) -- listed by :meth:`LinearOperator.parameters`. And
:meth:`LinearOperator.param_vjp` maps a pair ``(x, y_bar)`` for ``y = A(p) x`` to the
cotangents of those parameters. Cotangents follow JAX's convention (linear functionals, no
conjugation): ``x_bar = A^T y_bar`` and, for a dense matrix, ``A_bar = outer(y_bar, x)``, so
results agree with ``jax.vjp`` on complex data too.
"""

from __future__ import annotations

import abc
import numbers
from typing import Any

import numpy as np

from prdp_ops._array_ops import ArrayOps, ops_for

__all__ = ["LinearOperator", "MatrixFreeError"]


class MatrixFreeError(TypeError):
    """Raised when explicit matrix entries are needed but the operator is matrix-free."""


def _result_dtype(*dtypes: Any) -> Any:
    return np.result_type(*[np.dtype(d) for d in dtypes])


def _is_scalar(value: Any) -> bool:
    """A Python/NumPy number or a 0-d array of any backend (a traced JAX scalar included)."""
    return isinstance(value, numbers.Number) or getattr(value, "ndim", None) == 0


def _no_np_matrix(m: Any) -> Any:
    # scipy.sparse matrix + ndarray gives np.matrix, which solvers must not receive.
    return np.asarray(m) if isinstance(m, np.matrix) else m


def _algebra() -> Any:
    """The module of operator combinations (sum, product, ...), imported on first use: its
    classes subclass :class:`LinearOperator`, so it imports this module."""
    from prdp_ops._operators import composite

    return composite


def _scalar_dtype(value: Any) -> Any:
    # JAX and CuPy scalars carry a dtype; np.asarray would pull a traced one to the host.
    return value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype


class LinearOperator(abc.ABC):
    """Abstract base of every operator prdp_ops solves with.

    Subclasses implement :meth:`_matvec` (and :meth:`_rmatvec` for ``A^H y``, which the
    implicit adjoint needs). Operators with explicit entries also implement
    :meth:`diagonal` and :meth:`to_matrix` (Jacobi and SOR use them). Operators whose
    entries depend on arrays that gradients should reach implement :meth:`parameters`,
    :meth:`with_parameters` and :meth:`param_vjp`.

    Parameters
    ----------
    shape
        ``(m, n)``.
    dtype
        The operator's dtype (a NumPy dtype; JAX and CuPy share NumPy's dtypes).
    """

    #: True when the operator is known to be Hermitian (``A^H = A``); the adjoint of a
    #: matrix-free operator without ``rmatvec`` can then reuse ``matvec``.
    hermitian: bool = False

    def __init__(self, shape: tuple[int, int], dtype: Any) -> None:
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2 or min(shape) < 0:
            raise ValueError(f"shape must be a pair (m, n) of non-negative ints; got {shape!r}")
        self.shape: tuple[int, int] = shape  # type: ignore[assignment]
        self.dtype = np.dtype(dtype)

    # -- to implement -----------------------------------------------------------------
    @abc.abstractmethod
    def _matvec(self, x: Any) -> Any:
        """Return ``A @ x`` for a 1-D ``x`` of length ``n``."""

    def _rmatvec(self, y: Any) -> Any:
        """Return ``A^H @ y``; override it (the implicit adjoint and ``.T`` need it)."""
        if self.hermitian:
            return self._matvec(y)
        raise NotImplementedError(
            f"{type(self).__name__} has no rmatvec (A^H y), which the adjoint solve and A.T "
            "need; give the operator an rmatvec, or declare it Hermitian/symmetric if it is"
        )

    def _matmat(self, X: Any) -> Any:
        xp = ops_for(X).xp
        return xp.stack([self._matvec(X[:, j]) for j in range(X.shape[1])], axis=1)

    def _rmatmat(self, Y: Any) -> Any:
        """Return ``A^H @ Y`` for ``Y`` of shape ``(m, k)``; a column at a time unless
        overridden (a block of right-hand sides applies it at every adjoint iteration)."""
        if self.hermitian:
            return self._matmat(Y)
        xp = ops_for(Y).xp
        return xp.stack([self._rmatvec(Y[:, j]) for j in range(Y.shape[1])], axis=1)

    # -- public SciPy-style interface -------------------------------------------------
    @property
    def ndim(self) -> int:
        return 2

    @property
    def is_square(self) -> bool:
        return self.shape[0] == self.shape[1]

    def matvec(self, x: Any) -> Any:
        """Return ``A @ x``; ``x`` has shape ``(n,)`` or ``(n, 1)``."""
        x, column = self._check_vector(x, self.shape[1], "x")
        y = self._matvec(x)
        return y.reshape(-1, 1) if column else y

    def rmatvec(self, y: Any) -> Any:
        """Return ``A^H @ y``; ``y`` has shape ``(m,)`` or ``(m, 1)``."""
        y, column = self._check_vector(y, self.shape[0], "y")
        x = self._rmatvec(y)
        return x.reshape(-1, 1) if column else x

    def matmat(self, X: Any) -> Any:
        """Return ``A @ X`` for a 2-D ``X`` of shape ``(n, k)``."""
        if isinstance(X, np.matrix):
            X = np.asarray(X)  # np.matrix keeps 2-D through reshape; compute on ndarrays
        if getattr(X, "ndim", None) != 2 or X.shape[0] != self.shape[1]:
            raise ValueError(
                f"X must be a 2-D array with {self.shape[1]} rows for an operator of shape "
                f"{self.shape}; got shape {getattr(X, 'shape', None)}"
            )
        return self._matmat(X)

    def rmatmat(self, Y: Any) -> Any:
        """Return ``A^H @ Y`` for a 2-D ``Y`` of shape ``(m, k)``."""
        if getattr(Y, "ndim", None) != 2 or Y.shape[0] != self.shape[0]:
            raise ValueError(
                f"Y must be a 2-D array with {self.shape[0]} rows for an operator of shape "
                f"{self.shape}; got shape {getattr(Y, 'shape', None)}"
            )
        return self._rmatmat(np.asarray(Y) if isinstance(Y, np.matrix) else Y)

    @property
    def T(self) -> LinearOperator:
        """The transpose (no conjugation), as a lazy operator."""
        return _algebra().TransposedOperator(self)

    @property
    def H(self) -> LinearOperator:
        """The conjugate transpose, as a lazy operator."""
        return _algebra().AdjointOperator(self)

    def adjoint(self) -> LinearOperator:
        """The conjugate transpose (SciPy's name)."""
        return self.H

    def transpose(self) -> LinearOperator:
        """The transpose (SciPy's name)."""
        return self.T

    def dot(self, x: Any) -> Any:
        """``A @ x`` for an operator, a scalar, a vector or a matrix (SciPy's ``dot``)."""
        return self @ x

    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, LinearOperator):
            return _algebra().ProductOperator(self, other)
        if isinstance(other, numbers.Number):
            raise ValueError("use * to scale an operator by a scalar, not @")
        ndim = getattr(other, "ndim", None)
        if ndim == 1 or (ndim == 2 and other.shape[1] == 1):
            return self.matvec(other)
        if ndim == 2:
            return self.matmat(other)
        raise ValueError(
            f"A @ x needs x as a 1-D or 2-D array or a LinearOperator; got {type(other).__name__}"
        )

    def __call__(self, x: Any) -> Any:
        return self @ x

    def __add__(self, other: Any) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return _algebra().SumOperator(self, other)

    def __sub__(self, other: Any) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return _algebra().SumOperator(self, _algebra().ScaledOperator(other, -1))

    def __neg__(self) -> LinearOperator:
        return _algebra().ScaledOperator(self, -1)

    def __mul__(self, other: Any) -> Any:
        if _is_scalar(other):
            return _algebra().ScaledOperator(self, other)
        if isinstance(other, LinearOperator):
            return _algebra().ProductOperator(self, other)
        return self @ other

    def __rmul__(self, other: Any) -> LinearOperator:
        if _is_scalar(other):
            return _algebra().ScaledOperator(self, other)
        return NotImplemented

    def __truediv__(self, other: Any) -> LinearOperator:
        if not _is_scalar(other):
            raise ValueError(
                f"an operator can only be divided by a scalar; got {type(other).__name__}"
            )
        return _algebra().ScaledOperator(self, 1 / other)

    def __repr__(self) -> str:
        m, n = self.shape
        return f"<{m}x{n} {type(self).__name__} with dtype={self.dtype}>"

    # -- explicit entries (Jacobi, SOR) -----------------------------------------------
    def diagonal(self) -> Any:
        """Return the main diagonal as a 1-D array.

        Raises
        ------
        MatrixFreeError
            If the operator cannot provide it.
        """
        raise MatrixFreeError(
            f"{type(self).__name__} is matrix-free and cannot provide its diagonal; pass a "
            "matrix (dense or sparse), a stencil operator, or a FunctionOperator with "
            "diagonal=..., or use a Krylov solver (cg, gmres, bicgstab)"
        )

    def to_matrix(self) -> Any:
        """Return the explicit matrix in the backend's native form (dense or sparse).

        Raises
        ------
        MatrixFreeError
            If the operator is matrix-free.
        """
        raise MatrixFreeError(
            f"{type(self).__name__} is matrix-free and has no explicit entries; solvers such "
            "as 'sor' need them: pass a dense or sparse matrix, or use 'jacobi' or a Krylov "
            "solver (cg, gmres, bicgstab) instead"
        )

    # -- differentiable parameters ----------------------------------------------------
    def parameters(self) -> dict[str, Any]:
        """The arrays the entries are built from, ``{name: array}``; ``{}`` if none."""
        return {}

    def with_parameters(self, params: dict[str, Any]) -> LinearOperator:
        """Return the same operator built from other parameter arrays (same names/shapes)."""
        if params:
            raise ValueError(f"{type(self).__name__} has no parameters; got {sorted(params)}")
        return self

    def param_vjp(self, x: Any, y_bar: Any, part: str = "full") -> dict[str, Any]:
        """Cotangents of :meth:`parameters` for ``y = A(p) @ x`` given ``y_bar``.

        Returns ``{name: p_bar}`` with ``sum(p_bar * dp) == sum(y_bar * (dA x))`` (JAX's
        bilinear convention). ``{}`` for an operator without parameters.

        ``part`` restricts ``A`` to one piece of its splitting ``A = D + L + U``:
        ``"full"``, ``"diagonal"`` (D), ``"strict_lower"`` (L) or ``"strict_upper"`` (U).
        Jacobi and SOR, which apply those pieces separately, need the other parts.
        """
        return {}

    def param_vjp_batch(self, X: Any, Y_bar: Any, part: str = "full") -> dict[str, Any]:
        """Sum of :meth:`param_vjp` over the rows of ``X`` and ``Y_bar`` (shape ``(k, n)``).

        Unrolled adjoints collect one pair per matvec and call this once; dense and sparse
        operators override it with a single matrix product.
        """
        total: dict[str, Any] = {}
        for x, y_bar in zip(X, Y_bar, strict=True):
            total = add_cotangents(total, self.param_vjp(x, y_bar, part))
        return total

    def format_cotangent(self, params_bar: dict[str, Any]) -> Any:
        """Turn parameter cotangents into the form users receive in ``Cotangents.A``."""
        return dict(params_bar) if params_bar else None

    # -- helpers ----------------------------------------------------------------------
    @property
    def ops(self) -> ArrayOps:
        """The :class:`ArrayOps` of the operator's arrays (NumPy for matrix-free ones)."""
        return ops_for(*self.parameters().values())

    def _check_vector(self, v: Any, length: int, name: str) -> tuple[Any, bool]:
        if isinstance(v, np.matrix):
            v = np.asarray(v)
        shape = getattr(v, "shape", None)
        if shape == (length,):
            return v, False
        if shape == (length, 1):
            return v.reshape(-1), True
        raise ValueError(
            f"{name} must have shape ({length},) or ({length}, 1) for an operator of shape "
            f"{self.shape}; got {shape if shape is not None else type(v).__name__}"
        )


def add_cotangents(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Add two parameter-cotangent dicts key by key (missing keys count as zero)."""
    out = dict(a)
    for key, value in b.items():
        out[key] = out[key] + value if key in out else value
    return out


PARTS = ("full", "diagonal", "strict_lower", "strict_upper")
_TRANSPOSED_PART = {"full": "full", "diagonal": "diagonal", "strict_lower": "strict_upper",
                    "strict_upper": "strict_lower"}

