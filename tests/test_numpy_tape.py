"""The NumPy driver's reusable tape memory and the in-place ops the reverse sweeps use.

The tape cache (``prdp_ops.backends.numpy``) must change nothing but speed: gradients equal
bit for bit those of a tape in fresh memory, and nothing a caller holds -- a result, a
cotangent, a vjp not yet called, a deferred cotangent of ``A`` -- is overwritten by a later
solve that reuses the memory.
"""

from __future__ import annotations

import gc
import os
import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sp
from helpers import poisson_2d, random_vector
from prdp_ops.backends import numpy as pnp

import prdp_ops as po
from prdp_ops._array_ops import ArrayOps, NumpyOps

SOLVERS = [("cg", {}), ("bicgstab", {}), ("jacobi", {"omega": 0.8}), ("gmres", {"restart": 5})]


@pytest.fixture(autouse=True)
def fresh_cache():
    """Each test starts and ends with an empty cache and the default limit."""
    pnp.clear_tape_cache()
    limit = pnp.tape_cache_limit()
    yield
    pnp.set_tape_cache_limit(limit)
    pnp.clear_tape_cache()


def _unrolled(A, b, solver, options, x_bar, K=25):
    result, vjp = po.solve_vjp(A, b, solver, adjoint="unrolled", rtol=0.0, atol=0.0,
                               maxiter=K, **options)
    return result, vjp


@pytest.mark.parametrize(("solver", "options"), SOLVERS)
def test_reused_tape_gives_identical_gradients(solver, options):
    A = poisson_2d(12)
    b, x_bar = random_vector(144, seed=1), random_vector(144, seed=2)
    pnp.set_tape_cache_limit(0)  # every tape in fresh memory: the reference
    _, vjp = _unrolled(A, b, solver, options, x_bar)
    ref = vjp(x_bar)
    ref_b, ref_A = ref.b.copy(), ref.A.toarray()
    pnp.set_tape_cache_limit(1 << 30)
    for _ in range(3):  # the second and third calls reuse the first one's blocks
        _, vjp = _unrolled(A, b, solver, options, x_bar)
        cot = vjp(x_bar)
        np.testing.assert_array_equal(cot.b, ref_b)
        np.testing.assert_array_equal(cot.A.toarray(), ref_A)
        del vjp, cot
    gc.collect()
    before = pnp.cached_tape_bytes()
    _, vjp = _unrolled(A, b, solver, options, x_bar)
    vjp(x_bar)
    assert pnp.cached_tape_bytes() == before  # reused, not grown


def test_tape_blocks_are_reused_across_calls():
    A = poisson_2d(16)
    b, x_bar = random_vector(256, seed=3), random_vector(256, seed=4)
    _, vjp = _unrolled(A, b, "cg", {}, x_bar, K=40)
    vjp(x_bar)
    del vjp
    cached = pnp.cached_tape_bytes()
    assert cached > 0
    for _ in range(3):
        _, vjp = _unrolled(A, b, "cg", {}, x_bar, K=40)
        vjp(x_bar)
        del vjp
        assert pnp.cached_tape_bytes() == cached


@pytest.mark.parametrize("solver", ["cg", "bicgstab"])
def test_block_tapes_are_reused_across_calls_and_give_the_same_gradients(solver):
    # A block of right-hand sides records its (n, k) tape in reused memory too.
    A = poisson_2d(8)
    rng = np.random.default_rng(5)
    B, X_bar = rng.standard_normal((64, 3)), rng.standard_normal((64, 3))
    pnp.clear_tape_cache()

    def cotangents():
        _, vjp = po.solve_vjp(A, B, solver, adjoint="unrolled", rtol=0, atol=0, maxiter=30)
        cot = vjp(X_bar)
        return cot.b.copy(), cot.A.toarray()

    first = cotangents()
    cached = pnp.cached_tape_bytes()
    assert cached >= 30 * B.nbytes  # the block tape went to the cache
    for _ in range(2):
        again = cotangents()
        assert pnp.cached_tape_bytes() == cached
        for mine, ref in zip(again, first, strict=True):
            np.testing.assert_array_equal(mine, ref)


