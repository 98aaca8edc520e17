"""The CuPy backend.

Two groups of tests:

* **Everywhere** (no GPU needed): importing prdp_ops does not import cupy; ``get_ops("cupy")``
  fails with an install hint when cupy is missing; the GPU examples and the benchmark exit
  with a one-line explanation (no traceback) when cupy or a GPU is absent; and the CUDA
  source of the fused stencil kernels, compiled for the CPU with a C++ compiler, computes
  the same ``A u`` as the array-expression stencil (so the kernels' index arithmetic is
  checked on every machine, not only on GPU machines).
* **On a GPU** (skipped with a reason otherwise): the shared solver cases on CuPy arrays and
  cupyx sparse matrices in every adjoint mode against NumPy runs and dense direct solves,
  the fused kernels against the NumPy stencil, the convergence test's host syncs counted,
  and the DLPack bridge (zero-copy in both directions).
"""

from __future__ import annotations

import ctypes
import importlib.util
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
from helpers import (
    ADJOINT_MODES,
    HAS_CUPY,
    SOLVER_CASES,
    agree_tol,
    assert_agree,
    poisson_2d,
    random_vector,
    to_backend,
    to_numpy,
)

import prdp_ops as po
from prdp_ops._operators.stencil import (
    DiffusionStencil,
    LaplacianStencil,
    _node_means,
    apply_stencil,
)

ROOT = Path(__file__).resolve().parents[1]
BACKEND_SOURCE = ROOT / "backends" / "cupy.py"
GPU_SCRIPTS = ["examples/cupy_gpu_poisson.py", "examples/cupy_gpu_training.py",
               "benchmarks/cupy_vs_cupyx.py"]
needs_gpu = [pytest.mark.gpu,
             pytest.mark.skipif(not HAS_CUPY,
                                reason="cupy with a CUDA GPU is not available on this machine")]


def run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


# Makes `import cupy` fail in the child, as on a machine without it.
BLOCK_CUPY = "import sys; sys.modules['cupy'] = None; sys.modules['cupyx'] = None\n"


