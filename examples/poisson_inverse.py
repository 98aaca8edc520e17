r"""An inverse problem through an iterative Poisson solve: recover a source from a solution,
with PRDP choosing how many solver iterations each gradient step gets.

The 1D problem (the paper's toy problem)
---------------------------------------
On :math:`(0, 1)` with :math:`u(0) = u(1) = 0`,

.. math::

    -u''(x) = \theta \sin(2 \pi x),

discretised by central differences on ``N = 30`` interior nodes (:math:`h = 1/31`):
:math:`A u = \theta s` with :math:`A = \mathrm{tridiag}(-1, 2, -1) / h^2` (the library's
``LaplacianStencil``) and :math:`s_i = \sin(2 \pi x_i)`. The observation :math:`u_{ref}` is
the exact discrete solution for :math:`\theta_{ref} = 2`; starting from :math:`\theta = 5`,
plain gradient descent (learning rate 275, 180 steps) minimises

.. math::

    L(\theta) = \frac{1}{2N} \lVert u_K(\theta) - u_{ref} \rVert^2,

where :math:`u_K(\theta)` is ``K`` Jacobi iterations from zero. :math:`s` is an eigenvector of
:math:`A` and of Jacobi's iteration matrix :math:`G = I - D^{-1} A` (eigenvalue
:math:`g = \cos(2 \pi h) \approx 0.98`), so :math:`u_K = (1 - g^K)\, \theta A^{-1} s`: with too
few iterations the recovered :math:`\theta` is biased to :math:`\theta_{ref} / (1 - g^K)`
(about 5 for ``K = 25``). The bias falls below 1% near ``K = 220`` -- the level PRDP has to
find. Its signal is the relative parameter error :math:`|\theta - \theta_{ref}| /
\theta_{ref}`, checked after every step; settings as in the paper: ``K`` from 25 by 10 up to
600, ``tau_step = 0.92``, ``lookback = 2``, no moving average. The converged baseline runs
600 iterations at every step.

Gradients: ``--adjoint implicit`` (default) solves :math:`A^T \lambda = \bar u` with its own
``K`` iterations; ``--adjoint unrolled`` differentiates the ``K`` Jacobi iterations
themselves. Both count their backward iterations.

The 2D variant (``--variant 2d``): many parameters, CG
-----------------------------------------------------
:math:`-\Delta u = f` on the unit square with zero Dirichlet values and ``n x n`` interior
nodes; the source is a field with ``m x m`` parameters, the coefficients of the sine modes
:math:`f = \sum_{jk} c_{jk} \sin(j \pi x) \sin(k \pi y)`. A reference field with decaying
random coefficients gives the observation; the coefficients are recovered from zero with Adam
through ``K`` CG iterations, the signal being the relative coefficient error. Each mode is an
eigenvector of the discrete Laplacian, so CG converges in at most as many iterations as
there are distinct eigenvalues in the source -- but only if it is allowed that many.

Run ``python examples/poisson_inverse.py`` or ``python examples/poisson_inverse.py
--variant 2d``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common
import _report
import jax
import jax.numpy as jnp
import optax

import prdp_ops as po

EXAMPLE = "poisson_inverse"

#: The paper's 1D setting.
THETA_REF, THETA_INIT = 2.0, 5.0
SETTINGS_1D = {"n": 30, "lr": 275.0, "steps": 180,
               "controller": {"k_min": 25, "k_step": 10, "k_max": 600, "tau_step": 0.92,
                              "lookback": 2, "use_ema": False}}
#: The 2D variant: (tiny, full) sizes; PRDP with the 1D rule, K from 2 by 2.
SETTINGS_2D = {"tiny": {"n": 31, "modes": 6, "steps": 150},
               "full": {"n": 127, "modes": 12, "steps": 400},
               "lr": 0.5,
               "controller": {"k_min": 2, "k_step": 2, "tau_step": 0.92, "lookback": 2,
                              "use_ema": False}}


# ---------------------------------------------------------------------------- problems


def problem_1d(args: argparse.Namespace) -> dict[str, Any]:
    """Operator, source shape, observation and parameter map of the 1D problem."""
    n = SETTINGS_1D["n"]
    h = 1.0 / (n + 1)
    x = np.arange(1, n + 1) * h
    operator = po.LaplacianStencil(n, spacing=h)
    shape_vector = np.sin(2 * np.pi * x)
    u_ref = np.linalg.solve(operator.matmat(np.eye(n)), THETA_REF * shape_vector)
    return {"operator": operator, "solver": "jacobi",
            "source": lambda theta: theta[0] * jnp.asarray(shape_vector),
            "u_ref": jnp.asarray(u_ref), "params_init": jnp.array([THETA_INIT]),
            "params_ref": jnp.array([THETA_REF]), "k_max": SETTINGS_1D["controller"]["k_max"],
            "steps": SETTINGS_1D["steps"], "optimizer": optax.sgd(SETTINGS_1D["lr"]),
            "controller": dict(SETTINGS_1D["controller"]), "size": f"N={n}"}


def problem_2d(args: argparse.Namespace) -> dict[str, Any]:
    """Operator, sine-mode source field, observation and parameters of the 2D variant."""
    sizes = SETTINGS_2D["full" if args.full else "tiny"]
    n, m = sizes["n"], sizes["modes"]
    h = 1.0 / (n + 1)
    x = np.arange(1, n + 1) * h
    operator = po.LaplacianStencil((n, n), spacing=h)
    # basis[j, k] = sin((j+1) pi x) sin((k+1) pi y), flattened in the grid's row-major order.
    sines = np.sin(np.pi * np.outer(np.arange(1, m + 1), x))  # (m, n)
    basis = np.einsum("jx,ky->jkxy", sines, sines).reshape(m * m, n * n)
    rng = np.random.default_rng(args.seed)
    decay = 1.0 / np.add.outer(np.arange(1, m + 1), np.arange(1, m + 1)).reshape(-1)
    coefficients_ref = rng.uniform(-1, 1, m * m) * decay * 50
    # Each sine mode is an eigenvector of the discrete Laplacian: the exact solution is a
    # mode-wise division, no dense matrix needed.
    eigen_1d = (2 - 2 * np.cos(np.pi * np.arange(1, m + 1) * h)) / h**2
    eigen = np.add.outer(eigen_1d, eigen_1d).reshape(-1)
    u_ref = (coefficients_ref / eigen) @ basis
    basis_jax = jnp.asarray(basis)
    problem = {"operator": operator, "solver": "cg", "source": lambda c: c @ basis_jax,
               "u_ref": jnp.asarray(u_ref), "params_init": jnp.zeros(m * m),
               "params_ref": jnp.asarray(coefficients_ref), "steps": sizes["steps"],
               "optimizer": optax.adam(SETTINGS_2D["lr"]),
               "size": f"{n}x{n} grid, {m * m} parameters"}
    problem["k_max"] = converged_count(problem, rtol=1e-8, cap=4 * n)
    problem["controller"] = dict(SETTINGS_2D["controller"], k_max=problem["k_max"])
    return problem


def converged_count(problem: dict[str, Any], rtol: float, cap: int) -> int:
    """Iterations of the problem's solver that bring the relative residual of the reference
    source below ``rtol`` (at most ``cap``): the converged baseline's count."""
    from prdp_ops.backends import jax as pj

    operator = problem["operator"]
    b = problem["source"](problem["params_ref"])

    def relative_residual(k: int) -> float:
        x = pj.solve(operator, b, solver=problem["solver"], maxiter=k, rtol=0.0, atol=0.0,
                     **problem.get("solver_options", {}))
        return float(jnp.linalg.norm(b - operator.matvec(x)) / jnp.linalg.norm(b))

    return _common.converged_iterations(relative_residual, rtol, cap)


