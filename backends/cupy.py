"""The CuPy backend: :class:`CupyOps`, fused stencil kernels, and the DLPack bridge to JAX.

Solvers run on CuPy through the same loop driver as on NumPy
(:mod:`prdp_ops.backends.numpy`); this module supplies what differs on a GPU:

* :class:`CupyOps` (``OPS``), the ``ops`` namespace over ``cupy``. Every inner product,
  norm and step length stays a 0-d device array, so an iteration launches kernels and never
  waits for the device. The only device-to-host reads are the ones the driver asks for:
  the convergence test, every ``check_every`` iterations (``po.solve(..., check_every=m)``).
* :func:`apply_stencil_fused`: one CUDA kernel for the matvec of
  :class:`~prdp_ops._operators.stencil.LaplacianStencil` and
  :class:`~prdp_ops._operators.stencil.DiffusionStencil`, used automatically for CuPy
  vectors. The array-expression version launches about ten kernels per axis (pad, diff,
  multiply, diff, add) and allocates as many temporaries; the fused one reads each value a
  few times from cache and writes the result once.
* The bridge for ``prdp_ops.backends.jax.solve(..., backend="cupy")``: :func:`jax_to_cupy` and
  :func:`cupy_to_jax` exchange arrays through DLPack without a copy (same device memory, no
  host round trip); :func:`device_solve`, :func:`device_solve_vjp` and :func:`device_vjp` run a
  solve and its adjoint on such arrays; :func:`xla_stream` puts CuPy's work on XLA's stream
  inside ``jax.experimental.buffer_callback``, and :func:`write_buffer` fills its outputs.

Importing this module needs ``cupy``; using it needs a CUDA GPU. :func:`gpu_unavailable_reason`
says in one line why a GPU run is impossible here (for examples and tests to skip cleanly).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

try:
    import cupy
except ImportError as _err:  # pragma: no cover - depends on the machine
    raise ImportError(
        "prdp_ops.backends.cupy needs CuPy: install it with `pip install prdp-ops[cuda12]` "
        f"(or [cuda13]) on a machine with an NVIDIA GPU ({_err})"
    ) from _err

import prdp_ops as po
from prdp_ops._array_ops import ArrayOps, array_backend_name
from prdp_ops._operators.base import LinearOperator

__all__ = [
    "OPS",
    "CupyOps",
    "apply_stencil_fused",
    "cupy_to_jax",
    "device_solve",
    "device_solve_vjp",
    "device_vjp",
    "gpu_unavailable_reason",
    "jax_callback",
    "jax_to_cupy",
    "to_cupy_operator",
    "write_buffer",
    "xla_stream",
]


# -- the ops namespace ----------------------------------------------------------------------
class CupyOps(ArrayOps):
    """:class:`~prdp_ops._array_ops.ArrayOps` for CuPy arrays.

    Reductions (``vdot``, ``norm``) return 0-d device arrays and scalar arithmetic on them
    stays on the device, so a solver step queues kernels without a host sync. The methods
    that must reach the host say so: :meth:`to_float`, :meth:`to_host` and :meth:`cond` with
    a device predicate.
    """

    name = "cupy"

    def __init__(self) -> None:
        super().__init__(cupy)

    def cond(self, pred: Any, true_fn: Callable, false_fn: Callable, *operands: Any) -> Any:
        """Run ``true_fn(*operands)`` if ``pred`` else ``false_fn(*operands)``.

        A Python (or NumPy) boolean costs nothing; a CuPy 0-d predicate is read back to the
        host, which waits for the queued kernels (solvers keep such branches out of their
        per-iteration path, or use :meth:`where`).
        """
        return true_fn(*operands) if bool(pred) else false_fn(*operands)

    def safe_divide(self, num: Any, den: Any) -> Any:
        """Return ``num / den``, or 0 where ``den == 0``, in one fused kernel.

        Solvers take two or three step lengths per iteration through this; the generic
        version costs six kernel launches each (compare, two fills, two selects, divide),
        which on a GPU weighs as much as a vector update.
        """
        if not (isinstance(num, cupy.ndarray) and isinstance(den, cupy.ndarray)):
            return super().safe_divide(num, den)
        out = cupy.empty(np.broadcast_shapes(num.shape, den.shape),
                         dtype=np.result_type(num.dtype, den.dtype))
        return _SAFE_DIVIDE(num, den, out)

    def to_float(self, a: Any) -> float:
        """Return a Python float of a 0-d array (a device-to-host sync)."""
        return float(a.get()) if isinstance(a, cupy.ndarray) else float(a)

    def to_host(self, a: Any) -> Any:
        """Return ``a`` as a NumPy array (a device-to-host copy); scipy.sparse for cupyx."""
        return a.get() if hasattr(a, "get") else np.asarray(a)

    def asarray(self, a: Any, dtype: Any = None) -> Any:
        """Convert ``a`` to a CuPy array (a host-to-device copy for host data)."""
        return cupy.asarray(a, dtype=dtype)

    def solve_triangular(self, T: Any, rhs: Any, lower: bool) -> Any:
        """Return ``y`` with ``T y = rhs`` for a triangular ``T``, on the device.

        The signature of :meth:`ArrayOps.solve_triangular`: ``T`` a dense CuPy matrix
        (``cupyx.scipy.linalg.solve_triangular``) or a cupyx.scipy.sparse matrix
        (``cupyx.scipy.sparse.linalg.spsolve_triangular`` on CSR; other formats are
        converted) holding the ``lower`` (or upper) triangle with a non-zero diagonal;
        ``rhs`` a 1-D CuPy array. No finiteness check (the driver reports divergence).
        """
        if _is_cupy_sparse(T):
            import cupyx.scipy.sparse.linalg as cupy_sparse_linalg

            matrix = T if T.format == "csr" else T.tocsr()
            return cupy_sparse_linalg.spsolve_triangular(matrix, rhs, lower=lower)
        import cupyx.scipy.linalg as cupy_linalg

        return cupy_linalg.solve_triangular(T, rhs, lower=lower, check_finite=False)


# den == 0 -> 0, else num / den, in the output's type (the result type of num and den).
_SAFE_DIVIDE = cupy.ElementwiseKernel(
    "N num, D den", "O out", "out = den == D(0) ? O(0) : O(num) / O(den)",
    name="prdp_safe_divide")

#: The instance ``prdp_ops.backends.get_ops("cupy")`` returns.
OPS = CupyOps()


def _is_cupy_sparse(a: Any) -> bool:
    return (type(a).__module__ or "").startswith("cupyx.scipy.sparse")


def gpu_unavailable_reason() -> str | None:
    """Why CuPy cannot run on a GPU here, in one line, or ``None`` when it can.

    Checks that a CUDA device answers, that memory can be allocated on it, and that the CUDA
    libraries cupyx.scipy.sparse needs (cuSPARSE, cuBLAS) load.
    """
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # any CUDA failure means: no usable GPU
        return _one_line(f"CuPy is installed but no CUDA driver/GPU answers "
                         f"({type(err).__name__}: {err})")
    if count == 0:
        return "CuPy is installed but no CUDA GPU is visible"
    try:
        import cupyx.scipy.sparse.linalg  # noqa: F401 - loads cuSPARSE and cuBLAS

        cupy.zeros(1).sum().get()
    except Exception as err:  # any CUDA failure means: no usable GPU
        return _one_line(f"the CUDA GPU is not usable from CuPy ({type(err).__name__}: {err})")
    return None


def _one_line(text: str) -> str:
    return " ".join(text.split())


# -- fused stencil kernels ------------------------------------------------------------------
# The operator is A = sum_a G_a^T diag(f_a) G_a (see prdp_ops._operators.stencil). At node k
# along axis a (stride s) it contributes
#     f_left (u_k - u_{k-1}) + f_right (u_k - u_{k+1}),
# with u = 0 beyond a Dirichlet boundary (face j joins unknowns j - 1 and j, n + 1 faces) and
# indices mod n for a periodic axis (face j joins nodes j and j + 1 mod n, n faces). One
# thread computes one output entry, so the kernel is exact, order for order, up to the order
# of the floating-point sum over axes.

_MAX_DIMS = 3


def _axis_source(a: int, boundary: str, face_array: bool, index: str) -> str:
    """CUDA source adding axis ``a``'s two face fluxes at thread ``i`` to ``acc``.

    ``index`` is the C integer type of the index arithmetic: ``int`` when every index fits
    (64-bit division is several times slower on a GPU), else ``long long``.
    """
    neighbours = (
        "const T ul = k > 0 ? u[i - s] : T(0);\n"
        "    const T ur = k < n - 1 ? u[i + s] : T(0);"
        if boundary == "dirichlet" else
        "const T ul = u[k > 0 ? i - s : i + (n - 1) * s];\n"
        "    const T ur = u[k < n - 1 ? i + s : i - (n - 1) * s];"
    )
    if not face_array:
        faces = f"const W fl = w{a};\n    const W fr = w{a};"
    elif boundary == "dirichlet":
        # The face array has n + 1 entries along this axis: outer blocks are (n + 1) s long.
        faces = (f"const {index} fb = outer * (n + 1) * s + inner;\n"
                 f"    const W fl = f{a}[fb + k * s];\n"
                 f"    const W fr = f{a}[fb + (k + 1) * s];")
    else:
        faces = (f"const {index} fb = outer * n * s + inner;\n"
                 f"    const W fl = f{a}[fb + (k > 0 ? k - 1 : n - 1) * s];\n"
                 f"    const W fr = f{a}[fb + k * s];")
    return (
        "  {\n"
        f"    const {index} n = n{a};\n"
        f"    const {index} s = stride{a};\n"
        f"    const {index} q = g / s;\n"  # g = (outer * n + k) * s + inner
        f"    const {index} inner = g - q * s;\n"
        f"    const {index} outer = q / n;\n"
        f"    const {index} k = q - outer * n;\n"
        f"    {neighbours}\n"
        f"    {faces}\n"
        "    acc += fl * (uc - ul) + fr * (uc - ur);\n"
        "  }\n"
    )


@functools.cache
def _stencil_kernel(ndim: int, boundary: str, face_array: bool, wide_index: bool) -> Any:
    """The ElementwiseKernel of one (dimension, boundary, coefficient kind, index width);
    built once.

    Inputs: the grid values ``u`` (raw, with a leading batch axis allowed), the grid sizes
    and strides, and per axis either a scalar weight ``w_a`` (the Laplacian's ``1/h_a^2``)
    or a raw face array ``f_a`` (diffusion). Output: ``y = A u``, one entry per thread.
    """
    index = "long long" if wide_index else "int"
    coefficient = "raw W f{a}" if face_array else "W w{a}"
    params = ["raw T u", "int64 grid_size"]
    for a in range(ndim):
        params += [f"int64 n{a}", f"int64 stride{a}", coefficient.format(a=a)]
    body = (
        # position in the grid (a leading batch axis peeled off)
        f"const {index} g = ({index})(i % grid_size);\n"
        "const T uc = u[i];\n"
        "T acc = T(0);\n"
        + "".join(_axis_source(a, boundary, face_array, index) for a in range(ndim))
        + "y = acc;\n"
    )
    kind = "diffusion" if face_array else "laplacian"
    width = "i64" if wide_index else "i32"
    return cupy.ElementwiseKernel(", ".join(params), "T y", body,
                                  name=f"prdp_{kind}_{ndim}d_{boundary}_{width}")


#: Grids with at least this many nodes (or face entries) index with 64-bit integers.
_WIDE_INDEX = 2**31 - 2**20


def apply_stencil_fused(faces: tuple[Any, ...], u: Any, boundary: str) -> Any:
    """``sum_a G_a^T (faces[a] * G_a u)`` over the last ``len(faces)`` axes, in one kernel.

    The drop-in replacement of :func:`prdp_ops._operators.stencil.apply_stencil` for CuPy
    arrays (same arguments, same result up to rounding).

    Parameters
    ----------
    faces
        Per axis, the face coefficients divided by ``h_a^2``: all Python/NumPy scalars (the
        Laplacian) or all CuPy arrays with the grid's shape except ``n + 1`` (Dirichlet) or
        ``n`` (periodic) entries along their axis (diffusion).
    u
        A CuPy array of shape ``(..., *grid)``, real or complex.
    boundary
        ``"dirichlet"`` or ``"periodic"``.
    """
    ndim = len(faces)
    if not 1 <= ndim <= _MAX_DIMS:
        raise ValueError(f"faces must hold one entry per grid axis (1 to 3); got {ndim}")
    grid = u.shape[-ndim:]
    u = cupy.ascontiguousarray(u)
    real = np.dtype(u.real.dtype)
    face_array = any(isinstance(face, cupy.ndarray) for face in faces)
    args: list[Any] = [u, math.prod(grid)]
    for a, face in enumerate(faces):
        stride = math.prod(grid[a + 1:])
        if not face_array:
            coefficient = real.type(face)
        elif isinstance(face, cupy.ndarray):
            coefficient = cupy.ascontiguousarray(face, dtype=real)
        else:  # a constant axis next to variable ones: spell its faces out
            n_faces = grid[a] + (1 if boundary == "dirichlet" else 0)
            coefficient = cupy.full((*grid[:a], n_faces, *grid[a + 1:]), face, dtype=real)
        args += [grid[a], stride, coefficient]
    # The largest index formed is a face index, below prod(grid) (n + 1) / n <= 2 prod(grid).
    wide_index = 2 * math.prod(grid) >= _WIDE_INDEX
    return _stencil_kernel(ndim, boundary, face_array, wide_index)(*args, cupy.empty_like(u))


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
