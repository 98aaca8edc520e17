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
  They live in :mod:`prdp_ops.backends._cupy_jax` and are re-exported here.

Importing this module needs ``cupy``; using it needs a CUDA GPU. :func:`gpu_unavailable_reason`
says in one line why a GPU run is impossible here (for examples and tests to skip cleanly).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np

try:
    import cupy
except ImportError as _err:  # pragma: no cover - depends on the machine
    raise ImportError(
        "prdp_ops.backends.cupy needs CuPy: install it with `pip install prdp-ops[cuda12]` "
        f"(or [cuda13]) on a machine with an NVIDIA GPU ({_err})"
    ) from _err

from prdp_ops.backends._cupy_jax import cupy_to_jax as cupy_to_jax
from prdp_ops.backends._cupy_jax import device_solve as device_solve
from prdp_ops.backends._cupy_jax import device_solve_vjp as device_solve_vjp
from prdp_ops.backends._cupy_jax import device_vjp as device_vjp
from prdp_ops.backends._cupy_jax import jax_callback as jax_callback
from prdp_ops.backends._cupy_jax import jax_to_cupy as jax_to_cupy
from prdp_ops.backends._cupy_jax import to_cupy_operator as to_cupy_operator
from prdp_ops.backends._cupy_jax import write_buffer as write_buffer
from prdp_ops.backends._cupy_jax import xla_stream as xla_stream

from prdp_ops._array_ops import ArrayOps

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