# == everywhere ===============================================================================
def test_importing_prdp_ops_and_solving_on_numpy_does_not_import_cupy():
    code = (
        "import sys, numpy as np, prdp_ops as po\n"
        "from prdp_ops._operators.stencil import LaplacianStencil\n"
        "A = LaplacianStencil((6, 6))\n"
        "r, vjp = po.solve_vjp(A, np.ones(36), rtol=1e-8)\n"
        "vjp(np.ones(36))\n"
        "assert r.converged\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('cupy', 'cupyx')))\n"
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_get_ops_cupy_without_cupy_raises_an_install_hint():
    code = BLOCK_CUPY + (
        "from prdp_ops.backends import get_ops\n"
        "try:\n"
        "    get_ops('cupy')\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert "needs CuPy" in done.stdout and "pip install prdp-ops[cuda12]" in done.stdout


@pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="cupy is not installed")
def test_get_ops_cupy_returns_the_cupy_namespace():
    from prdp_ops.backends import get_ops

    ops = get_ops("cupy")
    assert ops.name == "cupy" and ops.xp.__name__ == "cupy"


def _assert_one_line_exit(done: subprocess.CompletedProcess, script: str) -> None:
    assert done.returncode == 0, f"{script}: exit {done.returncode}\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, done.stdout
    assert "GPU" in lines[0] or "CuPy" in lines[0]


@pytest.mark.parametrize("script", GPU_SCRIPTS)
def test_gpu_scripts_exit_with_one_line_without_cupy(script):
    code = BLOCK_CUPY + "import runpy, sys\nsys.argv = [sys.argv[1]]\n" \
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    done = run_python(code, str(ROOT / script))
    _assert_one_line_exit(done, script)
    assert "CuPy" in done.stdout


@pytest.mark.skipif(HAS_CUPY, reason="a GPU is present: the scripts run for real")
@pytest.mark.parametrize("script", GPU_SCRIPTS)
def test_gpu_scripts_exit_with_one_line_on_this_machine(script):
    done = subprocess.run([sys.executable, str(ROOT / script)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    _assert_one_line_exit(done, script)


# -- the fused kernels' CUDA source, compiled for the CPU ------------------------------------
class _RecordedKernel:
    """Stands in for cupy.ElementwiseKernel: keeps the source instead of compiling it."""

    def __init__(self, in_params: str, out_params: str, operation: str, name: str) -> None:
        self.in_params, self.out_params, self.operation, self.name = (
            in_params, out_params, operation, name)


def _load_with_stub_cupy(source: Path, name: str) -> Any:
    """``source`` loaded against a stub cupy, under the private module name ``name``.

    Every module the load imports that was not imported before (backends/cupy.py imports
    ``_cupy_jax``) is dropped again, so no stub-bound module outlives the load."""
    stub = types.ModuleType("cupy")
    stub.ElementwiseKernel = _RecordedKernel
    stub.ndarray = type("ndarray", (), {})
    before = dict(sys.modules)
    sys.modules["cupy"] = stub
    try:
        spec = importlib.util.spec_from_file_location(name, source)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for key in set(sys.modules) - set(before):
            del sys.modules[key]
        sys.modules.update(before)
        if "cupy" not in before:
            sys.modules.pop("cupy", None)
    return module


def _kernel_sources() -> Any:
    """backends/cupy.py loaded against a stub cupy, under a private module name."""
    return _load_with_stub_cupy(BACKEND_SOURCE, "_cupy_kernel_sources")


_HARNESS = """
#include <complex>
typedef {T} T;
typedef {W} W;
extern "C" void run({params}, T* out, long long total) {{
  for (long long i = 0; i < total; ++i) {{
    T y;
    {body}
    out[i] = y;
  }}
}}
"""


def _c_params(in_params: str) -> list[str]:
    """ElementwiseKernel parameters as C parameters (raw arrays become pointers)."""
    out = []
    for param in in_params.split(", "):
        words = param.split()
        raw = words[0] == "raw"
        ctype, name = words[-2], words[-1]
        ctype = {"int64": "long long"}.get(ctype, ctype)
        out.append(f"const {ctype}* {name}" if raw else f"{ctype} {name}")
    return out


@pytest.fixture(scope="module")
def compiled_kernels(tmp_path_factory):
    """Compile each generated kernel for the CPU once per (ndim, boundary, faces, dtype)."""
    if shutil.which("g++") is None:
        pytest.skip("no C++ compiler (g++) to compile the kernel source for the CPU")
    module = _kernel_sources()
    build = tmp_path_factory.mktemp("kernels")
    cache: dict[tuple, Any] = {}

    def get(ndim: int, boundary: str, face_array: bool, complex_values: bool,
            wide_index: bool) -> Any:
        key = (ndim, boundary, face_array, complex_values, wide_index)
        if key not in cache:
            kernel = module._stencil_kernel(ndim, boundary, face_array, wide_index)
            source = _HARNESS.format(
                T="std::complex<double>" if complex_values else "double", W="double",
                params=", ".join(_c_params(kernel.in_params)), body=kernel.operation)
            stem = build / f"{kernel.name}_{int(complex_values)}"
            stem.with_suffix(".cpp").write_text(source)
            subprocess.run(["g++", "-O0", "-shared", "-fPIC", "-o", str(stem) + ".so",
                            str(stem) + ".cpp"], check=True, capture_output=True)
            cache[key] = ctypes.CDLL(str(stem) + ".so").run
        return cache[key]

    return get


def _run_compiled(compiled, faces, u, boundary, wide_index):
    """Call a CPU-compiled kernel the way apply_stencil_fused calls the CUDA one."""
    ndim = len(faces)
    grid = u.shape[-ndim:]
    face_array = isinstance(faces[0], np.ndarray)
    complex_values = np.iscomplexobj(u)
    fn = compiled(ndim, boundary, face_array, complex_values, wide_index)
    keep = [np.ascontiguousarray(u)]
    args: list[Any] = [keep[0].ctypes.data_as(ctypes.c_void_p),
                       ctypes.c_longlong(int(np.prod(grid)))]
    for a, face in enumerate(faces):
        args += [ctypes.c_longlong(grid[a]), ctypes.c_longlong(int(np.prod(grid[a + 1:])))]
        if face_array:
            keep.append(np.ascontiguousarray(face, dtype=np.float64))
            args.append(keep[-1].ctypes.data_as(ctypes.c_void_p))
        else:
            args.append(ctypes.c_double(face))
    out = np.empty_like(keep[0])
    fn(*args, out.ctypes.data_as(ctypes.c_void_p), ctypes.c_longlong(u.size))
    return out


@pytest.mark.parametrize("grid", [(9,), (5, 7), (4, 3, 5)], ids=lambda g: f"{len(g)}d")
@pytest.mark.parametrize("boundary", ["dirichlet", "periodic"])
@pytest.mark.parametrize("kind", ["laplacian", "diffusion"])
# Each complex or 64-bit-index variant is one more g++ compile (~1 s each, 24 in all): those
# run in the slow step, real and batched values (12 compiles) by default.
@pytest.mark.parametrize("values", ["real", pytest.param("complex", marks=pytest.mark.slow),
                                    "batched",
                                    pytest.param("real, 64-bit index", marks=pytest.mark.slow)])
def test_fused_kernel_source_equals_array_stencil(compiled_kernels, grid, boundary, kind,
                                                  values):
    """The generated CUDA body, run on the CPU, equals ``apply_stencil`` (which the stencil
    tests check against matrices assembled node by node)."""
    rng = np.random.default_rng(len(grid))
    grid = tuple(g if boundary == "dirichlet" else max(g, 3) for g in grid)
    spacing = tuple(0.5 + 0.25 * a for a in range(len(grid)))
    if kind == "laplacian":
        faces = tuple(1.0 / h**2 for h in spacing)
    else:
        c = rng.uniform(0.5, 2.0, grid)
        faces = tuple(_node_means(np, c, a - len(grid), boundary) / h**2
                      for a, h in enumerate(spacing))
    shape = (3, *grid) if values == "batched" else grid
    wide_index = values.endswith("64-bit index")
    u = rng.standard_normal(shape)
    if values == "complex":
        u = u + 1j * rng.standard_normal(shape)
    expected = apply_stencil(np, faces, u, boundary)
    got = _run_compiled(compiled_kernels, faces, u, boundary, wide_index)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


_SAFE_DIVIDE_HARNESS = """
#include <complex>
typedef {T} N;
typedef {T} D;
typedef {T} O;
extern "C" void run(const N* num, const D* den, O* result, long long size) {{
  for (long long i = 0; i < size; ++i) {{
    O out;
    const N num_i = num[i];
    const D den_i = den[i];
    {body};  // CuPy appends the ';' to an ElementwiseKernel's operation
    result[i] = out;
  }}
}}
"""


@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
def test_safe_divide_kernel_source_equals_generic_safe_divide(tmp_path, dtype):
    """CupyOps.safe_divide's one-kernel body, run on the CPU, equals ArrayOps.safe_divide."""
    if shutil.which("g++") is None:
        pytest.skip("no C++ compiler (g++) to compile the kernel source for the CPU")
    body = _kernel_sources()._SAFE_DIVIDE.operation
    body = body.replace("num", "num_i").replace("den", "den_i")
    ctype = "std::complex<double>" if dtype == np.complex128 else "double"
    source = tmp_path / "safe_divide.cpp"
    source.write_text(_SAFE_DIVIDE_HARNESS.format(T=ctype, body=body))
    subprocess.run(["g++", "-O0", "-shared", "-fPIC", "-o", str(tmp_path / "sd.so"),
                    str(source)], check=True, capture_output=True)
    fn = ctypes.CDLL(str(tmp_path / "sd.so")).run
    num = np.array([1.0, -2.0, 0.0, 3.0, 5.0], dtype=dtype) * (1 + 1j if dtype == np.complex128
                                                               else 1)
    den = np.array([2.0, 0.0, 0.0, -4.0, 1e-300], dtype=dtype)
    got = np.empty_like(num)
    fn(num.ctypes.data_as(ctypes.c_void_p), den.ctypes.data_as(ctypes.c_void_p),
       got.ctypes.data_as(ctypes.c_void_p), ctypes.c_longlong(num.size))
    from prdp_ops._array_ops import NumpyOps

    with np.errstate(over="ignore"):
        expected = NumpyOps().safe_divide(num, den)
    np.testing.assert_array_equal(got, expected)


# -- the bridge's solve/adjoint logic, on NumPy arrays -----------------------------------------
@pytest.fixture
def bridge_on_host():
    """backends/_cupy_jax.py (the bridge functions backends/cupy.py re-exports) with the
    device hand-off made the identity, so they run on NumPy arrays here (the zero-copy
    hand-off itself is tested on a GPU)."""
    module = _load_with_stub_cupy(BACKEND_SOURCE.with_name("_cupy_jax.py"), "_cupy_bridge_on_host")
    module.jax_to_cupy = lambda x: x
    return module


@pytest.mark.parametrize("adjoint", ["implicit", "unrolled", "none"])
@pytest.mark.parametrize("solver", ["cg", "bicgstab"])
def test_device_vjp_without_the_forward_state_equals_solve_vjp(bridge_on_host, adjoint,
                                                                solver):
    """The backward callback (given only x and x_bar) returns exactly what po.solve_vjp's
    vjp returns: implicit mode starts at x and runs no forward iteration; unrolled mode
    re-runs the same forward."""
    A = poisson_2d(6).toarray()
    b, x_bar = random_vector(36), random_vector(36, seed=4)
    opts = {"rtol": 1e-6, "maxiter": 30}
    result, vjp = po.solve_vjp(A, b, solver, adjoint=adjoint, adjoint_maxiter=25, **opts)
    expected = vjp(x_bar)
    b_bar, A_bar = bridge_on_host.device_vjp(A, b, result.x, x_bar, solver, adjoint=adjoint,
                                             adjoint_maxiter=25, to_jax=False, **opts)
    np.testing.assert_array_equal(b_bar, expected.b)
    np.testing.assert_array_equal(A_bar, expected.A)


def test_device_solve_vjp_on_host_arrays_equals_solve_vjp(bridge_on_host):
    A = poisson_2d(6)
    b, x_bar = random_vector(36), random_vector(36, seed=4)
    x, result, vjp = bridge_on_host.device_solve_vjp(A, b, rtol=1e-8, to_jax=False)
    expected_result, expected_vjp = po.solve_vjp(A, b, rtol=1e-8)
    np.testing.assert_array_equal(x, expected_result.x)
    assert result.iterations == expected_result.iterations
    b_bar, A_bar = vjp(x_bar)
    expected = expected_vjp(x_bar)
    np.testing.assert_array_equal(b_bar, expected.b)
    np.testing.assert_array_equal(A_bar.toarray(), expected.A.toarray())
    b_bar_only, no_A = vjp(x_bar, need_A=False)
    assert no_A is None
    np.testing.assert_array_equal(b_bar_only, expected.b)


# == on a GPU ================================================================================
@pytest.fixture
def cp():
    import cupy

    return cupy


def _implemented(case) -> bool:
    try:
        po.solve(np.eye(3) * 2.0, np.ones(3), case.name, maxiter=1, **case.options)
    except NotImplementedError:
        return False
    return True


@pytest.mark.parametrize("case", SOLVER_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("mode", ADJOINT_MODES)
@pytest.mark.parametrize("matrix", ["dense", "cupyx_csr"])
@pytest.mark.parametrize("backend", [pytest.param("cupy", marks=needs_gpu)])
def test_shared_cases_on_cupy_match_dense_reference(case, mode, matrix, backend):
    """Every solver x adjoint mode on CuPy arrays and cupyx CSR: the solution and the
    cotangents equal the dense direct solve's (as on NumPy), and they stay on the device."""
    if not _implemented(case):
        pytest.skip(f"{case.name} is not implemented yet")
    import cupy

    n = 8
    A_host = case.matrix_for(n)
    b_host, x_bar_host = random_vector(n), random_vector(n, seed=4)
    A = to_backend(sp.csr_matrix(A_host) if matrix == "cupyx_csr" else A_host, backend)
    b, x_bar = to_backend(b_host, backend), to_backend(x_bar_host, backend)
    result, vjp = po.solve_vjp(A, b, case.name, adjoint=mode, rtol=1e-13, maxiter=4000,
                               **case.options)
    cot = vjp(x_bar)
    assert isinstance(result.x, cupy.ndarray) and isinstance(cot.b, cupy.ndarray)
    x = np.linalg.solve(A_host, b_host)
    np.testing.assert_allclose(to_numpy(result.x), x, rtol=1e-9, atol=1e-11)
    A_bar = to_numpy(cot.A)
    A_bar = A_bar.toarray() if sp.issparse(A_bar) else A_bar
    if mode == "none":
        assert np.all(to_numpy(cot.b) == 0) and np.all(A_bar == 0)
        return
    lam = np.linalg.solve(A_host.T, x_bar_host)
    expected_A_bar = -np.outer(lam, x)
    if matrix == "cupyx_csr":  # the sparse cotangent is restricted to A's pattern
        expected_A_bar = np.where(A_host != 0, expected_A_bar, 0.0)
    if mode == "unrolled" and case.name == "cg":  # see test_core: symmetric part only
        A_bar, expected_A_bar = (A_bar + A_bar.T) / 2, (expected_A_bar + expected_A_bar.T) / 2
    np.testing.assert_allclose(to_numpy(cot.b), lam, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(A_bar, expected_A_bar, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.complex128])
@pytest.mark.parametrize("backend", [pytest.param("cupy", marks=needs_gpu)])
def test_cg_on_cupy_equals_cg_on_numpy_iterate_for_iterate(dtype, backend):
    """Same arithmetic on both backends: the residual histories agree to rounding."""
    A_host = poisson_2d(12).astype(dtype)
    b_host = random_vector(144, dtype=dtype)
    opts = {"rtol": 0.0, "atol": 0.0, "maxiter": 25}
    ours = po.solve(to_backend(A_host, backend), to_backend(b_host, backend), **opts)
    ref = po.solve(A_host, b_host, **opts)
    # The GPU's reductions sum in other orders. 25 steps on 144 unknowns is before CG loses
    # orthogonality, so x and the recurrence's residual norms (relative to ||b||) agree to
    # eps cond k, normwise; an entrywise rtol is not what rounding bounds.
    tol = agree_tol(dtype, np.linalg.cond(A_host.toarray()), opts["maxiter"])
    assert_agree(to_numpy(ours.residual_norms), ref.residual_norms, tol)
    assert_agree(to_numpy(ours.x), ref.x, tol)


@pytest.mark.parametrize("grid", [(64, 48), (16, 12, 10)], ids=["2d", "3d"])
@pytest.mark.parametrize("boundary", ["dirichlet", "periodic"])
@pytest.mark.parametrize("backend", [pytest.param("cupy", marks=needs_gpu)])
def test_fused_stencil_kernels_on_gpu_equal_numpy(grid, boundary, backend, cp):
    """The stencil operators on CuPy run the fused kernel and equal the NumPy stencil, for
    matvec, matmat (batched) and the diffusion coefficient's cotangent."""
    rng = np.random.default_rng(0)
    n = int(np.prod(grid))
    c_host = rng.uniform(0.5, 2.0, grid)
    u_host, w_host = rng.standard_normal(n), rng.standard_normal(n)
    U_host = rng.standard_normal((n, 3))
    for make in (lambda c: LaplacianStencil(grid, boundary=boundary, spacing=0.3),
                 lambda c: DiffusionStencil(c, boundary=boundary, spacing=0.3)):
        ref, dev = make(c_host), make(cp.asarray(c_host))
        np.testing.assert_allclose(dev.matvec(cp.asarray(u_host)).get(), ref.matvec(u_host),
                                   rtol=1e-12, atol=1e-10)
        np.testing.assert_allclose(dev.matmat(cp.asarray(U_host)).get(), ref.matmat(U_host),
                                   rtol=1e-12, atol=1e-10)
        for key, value in ref.param_vjp(u_host, w_host).items():
            got = dev.param_vjp(cp.asarray(u_host), cp.asarray(w_host))[key].get()
            np.testing.assert_allclose(got, value, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", [pytest.param("cupy", marks=needs_gpu)])
def test_diffusion_gradient_on_cupy_matches_numpy(backend, cp):
    """The implicit gradient w.r.t. the coefficient field, on the GPU, equals NumPy's."""
    rng = np.random.default_rng(1)
    c_host = rng.uniform(0.5, 2.0, (24, 20))
    b_host, x_bar_host = rng.standard_normal(480), rng.standard_normal(480)
    grads = []
    for c, b, x_bar in ((c_host, b_host, x_bar_host),
                        (cp.asarray(c_host), cp.asarray(b_host), cp.asarray(x_bar_host))):
        _, vjp = po.solve_vjp(DiffusionStencil(c), b, rtol=1e-12, maxiter=2000)
        grads.append(to_numpy(vjp(x_bar).A["c"]))
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("check_every", [1, 10])
@pytest.mark.parametrize("backend", [pytest.param("cupy", marks=needs_gpu)])
def test_host_syncs_happen_only_at_convergence_checks(check_every, backend, cp):
    """The loop reads the device only when it tests convergence: about maxiter / m reads."""
    from prdp_ops.backends import cupy as cupy_backend
    from prdp_ops.backends.numpy import run_solver

    reads = []

    class CountingOps(cupy_backend.CupyOps):
        def to_float(self, a):
            reads.append(1)
            return super().to_float(a)

        def cond(self, pred, true_fn, false_fn, *operands):
            if isinstance(pred, cp.ndarray):
                reads.append(1)
            return super().cond(pred, true_fn, false_fn, *operands)

    A = po.aslinearoperator(to_backend(poisson_2d(16), backend))
    b = cp.ones(256)
    maxiter = 40
    run_solver(po.get_solver("cg"), CountingOps(), A, b, cp.zeros(256), None,
               maxiter=maxiter, tol=1e-30, check_every=check_every)
    # one read before the loop; per check: the finiteness test and the convergence test
    assert len(reads) <= 1 + 2 * (maxiter // check_every + 1)


@pytest.mark.parametrize("backend", [pytest.param("cupy", marks=needs_gpu)])
def test_dlpack_bridge_is_zero_copy_both_ways(backend, cp):
    jax = pytest.importorskip("jax")
    if not any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("jax has no GPU device here (a CUDA-enabled jaxlib is needed)")
    import jax.numpy as jnp
    from prdp_ops.backends.cupy import cupy_to_jax, device_solve_vjp, jax_to_cupy

    x_jax = jnp.arange(1000.0)
    as_cupy = jax_to_cupy(x_jax)
    assert as_cupy.data.ptr == x_jax.unsafe_buffer_pointer()
    back = cupy_to_jax(as_cupy)
    assert back.unsafe_buffer_pointer() == as_cupy.data.ptr
    A = jnp.asarray(poisson_2d(8).toarray())
    b, x_bar = jnp.ones(64, dtype=A.dtype), jnp.ones(64, dtype=A.dtype)
    single = A.dtype == jnp.float32  # unless the process enabled jax_enable_x64
    with jax.transfer_guard("disallow"):  # raises on any implicit host transfer
        x, _, vjp = device_solve_vjp(A, b, rtol=1e-6 if single else 1e-12)
        b_bar, A_bar = vjp(x_bar)
    A_host = np.asarray(A, dtype=np.float64)
    tol = 1e-4 if single else 1e-9
    np.testing.assert_allclose(np.asarray(x), np.linalg.solve(A_host, np.ones(64)), rtol=tol)
    lam = np.linalg.solve(A_host.T, np.ones(64))
    np.testing.assert_allclose(np.asarray(b_bar), lam, rtol=tol)
    np.testing.assert_allclose(np.asarray(A_bar), -np.outer(lam, np.asarray(x)), rtol=tol,
                               atol=tol)
