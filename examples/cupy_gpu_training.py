"""A JAX training loop on the GPU whose PDE solve runs on CuPy, with PRDP choosing how many
solver iterations training needs.

The task: learn a source term. A small MLP maps the node coordinates of an ``N x N`` grid to a
source ``f_theta``; the loss compares ``u = A^-1 f_theta`` (``A = -Δ`` with zero Dirichlet
boundaries, ``po.LaplacianStencil``) with the solution ``u*`` of a hidden source. Every
training solve is

    pj.solve(A, f, "cg", maxiter=k, rtol=0, atol=0, backend="cupy")

inside ``jax.jit`` and ``jax.grad``: the CG iterations and the implicit adjoint run on CuPy
(the fused stencil kernel), and the arrays cross between JAX and CuPy by DLPack on the same
device, without a host round trip. Once per epoch the validation loss (same loss, converged
solve, so it does not depend on ``k``) goes to ``po.PRDPController``, which raises ``k`` when
training plateaus and stops refining once refinement no longer pays off.

    python examples/cupy_gpu_training.py          # 64 x 64, 30 epochs
    python examples/cupy_gpu_training.py --full   # 256 x 256, 60 epochs

Without CuPy, a usable CUDA GPU, or a CUDA-enabled jaxlib it prints one line saying why and
exits with status 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _gpu import gpu_backend_or_exit

SCRIPT = "cupy_gpu_training.py"


def jax_gpu_or_exit(script: str) -> None:
    """Exit with one line unless JAX sees the GPU (the DLPack exchange needs both there)."""
    try:
        import jax
    except ImportError as err:
        print(f"{script}: skipped, it needs JAX with CUDA (pip install jax[cuda12]): {err}")
        sys.exit(0)
    if not any(d.platform == "gpu" for d in jax.devices()):
        print(f"{script}: skipped, JAX sees no CUDA GPU (CPU-only jaxlib; pip install "
              "jax[cuda12]), and the CuPy GPU path exchanges device arrays with JAX")
        sys.exit(0)


def build_problem(n: int, seed: int) -> dict[str, Any]:
    """Grid, operator, hidden source, its converged solution, and initial MLP weights."""
    import jax
    import jax.numpy as jnp
    from prdp_ops.backends import jax as pj

    import prdp_ops as po

    h = 1.0 / (n + 1)
    A = po.LaplacianStencil((n, n), spacing=h)
    axis = jnp.linspace(h, 1.0 - h, n)
    X, Y = jnp.meshgrid(axis, axis, indexing="ij")
    coords = jnp.stack([X.reshape(-1), Y.reshape(-1)], axis=1)
    hidden = (jnp.sin(jnp.pi * X) * jnp.sin(2 * jnp.pi * Y)
              + 0.5 * jnp.exp(-40 * ((X - 0.3) ** 2 + (Y - 0.6) ** 2))).reshape(-1)
    u_star = pj.solve(A, hidden, "cg", rtol=1e-10, maxiter=20 * n, backend="cupy")
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    width = 32
    params = {"w1": jax.random.normal(k1, (2, width)) * 2.0, "b1": jnp.zeros(width),
              "w2": jax.random.normal(k2, (width, 1)) / jnp.sqrt(width), "b2": jnp.zeros(1)}
    return {"A": A, "coords": coords, "u_star": u_star, "params": params, "n": n}


def make_functions(problem: dict[str, Any], learning_rate: float) -> tuple[Any, Any, Any]:
    """Jitted training step (k forward / k adjoint iterations) and validation loss."""
    import jax
    import jax.numpy as jnp
    import optax
    from prdp_ops.backends import jax as pj

    A, coords, u_star = problem["A"], problem["coords"], problem["u_star"]
    optimizer = optax.adam(learning_rate)

    def source(params: dict[str, Any]) -> Any:
        hidden = jnp.tanh(coords @ params["w1"] + params["b1"])
        return (hidden @ params["w2"] + params["b2"]).reshape(-1)

    def loss(params: dict[str, Any], k: Any) -> Any:
        u = pj.solve(A, source(params), "cg", maxiter=k, rtol=0.0, atol=0.0,
                     adjoint="implicit", adjoint_maxiter=k, backend="cupy")
        return jnp.mean((u - u_star) ** 2) / jnp.mean(u_star**2)

    @jax.jit
    def train_step(params: dict[str, Any], opt_state: Any, k: Any) -> tuple[Any, Any, Any]:
        value, grads = jax.value_and_grad(loss)(params, k)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    @jax.jit
    def validation_loss(params: dict[str, Any]) -> Any:
        u = pj.solve(A, source(params), "cg", rtol=1e-8, maxiter=20 * problem["n"],
                     backend="cupy")
        return jnp.mean((u - u_star) ** 2) / jnp.mean(u_star**2)

    return optimizer, train_step, validation_loss


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="256 x 256 grid, 60 epochs")
    parser.add_argument("--steps", type=int, default=10, help="optimiser steps per epoch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial MLP weights")
    args = parser.parse_args(argv)
    gpu_backend_or_exit(SCRIPT)
    jax_gpu_or_exit(SCRIPT)
    import jax
    import jax.numpy as jnp

    import prdp_ops as po

    jax.config.update("jax_enable_x64", True)
    n, epochs = (256, 60) if args.full else (64, 30)
    problem = build_problem(n, args.seed)
    optimizer, train_step, validation_loss = make_functions(problem, 1e-2)
    # CG on an n x n Poisson grid converges in O(n) iterations: start and step at a fraction.
    # Latched (the default, as in the README's loop): after the first "stop" k stays put. The
    # CPU examples pass latch=False, as the paper's code, so a later plateau may still refine.
    controller = po.PRDPController(k_min=n // 8, k_step=n // 4, k_max=20 * n)
    params, opt_state = problem["params"], optimizer.init(problem["params"])
    print(f"{jax.devices()[0].device_kind}: {n}x{n} Poisson source inversion, CG on CuPy via "
          f"pj.solve(backend='cupy'), implicit adjoint, PRDP")
    solver_iterations = 0
    start = time.perf_counter()
    for epoch in range(epochs):
        k = controller.k
        for _ in range(args.steps):
            params, opt_state, train_loss = train_step(params, opt_state, jnp.asarray(k))
        solver_iterations += args.steps * 2 * k  # forward and adjoint, k each
        val = float(validation_loss(params))
        decision = controller.update(val)
        print(f"epoch {epoch:3d}  k={k:4d}  train {float(train_loss):.3e}  "
              f"validation {val:.3e}  -> {decision}")
    elapsed = time.perf_counter() - start
    print(f"{solver_iterations:,d} CG iterations (forward + adjoint) in {elapsed:.1f} s; a "
          f"fixed k = {controller.k} from the start would have taken "
          f"{epochs * args.steps * 2 * controller.k:,d}")


if __name__ == "__main__":
    main()
