"""The bridge: ``backend="numpy"`` runs the NumPy implementation from jitted JAX code.

Its results and gradients must equal the native JAX ones (an independent implementation:
the NumPy driver, its hand-derived reverse steps and the core's implicit adjoint, against
JAX's while loop and autodiff of the steps).
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    AGREE_SAFETY,
    agree_tol,
    assert_agree,
    permutation_spread,
    poisson_1d,
    random_vector,
    spd,
)
from jax.experimental import sparse as jax_sparse
from prdp_ops.backends import jax as pj

import prdp_ops as po

jax.config.update("jax_enable_x64", True)

N = 10


def _loss(A: object, b: jax.Array, backend: str, **kwargs: object) -> jax.Array:
    x = pj.solve(A, b, backend=backend, **kwargs)
    return jnp.sum(x ** 2) + jnp.sum(x)


_grad = jax.jit(jax.grad(_loss, argnums=(0, 1)), static_argnames=("backend", "adjoint",
                                                                    "maxiter", "rtol"))


@pytest.mark.parametrize(("adjoint", "maxiter", "rtol"), [
    ("implicit", 200, 1e-10), ("implicit", 4, 0.0), ("unrolled", 4, 0.0), ("unrolled", 50, 1e-2)
])
def test_bridge_gradients_equal_native(adjoint: str, maxiter: int, rtol: float) -> None:
    A, b = spd(N), random_vector(N)
    kw = {"adjoint": adjoint, "maxiter": maxiter, "rtol": rtol}
    bridged = _grad(jnp.asarray(A), jnp.asarray(b), backend="numpy", **kw)

    def native(perm: np.ndarray) -> tuple:
        back = np.argsort(perm)
        gA, gb = _grad(jnp.asarray(A[np.ix_(perm, perm)]), jnp.asarray(b[perm]),
                       backend="jax", **kw)
        return np.asarray(gA)[np.ix_(back, back)], np.asarray(gb)[back]

    # NumPy's sums (the bridge) and XLA's round differently. Within the eps model (k forward
    # and k adjoint steps, cond 50) they agree to eps cond^2 2k; but CG through its loss of
    # orthogonality (here: near N = 10 steps, the unrolled-50 case) is more sensitive than the
    # model, about 1e-10. The native gradient's own spread when the sums are reordered
    # (unknowns permuted) measures that; the bridge must agree within 10x of it.
    k = int(pj.solve(jnp.asarray(A), jnp.asarray(b), maxiter=maxiter, rtol=rtol,
                     return_result=True)[1].iterations)
    floor = agree_tol(np.float64, cond=np.linalg.cond(A), iterations=2 * k, power=2)
    reference, spreads = permutation_spread(native, N)
    for g, r, spread in zip(bridged, reference, spreads, strict=True):
        np.testing.assert_allclose(g, r, rtol=0, atol=AGREE_SAFETY * spread
                                   + floor * np.abs(r).max())


def test_bridge_forward_and_result_equal_native() -> None:
    A, b = spd(N), random_vector(N)

    @jax.jit
    def both(A: jax.Array, b: jax.Array) -> tuple:
        return (pj.solve(A, b, rtol=1e-8, return_result=True),
                pj.solve(A, b, rtol=1e-8, return_result=True, backend="numpy"))

    (_, result), (xb, bridged) = both(jnp.asarray(A), jnp.asarray(b))
    assert int(bridged.iterations) == int(result.iterations)
    assert int(bridged.status) == int(result.status) == 0

    k = int(result.iterations)  # the norms after it are padding (NaN)

    def native(perm: np.ndarray) -> tuple:
        (x, result), _ = both(jnp.asarray(A[np.ix_(perm, perm)]), jnp.asarray(b[perm]))
        return np.asarray(x)[np.argsort(perm)], np.asarray(result.residual_norms)[:k + 1]

    # Equal down to rounding, which is not eps cond k here: CG stops at step N = 10, where
    # in exact arithmetic it would terminate and where the residual (~4e-10 ||b||) is made by
    # rounding, so reordered sums move x by ~1e-11 and that residual by ~1e-10 ||b||. The
    # native solve's spread under reordered sums (permuted unknowns) measures it; the bridge
    # agrees within 10x of it (or of the eps model's floor).
    reference, spreads = permutation_spread(native, N)
    floors = [agree_tol(np.float64, cond=np.linalg.cond(A), iterations=k, power=p)
              for p in (1, 2)]  # x; residual norms (relative to ||b||)
    for got, want, spread, floor in zip((xb, bridged.residual_norms[:k + 1]), reference,
                                        spreads, floors, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=AGREE_SAFETY * spread
                                   + floor * np.abs(want).max())


def test_bridge_under_vmap_and_grad() -> None:
    A = jnp.asarray(spd(N))
    B = jnp.stack([jnp.asarray(random_vector(N, seed=s)) for s in range(3)])

    def per_b(backend: str) -> jax.Array:
        grad = jax.grad(lambda b: jnp.sum(pj.solve(A, b, rtol=1e-10, backend=backend) ** 2))
        return jax.jit(jax.vmap(grad))(B)

    # NumPy's sums against XLA's: a gradient through k forward and k adjoint steps of
    # converged solves, eps cond^2 2k (k: the longest forward solve of the three)
    k = max(int(pj.solve(A, b, rtol=1e-10, return_result=True)[1].iterations) for b in B)
    for got, want in zip(per_b("numpy"), per_b("jax"), strict=True):
        assert_agree(got, want, agree_tol(np.float64, np.linalg.cond(A), 2 * k, power=2))


def test_bridge_traced_maxiter_compiles_once() -> None:
    A, b = jnp.asarray(spd(N)), jnp.asarray(random_vector(N))
    traces = []

    @jax.jit
    def run(k: jax.Array) -> tuple:
        traces.append(1)
        return pj.solve(A, b, maxiter=k, rtol=0.0, backend="numpy", return_result=True)

    for k in (2, 5):
        x, result = run(jnp.asarray(k))
        assert int(result.iterations) == k
        np.testing.assert_allclose(x, po.solve(np.asarray(A), np.asarray(b), maxiter=k,
                                               rtol=0.0).x, rtol=1e-12)
    assert len(traces) == 1


def test_bridge_takes_scipy_sparse_and_bcoo() -> None:
    T = poisson_1d(N, shift=0.1)
    b = jnp.asarray(random_vector(N))
    bcoo = jax_sparse.BCOO.from_scipy_sparse(T)
    x = jax.jit(lambda b: pj.solve(T, b, rtol=1e-12, backend="numpy"))(b)
    np.testing.assert_allclose(x, np.linalg.solve(T.toarray(), b), rtol=1e-9)
    # gradients w.r.t. b with a constant scipy matrix, and w.r.t. the BCOO values
    gb = jax.grad(lambda b: jnp.sum(pj.solve(T, b, rtol=1e-12, backend="numpy")))(b)
    np.testing.assert_allclose(gb, np.linalg.solve(T.toarray().T, np.ones(N)), rtol=1e-9)

    def loss(data: jax.Array, backend: str) -> jax.Array:
        A = jax_sparse.BCOO((data, bcoo.indices), shape=bcoo.shape)
        return jnp.sum(pj.solve(A, b, rtol=1e-12, backend=backend) ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    np.testing.assert_allclose(grad(bcoo.data, "numpy"), grad(bcoo.data, "jax"), rtol=1e-8,
                               atol=1e-12)


def test_bridge_diffusion_stencil_gradient() -> None:
    if not hasattr(po, "DiffusionStencil"):
        pytest.skip("po.DiffusionStencil is not available yet")
    c = jnp.asarray(np.random.default_rng(0).uniform(0.5, 2.0, (4, 3)))
    b = jnp.asarray(random_vector(12))

    def loss(c: jax.Array, backend: str) -> jax.Array:
        return jnp.sum(pj.solve(po.DiffusionStencil(c), b, rtol=1e-12, backend=backend) ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    np.testing.assert_allclose(grad(c, "numpy"), grad(c, "jax"),
                               rtol=1e-8, atol=1e-12)


def test_bridge_adjoint_callback_and_failure_policy() -> None:
    A, b = jnp.asarray(spd(N)), jnp.asarray(random_vector(N))
    seen = []
    jax.grad(lambda b: jnp.sum(pj.solve(A, b, rtol=1e-10, backend="numpy",
                                         adjoint_callback=seen.append)))(b)
    assert len(seen) == 1 and seen[0].converged and seen[0].iterations > 0
    indefinite = jnp.diag(jnp.r_[jnp.ones(N - 1), -1.0])
    with pytest.raises(Exception, match="broke down"):
        jax.block_until_ready(jax.jit(lambda b: pj.solve(indefinite, b, backend="numpy",
                                                         on_failure="raise"))(b))


def test_bridge_bad_input() -> None:
    b = jnp.ones(N)
    with pytest.raises(TypeError, match="bridge"):
        pj.solve(lambda x: x, b, backend="numpy")
    with pytest.raises(ValueError, match="square"):
        pj.solve(jnp.ones((N, N + 1)), b, backend="numpy")
    with pytest.raises(ValueError, match="shape"):
        pj.solve(jnp.asarray(spd(N)), jnp.ones(N + 1), backend="numpy")


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None,
                    reason="cupy is installed: the GPU tests cover backend='cupy'")
def test_cupy_backend_without_cupy_is_a_clear_error() -> None:
    with pytest.raises((RuntimeError, ImportError, NotImplementedError), match=r"(?i)cupy"):
        pj.solve(jnp.asarray(spd(N)), jnp.ones(N), backend="cupy")


def test_bridge_result_is_a_scipy_solve() -> None:
    # the bridge runs exactly the NumPy driver: same iterate as po.solve
    A, b = spd(N), random_vector(N)
    x = pj.solve(jnp.asarray(A), jnp.asarray(b), maxiter=3, rtol=0.0, backend="numpy")
    np.testing.assert_allclose(x, po.solve(A, b, maxiter=3, rtol=0.0).x, rtol=1e-13)
