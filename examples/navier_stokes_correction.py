r"""A neural-hybrid corrector for 2D incompressible Navier-Stokes, trained through the
iterative solves of an implicit step with PRDP.

The solver
----------
The incompressible Navier-Stokes equations on the periodic square :math:`[0, 2\pi)^2`,

.. math::

    \partial_t u + (u \cdot \nabla) u = -\nabla p + \nu \Delta u, \qquad \nabla \cdot u = 0,

are stepped on an ``n x n`` collocated grid by a projection method with one Picard
linearisation of the advection (the advecting velocity frozen at the old state :math:`a =
u^t`), first-order upwinding and backward Euler:

1. **implicit advection-diffusion**, one system per velocity component, non-symmetric (the
   upwind stencil follows :math:`a`), solved by GMRES:

   .. math::

       \big(I + \Delta t\, (a \cdot \nabla)_{up} - \nu \Delta t\, \Delta_h\big)\, u^* = u^t;

2. **pressure projection**: with central differences :math:`G` (gradient) and :math:`D =
   -G^T` (divergence), solve :math:`G^T G\, p = G^T u^*` by CG (symmetric positive
   semi-definite; the right-hand side lies in its range) and set :math:`u^{t+1} = u^* - G p`,
   so that :math:`D u^{t+1} = 0` up to the solver's accuracy.

``K`` iterations of each solve give the physics :math:`P_K`; each solve is capped at its own
converged count (the count that brings its relative residual below 1e-8 on the training
data), which is what the baseline runs.

The learning problem
--------------------
Reference data: random divergence-free initial states (a streamfunction of random low Fourier
modes) simulated on a grid twice as fine with converged solves and averaged down to ``n x n``
(the paper: 97^2 down to 48^2, 5 steps, 200 training and 5 validation trajectories,
``dt = 0.1``, ``nu = 1e-4``). The coarse solver alone drifts from the reference; a small
periodic CNN :math:`N_\theta` (a ResNet in plain JAX, ``jax.lax.conv``) corrects it:

``--setup correction`` (default): :math:`u \leftarrow P_K(u) + N_\theta(P_K(u))`;
``--setup prediction``: :math:`u \leftarrow u + N_\theta(u)` -- the network alone, no solver
(so there is nothing for PRDP to save; it is here to compare setups).

Training modalities (``--modality``), the loss being the MSE over the unrolled steps against
the reference:

``one-step``: one step from reference states;
``unrolled`` (default): two steps, gradients through the network and the solves (implicit
adjoint, or ``--adjoint unrolled``);
``unrolled-no-grad``: two steps, each step's input detached and the solves run with
``adjoint="none"`` (no backward solves at all).

PRDP watches the 5-step nMSE of the x-velocity on the validation trajectories, rolled out by
the hybrid model with the *converged* solver (so the signal does not depend on ``K``), with
the paper's settings: ``K`` from one GMRES restart cycle (8 iterations) by one cycle,
``tau_step = 0.95``, the rest default, no latch.

Run ``python examples/navier_stokes_correction.py`` (tiny: 16^2) or add ``--full`` (48^2,
hours on a laptop CPU).
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

EXAMPLE = "navier_stokes_correction"

SIZES = {
    "tiny": {"n": 16, "train": 20, "val": 5, "steps": 5, "width": 8, "blocks": 1,
             "batch": 10, "epochs": 30},
    "full": {"n": 48, "train": 200, "val": 5, "steps": 5, "width": 64, "blocks": 3,
             "batch": 25, "epochs": 100},
}
DT, NU, LENGTH = 0.1, 1e-4, 2 * np.pi
UNROLL = 2
#: The paper's setting: K from 1 by 1 with tau_step 0.95, where K counted GMRES restart cycles
#: of 8 iterations; here K counts iterations, so one cycle is 8 of them.
CONTROLLER = {"k_min": 8, "k_step": 8, "tau_step": 0.95}


# ---------------------------------------------------------------------------- the solver


class Grid:
    """Periodic ``n x n`` grid on ``[0, 2 pi)^2`` with the operators of the scheme.

    Fields are ``(n, n)`` arrays (axis 0 is x, axis 1 is y); velocities ``(2, n, n)``.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.h = LENGTH / n

    def central(self, f: jax.Array, axis: int) -> jax.Array:
        """Central difference ``(f_{i+1} - f_{i-1}) / 2h`` along ``axis``."""
        return (jnp.roll(f, -1, axis) - jnp.roll(f, 1, axis)) / (2 * self.h)

    def gradient(self, p: jax.Array) -> jax.Array:
        return jnp.stack([self.central(p, 0), self.central(p, 1)])

    def divergence(self, u: jax.Array) -> jax.Array:
        return self.central(u[0], 0) + self.central(u[1], 1)

    def pressure_operator(self) -> po.LinearOperator:
        """``G^T G = -D G`` (SPD on its range) on flattened pressures, matrix-free."""
        n = self.n

        def matvec(p: jax.Array) -> jax.Array:
            return -self.divergence(self.gradient(p.reshape(n, n))).reshape(-1)
        return po.FunctionOperator(matvec, n * n, symmetric=True)

    def advection_diffusion(self, a: jax.Array) -> Any:
        """``phi -> phi + dt (a . grad)_upwind phi - nu dt Lap phi`` for a frozen ``a``.

        A plain function closing over ``a``: gradients reach ``a`` through the solve.
        """
        n, h = self.n, self.h

        def matvec(phi: jax.Array) -> jax.Array:
            phi = phi.reshape(n, n)
            out = phi
            for axis in (0, 1):
                backward = (phi - jnp.roll(phi, 1, axis)) / h
                forward = (jnp.roll(phi, -1, axis) - phi) / h
                speed = a[axis]
                out = out + DT * (jnp.maximum(speed, 0) * backward
                                  + jnp.minimum(speed, 0) * forward)
                out = out - NU * DT * (forward - backward) / h
            return out.reshape(-1)
        return matvec


