"""The operator algebra: lazy sums, scalings, products, transposes and adjoints.

Each combination is itself a :class:`~prdp_ops.LinearOperator`, so solvers and adjoints see
no difference. Parameters of the parts are namespaced (``"0."``, ``"1."``) so that a
gradient reaches every part; the transpose of a combination is built from the parts'
transposes (``(AB)^T = B^T A^T``), never from a materialised matrix.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from prdp_ops._array_ops import ops_for
from prdp_ops._operators.base import (
    _TRANSPOSED_PART,
    LinearOperator,
    _no_np_matrix,
    _result_dtype,
    _scalar_dtype,
)


def _require_full(op: LinearOperator, part: str) -> None:
    if part != "full":
        raise NotImplementedError(
            f"{type(op).__name__} cannot split its parameter cotangent by part={part!r}; use a "
            "Krylov solver for it, or pass the matrix itself"
        )


def _prefixed(prefix: str, params: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}{k}": v for k, v in params.items()}


def _unprefixed(prefix: str, params: dict[str, Any]) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}


class SumOperator(LinearOperator):
    """``A + B``; parameters are those of A under ``"0."`` and of B under ``"1."``."""

    def __init__(self, A: LinearOperator, B: LinearOperator) -> None:
        if A.shape != B.shape:
            raise ValueError(f"cannot add operators of shapes {A.shape} and {B.shape}")
        super().__init__(A.shape, _result_dtype(A.dtype, B.dtype))
        self.args = (A, B)
        self.hermitian = A.hermitian and B.hermitian

    def _matvec(self, x: Any) -> Any:
        return self.args[0]._matvec(x) + self.args[1]._matvec(x)

    def _rmatvec(self, y: Any) -> Any:
        return self.args[0]._rmatvec(y) + self.args[1]._rmatvec(y)

    def _matmat(self, X: Any) -> Any:
        return self.args[0]._matmat(X) + self.args[1]._matmat(X)

    def _rmatmat(self, Y: Any) -> Any:
        return self.args[0]._rmatmat(Y) + self.args[1]._rmatmat(Y)

    def diagonal(self) -> Any:
        return self.args[0].diagonal() + self.args[1].diagonal()

    def to_matrix(self) -> Any:
        return _no_np_matrix(self.args[0].to_matrix() + self.args[1].to_matrix())

    def parameters(self) -> dict[str, Any]:
        return {**_prefixed("0.", self.args[0].parameters()),
                **_prefixed("1.", self.args[1].parameters())}

    def with_parameters(self, params: dict[str, Any]) -> LinearOperator:
        A, B = self.args
        return SumOperator(A.with_parameters(_unprefixed("0.", params)),
                            B.with_parameters(_unprefixed("1.", params)))

    def param_vjp(self, x: Any, y_bar: Any, part: str = "full") -> dict[str, Any]:
        return {**_prefixed("0.", self.args[0].param_vjp(x, y_bar, part)),
                **_prefixed("1.", self.args[1].param_vjp(x, y_bar, part))}

    def param_vjp_batch(self, X: Any, Y_bar: Any, part: str = "full") -> dict[str, Any]:
        return {**_prefixed("0.", self.args[0].param_vjp_batch(X, Y_bar, part)),
                **_prefixed("1.", self.args[1].param_vjp_batch(X, Y_bar, part))}


class ScaledOperator(LinearOperator):
    """``alpha * A`` for a scalar ``alpha`` (a constant, not a parameter)."""

    def __init__(self, A: LinearOperator, alpha: Any) -> None:
        super().__init__(A.shape, _result_dtype(A.dtype, _scalar_dtype(alpha)))
        self.A, self.alpha = A, alpha
        self.hermitian = A.hermitian and not np.issubdtype(_scalar_dtype(alpha),
                                                           np.complexfloating)

    def _matvec(self, x: Any) -> Any:
        return self.alpha * self.A._matvec(x)

    def _rmatvec(self, y: Any) -> Any:
        return self._conj_alpha() * self.A._rmatvec(y)

    def _matmat(self, X: Any) -> Any:
        return self.alpha * self.A._matmat(X)

    def _rmatmat(self, Y: Any) -> Any:
        return self._conj_alpha() * self.A._rmatmat(Y)

    def _conj_alpha(self) -> Any:
        # A Python/NumPy number is conjugated by NumPy (cupy ufuncs refuse Python scalars);
        # a 0-d array by its own backend, which keeps a traced JAX scalar traced.
        alpha = self.alpha
        conj = np.conj if isinstance(alpha, numbers.Number) else ops_for(alpha).xp.conj
        return conj(alpha)

    def diagonal(self) -> Any:
        return self.alpha * self.A.diagonal()

    def to_matrix(self) -> Any:
        return self.alpha * self.A.to_matrix()

    def parameters(self) -> dict[str, Any]:
        return self.A.parameters()

    def with_parameters(self, params: dict[str, Any]) -> LinearOperator:
        return ScaledOperator(self.A.with_parameters(params), self.alpha)

    def param_vjp(self, x: Any, y_bar: Any, part: str = "full") -> dict[str, Any]:
        return self.A.param_vjp(x, self.alpha * y_bar, part)

    def param_vjp_batch(self, X: Any, Y_bar: Any, part: str = "full") -> dict[str, Any]:
        return self.A.param_vjp_batch(X, self.alpha * Y_bar, part)

    def format_cotangent(self, params_bar: dict[str, Any]) -> Any:
        return self.A.format_cotangent(params_bar)


class ProductOperator(LinearOperator):
    """``A @ B``; parameters of A under ``"0."`` and of B under ``"1."``."""

    def __init__(self, A: LinearOperator, B: LinearOperator) -> None:
        if A.shape[1] != B.shape[0]:
            raise ValueError(f"cannot compose operators of shapes {A.shape} and {B.shape}")
        super().__init__((A.shape[0], B.shape[1]), _result_dtype(A.dtype, B.dtype))
        self.args = (A, B)

    def _matvec(self, x: Any) -> Any:
        return self.args[0]._matvec(self.args[1]._matvec(x))

    def _rmatvec(self, y: Any) -> Any:
        return self.args[1]._rmatvec(self.args[0]._rmatvec(y))

    def _matmat(self, X: Any) -> Any:
        return self.args[0]._matmat(self.args[1]._matmat(X))

    def _rmatmat(self, Y: Any) -> Any:
        return self.args[1]._rmatmat(self.args[0]._rmatmat(Y))

    def to_matrix(self) -> Any:
        return _no_np_matrix(self.args[0].to_matrix() @ self.args[1].to_matrix())

    def parameters(self) -> dict[str, Any]:
        return {**_prefixed("0.", self.args[0].parameters()),
                **_prefixed("1.", self.args[1].parameters())}

    def with_parameters(self, params: dict[str, Any]) -> LinearOperator:
        A, B = self.args
        return ProductOperator(A.with_parameters(_unprefixed("0.", params)),
                                B.with_parameters(_unprefixed("1.", params)))

    def param_vjp(self, x: Any, y_bar: Any, part: str = "full") -> dict[str, Any]:
        # y = A (B x): A sees the input B x; B sees the cotangent A^T y_bar.
        _require_full(self, part)
        A, B = self.args
        bx = B._matvec(x)
        at_ybar = A.T._matvec(y_bar)
        return {**_prefixed("0.", A.param_vjp(bx, y_bar)),
                **_prefixed("1.", B.param_vjp(x, at_ybar))}

    def param_vjp_batch(self, X: Any, Y_bar: Any, part: str = "full") -> dict[str, Any]:
        # Rows are vectors: B x_k for every k is (B X^T)^T, one matmat per factor.
        _require_full(self, part)
        A, B = self.args
        BX = B.matmat(X.T).T
        AtY = A.T.matmat(Y_bar.T).T
        return {**_prefixed("0.", A.param_vjp_batch(BX, Y_bar)),
                **_prefixed("1.", B.param_vjp_batch(X, AtY))}


class TransposedOperator(LinearOperator):
    """``A^T`` (no conjugation): ``A^T x = conj(A^H conj(x))``."""

    def __init__(self, A: LinearOperator) -> None:
        super().__init__((A.shape[1], A.shape[0]), A.dtype)
        self.A = A
        self.hermitian = A.hermitian and not np.issubdtype(A.dtype, np.complexfloating)

    def _is_real(self) -> bool:
        return not np.issubdtype(self.dtype, np.complexfloating)

    def _through_conjugate(self, apply: Any, v: Any) -> Any:
        # A^T v = conj(A^H conj(v)): the transpose from the adjoint (and back), which is the
        # identity on real data.
        if self._is_real():
            return apply(v)
        xp = ops_for(v).xp
        return xp.conj(apply(xp.conj(v)))

    def _matvec(self, x: Any) -> Any:
        return self._through_conjugate(self.A._rmatvec, x)

    def _rmatvec(self, y: Any) -> Any:
        return self._through_conjugate(self.A._matvec, y)

    def _matmat(self, X: Any) -> Any:
        return self._through_conjugate(self.A._rmatmat, X)

    def _rmatmat(self, Y: Any) -> Any:
        return self._through_conjugate(self.A._matmat, Y)

    @property
    def T(self) -> LinearOperator:
        return self.A

    def diagonal(self) -> Any:
        return self.A.diagonal()

    def to_matrix(self) -> Any:
        return self.A.to_matrix().T

    def parameters(self) -> dict[str, Any]:
        return self.A.parameters()

    def with_parameters(self, params: dict[str, Any]) -> LinearOperator:
        return TransposedOperator(self.A.with_parameters(params))

    def param_vjp(self, x: Any, y_bar: Any, part: str = "full") -> dict[str, Any]:
        # sum(y_bar * dA^T x) == sum(x * dA y_bar): the roles of x and y_bar swap, and the
        # lower triangle of A^T is the upper triangle of A.
        return self.A.param_vjp(y_bar, x, _TRANSPOSED_PART[part])

    def param_vjp_batch(self, X: Any, Y_bar: Any, part: str = "full") -> dict[str, Any]:
        return self.A.param_vjp_batch(Y_bar, X, _TRANSPOSED_PART[part])

    def format_cotangent(self, params_bar: dict[str, Any]) -> Any:
        return self.A.format_cotangent(params_bar)


class AdjointOperator(LinearOperator):
    """``A^H``: matvec is A's rmatvec and vice versa."""

    def __init__(self, A: LinearOperator) -> None:
        super().__init__((A.shape[1], A.shape[0]), A.dtype)
        self.A = A
        self.hermitian = A.hermitian

    def _matvec(self, x: Any) -> Any:
        return self.A._rmatvec(x)

    def _rmatvec(self, y: Any) -> Any:
        return self.A._matvec(y)

    def _matmat(self, X: Any) -> Any:
        return self.A._rmatmat(X)

    def _rmatmat(self, Y: Any) -> Any:
        return self.A._matmat(Y)

    @property
    def H(self) -> LinearOperator:
        return self.A

    def diagonal(self) -> Any:
        d = self.A.diagonal()
        return ops_for(d).xp.conj(d) if np.issubdtype(self.dtype, np.complexfloating) else d

    def to_matrix(self) -> Any:
        m = self.A.to_matrix()
        return m.conj().T if np.issubdtype(self.dtype, np.complexfloating) else m.T

    def parameters(self) -> dict[str, Any]:
        return self.A.parameters()

    def with_parameters(self, params: dict[str, Any]) -> LinearOperator:
        return AdjointOperator(self.A.with_parameters(params))

    def param_vjp(self, x: Any, y_bar: Any, part: str = "full") -> dict[str, Any]:
        # A^H = conj(A)^T; the vjp of conj is conj, so conjugate the transposed-case result.
        return self._conjugated(self.A.param_vjp(y_bar, x, _TRANSPOSED_PART[part]))

    def param_vjp_batch(self, X: Any, Y_bar: Any, part: str = "full") -> dict[str, Any]:
        return self._conjugated(self.A.param_vjp_batch(Y_bar, X, _TRANSPOSED_PART[part]))

    def _conjugated(self, bar: dict[str, Any]) -> dict[str, Any]:
        if not np.issubdtype(self.dtype, np.complexfloating):
            return bar
        return {k: ops_for(v).xp.conj(v) for k, v in bar.items()}

    def format_cotangent(self, params_bar: dict[str, Any]) -> Any:
        return self.A.format_cotangent(params_bar)
