"""Operators for the JAX backend (private to ``prdp_ops.backends.jax``).

What a user passes as ``A`` or ``M`` becomes a :class:`~prdp_ops.LinearOperator` of jax
arrays whose array leaves are its ``parameters()`` (so gradients reach them): matrices and
BCOO matrices directly, a matvec function through ``jax.closure_convert``. The adjoint solve
and the unrolled reverse sweep need ``A^T``: the operator's own transpose where it has one,
else JAX's transpose of its (linear) matvec.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from prdp_ops.backends._jax_ops import is_bcoo

from prdp_ops._operators.base import LinearOperator
from prdp_ops._operators.convert import aslinearoperator

__all__ = ["as_jax_operator", "like_parameter", "operand_dtype", "own_param_vjp", "rebuilder",
           "structured_adjoint", "transpose"]

_NUMPY_ONLY = (
    "{name} computes with NumPy/SciPy ({what}), which cannot run on traced JAX arrays inside "
    "the JAX backend. Pass backend='numpy' to pj.solve (the NumPy implementation, called "
    "from JAX through a callback; gradients still reach b), or write {name}'s product with "
    "jax.numpy: a jax array or BCOO matrix, a function x -> {name} @ x, or "
    "po.FunctionOperator(matvec, n) whose matvec uses jax.numpy"
)


class _ClosureOperator(LinearOperator):
    """A matvec function after ``jax.closure_convert``: the arrays it closes over that may
    carry gradients become the operator's parameters ``closure0``, ``closure1``, ..."""

    def __init__(self, fn: Callable, consts: tuple[Any, ...], n: int, dtype: Any,
                 hermitian: bool = False) -> None:
        super().__init__((n, n), dtype)
        self._fn, self._consts = fn, tuple(consts)
        self.hermitian = hermitian

    def _matvec(self, x: Any) -> Any:
        return self._fn(x, *self._consts)

    def _rmatvec(self, y: Any) -> Any:
        if self.hermitian:
            return self._matvec(y)
        # A^H y = conj(A^T conj(y)); JAX transposes the (linear) matvec for us.
        complex_data = jnp.issubdtype(self.dtype, jnp.complexfloating)
        conj = jnp.conj if complex_data else (lambda v: v)
        return conj(_linear_transpose(self._matvec, y)(conj(y)))

    def parameters(self) -> dict[str, Any]:
        return {f"closure{i}": c for i, c in enumerate(self._consts)}

    def with_parameters(self, params: dict[str, Any]) -> LinearOperator:
        consts = tuple(params[f"closure{i}"] for i in range(len(self._consts)))
        return _ClosureOperator(self._fn, consts, self.shape[0], self.dtype, self.hermitian)


def _linear_transpose(matvec: Callable, like: Any) -> Callable:
    transposed = jax.linear_transpose(matvec, jax.ShapeDtypeStruct(like.shape, like.dtype))
    return lambda y: transposed(y)[0]


class _AutoTransposed(LinearOperator):
    """``A^T`` by ``jax.linear_transpose`` of ``A``'s matvec (for operators without rmatvec)."""

    def __init__(self, A: LinearOperator) -> None:
        super().__init__((A.shape[1], A.shape[0]), A.dtype)
        self.A = A

    def _matvec(self, x: Any) -> Any:
        return _linear_transpose(self.A.matvec, x)(x)

    def diagonal(self) -> Any:
        return self.A.diagonal()

    def to_matrix(self) -> Any:
        return self.A.to_matrix().T


def transpose(A: LinearOperator, like: Any) -> LinearOperator:
    """``A^T`` (no conjugation): the operator's own transpose if it has one, else JAX's."""
    try:
        jax.eval_shape(A.T.matvec, like)
    except NotImplementedError:
        return _AutoTransposed(A)
    return A.T


