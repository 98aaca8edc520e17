"""Argument checks shared by :func:`prdp_ops.solve`, :func:`prdp_ops.solve_vjp` and the JAX
bridge: each error names the argument, what was received and what to pass instead."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np

from prdp_ops._array_ops import ArrayOps
from prdp_ops._operators.base import LinearOperator
from prdp_ops._operators.convert import aslinearoperator
from prdp_ops._solver.base import IterativeSolver

__all__ = ["as_array", "as_operator", "block_columns", "check_callback", "check_choice",
           "check_count", "check_tolerance", "check_vector", "copying", "solve_dtype"]


def as_operator(A: Any, name: str = "A") -> LinearOperator:
    try:
        op = aslinearoperator(A)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{name}: {err}") from None
    if not op.is_square:
        raise ValueError(
            f"{name} must be square for a linear solve; got shape {op.shape}. For a "
            "least-squares problem solve the normal equations (A^H A x = A^H b) instead"
        )
    return op


def check_count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a non-negative int; got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative int; got {value}")
    return int(value)


def check_tolerance(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number >= 0; got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {value}")
    return float(value)


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")
    return value


def solve_dtype(op: LinearOperator, b: Any, solver: IterativeSolver) -> Any:
    dtype = np.result_type(op.dtype, b.dtype, np.float32)
    if np.issubdtype(b.dtype, np.integer) or np.issubdtype(op.dtype, np.integer):
        dtype = np.result_type(dtype, np.float64)
    if np.issubdtype(dtype, np.complexfloating) and not solver.supports_complex:
        raise TypeError(
            f"solver {solver.name!r} does not support complex data (dtype {dtype}); use "
            "'gmres', 'bicgstab' or 'cg' (Hermitian A), or split into real and imaginary parts"
        )
    if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.complexfloating)):
        raise TypeError(f"A and b must be numeric; got dtypes {op.dtype} and {b.dtype}")
    return dtype


def as_array(v: Any) -> Any:
    """Arrays as they are; lists, tuples and scalars through ``np.asarray`` (as for ``b``)."""
    return v if hasattr(v, "shape") else np.asarray(v)


def block_columns(b: Any) -> int | None:
    """``k`` for a block of right-hand sides ``b`` of shape ``(n, k)``, ``k != 1``; None for
    one right-hand side (``(n,)``, or ``(n, 1)`` as in SciPy)."""
    shape = getattr(b, "shape", ())
    return shape[1] if len(shape) == 2 and shape[1] != 1 else None


def check_vector(ops: ArrayOps, v: Any, n: int, name: str, dtype: Any, *,
                  check_finite: bool = True, copy: bool = False,
                  columns: int | None = None) -> Any:
    """``v`` as a 1-D array of ``dtype``: shape ``(n,)`` or ``(n, 1)``, finite unless
    ``check_finite`` is off (then a NaN is left to the driver, which reports it in the
    result). ``copy=True`` returns an array the caller's ``v`` does not share.
    ``columns=k``: ``v`` belongs to a block of ``k`` right-hand sides and must be ``(n, k)``
    (kept 2-D)."""
    shape = getattr(v, "shape", None)
    wrong = (shape[0] != n if columns is not None and name == "b"
             else shape != (n, columns) if columns is not None
             else shape not in ((n,), (n, 1)))
    if wrong and columns is not None and name != "b":
        raise ValueError(
            f"{name} must have shape ({n}, {columns}) to match b's block of {columns} "
            f"right-hand sides; got shape {shape}"
        )
    if wrong:
        raise ValueError(
            f"{name} must have shape ({n},) or ({n}, 1) to match A of shape ({n}, {n}), or "
            f"({n}, k) for a block of k right-hand sides (b too); got shape {shape}"
        )
    v = v.astype(dtype, copy=copy) if columns is not None else v.reshape(-1).astype(
        dtype, copy=copy)
    if check_finite and not bool(ops.is_finite(v)):
        raise ValueError(f"{name} contains NaN or inf; pass finite values")
    return v


def check_callback(value: Any, name: str) -> Callable | None:
    if value is not None and not callable(value):
        raise TypeError(
            f"{name} must be a function called as {name}(xk) after every iteration, or None; "
            f"got {type(value).__name__} {value!r}"
        )
    return value


def copying(callback: Callable | None, shape: tuple[int, ...]) -> Callable | None:
    """``callback`` fed a copy of each iterate in ``b``'s shape: the caller may keep or
    modify what it receives without touching the solver's state (SciPy hands out the live
    array)."""
    if callback is None:
        return None
    return lambda xk: callback(xk.reshape(shape).copy())