# ---------------------------------------------------------------------------- training


def make_trainer(problem: dict[str, Any], args: argparse.Namespace) -> _common.Trainer:
    """Gradient steps on the parameters through ``K`` iterations of the problem's solver."""
    from prdp_ops.backends import jax as pj

    operator, solver, source = problem["operator"], problem["solver"], problem["source"]
    u_ref, params_ref = problem["u_ref"], problem["params_ref"]
    optimizer = problem["optimizer"]
    steps = _common.positive_int("--steps", args.epochs, problem["steps"])
    max_steps = problem["k_max"] if args.adjoint == "unrolled" else None
    n = u_ref.shape[0]

    def loss_fn(params: jax.Array, k: jax.Array, k_adjoint: jax.Array) -> jax.Array:
        u = pj.solve(operator, source(params), solver=solver, maxiter=k, rtol=0.0, atol=0.0,
                     adjoint=args.adjoint, adjoint_maxiter=k_adjoint, max_steps=max_steps,
                     **problem.get("solver_options", {}))
        return jnp.sum((u - u_ref) ** 2) / (2 * n)


    @jax.jit
    def step_jit(state: tuple, k: jax.Array, k_adjoint: jax.Array) -> tuple:
        params, opt_state = state
        grads = jax.grad(loss_fn)(params, k, k_adjoint)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def init_state() -> tuple:
        return problem["params_init"], optimizer.init(problem["params_init"])

    def run_epoch(state: tuple, epoch: int, k: int, k_adjoint: int) -> tuple:
        # One "epoch" is one gradient step here: the controller checks after every step.
        return step_jit(state, jnp.asarray(k), jnp.asarray(k_adjoint))

    def parameter_error(state: tuple) -> float:
        params = state[0]
        return float(jnp.linalg.norm(params - params_ref) / jnp.linalg.norm(params_ref))

    def iterations_per_epoch(k: int, k_adjoint: int) -> int:
        return k + (k_adjoint if args.adjoint == "implicit" else k)

    signal, raw, start_views = _common.signal_functions(args, optimizer, loss_fn)

    def gradient(state: tuple, k: int, k_adjoint: int) -> jax.Array:
        # The fidelity signal's gradient: the training loss's (one observation, no batches).
        return signal(*state, jnp.asarray(k), jnp.asarray(k_adjoint))

    def raw_gradient(state: tuple, k: int, k_adjoint: int) -> jax.Array:
        # The start search's signal: the raw gradient of the same loss.
        return raw(*state, jnp.asarray(k), jnp.asarray(k_adjoint))

    return _common.Trainer(init_state=init_state, run_epoch=run_epoch,
                           validate=parameter_error, iterations_per_epoch=iterations_per_epoch,
                           epochs=steps, unit="step", gradient=gradient,
                           gradient_iterations=iterations_per_epoch, raw_gradient=raw_gradient,
                           start_views=lambda state, g, ref: start_views(*state, g, ref))


