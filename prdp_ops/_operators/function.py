"""Matrix-free operators: one built from Python callables, and a wrapper around SciPy's
``LinearOperator`` (its ``rmatvec`` serves the adjoint)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from prdp_ops._operators.base import LinearOperator

__all__ = ["FunctionOperator", "ScipyLinearOperator"]


class FunctionOperator(LinearOperator):
    """An operator defined by a matvec function (and optionally its adjoint).

    Parameters
    ----------
    matvec
        ``x -> A @ x`` for a 1-D ``x``; it must return shape ``(m,)`` (or ``(m, 1)``),
        checked at every call (a ValueError names the shape it returned).
    shape
        ``(m, n)``; an int ``n`` means ``(n, n)``.
    dtype
        The operator's dtype (default float64).
    rmatvec
        ``y -> A^H @ y``. Without it the implicit adjoint needs ``hermitian=True`` (or
        ``symmetric=True`` for a real operator), and fails clearly otherwise.
    hermitian, symmetric
        Declare ``A^H == A`` (``symmetric`` is the same flag, for real operators). Not
        checked.
    diagonal
        The operator's main diagonal as a 1-D array, if known; lets Jacobi run matrix-free.
    """

    def __init__(
        self,
        matvec: Callable[[Any], Any],
        shape: int | tuple[int, int],
        dtype: Any = np.float64,
        *,
        rmatvec: Callable[[Any], Any] | None = None,
        hermitian: bool = False,
        symmetric: bool = False,
        diagonal: Any = None,
    ) -> None:
        if not callable(matvec):
            raise TypeError(f"matvec must be callable; got {type(matvec).__name__}")
        if rmatvec is not None and not callable(rmatvec):
            raise TypeError(f"rmatvec must be callable or None; got {type(rmatvec).__name__}")
        if isinstance(shape, (int, np.integer)):
            shape = (int(shape), int(shape))
        super().__init__(shape, dtype)
        self._matvec_fn, self._rmatvec_fn = matvec, rmatvec
        self.hermitian = bool(hermitian or symmetric)
        if diagonal is not None and getattr(diagonal, "shape", None) != (min(self.shape),):
            raise ValueError(
                f"diagonal must be a 1-D array of length {min(self.shape)}; got shape "
                f"{getattr(diagonal, 'shape', None)}"
            )
        self._diagonal = diagonal

    def _matvec(self, x: Any) -> Any:
        return _checked_output(self._matvec_fn(x), self.shape[0], "matvec", self._matvec_fn,
                               x, self.shape)

    def _rmatvec(self, y: Any) -> Any:
        if self._rmatvec_fn is not None:
            return _checked_output(self._rmatvec_fn(y), self.shape[1], "rmatvec",
                                   self._rmatvec_fn, y, self.shape)
        return super()._rmatvec(y)

    def diagonal(self) -> Any:
        if self._diagonal is None:
            return super().diagonal()
        return self._diagonal


def _checked_output(out: Any, length: int, name: str, fn: Callable, given: Any,
                    shape: tuple[int, int]) -> Any:
    """``out`` as a 1-D array of ``length`` entries, or a ValueError naming the function.

    A user's function is the one place an operator's output shape is not guaranteed by
    construction; unchecked, a wrong length surfaces far away as a broadcast error inside a
    solver (``b - A x``), a scalar silently broadcasts, and ``None`` fails with a
    ``TypeError`` about operand types. A column ``(length, 1)`` is accepted as SciPy does.
    Only the static shape is read, so the check is free and works on traced JAX values.
    """
    out_shape = getattr(out, "shape", None)
    if out_shape == (length,):
        return out
    if out_shape == (length, 1):
        return out.reshape(-1)
    received = (f"an array of shape {tuple(out_shape)}" if out_shape is not None
                else "None" if out is None else f"a {type(out).__name__}")
    label = getattr(fn, "__qualname__", type(fn).__name__)
    raise ValueError(
        f"{name} function {label!r} of a FunctionOperator of shape {shape} must return an "
        f"array of shape ({length},) for an input of shape "
        f"{tuple(getattr(given, 'shape', ()))}; it returned {received}. Fix the function, or "
        "the shape given with it"
    )


class ScipyLinearOperator(LinearOperator):
    """Wraps a ``scipy.sparse.linalg.LinearOperator`` (its ``rmatvec`` is the adjoint)."""

    def __init__(self, op: Any, *, hermitian: bool = False) -> None:
        super().__init__(op.shape, op.dtype if op.dtype is not None else np.float64)
        self.op = op
        self.hermitian = hermitian

    def _matvec(self, x: Any) -> Any:
        return np.asarray(self.op.matvec(x)).reshape(-1)

    def _rmatvec(self, y: Any) -> Any:
        try:
            return np.asarray(self.op.rmatvec(y)).reshape(-1)
        except NotImplementedError:
            return super()._rmatvec(y)

    def _matmat(self, X: Any) -> Any:
        # SciPy's own matmat: one call for a block (its _matmat if the operator has one).
        return np.asarray(self.op.matmat(X))

    def _rmatmat(self, Y: Any) -> Any:
        try:
            return np.asarray(self.op.rmatmat(Y))
        except NotImplementedError:
            return super()._rmatmat(Y)