def solve_counts(k: int, k_advection: int, k_pressure: int) -> dict[str, int]:
    """Iterations each solve of a step runs at the controller's ``K``: each is capped at its
    own converged count (the advection solves by GMRES, the pressure solve by CG)."""
    return {"GMRES (advection)": min(k, k_advection), "CG (pressure)": min(k, k_pressure)}


def ns_step(grid: Grid, u: jax.Array, k_advection: Any, k_pressure: Any,
            solve_options: dict[str, Any]) -> jax.Array:
    """One projection step ``P_K(u)`` with the given iteration counts (or tolerances)."""
    from prdp_ops.backends import jax as pj

    n = grid.n
    matvec = grid.advection_diffusion(u)
    solve_adv = solve_options.get("advection", {})
    solve_p = solve_options.get("pressure", {})

    def advect(component: jax.Array, k: Any) -> jax.Array:
        return pj.solve(matvec, component.reshape(-1), solver="gmres", maxiter=k,
                        **solve_adv).reshape(n, n)

    u_star = jnp.stack([advect(u[0], k_advection), advect(u[1], k_advection)])
    rhs = -grid.divergence(u_star).reshape(-1)
    p = pj.solve(grid.pressure_operator(), rhs, solver="cg", maxiter=k_pressure, **solve_p)
    return u_star - grid.gradient(p.reshape(n, n))


# ---------------------------------------------------------------------------- data


def random_divergence_free(rng: np.random.Generator, n: int, count: int) -> np.ndarray:
    """Velocities ``(count, 2, n, n)`` from random streamfunctions (modes |k| <= 4), scaled
    to a maximum speed of 1: ``u = d psi / dy``, ``v = -d psi / dx`` (spectrally)."""
    k = np.fft.fftfreq(n, 1.0 / n)
    kx, ky = np.meshgrid(k, k, indexing="ij")
    low = (np.abs(kx) <= 4) & (np.abs(ky) <= 4) & ((kx != 0) | (ky != 0))
    states = np.empty((count, 2, n, n))
    for s in range(count):
        spectrum = (rng.normal(size=(n, n)) + 1j * rng.normal(size=(n, n))) * low
        spectrum /= 1.0 + kx**2 + ky**2
        u = np.real(np.fft.ifft2(1j * ky * spectrum))
        v = np.real(np.fft.ifft2(-1j * kx * spectrum))
        speed = np.sqrt(u**2 + v**2).max()
        states[s] = np.stack([u, v]) / speed
    return states


