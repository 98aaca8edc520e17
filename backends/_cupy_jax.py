"""The CuPy side of the JAX bridge: DLPack views, XLA's stream, and solves on device arrays.

``prdp_ops.backends.jax.solve(..., backend="cupy")`` hands its arrays to this module. They
cross by DLPack (:func:`jax_to_cupy`, :func:`cupy_to_jax`): the same device memory, no copy
and no host round trip. A solve and its adjoint run on them (:func:`device_solve`,
:func:`device_solve_vjp`, :func:`device_vjp`). Inside ``jax.experimental.buffer_callback``,
:func:`xla_stream` puts CuPy's kernels on XLA's stream so their order with XLA's own work is
the stream's order, and :func:`write_buffer` fills the callback's outputs. Re-exported by
:mod:`prdp_ops.backends.cupy`; importing it needs ``cupy``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import cupy

import prdp_ops as po
from prdp_ops._array_ops import array_backend_name
from prdp_ops._operators.base import LinearOperator


# -- the DLPack bridge to JAX ---------------------------------------------------------------
def jax_to_cupy(x: Any) -> Any:
    """A CuPy view of a JAX GPU array (or any object with ``__dlpack__``), without a copy.

    The view shares the JAX array's device memory: prdp_ops never writes to its inputs, so
    JAX's immutability is kept. CuPy's current stream waits for the array to be ready
    (DLPack's stream handshake); no data passes through the host.
    """
    if isinstance(x, cupy.ndarray):
        return x
    if hasattr(x, "__cuda_array_interface__") and not hasattr(x, "block_until_ready"):
        # buffer_callback's Buffer: a raw device buffer on XLA's stream (see xla_stream).
        return cupy.asarray(x)
    return cupy.from_dlpack(x)


def cupy_to_jax(x: Any) -> Any:
    """A JAX array sharing a CuPy array's device memory (DLPack), without a copy.

    CuPy's current stream is synchronised first, so the JAX array is complete when JAX,
    which computes on its own stream, reads it. That is a wait for the GPU, not a transfer.
    The JAX array keeps ``x``'s memory alive; neither side writes to it afterwards.
    """
    import jax.dlpack

    x = cupy.ascontiguousarray(x)
    cupy.cuda.get_current_stream().synchronize()
    return jax.dlpack.from_dlpack(x)


@contextlib.contextmanager
def xla_stream(ctx: Any) -> Iterator[None]:
    """Run CuPy work on XLA's CUDA stream, inside a ``buffer_callback``.

    ``jax.experimental.buffer_callback`` hands its callback an ``ExecutionContext`` whose
    ``stream`` is the stream XLA orders the surrounding computation on. Queuing CuPy's
    kernels there keeps the callback's reads after JAX's writes of the inputs, and JAX's
    reads after the callback's writes of the outputs, with no extra synchronisation.
    """
    with _external_stream(int(ctx.stream)):
        yield


class _StreamHandle:
    """A raw ``cudaStream_t`` address behind the CUDA stream protocol."""

    def __init__(self, address: int) -> None:
        self.address = address

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.address)


def _external_stream(address: int) -> Any:
    """A CuPy stream object for a stream CuPy does not own (CuPy 14's API, or 13's)."""
    if hasattr(cupy.cuda.Stream, "from_external"):
        return cupy.cuda.Stream.from_external(_StreamHandle(address))
    return cupy.cuda.ExternalStream(address)


def write_buffer(out: Any, value: Any) -> None:
    """Copy a CuPy array into a ``buffer_callback`` output buffer (device to device)."""
    target = cupy.asarray(out)
    target[...] = value.reshape(target.shape)


def jax_callback(fn: Callable[..., Any], result_shape_dtypes: Any, *args: Any,
                 vmap_method: str | None = None) -> Any:
    """Call ``fn`` on CuPy views of JAX device arrays from traced JAX code.

    The contract of ``jax.pure_callback`` (``fn`` is pure, its outputs match
    ``result_shape_dtypes``), except that ``fn`` receives and returns CuPy arrays sharing
    memory with XLA's buffers: built on ``jax.experimental.buffer_callback``, whose buffers
    are exchanged by DLPack and written in place on XLA's stream, so no data passes through
    the host. The JAX bridge's ``backend="cupy"`` uses it.
    """
    import jax
    from jax.experimental.buffer_callback import buffer_callback

    def run_on_device(ctx: Any, out: Any, *buffers: Any) -> None:
        with xla_stream(ctx):
            results = fn(*jax.tree.map(jax_to_cupy, buffers))
            jax.tree.map(lambda target, value: write_buffer(target, cupy.asarray(value)),
                         out, results)

    return buffer_callback(run_on_device, result_shape_dtypes,
                           vmap_method=vmap_method)(*args)


class _SparseFromBCOO:
    """A jax ``BCOO`` matrix as a canonical cupyx CSR matrix, and its cotangent map back.

    CSR stores each ``(row, col)`` once, in row-major order; BCOO may hold entries in any
    order and repeat them (repeats add up). ``order`` sorts the BCOO entries into row-major
    order and ``group`` numbers the distinct positions, so a CSR ``data`` cotangent maps back
    to BCOO ``data`` order as ``bar_bcoo[order] = bar_csr[group]`` (a repeated entry
    receives its sum's cotangent).
    """

    def __init__(self, bcoo: Any) -> None:
        import cupyx
        import cupyx.scipy.sparse as cupy_sparse

        data = jax_to_cupy(bcoo.data)
        indices = jax_to_cupy(bcoo.indices)
        rows, cols = indices[:, 0].astype(cupy.int64), indices[:, 1].astype(cupy.int64)
        n_rows = bcoo.shape[0]
        self.order = cupy.lexsort(cupy.stack([cols, rows]))  # by row, then column
        rows, cols = rows[self.order], cols[self.order]
        new = cupy.ones(rows.shape, dtype=bool)
        new[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])
        self.group = cupy.cumsum(new) - 1
        n_unique = int(self.group[-1].get()) + 1 if rows.size else 0  # one-off sizing read
        values = cupy.zeros(n_unique, dtype=data.dtype)
        cupyx.scatter_add(values, self.group, data[self.order])
        unique_rows, unique_cols = rows[new], cols[new]
        indptr = cupy.zeros(n_rows + 1, dtype=cupy.int64)
        indptr[1:] = cupy.cumsum(cupy.bincount(unique_rows, minlength=n_rows))
        self.matrix = cupy_sparse.csr_matrix((values, unique_cols, indptr), shape=bcoo.shape)

    def data_cotangent(self, csr_bar: Any) -> Any:
        """The cotangent of the BCOO ``data`` from that of the CSR ``data``."""
        out = cupy.empty(self.order.shape, dtype=csr_bar.dtype)
        out[self.order] = csr_bar[self.group]
        return out


class _DeviceOperator:
    """An operator moved to CuPy, and how its cotangent returns to the caller's form."""

    def __init__(self, A: Any) -> None:
        self.kind, self.bcoo, self.source = "operator", None, A
        if isinstance(A, LinearOperator):
            params = A.parameters()
            moved = {k: jax_to_cupy(v) for k, v in params.items()
                     if array_backend_name(v) == "jax"}
            self.operator = A.with_parameters({**params, **moved}) if moved else A
            self.kind = "jax_operator" if moved else "operator"
        elif (type(A).__module__ or "").startswith("jax.experimental.sparse"):
            self.bcoo = _SparseFromBCOO(A)
            self.operator = po.aslinearoperator(self.bcoo.matrix)
            self.kind = "bcoo"
        elif array_backend_name(A) == "jax":
            self.operator = po.DenseOperator(jax_to_cupy(A))
            self.kind = "jax_dense"
        else:
            self.operator = po.aslinearoperator(A)

    def cotangent(self, A_bar: Any) -> Any:
        """Cotangent of ``A`` in the caller's form: JAX arrays for JAX inputs.

        A dense JAX matrix gets a JAX matrix; a BCOO matrix a BCOO matrix with its indices;
        a :class:`~prdp_ops.LinearOperator` holding JAX arrays a dict of JAX arrays (its
        parameters' cotangents); CuPy inputs get CuPy cotangents, as ``po.solve_vjp`` gives.
        """
        if A_bar is None or self.kind == "operator":
            return A_bar
        if self.kind == "jax_dense":
            return cupy_to_jax(A_bar)
        if self.kind == "bcoo":
            from jax.experimental import sparse as jax_sparse

            data_bar = cupy_to_jax(self.bcoo.data_cotangent(A_bar.data))
            return jax_sparse.BCOO((data_bar, self.source.indices), shape=self.source.shape)
        if isinstance(A_bar, dict):  # a parameterised operator's cotangents, by name
            return {k: cupy_to_jax(v) for k, v in A_bar.items()}
        return cupy_to_jax(A_bar)  # a DenseOperator's cotangent is its matrix


def to_cupy_operator(A: Any) -> LinearOperator:
    """``A`` as a :class:`~prdp_ops.LinearOperator` on CuPy arrays, sharing device memory.

    Takes a dense JAX array, a jax ``BCOO`` matrix (converted to CSR on the device), a
    :class:`~prdp_ops.LinearOperator` holding JAX or CuPy arrays (JAX parameters are
    viewed as CuPy ones), or anything :func:`prdp_ops.aslinearoperator` takes.
    """
    return _DeviceOperator(A).operator


def _device_vector(v: Any) -> Any:
    return None if v is None else jax_to_cupy(v)


def device_solve(A: Any, b: Any, solver: Any = "cg", *, to_jax: bool = True,
                 **solve_options: Any) -> tuple[Any, po.SolveResult]:
    """``po.solve`` on the GPU for JAX (or CuPy) arrays: no host copy on the way in or out.

    Parameters
    ----------
    A
        See :func:`to_cupy_operator`.
    b
        The right-hand side: a JAX GPU array, a ``buffer_callback`` buffer or a CuPy array.
    solver
        A registered solver name or instance.
    to_jax
        Return ``x`` as a JAX array (True) or as a CuPy array (False, e.g. to
        :func:`write_buffer` it).
    **solve_options
        The options of :func:`prdp_ops.solve` (``maxiter``, ``rtol``, ``atol``, ``x0``,
        ``M``, ``check_every``, ``on_failure``, solver options).

    Returns
    -------
    (x, result)
        The solution and the :class:`~prdp_ops.SolveResult` (``result.x`` is the CuPy array).
    """
    options = _moved_options(solve_options)
    result = po.solve(to_cupy_operator(A), jax_to_cupy(b), solver, **options)
    return (cupy_to_jax(result.x) if to_jax else result.x), result


def device_solve_vjp(A: Any, b: Any, solver: Any = "cg", *, to_jax: bool = True,
                     **solve_vjp_options: Any) -> tuple[Any, po.SolveResult, Callable]:
    """``po.solve_vjp`` on the GPU for JAX (or CuPy) arrays, all on the device.

    Returns ``(x, result, vjp)`` with ``vjp(x_bar, *, need_A=True) -> (b_bar, A_bar)``:
    ``x_bar`` a JAX or CuPy array; ``b_bar`` a JAX array (CuPy with ``to_jax=False``);
    ``A_bar`` in the form :meth:`_DeviceOperator.cotangent` describes, or ``None`` with
    ``need_A=False`` (then it is not computed: for an unrolled solve that saves about one
    matvec per iteration). Options are those of
    :func:`prdp_ops.solve_vjp` (``adjoint``, ``adjoint_maxiter``, ...).
    """
    moved = _DeviceOperator(A)
    options = _moved_options(solve_vjp_options)
    result, vjp = po.solve_vjp(moved.operator, jax_to_cupy(b), solver, **options)

    def device_vjp_fn(x_bar: Any, *, need_A: bool = True) -> tuple[Any, Any]:
        cotangents = vjp(jax_to_cupy(x_bar))
        return _returned(cotangents, moved, to_jax, need_A)

    return (cupy_to_jax(result.x) if to_jax else result.x), result, device_vjp_fn


def device_vjp(A: Any, b: Any, x: Any, x_bar: Any, solver: Any = "cg", *,
               adjoint: str = "implicit", maxiter: int | None = None, rtol: float = 1e-5,
               atol: float = 0.0, adjoint_maxiter: int | None = None,
               adjoint_rtol: float | None = None, adjoint_atol: float | None = None,
               adjoint_solver: Any = None, to_jax: bool = True, need_A: bool = True,
               **solve_options: Any) -> tuple[Any, Any]:
    """The backward pass alone, for a bridge whose forward ran in an earlier callback.

    Given the forward's solution ``x`` and its cotangent ``x_bar``, return ``(b_bar, A_bar)``
    exactly as ``device_solve_vjp(A, b, ...)[2](x_bar)`` would, without keeping anything
    between the two callbacks:

    * ``"implicit"`` needs only ``x``: the forward is not re-run (the solve starts at ``x``
      with ``maxiter=0``, one residual evaluation), then one adjoint solve with the
      adjoint settings, which default to the forward's ``maxiter``/``rtol``/``atol``.
    * ``"unrolled"`` needs the forward's tape: the forward is re-run from ``b`` (the same
      arithmetic on the same device, so the same iterates) and swept in reverse.
    * ``"none"`` returns zero cotangents.

    Parameters
    ----------
    A, b, solver, maxiter, rtol, atol, **solve_options
        The forward solve's arguments, as given to :func:`device_solve`.
    x, x_bar
        The forward's solution and its cotangent (JAX, buffer or CuPy arrays).
    adjoint, adjoint_maxiter, adjoint_rtol, adjoint_atol, adjoint_solver
        As :func:`prdp_ops.solve_vjp`.
    to_jax, need_A
        As for the ``vjp`` of :func:`device_solve_vjp`.
    """
    forward = {"maxiter": maxiter, "rtol": rtol, "atol": atol}
    adjoint_settings = {"adjoint_solver": adjoint_solver,
                        "adjoint_rtol": rtol if adjoint_rtol is None else adjoint_rtol,
                        "adjoint_atol": atol if adjoint_atol is None else adjoint_atol,
                        "adjoint_maxiter": maxiter if adjoint_maxiter is None
                        else adjoint_maxiter}
    if adjoint == "implicit":
        # x0 = x with no iteration returns x itself; only the adjoint solve does work.
        forward = {"maxiter": 0, "rtol": 0.0, "atol": 0.0, "x0": x}
        solve_options = {k: v for k, v in solve_options.items() if k != "x0"}
        if adjoint_settings["adjoint_maxiter"] is None:
            # po.solve_vjp's default adjoint maxiter is the forward's (here 0): restore the
            # default of the original forward, 10 n.
            adjoint_settings["adjoint_maxiter"] = 10 * _size(b)
    _, _, vjp = device_solve_vjp(A, b, solver, adjoint=adjoint, to_jax=to_jax,
                                 **forward, **adjoint_settings, **solve_options)
    return vjp(x_bar, need_A=need_A)


def _size(b: Any) -> int:
    return math.prod(getattr(b, "shape", ()))


def _moved_options(options: dict[str, Any]) -> dict[str, Any]:
    """Solve options with their JAX arrays (``x0``, ``M``) viewed as CuPy ones."""
    moved = dict(options)
    if moved.get("x0") is not None:
        moved["x0"] = _device_vector(moved["x0"])
    if moved.get("M") is not None:
        moved["M"] = to_cupy_operator(moved["M"])
    return moved


def _returned(cotangents: po.Cotangents, moved: _DeviceOperator, to_jax: bool,
              need_A: bool) -> tuple:
    # Cotangents.A is computed on first access: touch it only when it is wanted.
    if not to_jax:
        return cotangents.b, (cotangents.A if need_A else None)
    return cupy_to_jax(cotangents.b), (moved.cotangent(cotangents.A) if need_A else None)