def make_controller(problem: dict[str, Any], args: argparse.Namespace) -> po.PRDPController:
    """PRDP with the problem's settings and ``--rule``. ``latch=False`` as the paper's code:
    under the plateau rule a later plateau may still refine after a "stop" (the fidelity rule
    never stops)."""
    return po.PRDPController(latch=False, **_common.rule_options(args), **problem["controller"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_arguments(parser, EXAMPLE, unit="step",
                                 plots=f"out/{EXAMPLE}_1d.png or out/{EXAMPLE}_2d.png, by "
                                       "--variant")
    parser.add_argument("--variant", choices=("1d", "2d"), default="1d",
                        help="1d: the paper's scalar amplitude through Jacobi; 2d: a source "
                             "field of many parameters through CG")
    parser.add_argument("--adjoint", choices=("implicit", "unrolled"), default="implicit",
                        help="how gradients go through the solve: implicit (an adjoint solve "
                             "with its own K iterations, default) or unrolled (through the K "
                             "iterations run)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = _common.default_out(f"{EXAMPLE}_{args.variant}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the example; return the result dict (also printed as the last JSON line)."""
    _common.enable_x64()
    args = parse_args(argv)
    problem = problem_2d(args) if args.variant == "2d" else problem_1d(args)
    trainer = make_trainer(problem, args)
    k_baseline = problem["k_max"]
    print(f"Poisson inverse {args.variant} ({problem['size']}), solver {problem['solver']}, "
          f"adjoint {args.adjoint}, {trainer.epochs} steps; converged baseline K = "
          f"{k_baseline}", file=sys.stderr)
    if args.sweep:
        settings = problem["controller"]
        ks = args.sweep_ks or _report.sweep_grid(k_baseline, settings["k_min"],
                                                 settings["k_step"])
        return _report.sweep(f"{EXAMPLE}_{args.variant}", trainer,
                             lambda: make_controller(problem, args), k_baseline, ks,
                             args.out.with_name(args.out.stem + "_sweep.png"),
                             f"Poisson inverse ({args.variant}): final error vs cost",
                             progress=not args.quiet, start=args.start_search)
    controller = make_controller(problem, args)
    baseline, prdp = _common.compare(trainer, controller, k_baseline,
                                     with_baseline=args.compare, progress=not args.quiet,
                                     start=args.start_search)
    estimates = {run.label: np.asarray(run.final_state[0]) for run in (baseline, prdp)
                 if run is not None}
    if args.variant == "1d":
        for label, theta in estimates.items():
            print(f"{label}: theta = {theta[0]:.6f} (reference {THETA_REF})", file=sys.stderr)
    return _report.finish(f"{EXAMPLE}_{args.variant}", baseline, prdp, args.out,
                          f"Poisson inverse ({args.variant}): PRDP vs converged K={k_baseline}")


if __name__ == "__main__":
    main()