class _StructuredAdjoint(LinearOperator):
    """``rebuild(params)`` whose matvec JAX differentiates with the operator's own structure.

    Plain autodiff of a stencil's matvec transposes every shifted slice into a padded copy;
    the operator usually knows better: its ``rmatvec`` (the matvec itself when Hermitian)
    for ``x_bar = A^T y_bar``, and its ``param_vjp`` for the parameters. The unrolled
    reverse sweep applies the solver's steps to this wrapper, so each reverse step costs
    one forward-speed product with ``A^T``.
    """

    def __init__(self, rebuild: Callable[[dict[str, Any]], LinearOperator],
                 params: dict[str, Any]) -> None:
        inner = rebuild(params)
        super().__init__(inner.shape, inner.dtype)
        self.inner, self.hermitian = inner, inner.hermitian
        self._apply = _structured_matvec(rebuild)
        self._params = params

    def _matvec(self, x: Any) -> Any:
        return self._apply(self._params, x)

    def _rmatvec(self, y: Any) -> Any:
        return self.inner._rmatvec(y)

    def diagonal(self) -> Any:
        return self.inner.diagonal()

    def to_matrix(self) -> Any:
        return self.inner.to_matrix()


def structured_adjoint(rebuild: Callable[[dict[str, Any]], LinearOperator]) -> Callable:
    """``params -> A(params)`` whose matvec is differentiated with A's own transpose and
    parameter vjp (see :class:`_StructuredAdjoint`)."""
    return lambda params: _StructuredAdjoint(rebuild, params)


def own_param_vjp(op: LinearOperator) -> bool:
    """Whether ``op`` implements ``param_vjp`` itself (not the closure or base default)."""
    method = type(op).param_vjp
    return method is not LinearOperator.param_vjp and not isinstance(op, _ClosureOperator)


def like_parameter(cotangent: Any, param: Any) -> Any:
    """A cotangent shaped and typed like its (possibly real) parameter."""
    if cotangent is None:
        return jnp.zeros_like(param)
    cotangent = jnp.asarray(cotangent)
    if not jnp.issubdtype(param.dtype, jnp.complexfloating):
        cotangent = jnp.real(cotangent)
    return cotangent.astype(param.dtype).reshape(param.shape)


def _structured_matvec(rebuild: Callable) -> Callable:
    """``apply(params, x) = A(params) x``, differentiated with A's own transpose and
    parameter vjp."""

    @jax.custom_vjp
    def apply(params: dict[str, Any], x: Any) -> Any:
        return rebuild(params).matvec(x)

    def fwd(params: dict[str, Any], x: Any) -> tuple:
        return apply(params, x), (params, x)

    def bwd(residuals: tuple, y_bar: Any) -> tuple:
        params, x = residuals
        A = rebuild(params)
        x_bar = transpose(A, x).matvec(y_bar)
        if not params:
            return {}, x_bar
        if own_param_vjp(A):
            own = A.param_vjp(x, y_bar)
            params_bar = {k: like_parameter(own.get(k), v) for k, v in params.items()}
        else:
            _, pull = jax.vjp(lambda p: rebuild(p).matvec(x), params)
            (params_bar,) = pull(y_bar)
        return params_bar, x_bar

    apply.defvjp(fwd, bwd)
    return apply


# -- from what the user passed to an operator -------------------------------------------------
def _numpy_only(A: Any) -> str | None:
    """What makes ``A`` a NumPy/SciPy-only operator, or None."""
    module = type(A).__module__ or ""
    if module.startswith("scipy.sparse.linalg") or (
            module.startswith("scipy.") and hasattr(A, "matvec") and hasattr(A, "shape")):
        return f"a {type(A).__module__}.{type(A).__name__}"
    if type(A).__name__ == "ScipyLinearOperator" and isinstance(A, LinearOperator):
        return "a po.ScipyLinearOperator wrapping a scipy LinearOperator"
    return None


def _is_scipy_sparse(A: Any) -> bool:
    return (type(A).__module__ or "").startswith("scipy.sparse") and hasattr(A, "tocoo")


def operand_dtype(A: Any, b: Any, name: str) -> Any:
    """The dtype ``A`` (or ``M``) computes in, before any operator is built (a matvec
    function is traced once on ``b`` to find it)."""
    if _is_scipy_sparse(A) or isinstance(A, (jax.Array, np.ndarray)) or is_bcoo(A):
        return jnp.dtype(jax.dtypes.canonicalize_dtype(A.dtype))
    what = _numpy_only(A)
    if what is not None:
        raise TypeError(_NUMPY_ONLY.format(name=name, what=what))
    if isinstance(A, LinearOperator):
        return jnp.dtype(jax.dtypes.canonicalize_dtype(A.dtype))
    if callable(A):
        return _traced_output(A, b, name).dtype
    raise TypeError(
        f"{name} must be a jax array, a jax BCOO matrix, a prdp_ops LinearOperator or a "
        f"matvec function x -> {name} @ x; got {type(A).__name__}. For other matrix types "
        "(scipy.sparse.linalg.LinearOperator, ...) use backend='numpy'"
    )