@pytest.mark.parametrize(("solver", "options"), [
    # CG (vectors made in tape memory) and GMRES (a basis per cycle) in the default run;
    # BiCGSTAB and Jacobi keep their tapes the same ways, under pytest -m slow.
    pytest.param(solver, options, id=solver,
                 marks=() if solver in ("cg", "gmres") else (pytest.mark.slow,))
    for solver, options in SOLVERS])
def test_later_solves_never_overwrite_what_a_caller_holds(solver, options):
    A = poisson_2d(10)
    b1, b2 = random_vector(100, seed=5), random_vector(100, seed=6)
    x_bar = random_vector(100, seed=7)
    pnp.set_tape_cache_limit(0)
    ref_result, ref_vjp = _unrolled(A, b1, solver, options, x_bar)
    ref = ref_vjp(x_bar)
    ref_x, ref_b, ref_A = ref_result.x.copy(), ref.b.copy(), ref.A.toarray()
    pnp.set_tape_cache_limit(1 << 30)

    result, vjp = _unrolled(A, b1, solver, options, x_bar)
    cot = vjp(x_bar)
    held_vjp = _unrolled(A, b1, solver, options, x_bar)[1]  # not called yet
    deferred = _unrolled(A, b1, solver, options, x_bar)[1](x_bar)  # .A not asked for yet
    # Solves with another b, which reuse whatever memory is free.
    for _ in range(3):
        _, other = _unrolled(A, b2, solver, options, x_bar)
        other(x_bar).A  # noqa: B018 (computes the deferred cotangent)
        del other
        gc.collect()
    np.testing.assert_array_equal(result.x, ref_x)
    np.testing.assert_array_equal(cot.b, ref_b)
    np.testing.assert_array_equal(cot.A.toarray(), ref_A)
    held = held_vjp(x_bar)
    np.testing.assert_array_equal(held.b, ref_b)
    np.testing.assert_array_equal(held.A.toarray(), ref_A)
    np.testing.assert_array_equal(deferred.A.toarray(), ref_A)
    # A vjp may be called twice: the reverse sweep does not modify its tape.
    np.testing.assert_array_equal(held_vjp(x_bar).b, ref_b)


def test_clear_tape_cache_frees_the_memory():
    A = poisson_2d(32)
    b, x_bar = random_vector(1024, seed=8), random_vector(1024, seed=9)
    tracemalloc.start()
    try:
        _, vjp = _unrolled(A, b, "cg", {}, x_bar, K=60)
        vjp(x_bar)
        del vjp
        gc.collect()
        cached = pnp.cached_tape_bytes()
        assert cached >= 3 * 60 * 1024 * 8  # CG keeps three vectors per iteration
        held, _ = tracemalloc.get_traced_memory()
        pnp.clear_tape_cache()
        gc.collect()
        freed = held - tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert pnp.cached_tape_bytes() == 0
    assert freed >= cached


def test_cache_limit_is_respected_and_validated():
    A = poisson_2d(16)
    b, x_bar = random_vector(256, seed=10), random_vector(256, seed=11)
    # The documented default: a quarter of physical memory (POSIX), read independently here.
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert pnp.set_tape_cache_limit(0) == physical // 4
    _, vjp = _unrolled(A, b, "cg", {}, x_bar, K=40)
    vjp(x_bar)
    assert pnp.cached_tape_bytes() == 0
    pnp.set_tape_cache_limit(1 << 30)
    _, vjp = _unrolled(A, b, "cg", {}, x_bar, K=40)
    vjp(x_bar)
    del vjp
    gc.collect()
    assert pnp.cached_tape_bytes() > 0
    pnp.set_tape_cache_limit(0)  # lowering the limit drops the free blocks
    assert pnp.cached_tape_bytes() == 0
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="nbytes"):
            pnp.set_tape_cache_limit(bad)


