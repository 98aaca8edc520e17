"""Gradients of inverse-problem losses with respect to the diffusion coefficient field.

The forward model is ``u(c) = A(c)^-1 f`` with ``A(c) = -div(c grad .)`` (a
:class:`prdp_ops.DiffusionStencil`), the loss ``L(c) = 1/2 ||u(c) - u_obs||^2``. Its gradient
through ``po.solve_vjp`` is checked against central finite differences: of a sparse direct
solve for the implicit adjoint, and of the very K-iteration map the solver runs for the
unrolled adjoint. The Laplacian stencil is checked against the shared Poisson matrices.
"""

from __future__ import annotations

import importlib.util
import itertools

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spl
from helpers import fd_noise, poisson_1d, poisson_2d, random_vector

import prdp_ops as po

GRIDS = [(16,), (6, 5)]
SPACING = 0.25


def coefficient(grid: tuple[int, ...]) -> np.ndarray:
    """A smooth positive field with some structure (what an inverse problem recovers)."""
    axes = np.meshgrid(*[np.linspace(0, 1, n) for n in grid], indexing="ij")
    return 1.0 + 0.5 * np.sin(3 * sum(axes)) ** 2


def problem(grid: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(c, f, u_obs)``: the field, a source and observations from a perturbed field."""
    n = int(np.prod(grid))
    c = coefficient(grid)
    f = 1.0 + random_vector(n, seed=4) ** 2
    truth = c * (1.0 + 0.3 * np.random.default_rng(5).uniform(-1, 1, grid))
    u_obs = spl.spsolve(po.DiffusionStencil(truth, spacing=SPACING).to_matrix().tocsc(), f)
    return c, f, u_obs


def loss(u: np.ndarray, u_obs: np.ndarray) -> float:
    return 0.5 * float(np.sum((u - u_obs) ** 2))


FD_STEP = 1e-6


def central_differences(loss_of_c, c: np.ndarray, eps: float = FD_STEP) -> np.ndarray:
    grad = np.zeros_like(c)
    for index in np.ndindex(c.shape):
        up, down = c.copy(), c.copy()
        up[index] += eps
        down[index] -= eps
        grad[index] = (loss_of_c(up) - loss_of_c(down)) / (2 * eps)
    return grad


def gradient_by_solve_vjp(c, f, u_obs, solver, **options) -> np.ndarray:
    A = po.DiffusionStencil(c, spacing=SPACING)
    result, vjp = po.solve_vjp(A, f, solver, **options)
    cotangents = vjp(result.x - u_obs)
    assert set(cotangents.A) == {"c"}
    return cotangents.A["c"]


# -- implicit adjoint: the gradient of the exact solution map ---------------------------------
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{len(g)}d")
def test_implicit_cg_gradient_matches_finite_differences_of_a_direct_solve(grid):
    c, f, u_obs = problem(grid)
    got = gradient_by_solve_vjp(c, f, u_obs, "cg", adjoint="implicit", rtol=1e-13,
                                maxiter=2000)

    def exact_loss(cc):
        A = po.DiffusionStencil(cc, spacing=SPACING).to_matrix().tocsc()
        return loss(spl.spsolve(A, f), u_obs)

    expected = central_differences(exact_loss, c)
    assert got.shape == c.shape and np.abs(expected).max() > 1e-3
    # the differences' rounding noise, eps cond |L| / h per entry, is the absolute floor
    cond = np.linalg.cond(po.DiffusionStencil(c, spacing=SPACING).to_matrix().toarray())
    np.testing.assert_allclose(got, expected, rtol=1e-6,
                               atol=fd_noise(exact_loss(c), cond, FD_STEP))


# -- unrolled adjoint: the gradient of the K iterations actually run -------------------------
UNROLLED = [("cg", 6, {}), ("jacobi", 25, {"omega": 0.8}), ("sor", 12, {"omega": 1.3})]


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{len(g)}d")
@pytest.mark.parametrize("solver, K, options", UNROLLED, ids=[s for s, _, _ in UNROLLED])
def test_unrolled_gradient_matches_finite_differences_of_the_k_step_map(grid, solver, K,
                                                                        options):
    c, f, u_obs = problem(grid)
    fixed = {"rtol": 0.0, "atol": 0.0, "maxiter": K, **options}
    got = gradient_by_solve_vjp(c, f, u_obs, solver, adjoint="unrolled", **fixed)

    def k_step_loss(cc):
        result = po.solve(po.DiffusionStencil(cc, spacing=SPACING), f, solver, **fixed)
        assert result.iterations == K
        return loss(result.x, u_obs)

    expected = central_differences(k_step_loss, c)
    assert np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7 * np.abs(expected).max())


def test_unrolled_gradient_differs_from_the_implicit_one_when_far_from_convergence():
    # A check that the unrolled test above is not vacuous: after few iterations the K-step
    # map's derivative is not the exact solution map's.
    c, f, u_obs = problem((16,))
    unrolled = gradient_by_solve_vjp(c, f, u_obs, "jacobi", adjoint="unrolled", rtol=0.0,
                                     atol=0.0, maxiter=5)
    implicit = gradient_by_solve_vjp(c, f, u_obs, "cg", adjoint="implicit", rtol=1e-12)
    assert np.linalg.norm(unrolled - implicit) > 0.1 * np.linalg.norm(implicit)


# -- composite operators and periodic grids -----------------------------------------------------
def test_periodic_diffusion_with_reaction_term_gradients_reach_both_parameters():
    # -div(c grad u) + u on a periodic grid: the stencil is singular alone, the mass term
    # makes the sum positive definite. Parameters: the field c and the mass matrix's data.
    grid = (5, 4)
    n = 20
    c = coefficient(grid)
    f = random_vector(n, seed=6)
    mass = sp.identity(n, format="csr")
    # Observations from a perturbed model keep the loss small, and with it the rounding
    # noise of the finite differences (~ 1e-16 L / eps).
    truth = po.DiffusionStencil(1.2 * c, boundary="periodic").to_matrix() + 0.8 * mass
    u_obs = spl.spsolve(truth.tocsc(), f)

    def operator(cc, mass_data):
        return po.DiffusionStencil(cc, boundary="periodic") + po.aslinearoperator(
            sp.csr_matrix((mass_data, mass.indices, mass.indptr), shape=(n, n)))

    A = operator(c, mass.data)
    result, vjp = po.solve_vjp(A, f, "cg", rtol=1e-13, maxiter=1000)
    grads = vjp(result.x - u_obs).A
    assert set(grads) == {"0.c", "1.data"}

    def exact_loss(cc, mass_data):
        dense = po.DiffusionStencil(cc, boundary="periodic").to_matrix() + sp.diags(mass_data)
        return loss(spl.spsolve(dense.tocsc(), f), u_obs)

    expected_c = central_differences(lambda cc: exact_loss(cc, mass.data), c)
    expected_mass = central_differences(lambda m: exact_loss(c, m), mass.data.copy())
    # the differences' rounding noise, eps cond |L| / h per entry, is the absolute floor
    noise = fd_noise(exact_loss(c, mass.data), np.linalg.cond(A.to_matrix().toarray()),
                     FD_STEP)
    np.testing.assert_allclose(grads["0.c"], expected_c, rtol=1e-6, atol=noise)
    np.testing.assert_allclose(grads["1.data"], expected_mass, rtol=1e-6, atol=noise)


def test_gradient_descent_on_the_field_reduces_the_loss():
    # The use the gradients exist for: a few steps of gradient descent on c lower the misfit.
    c, f, u_obs = problem((6, 5))

    def misfit(cc):
        return loss(po.solve(po.DiffusionStencil(cc, spacing=SPACING), f, rtol=1e-12).x, u_obs)

    history = [misfit(c)]
    for _ in range(5):
        grad = gradient_by_solve_vjp(c, f, u_obs, "cg", rtol=1e-12)
        c = c - 0.02 * grad / np.abs(grad).max()
        history.append(misfit(c))
    assert all(later < earlier for earlier, later in itertools.pairwise(history))
    assert history[-1] < 0.6 * history[0]


# -- the Laplacian stencil is the shared Poisson matrix -----------------------------------------
@pytest.mark.parametrize("n, h", [(8, 1.0), (11, 0.1)])
def test_laplacian_stencil_is_poisson_over_h_squared(n, h):
    L1 = po.LaplacianStencil(n, spacing=h)
    np.testing.assert_allclose(L1.to_matrix().toarray(), poisson_1d(n).toarray() / h**2,
                               rtol=1e-13)
    L2 = po.LaplacianStencil((n, n), spacing=h)
    P2 = poisson_2d(n) / h**2
    np.testing.assert_allclose(L2.to_matrix().toarray(), P2.toarray(), rtol=1e-13)
    v = random_vector(n * n, seed=8)
    np.testing.assert_allclose(L2 @ v, P2 @ v, rtol=1e-12, atol=1e-12 / h**2)
    np.testing.assert_allclose(L2.diagonal(), P2.diagonal(), rtol=1e-13)
    # The same iterations on both: the solver sees the same operator.
    x_stencil = po.solve(L2, v, "cg", rtol=0, atol=0, maxiter=15).x
    x_matrix = po.solve(P2, v, "cg", rtol=0, atol=0, maxiter=15).x
    np.testing.assert_allclose(x_stencil, x_matrix, rtol=1e-10, atol=1e-12)


def test_diffusion_with_unit_coefficient_is_the_laplacian():
    for grid in [(9,), (4, 6), (3, 4, 5)]:
        for boundary in ("dirichlet", "periodic"):
            D = po.DiffusionStencil(np.ones(grid), boundary=boundary, spacing=0.3)
            L = po.LaplacianStencil(grid, boundary=boundary, spacing=0.3)
            np.testing.assert_allclose(D.to_matrix().toarray(), L.to_matrix().toarray(),
                                       rtol=1e-13)


# -- the same gradients through the JAX backend -------------------------------------------------
@pytest.mark.parametrize("solver, options", [
    ("cg", {"adjoint": "implicit", "rtol": 1e-12, "maxiter": 500}),
    ("jacobi", {"adjoint": "unrolled", "rtol": 0.0, "atol": 0.0, "maxiter": 20, "omega": 0.8}),
], ids=["cg-implicit", "jacobi-unrolled"])
def test_jax_gradient_through_the_stencil_equals_the_numpy_one(solver, options):
    jax = pytest.importorskip("jax", reason="jax is not installed")
    if importlib.util.find_spec("prdp_ops.backends.jax") is None:
        pytest.skip("prdp_ops.backends.jax (the JAX array backend) is not available yet")
    jax.config.update("jax_enable_x64", True)
    from prdp_ops.backends import jax as pj

    jnp = jax.numpy
    c, f, u_obs = problem((6, 5))

    def jax_loss(cc):
        x = pj.solve(po.DiffusionStencil(cc, spacing=SPACING), jnp.asarray(f), solver=solver,
                     **options)
        return 0.5 * jnp.sum((x - jnp.asarray(u_obs)) ** 2)

    got = np.asarray(jax.jit(jax.grad(jax_loss))(jnp.asarray(c)))  # one compile, not one per op
    expected = gradient_by_solve_vjp(c, f, u_obs, solver, **options)
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-10 * np.abs(expected).max())