def _traced_output(fn: Callable, v: Any, name: str) -> Any:
    """``jax.eval_shape(fn, v)``, with errors that say which argument failed and why."""
    try:
        out = jax.eval_shape(fn, v)
    except jax.errors.TracerArrayConversionError as err:
        raise TypeError(_NUMPY_ONLY.format(
            name=name, what="its product converted a traced JAX array to a NumPy array")
        ) from err
    except Exception as err:  # say which argument failed, then re-raise
        raise TypeError(f"{name}: calling the matvec function on a vector of shape {v.shape} "
                        f"and dtype {v.dtype} failed: {err}") from err
    if getattr(out, "shape", None) != v.shape:
        raise ValueError(
            f"{name}: the matvec function must map a vector of shape {v.shape} to the same "
            f"shape; it returned {getattr(out, 'shape', type(out).__name__)}"
        )
    return out


def as_jax_operator(A: Any, like: Any, name: str, dtype: Any,
                    hermitian: bool = False) -> LinearOperator:
    """Turn what the user passed as ``A`` (or ``M``) into a LinearOperator of jax arrays.

    Matrices are cast to the solve's ``dtype`` (an integer matrix computes in floating
    point, as ``jnp.linalg.solve`` does); a matvec function is converted at ``like`` cast to
    ``dtype`` and must return that dtype.
    """
    like = jax.ShapeDtypeStruct(like.shape, dtype)
    if isinstance(A, LinearOperator):
        op = A
        _check_traceable(op, like, name)
    elif isinstance(A, (jax.Array, np.ndarray)):
        op = aslinearoperator(jnp.asarray(A).astype(dtype), hermitian=hermitian)
    elif is_bcoo(A) or _is_scipy_sparse(A):
        if _is_scipy_sparse(A):
            from jax.experimental import sparse as jax_sparse

            A = jax_sparse.BCOO.from_scipy_sparse(A)
        if A.dtype != dtype:
            A = type(A)((A.data.astype(dtype), A.indices), shape=A.shape)
        op = aslinearoperator(A, hermitian=hermitian)
    else:  # operand_dtype has vetted it: a matvec function
        op = _closure_operator(A, like, name, hermitian)
    if not op.is_square:
        raise ValueError(
            f"{name} must be square for a linear solve; got shape {op.shape}. For a "
            "least-squares problem solve the normal equations (A^H A x = A^H b) instead"
        )
    return op


def _check_traceable(op: LinearOperator, like: Any, name: str) -> None:
    """Trace ``op``'s matvec once: an operator holding NumPy/SciPy data fails here, with a
    message naming the argument, instead of deep inside the solver."""
    if op.shape[1] != like.shape[0]:
        return  # the shape error is raised by the caller
    try:
        jax.eval_shape(op.matvec, like)
    except jax.errors.TracerArrayConversionError as err:
        raise TypeError(_NUMPY_ONLY.format(
            name=name, what=f"a {type(op).__name__} whose matvec converted a traced JAX array "
                            "to a NumPy array")) from err


def _closure_operator(fn: Callable, like: Any, name: str, hermitian: bool) -> LinearOperator:
    out = _traced_output(fn, like, name)
    if out.dtype != like.dtype:
        raise TypeError(
            f"{name}: the matvec function maps a {like.dtype} vector to a {out.dtype} one; it "
            f"must keep the solve's dtype {like.dtype} (cast inside the function, or pass b "
            f"as {out.dtype})"
        )
    converted, consts = jax.closure_convert(fn, like)
    return _ClosureOperator(converted, tuple(consts), like.shape[0], like.dtype, hermitian)


def rebuilder(op: LinearOperator) -> Callable[[dict[str, Any]], LinearOperator]:
    """``params -> op`` with its parameters replaced (the identity without parameters)."""
    if not op.parameters():
        return lambda params: op
    return op.with_parameters