def make_data(seed: int, n: int, count: int, steps: int) -> np.ndarray:
    """Reference trajectories ``(count, steps + 1, 2, n, n)``: converged solves on the grid
    ``2n x 2n``, averaged over 2 x 2 blocks."""
    fine = Grid(2 * n)
    converged = {"rtol": 1e-10, "atol": 0.0, "adjoint": "none"}
    options = {"advection": converged, "pressure": converged}
    # Project the initial states first, so that they are discretely divergence-free.
    step = jax.jit(jax.vmap(lambda u: ns_step(fine, u, 40 * n, 40 * n, options)))
    u = jnp.asarray(random_divergence_free(np.random.default_rng(seed), 2 * n, count))
    trajectory = [step(u)]
    for _ in range(steps):
        trajectory.append(step(trajectory[-1]))
    fine_states = np.stack([np.asarray(t) for t in trajectory], axis=1)
    return fine_states.reshape(*fine_states.shape[:3], n, 2, n, 2).mean(axis=(4, 6))


# ---------------------------------------------------------------------------- network


def _periodic_conv(h: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """3x3 convolution with periodic padding of ``h`` (channels, n, n)."""
    padded = jnp.pad(h, ((0, 0), (1, 1), (1, 1)), mode="wrap")
    return jax.lax.conv_general_dilated(padded[None], kernel, (1, 1), "VALID")[0] + bias


def init_cnn(key: jax.Array, width: int, blocks: int) -> dict[str, Any]:
    """A periodic ResNet 2 -> width -> 2 channels; the output layer starts at zero, so the
    corrector starts as "no correction"."""
    def conv(key: jax.Array, c_out: int, c_in: int) -> tuple[jax.Array, jax.Array]:
        bound = np.sqrt(6.0 / (9 * c_in))
        return (jax.random.uniform(key, (c_out, c_in, 3, 3), minval=-bound, maxval=bound),
                jnp.zeros((c_out, 1, 1)))

    keys = jax.random.split(key, 2 * blocks + 1)
    return {"lift": conv(keys[0], width, 2),
            "blocks": [(conv(keys[1 + 2 * b], width, width), conv(keys[2 + 2 * b], width, width))
                       for b in range(blocks)],
            "project": (jnp.zeros((2, width, 3, 3)), jnp.zeros((2, 1, 1)))}


def apply_cnn(params: dict[str, Any], u: jax.Array) -> jax.Array:
    """The corrector on one velocity field ``(2, n, n)``."""
    h = jax.nn.relu(_periodic_conv(u, *params["lift"]))
    for first, second in params["blocks"]:
        h = h + _periodic_conv(jax.nn.relu(_periodic_conv(h, *first)), *second)
    return _periodic_conv(h, *params["project"])


# ---------------------------------------------------------------------------- training


def build(args: argparse.Namespace) -> tuple[_common.Trainer, dict[str, Any]]:
    """The training problem for the parsed arguments."""
    from prdp_ops.backends import jax as pj

    size_key = "full" if args.full else "tiny"
    sizes = SIZES[size_key]
    n = _common.positive_int("--grid", args.grid, sizes["n"])
    grid = Grid(n)
    epochs = _common.positive_int("--epochs", args.epochs, sizes["epochs"])
    data = make_data(args.seed, n, sizes["train"] + sizes["val"], sizes["steps"])
    train, val = data[: sizes["train"]], jnp.asarray(data[sizes["train"]:])
    unroll = 1 if args.modality == "one-step" else UNROLL
    # All windows of unroll + 1 consecutive states of the training trajectories.
    windows = np.concatenate([train[:, t: t + unroll + 1]
                              for t in range(sizes["steps"] + 1 - unroll)])
    windows = jnp.asarray(windows)
    batch = sizes["batch"]
    steps_per_epoch = windows.shape[0] // batch

    # Converged counts: iterations to a relative residual of 1e-8 on the first training state.
    u_sample = jnp.asarray(train[0, 0])
    matvec = grid.advection_diffusion(u_sample)
    advected, iterations = [], []
    for component in u_sample:
        x, result = pj.solve(matvec, component.reshape(-1), solver="gmres", rtol=1e-8,
                             maxiter=40 * n, return_result=True)
        advected.append(x.reshape(n, n))
        iterations.append(int(result.iterations))
    k_advection = max(iterations)
    _, result = pj.solve(grid.pressure_operator(),
                         -grid.divergence(jnp.stack(advected)).reshape(-1), solver="cg",
                         rtol=1e-8, maxiter=40 * n, return_result=True)
    k_pressure = int(result.iterations)
    k_max = max(k_advection, k_pressure)

    differentiable = args.modality == "unrolled"
    adjoint = args.adjoint if differentiable else "none"
    max_steps = k_max if adjoint == "unrolled" else None

    def physics(u: jax.Array, k: jax.Array, k_adjoint: jax.Array) -> jax.Array:
        def options(cap: int, rtol: float) -> dict[str, Any]:
            return {"rtol": rtol, "atol": 0.0, "adjoint": adjoint, "max_steps": max_steps,
                    "adjoint_maxiter": jnp.minimum(k_adjoint, cap)}
        # GMRES runs exactly K iterations (rtol = 0). The pressure system is singular
        # (constants and checkerboards are in G's null space): CG on its consistent
        # right-hand side converges, but iterating on at round-off level breaks down, so a
        # tolerance far below the converged level (1e-8) stops it there. The accounting
        # counts K, an upper bound that is reached except for such exhausted solves.
        return ns_step(grid, u, jnp.minimum(k, k_advection), jnp.minimum(k, k_pressure),
                       {"advection": options(k_advection, 0.0),
                        "pressure": options(k_pressure, 1e-12)})

    def model_step(params: Any, u: jax.Array, k: jax.Array, k_adjoint: jax.Array) -> jax.Array:
        if args.setup == "prediction":
            return u + apply_cnn(params, u)
        if args.modality == "unrolled-no-grad":
            u = jax.lax.stop_gradient(u)
        coarse = physics(u, k, k_adjoint)
        return coarse + apply_cnn(params, coarse)

    def loss_fn(params: Any, window: jax.Array, k: jax.Array, k_adjoint: jax.Array) -> jax.Array:
        def one(window: jax.Array) -> jax.Array:
            u, loss = window[0], 0.0
            for t in range(1, unroll + 1):
                u = model_step(params, u, k, k_adjoint)
                loss = loss + jnp.mean((u - window[t]) ** 2)
            return loss / unroll
        return jnp.mean(jax.vmap(one)(window))

    schedule = optax.cosine_decay_schedule(1e-3, epochs * steps_per_epoch)
    optimizer = optax.adam(schedule)

    @jax.jit
    def run_epoch_jit(state: tuple, batches: jax.Array, k: jax.Array,
                      k_adjoint: jax.Array) -> tuple:
        def train_step(carry: tuple, window: jax.Array) -> tuple[tuple, jax.Array]:
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, window, k, k_adjoint)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss
        state, _ = jax.lax.scan(train_step, state, batches)
        return state

    def run_epoch(state: tuple, epoch: int, k: int, k_adjoint: int) -> tuple:
        order = np.random.default_rng([args.seed, epoch]).permutation(windows.shape[0])
        order = order[: steps_per_epoch * batch].reshape(steps_per_epoch, batch)
        return run_epoch_jit(state, windows[order], jnp.asarray(k), jnp.asarray(k_adjoint))

    @jax.jit
    def validate_jit(params: Any) -> jax.Array:
        # Rolled out with the converged solver, so the signal does not depend on K.
        k_conv = jnp.asarray(k_max)

        def rollout(trajectory: jax.Array) -> jax.Array:
            def step(u: jax.Array, reference: jax.Array) -> tuple[jax.Array, jax.Array]:
                u = model_step(params, u, k_conv, k_conv)
                return u, jnp.sum((u[0] - reference[0]) ** 2) / jnp.sum(reference[0] ** 2)
            _, errors = jax.lax.scan(step, trajectory[0], trajectory[1:])
            return jnp.mean(errors)
        return jnp.mean(jax.vmap(rollout)(val))

    def init_state() -> tuple:
        params = init_cnn(jax.random.PRNGKey(args.seed), sizes["width"], sizes["blocks"])
        return params, optimizer.init(params)

    def iterations_per_step(k: int, k_adjoint: int) -> int:
        # One batched step of the model: unroll steps of two GMRES and one CG solve each.
        if args.setup == "prediction":
            return 0
        forward = 2 * min(k, k_advection) + min(k, k_pressure)
        if adjoint == "implicit":
            backward = 2 * min(k_adjoint, k_advection) + min(k_adjoint, k_pressure)
        else:
            backward = forward if adjoint == "unrolled" else 0
        return unroll * (forward + backward)

    def iterations_per_epoch(k: int, k_adjoint: int) -> int:
        return steps_per_epoch * iterations_per_step(k, k_adjoint)

    # The fidelity signal: the training loss's gradient on the validation trajectories' first
    # windows, one batched step's solves (counted like a training step's).
    val_windows = val[:, : unroll + 1]
    signal, raw, start_views = _common.signal_functions(args, optimizer, loss_fn)

    def gradient(state: tuple, k: int, k_adjoint: int) -> Any:
        return signal(*state, val_windows, jnp.asarray(k), jnp.asarray(k_adjoint))

    def raw_gradient(state: tuple, k: int, k_adjoint: int) -> Any:
        # The start search's signal: the raw gradient on the same windows.
        return raw(*state, val_windows, jnp.asarray(k), jnp.asarray(k_adjoint))

    trainer = _common.Trainer(init_state=init_state, run_epoch=run_epoch,
                              validate=lambda state: float(validate_jit(state[0])),
                              iterations_per_epoch=iterations_per_epoch, epochs=epochs,
                              gradient=gradient if args.setup != "prediction" else None,
                              gradient_iterations=iterations_per_step,
                              raw_gradient=raw_gradient if args.setup != "prediction" else None,
                              start_views=lambda state, g, ref: start_views(*state, g, ref))
    info = {"n": n, "size": size_key, "k_advection": k_advection, "k_pressure": k_pressure,
            "k_max": k_max, "epochs": epochs, "adjoint": adjoint, "windows": windows.shape[0]}
    return trainer, info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_arguments(parser, EXAMPLE)
    parser.add_argument("--modality", choices=("one-step", "unrolled-no-grad", "unrolled"),
                        default="unrolled",
                        help="one-step: one step from reference states; unrolled (default): "
                             "two steps with gradients through network and solves; "
                             "unrolled-no-grad: two steps, no gradients through the solves")
    parser.add_argument("--setup", choices=("correction", "prediction"), default="correction",
                        help="correction (default): the network corrects the coarse solver's "
                             "step; prediction: the network alone, no solver")
    parser.add_argument("--adjoint", choices=("implicit", "unrolled"), default="implicit",
                        help="how the fully differentiable modality differentiates the solves")
    parser.add_argument("--grid", type=int, default=None,
                        help="coarse grid size n (default 16, 48 with --full); the reference "
                             "runs at 2n")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the example; return the result dict (also printed as the last JSON line)."""
    _common.enable_x64()
    args = parse_args(argv)
    trainer, info = build(args)
    print(f"Navier-Stokes {info['n']}x{info['n']} ({info['size']}), {args.setup} setup, "
          f"{args.modality} training (solver adjoint {info['adjoint']}), {info['windows']} "
          f"windows, {info['epochs']} epochs; converged counts: GMRES {info['k_advection']}, "
          f"CG {info['k_pressure']}", file=sys.stderr)
    title = f"Navier-Stokes corrector ({args.setup}, {args.modality})"

    def make_controller() -> po.PRDPController:
        # latch=False as the paper's code: under the plateau rule a later plateau may still
        # refine after a "stop" (the fidelity rule never stops).
        return po.PRDPController(k_max=info["k_max"], latch=False,
                                 **_common.rule_options(args), **CONTROLLER)

    if args.sweep:
        step = CONTROLLER["k_step"]
        ks = args.sweep_ks or _report.sweep_grid(info["k_max"], step, step)
        return _report.sweep(EXAMPLE, trainer, make_controller, info["k_max"], ks,
                             args.out.with_name(args.out.stem + "_sweep.png"),
                             f"{title}: final error vs cost", progress=not args.quiet,
                             start=args.start_search)
    controller = make_controller()
    baseline, prdp = _common.compare(trainer, controller, info["k_max"],
                                     with_baseline=args.compare, progress=not args.quiet,
                                     start=args.start_search)
    return _report.finish(EXAMPLE, baseline, prdp, args.out,
                          f"{title}: PRDP vs converged (GMRES {info['k_advection']}, "
                          f"CG {info['k_pressure']})",
                          k_counts=lambda k: solve_counts(k, info["k_advection"],
                                                          info["k_pressure"]))


if __name__ == "__main__":
    main()
