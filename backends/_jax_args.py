"""Argument checking, dtypes and buffer sizes of the JAX solve (private to
``prdp_ops.backends.jax``).

Everything here runs at trace time, on static information (shapes, dtypes, Python
numbers), so a bad argument or a buffer that cannot fit fails before anything is
allocated, with an error that names the argument.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prdp_ops._solver.base import IterativeSolver

__all__ = ["capacity", "check_memory", "choice", "controls", "count", "history_size",
           "is_traced", "real_dtype", "solve_dtype", "tolerance", "vector"]

#: The residual history keeps at most ``max(10 n, HISTORY_FLOOR)`` entries: enough for a
#: Krylov solve (at most ``n`` steps in exact arithmetic) and for slow stationary methods,
#: without a buffer sized by a huge concrete ``maxiter`` (``2e8`` would take 1.6 GB).
HISTORY_FLOOR = 100_000


def choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")
    return value


def is_traced(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


def count(value: Any, name: str) -> Any:
    """A non-negative iteration count: a Python int, or an int32 scalar if traced."""
    if is_traced(value):
        if value.shape != () or not jnp.issubdtype(value.dtype, jnp.integer):
            raise TypeError(f"{name} must be an integer scalar; got a traced {value.aval}")
        return value.astype(jnp.int32)
    if isinstance(value, bool) or not (
        isinstance(value, numbers.Integral)
        or (np.ndim(value) == 0 and np.issubdtype(np.asarray(value).dtype, np.integer))
    ):
        raise TypeError(f"{name} must be a non-negative int; got {value!r}")
    if int(value) < 0:
        raise ValueError(f"{name} must be a non-negative int; got {int(value)}")
    return int(value)


def tolerance(value: Any, name: str) -> Any:
    """A tolerance: a Python float >= 0, or a real scalar if traced."""
    if is_traced(value):
        if value.shape != () or not jnp.issubdtype(value.dtype, jnp.floating):
            raise TypeError(f"{name} must be a real scalar; got a traced {value.aval}")
        return value
    if isinstance(value, bool) or not (
        isinstance(value, numbers.Real) or (np.ndim(value) == 0 and np.isrealobj(value))
    ):
        raise TypeError(f"{name} must be a real number >= 0; got {value!r}")
    value = float(value)
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {value}")
    return value


def solve_dtype(A_dtype: Any, b_dtype: Any, solver: IterativeSolver) -> Any:
    """The dtype the solve computes in: exactly what ``jnp.linalg.solve`` returns for A's
    and b's dtypes (asked of it on 1 x 1 shapes, so nothing is computed).

    That is ``jnp.result_type(A, b)``, following ``jax_numpy_dtype_promotion`` (under
    ``"strict"`` the two must agree), with integers made inexact as JAX makes them: int64
    (the integer dtype with x64 enabled) gives float64, as NumPy; narrower ints give float32.
    """
    if not (jnp.issubdtype(b_dtype, jnp.number) and jnp.issubdtype(A_dtype, jnp.number)):
        raise TypeError(f"A and b must be numeric; got dtypes {A_dtype} and {b_dtype}")
    try:
        dtype = jax.eval_shape(jnp.linalg.solve, jax.ShapeDtypeStruct((1, 1), A_dtype),
                               jax.ShapeDtypeStruct((1,), b_dtype)).dtype
    except jax.dtypes.TypePromotionError as err:
        raise TypeError(
            f"A has dtype {A_dtype} and b has dtype {b_dtype}, which JAX's strict dtype "
            "promotion (jax_numpy_dtype_promotion='strict') does not mix; cast one to the "
            f"other's dtype (e.g. b.astype({A_dtype}))"
        ) from err
    if jnp.issubdtype(dtype, jnp.complexfloating) and not solver.supports_complex:
        raise TypeError(
            f"solver {solver.name!r} does not support complex data (dtype {dtype}); use "
            "'gmres', 'bicgstab' or 'cg' (Hermitian A), or split into real and imaginary parts"
        )
    return jnp.dtype(dtype)


def real_dtype(dtype: Any) -> Any:
    """The real dtype of norms and tolerances of a ``dtype`` solve (float32 for complex64)."""
    return jnp.finfo(dtype).dtype


def vector(v: Any, n: int, name: str, dtype: Any) -> Any:
    """``v`` as a 1-D array of ``n`` entries of the solve's ``dtype`` (an explicit cast, so
    strict promotion accepts it), checked finite when concrete."""
    if isinstance(v, (list, tuple)) or isinstance(v, np.ndarray):
        v = jnp.asarray(v)
    shape = getattr(v, "shape", None)
    if shape not in ((n,), (n, 1)):
        hint = ""
        if shape is not None and len(shape) == 2 and n in shape:
            # A block of right-hand sides: in JAX that is vmap (one batched loop; the bridge
            # hands the batch to one block solve on the host).
            axis = 1 if shape[0] == n else 0
            axes = "in_axes=1, out_axes=1" if axis else "in_axes=0"
            hint = (f"; for a batch of right-hand sides use jax.vmap, e.g. jax.vmap(lambda b: "
                    f"solve(A, b, ...), {axes})({name})")
        raise ValueError(
            f"{name} must have shape ({n},) to match A of shape ({n}, {n}); got shape "
            f"{shape}{hint}"
        )
    v = v.reshape(-1).astype(dtype)
    # A concrete vector is checked on the host (jnp ops would be staged under jit); a traced
    # one that is not finite is reported by the driver as a NaN residual.
    if not is_traced(v) and not np.all(np.isfinite(np.asarray(v))):
        raise ValueError(f"{name} contains NaN or inf; pass finite values")
    return v


def controls(maxiter: Any, rtol: Any, atol: Any, adjoint_maxiter: Any, adjoint_rtol: Any,
             adjoint_atol: Any, real: Any = None) -> tuple:
    """The six run-time numbers as jax scalars (traced or not: one compilation for all):
    counts as int32, tolerances in ``real`` (the solve's real dtype; default JAX's float),
    cast explicitly so that a float64 tolerance meets float32 norms under strict promotion."""
    real = jnp.result_type(float) if real is None else real
    rtol, atol = tolerance(rtol, "rtol"), tolerance(atol, "atol")
    adjoint_maxiter = maxiter if adjoint_maxiter is None else count(adjoint_maxiter,
                                                                    "adjoint_maxiter")
    adjoint_rtol = rtol if adjoint_rtol is None else tolerance(adjoint_rtol, "adjoint_rtol")
    adjoint_atol = atol if adjoint_atol is None else tolerance(adjoint_atol, "adjoint_atol")
    return (jnp.asarray(maxiter).astype(jnp.int32), jnp.asarray(rtol).astype(real),
            jnp.asarray(atol).astype(real), jnp.asarray(adjoint_maxiter).astype(jnp.int32),
            jnp.asarray(adjoint_rtol).astype(real), jnp.asarray(adjoint_atol).astype(real))


def capacity(maxiter: Any, max_steps: Any, adjoint: str) -> int | None:
    """The static number of iterations buffers are sized for (``None``: unknown)."""
    if max_steps is not None:
        max_steps = count(max_steps, "max_steps")
        if is_traced(max_steps):
            raise TypeError("max_steps must be a static int (it sizes buffers); got a tracer")
        if not is_traced(maxiter) and maxiter > max_steps:
            raise ValueError(
                f"maxiter={maxiter} exceeds max_steps={max_steps}; raise max_steps or lower "
                "maxiter"
            )
    if not is_traced(maxiter):
        return maxiter
    if max_steps is None and adjoint == "unrolled":
        raise ValueError(
            "adjoint='unrolled' with a traced maxiter needs a static max_steps=K (the most "
            "iterations any call will run): the reverse sweep keeps one state per iteration "
            "in a buffer whose size must be known when compiling"
        )
    return max_steps


def history_size(capacity: int | None, n: int) -> int | None:
    """Entries (after the initial one) of a residual history for ``capacity`` iterations:
    at most ``max(10 n, HISTORY_FLOOR)`` (see :data:`HISTORY_FLOOR`)."""
    if capacity is None:
        return None
    return min(capacity, max(10 * n, HISTORY_FLOOR))


# -- memory ---------------------------------------------------------------------------------
def device_memory() -> int | None:
    """Bytes the default device can hold: the allocator's limit on an accelerator, the
    available host memory on CPU (``None`` if unknown)."""
    device = jax.devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # some backends do not implement memory_stats
        stats = {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def sqrt_checkpoints(capacity: int) -> int:
    """``c`` minimising the ``capacity / c + c`` states a checkpointed sweep keeps."""
    return max(1, math.isqrt(max(capacity - 1, 0)) + 1)


def tape_bytes(capacity: int, every: int, state: int) -> int:
    """Bytes of the unrolled sweep's buffers, for ``state`` bytes of the entries ``step``
    reads: ``ceil(capacity / every)`` checkpoints and (``every > 1``) a segment of
    ``every`` recomputed states."""
    slots = -(-max(capacity, 1) // every)
    return (slots + (every if every > 1 else 0)) * state


def check_memory(capacity: int, every: int, tape_state: int, limit: int | None, *,
                 maxiter_given: bool) -> None:
    """Raise before allocating a tape the device cannot hold."""
    need = tape_bytes(capacity, every, tape_state)
    if limit is None or need <= limit:
        return
    best = sqrt_checkpoints(capacity)
    least = tape_bytes(capacity, best, tape_state)
    origin = "maxiter" if maxiter_given else "the default maxiter = 10 n"
    raise MemoryError(
        f"adjoint='unrolled' needs a tape of {need:,} bytes ({capacity} iterations from "
        f"{origin} or max_steps, checkpoint_every={every}, {tape_state:,} bytes per kept "
        f"state) but the device holds {limit:,}. Lower maxiter (or max_steps for a traced "
        f"maxiter) to the iterations training needs, or set checkpoint_every={best} "
        f"({least:,} bytes, one more forward pass), or use adjoint='implicit' (O(n) memory)"
    )