def test_in_place_ops_reuse_private_buffers_and_agree_with_the_functional_ones():
    ops, functional = NumpyOps(), ArrayOps(np)
    rng = np.random.default_rng(12)
    x, y0 = rng.standard_normal(50), rng.standard_normal(50)
    eps = np.finfo(np.float64).eps
    for a in (np.float64(0.3), 1, -1, np.float64(-2.5)):
        y = y0.copy()
        out = ops.axpy_(y, a, x)
        assert out is y
        # BLAS axpy (a fused pass) may round y + a x once where NumPy rounds a x first:
        # one rounding apart, 2 eps |y + a x| + eps |a x| at most.
        reference = functional.axpy_(y0, a, x)
        np.testing.assert_array_less(np.abs(out - reference),
                                     2 * eps * np.abs(reference) + eps * np.abs(a * x)
                                     + np.finfo(np.float64).tiny)
        np.testing.assert_array_equal(y0 + a * x, functional.axpy_(y0, a, x))
    # Complex data take the complex BLAS routine, in place as well.
    yc0 = y0 + 1j * rng.standard_normal(50)
    yc, xc = yc0.copy(), x - 2j * y0
    assert ops.axpy_(yc, np.complex128(0.5 - 1.5j), xc) is yc
    np.testing.assert_allclose(yc, yc0 + (0.5 - 1.5j) * xc, rtol=4 * eps, atol=4 * eps)
    # matmul_add_: y + a @ b in place, for a block of rows (gemm) and a vector (gemv).
    Y0, C, S = rng.standard_normal((6, 50)), rng.standard_normal((4, 2)), rng.standard_normal(
        (2, 50))
    Y = Y0.copy()
    assert ops.matmul_add_(Y[:4], C, S).base is Y
    np.testing.assert_allclose(Y[:4], Y0[:4] + C @ S, rtol=1e-14, atol=1e-14)
    np.testing.assert_array_equal(Y[4:], Y0[4:])
    np.testing.assert_array_equal(functional.matmul_add_(Y0[:4], C, S), Y0[:4] + C @ S)
    y = y0.copy()
    assert ops.matmul_add_(y, Y0[:3].T, C[:3, 0]) is y
    np.testing.assert_allclose(y, y0 + Y0[:3].T @ C[:3, 0], rtol=1e-14, atol=1e-14)
    y = y0.copy()
    assert ops.scale_(y, np.float64(0.5)) is y
    np.testing.assert_array_equal(y, 0.5 * y0)
    # A result of another dtype or shape is a new array, and y is left as it was.
    y32 = y0.astype(np.float32)
    out = ops.axpy_(y32, np.complex128(1j), x)
    assert out.dtype == np.complex128 and out is not y32
    np.testing.assert_array_equal(y32, y0.astype(np.float32))
    V = np.zeros((3, 4))
    assert ops.set_at_(V, 1, np.ones(4)) is V and V[1].sum() == 4
    # The functional flavour (what JAX and CuPy inherit) never writes into y.
    y = y0.copy()
    assert functional.axpy_(y, 2.0, x) is not y and functional.set_at_(V, 0, 1.0) is not V
    np.testing.assert_array_equal(y, y0)


def test_keep_is_the_identity_outside_the_numpy_tape():
    a = np.arange(3.0)
    assert ArrayOps(np).keep(a) is a and NumpyOps().keep(a) is a


def test_fresh_copies_are_made_in_tape_memory_and_kept_without_a_second_copy():
    # A step's fresh_copy while taping is a row of the arena; keeping it returns that row
    # (no copy), and a vector the step did not build there is still copied once.
    from prdp_ops.backends._numpy_tape import TapeArena, TapingOps

    ops = TapingOps(TapeArena((50,), np.float64))
    a = random_vector(50)
    row = ops.fresh_copy(a)
    assert row is not a and row.base is not None
    np.testing.assert_array_equal(row, a)
    ops.axpy_(row, 2.0, a)  # the step updates it in place
    assert ops.keep(row) is row
    kept = ops.keep(a)
    assert kept is not a and kept.base is not None and ops.keep(a) is kept
    assert NumpyOps().fresh_copy(a) is not a and ArrayOps(np).fresh_copy(a) is not a
    # Another shape: an ordinary copy.
    other = np.ones(3)
    assert ops.fresh_copy(other).base is None


def test_sor_on_a_sparse_matrix_factors_its_triangle_once(monkeypatch):
    """SOR's sweeps and reverse steps solve with one factorisation per solve, never with
    ``spsolve_triangular`` (which rebuilds the matrix on every call), and the result equals
    the dense triangular solve."""
    import scipy.linalg
    import scipy.sparse.linalg as spl
    from helpers import diagonally_dominant

    calls = {"splu": 0, "spsolve_triangular": 0}
    splu, spsolve = spl.splu, spl.spsolve_triangular

    def counting_splu(*args, **kwargs):
        calls["splu"] += 1
        return splu(*args, **kwargs)

    def counting_spsolve(*args, **kwargs):
        calls["spsolve_triangular"] += 1
        return spsolve(*args, **kwargs)

    monkeypatch.setattr(spl, "splu", counting_splu)
    monkeypatch.setattr(spl, "spsolve_triangular", counting_spsolve)
    A = poisson_2d(8)
    b, x_bar = random_vector(64, seed=13), random_vector(64, seed=14)
    _, vjp = po.solve_vjp(A, b, "sor", omega=1.2, adjoint="unrolled", rtol=0.0, atol=0.0,
                          maxiter=15)
    vjp(x_bar)
    assert calls == {"splu": 1, "spsolve_triangular": 0}

    from prdp_ops._solver.sor import sweep_matrix

    ops = NumpyOps()
    dense = diagonally_dominant(40, seed=15)
    T = sweep_matrix(ops, dense, 1.3)
    F = ops.prepare_triangular(sweep_matrix(ops, sp.csr_matrix(dense), 1.3), lower=True)
    rhs = random_vector(40, seed=16)
    eps = np.finfo(np.float64).eps
    # Forward substitution with a diagonally dominant triangle: backward stable, error a
    # few eps per row times n.
    tol = 40 * 8 * eps
    for got, want in ((ops.solve_triangular(F, rhs, lower=True),
                       scipy.linalg.solve_triangular(T, rhs, lower=True)),
                      (ops.solve_triangular(F.T, rhs, lower=False),
                       scipy.linalg.solve_triangular(T.T, rhs, lower=False))):
        np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max())


def test_a_full_cache_makes_room_by_dropping_other_shapes_free_blocks():
    x_bar_small, x_bar_large = random_vector(144, seed=17), random_vector(256, seed=18)
    small, large = poisson_2d(12), poisson_2d(16)
    b_small, b_large = random_vector(144, seed=19), random_vector(256, seed=20)
    _, vjp = _unrolled(large, b_large, "cg", {}, x_bar_large, K=40)
    vjp(x_bar_large)
    del vjp
    gc.collect()
    one_tape = pnp.cached_tape_bytes()
    pnp.set_tape_cache_limit(one_tape + 1024)  # room for about one such tape
    _, vjp = _unrolled(small, b_small, "cg", {}, x_bar_small, K=40)
    vjp(x_bar_small)
    del vjp
    gc.collect()
    held = pnp.cached_tape_bytes()
    assert held <= one_tape + 1024
    # The small shape's blocks are cached (the large shape's free ones made room): a second
    # call reuses them and the cache does not change.
    _, vjp = _unrolled(small, b_small, "cg", {}, x_bar_small, K=40)
    vjp(x_bar_small)
    del vjp
    gc.collect()
    assert pnp.cached_tape_bytes() == held
    assert any(key[0] == (144,) and blocks for key, blocks in pnp_cache().items())


def pnp_cache():
    from prdp_ops.backends import _numpy_tape

    return _numpy_tape._cache
