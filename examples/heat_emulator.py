r"""A neural emulator of implicit (BTCS) heat diffusion, trained through an iterative solver
with PRDP.

The scenario
------------
Heat diffusion :math:`u_t = \nu \Delta u` on the periodic unit square (interval, cube) with
``n`` nodes per axis (spacing :math:`h = 1/n`), stepped by backward Euler in time and central
differences in space (BTCS):

.. math::

    A u^{t+1} = u^t, \qquad A = I + r L, \qquad r = \frac{\nu\,\Delta t}{h^2},

where :math:`L` is the periodic (2d+1)-point stencil of :math:`-h^2 \Delta`. :math:`A` is
symmetric positive definite with diagonal :math:`1 + 2 d r`, so Jacobi's iteration matrix
:math:`I - D^{-1}A` has spectral radius :math:`2dr / (1 + 2dr) < 1`: every iteration removes
a fixed fraction of the error, and ``K`` iterations give the physics :math:`P_K`, an
approximation of :math:`A^{-1}` that tends to it as ``K`` grows.

The learning problem (the paper's "neural emulator"): a network :math:`N_\theta` must learn
one time step. It is trained on the *two-step* target through the solver,

.. math::

    \min_\theta \; \mathrm{MSE}\big(P_K(N_\theta(u^0)),\, u^2\big),

so :math:`N_\theta` has to play the first step, and the physics the second. With coarse
physics (small ``K``) the network learns to compensate for :math:`P_K`'s error instead of
learning the step; PRDP raises ``K`` only while that still improves the network. The
validation metric does not involve the solver at all: the two-step error of the network
alone, :math:`\mathrm{nMSE}(N_\theta(N_\theta(u^0)), u^2)`, averaged over the validation set.
Gradients reach :math:`\theta` through the solve by the implicit adjoint (one solve with
:math:`A^T = A`) or by unrolling the ``K`` iterations (``--adjoint``).

After training, the network steps alone from each validation state for ``--rollout`` steps,
and the normalised RMSE against the exact BTCS trajectory is reported per step and averaged
over the horizon (the rollout metrics of APEBench).

Data (as in the paper's reference setup): initial states are sums of five sine and five
cosine modes with amplitudes drawn from U(-1, 1); in 1D mode ``j`` has wavenumber ``j``, in
2D and 3D each mode gets a random wave vector with components in 1..5 (1..3 in 3D). Targets
come from the exact BTCS step (a direct solve by FFT, since :math:`A` is circulant).

Sizes
-----
``--dim 1``: 30 nodes, ``nu dt = 1e-3`` (r = 0.9), MLP 30 -> 64 -> 64 -> 64 -> 30 (ReLU),
    Adam with exponential decay from 1e-3, batch 25, 200 training / 5 validation states,
    100 epochs (the paper's sizes, also the default); implicit adjoint; PRDP: K from 1 by 1,
    tau_step 0.98, tau_stop 0.9, EMA window 8.
``--dim 2``: 30 x 30 nodes and an MLP of width 3000 for 70 epochs at ``--full`` (20 x 20,
    width 256, 100 states, 60 epochs by default), ``nu dt = 1e-3``; unrolled adjoint; PRDP:
    tau_step 0.9, tau_stop 0.9, window 6, lookback 3. ``--full`` uses the paper's ReLU MLP
    and Adam from 1e-3; the small default uses a linear MLP (no activation) and Adam from
    3e-3, because the small ReLU network did not learn the step at all (validation nMSE
    above 1, the score of predicting zero).
``--dim 3``: a 3D variant, 32^3 at ``--full`` (12^3 by default) with ``nu dt = 4 / 32^2``
    (r = 4 at 32^3), so that the implicit solve dominates a training step; the network is a
    linear periodic CNN ``u + conv(conv(u))`` with 3x3x3 kernels (an MLP on 32^3 values would
    have 10^9 weights), Adam from 1e-2, batch 5; PRDP as in 2D but with K starting at and
    growing by a twentieth of the converged count.

``--activation linear`` drops the MLP's ReLUs: a linear network can represent the BTCS step
exactly, so its error is limited by the physics it was trained through rather than by its
capacity -- the hard case for PRDP (see examples/RESULTS.md).

The converged baseline runs every solve with ``K_conv`` iterations, the smallest count whose
relative residual is below ``--converged-rtol`` (1e-6) on the validation data; PRDP's
``k_max`` is that same count. The controller runs without the latch, as the paper's code.

Run ``python examples/heat_emulator.py --dim 1`` (tiny, seconds) or add ``--full``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
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

EXAMPLE = "heat_emulator"

#: Per-dimension settings: (tiny, full) sizes and the paper's PRDP hyperparameters.
SETTINGS: dict[int, dict[str, Any]] = {
    1: {"tiny": {"n": 30, "width": 64, "epochs": 100, "train": 200},
        "full": {"n": 30, "width": 64, "epochs": 100, "train": 200},
        "nu_dt": 1e-3, "max_wavenumber": 5, "adjoint": "implicit", "batch": 25, "lr": 1e-3,
        "activation": "relu",
        "controller": {"tau_step": 0.98, "tau_stop": 0.9, "ema_window": 8, "lookback": 3}},
    2: {"tiny": {"n": 20, "width": 256, "epochs": 60, "train": 100, "lr": 3e-3,
                 "activation": "linear"},
        "full": {"n": 30, "width": 3000, "epochs": 70, "train": 200},
        "nu_dt": 1e-3, "max_wavenumber": 5, "adjoint": "unrolled",
        "batch": 25, "lr": 1e-3, "activation": "relu",
        "controller": {"tau_step": 0.9, "tau_stop": 0.9, "ema_window": 6, "lookback": 3}},
    3: {"tiny": {"n": 12, "width": 8, "epochs": 30, "train": 50},
        "full": {"n": 32, "width": 8, "epochs": 50, "train": 100},
        "nu_dt": 4.0 / 32**2, "max_wavenumber": 3, "adjoint": "implicit", "batch": 5,
        "lr": 1e-2, "activation": "linear", "relative_step": True,
        "controller": {"tau_step": 0.9, "tau_stop": 0.9, "ema_window": 6, "lookback": 3}},
}

NUM_MODES = 5
NUM_VALIDATION = 5


# ---------------------------------------------------------------------------- physics


def btcs_operator(grid: tuple[int, ...], r: float) -> po.LinearOperator:
    """``A = I + r h^2 (-Delta)`` on the periodic grid, matrix-free with its diagonal.

    ``h^2 (-Delta)`` is the library's periodic Laplacian stencil with unit spacing; Jacobi
    reads the (constant) diagonal ``1 + 2 d r``.
    """
    laplacian = po.LaplacianStencil(grid, boundary="periodic")
    size = int(np.prod(grid))
    diagonal = jnp.full(size, 1.0 + 2 * len(grid) * r)
    return po.FunctionOperator(lambda x: x + r * laplacian.matvec(x), size, symmetric=True,
                               diagonal=diagonal)


def btcs_step_exact(u: np.ndarray, r: float) -> np.ndarray:
    """One exact BTCS step of a batch of grids ``(batch, *grid)``, by FFT.

    ``A`` is circulant, so the Fourier modes are its eigenvectors with eigenvalues
    ``1 + r sum_a (2 - 2 cos(2 pi k_a / n))``.
    """
    grid = u.shape[1:]
    eigenvalues = np.ones(grid)
    for axis, n in enumerate(grid):
        shape = [1] * len(grid)
        shape[axis] = n
        eigenvalues = eigenvalues + r * (2 - 2 * np.cos(2 * np.pi * np.arange(n) / n)).reshape(
            shape)
    axes = tuple(range(1, u.ndim))
    return np.real(np.fft.ifftn(np.fft.fftn(u, axes=axes) / eigenvalues, axes=axes))


def random_initial_states(rng: np.random.Generator, count: int, grid: tuple[int, ...],
                          max_wavenumber: int) -> np.ndarray:
    """``count`` states, each a sum of 5 sine and 5 cosine modes with U(-1, 1) amplitudes."""
    coordinates = np.meshgrid(*[np.arange(n) / n for n in grid], indexing="ij")
    states = np.zeros((count, *grid))
    for s in range(count):
        for j in range(1, NUM_MODES + 1):
            if len(grid) == 1:
                wave = (j,)
            else:
                wave = tuple(rng.integers(1, max_wavenumber + 1, size=len(grid)))
            phase = 2 * np.pi * sum(k * x for k, x in zip(wave, coordinates, strict=True))
            a_sin, a_cos = rng.uniform(-1, 1, size=2)
            states[s] += a_sin * np.sin(phase) + a_cos * np.cos(phase)
    return states


def make_data(seed: int, grid: tuple[int, ...], r: float, num_train: int, rollout: int,
              max_wavenumber: int) -> dict[str, np.ndarray]:
    """Training pairs ``(u0, u2)``, validation pairs and validation reference trajectories."""
    rng = np.random.default_rng(seed)
    u0 = random_initial_states(rng, num_train + NUM_VALIDATION, grid, max_wavenumber)
    trajectory = [u0]
    for _ in range(max(rollout, 2)):
        trajectory.append(btcs_step_exact(trajectory[-1], r))
    trajectory = np.stack(trajectory, axis=1)  # (samples, time, *grid)
    flat = trajectory.reshape(*trajectory.shape[:2], -1)
    return {"train_u0": flat[:num_train, 0], "train_u2": flat[:num_train, 2],
            "val_u0": flat[num_train:, 0], "val_u2": flat[num_train:, 2],
            "val_trajectory": flat[num_train:]}


# ---------------------------------------------------------------------------- networks


def init_mlp(key: jax.Array, size: int, width: int, activation: str,
             depth: int = 3) -> list[tuple]:
    """Weights of an MLP ``size -> width (x depth) -> size``, zero biases.

    Uniform weights with variance ``2 / fan_in`` for ReLU (He) and ``1 / fan_in`` for the
    linear network (LeCun), so that signals keep their scale through the layers.
    """
    sizes = [size] + [width] * depth + [size]
    gain = 6.0 if activation == "relu" else 3.0
    params = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        key, sub = jax.random.split(key)
        bound = np.sqrt(gain / fan_in)
        params.append((jax.random.uniform(sub, (fan_in, fan_out), minval=-bound, maxval=bound),
                       jnp.zeros(fan_out)))
    return params


def make_apply_mlp(activation: str) -> Callable[[list[tuple], jax.Array], jax.Array]:
    """The MLP on a flat state: ReLU (the paper's) or no activation between the layers (a
    linear network, which can represent the BTCS step exactly)."""
    act = jax.nn.relu if activation == "relu" else (lambda h: h)

    def apply_mlp(params: list[tuple], u: jax.Array) -> jax.Array:
        for weight, bias in params[:-1]:
            u = act(u @ weight + bias)
        weight, bias = params[-1]
        return u @ weight + bias
    return apply_mlp


def _periodic_conv3d(u: jax.Array, kernel: jax.Array) -> jax.Array:
    """3x3x3 convolution with periodic padding; ``u`` is ``(channels, n, n, n)``."""
    padded = jnp.pad(u, ((0, 0), (1, 1), (1, 1), (1, 1)), mode="wrap")
    return jax.lax.conv_general_dilated(padded[None], kernel, (1, 1, 1), "VALID")[0]


def init_cnn(key: jax.Array, width: int) -> list[tuple]:
    """Weights of a periodic CNN 1 -> width -> 1 channels with 3x3x3 kernels.

    The last layer starts at zero, so the network starts as the identity map (see
    :func:`make_apply_cnn`) and learns the step's deviation from it.
    """
    first = jax.random.uniform(key, (width, 1, 3, 3, 3), minval=-1.0, maxval=1.0) / 27
    return [(first, jnp.zeros((width, 1, 1, 1))),
            (jnp.zeros((1, width, 3, 3, 3)), jnp.zeros((1, 1, 1, 1)))]


def make_apply_cnn(grid: tuple[int, ...],
                   activation: str) -> Callable[[list[tuple], jax.Array], jax.Array]:
    """The CNN as a function of a flat state: ``u + conv(act(conv(u)))`` on the 3D grid.

    Without an activation it is a linear network whose receptive field (5^3 nodes) can hold
    an explicit approximation of the implicit step.
    """
    act = jax.nn.relu if activation == "relu" else (lambda h: h)

    def apply_cnn(params: list[tuple], u: jax.Array) -> jax.Array:
        (kernel_in, bias_in), (kernel_out, bias_out) = params
        field = u.reshape(1, *grid)
        hidden = act(_periodic_conv3d(field, kernel_in) + bias_in)
        return (field + _periodic_conv3d(hidden, kernel_out) + bias_out).reshape(-1)
    return apply_cnn


# ---------------------------------------------------------------------------- metrics


def nmse(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """Mean over samples of ``||prediction - target||^2 / ||target||^2``."""
    return jnp.mean(jnp.sum((prediction - target) ** 2, axis=-1) / jnp.sum(target**2, axis=-1))


def rollout_nrmse(apply_net: Callable, params: Any, trajectory: jax.Array) -> np.ndarray:
    """nRMSE of the network stepping alone, per step: ``mean_s ||u_t - ref_t|| / ||ref_t||``.

    ``trajectory`` is ``(samples, steps + 1, size)``; entry ``t`` of the result compares step
    ``t + 1``.
    """
    def step(u: jax.Array, reference: jax.Array) -> tuple[jax.Array, jax.Array]:
        u = jax.vmap(apply_net, (None, 0))(params, u)
        error = jnp.linalg.norm(u - reference, axis=-1) / jnp.linalg.norm(reference, axis=-1)
        return u, jnp.mean(error)

    _, errors = jax.lax.scan(step, trajectory[:, 0], jnp.swapaxes(trajectory[:, 1:], 0, 1))
    return np.asarray(errors)


# ---------------------------------------------------------------------------- training


def build(args: argparse.Namespace) -> tuple[_common.Trainer, dict[str, Any]]:
    """The training problem and its settings for the parsed arguments."""
    from prdp_ops.backends import jax as pj

    setting = SETTINGS[args.dim]
    size_key = "full" if args.full else "tiny"
    sizes = setting[size_key]
    n = sizes["n"]
    grid = (n,) * args.dim
    r = setting["nu_dt"] * n**2
    epochs = _common.positive_int("--epochs", args.epochs, sizes["epochs"])
    adjoint = args.adjoint or setting["adjoint"]
    data = make_data(args.seed, grid, r, sizes["train"], args.rollout,
                     setting["max_wavenumber"])
    # Size-specific choices (the small 2D default) override the dimension's.
    activation = args.activation or sizes.get("activation", setting["activation"])
    operator = btcs_operator(grid, r)
    size = int(np.prod(grid))

    if args.dim == 3:
        apply_net = make_apply_cnn(grid, activation)
        init_params = lambda: init_cnn(jax.random.PRNGKey(args.seed), sizes["width"])  # noqa: E731
    else:
        apply_net = make_apply_mlp(activation)
        init_params = lambda: init_mlp(jax.random.PRNGKey(args.seed), size, sizes["width"],  # noqa: E731
                                       activation)

    num_train = data["train_u0"].shape[0]
    batch_size = setting["batch"]
    steps_per_epoch = num_train // batch_size
    lr = sizes.get("lr", setting["lr"]) if args.lr is None else args.lr
    schedule = optax.exponential_decay(lr, transition_steps=epochs * steps_per_epoch,
                                       decay_rate=0.1)
    optimizer = optax.adam(schedule)

    def relative_residual(k: int) -> float:
        b = jnp.asarray(data["val_u0"])
        x = jax.vmap(lambda bi: pj.solve(operator, bi, solver=args.solver, maxiter=k,
                                         rtol=0.0, atol=0.0))(b)
        residual = b - jax.vmap(operator.matvec)(x)
        return float(jnp.max(jnp.linalg.norm(residual, axis=-1) / jnp.linalg.norm(b, axis=-1)))

    k_converged = _common.converged_iterations(relative_residual, args.converged_rtol,
                                               args.k_cap)
    # Unrolling keeps one state per iteration: the buffer is sized for the largest count.
    max_steps = k_converged if adjoint == "unrolled" else None

    def physics(b: jax.Array, k: jax.Array, k_adjoint: jax.Array) -> jax.Array:
        return pj.solve(operator, b, solver=args.solver, maxiter=k, rtol=0.0, atol=0.0,
                        adjoint=adjoint, adjoint_maxiter=k_adjoint, max_steps=max_steps)

    def loss_fn(params: Any, u0: jax.Array, u2: jax.Array, k: jax.Array,
                k_adjoint: jax.Array) -> jax.Array:
        u1 = jax.vmap(apply_net, (None, 0))(params, u0)
        prediction = jax.vmap(physics, (0, None, None))(u1, k, k_adjoint)
        return jnp.mean((prediction - u2) ** 2)

    @jax.jit
    def run_epoch_jit(state: tuple, u0: jax.Array, u2: jax.Array, k: jax.Array,
                      k_adjoint: jax.Array) -> tuple:
        def train_step(carry: tuple, batch: tuple) -> tuple[tuple, jax.Array]:
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, *batch, k, k_adjoint)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss
        state, _ = jax.lax.scan(train_step, state, (u0, u2))
        return state

    train_u0 = jnp.asarray(data["train_u0"])
    train_u2 = jnp.asarray(data["train_u2"])

    def batches(epoch: int) -> tuple[jax.Array, jax.Array]:
        # The same shuffle for both runs: it depends on the seed and the epoch only.
        order = np.random.default_rng([args.seed, epoch]).permutation(num_train)
        order = order[: steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)
        return train_u0[order], train_u2[order]

    def run_epoch(state: tuple, epoch: int, k: int, k_adjoint: int) -> tuple:
        return run_epoch_jit(state, *batches(epoch), jnp.asarray(k), jnp.asarray(k_adjoint))

    val_u0, val_u2 = jnp.asarray(data["val_u0"]), jnp.asarray(data["val_u2"])
    signal, raw, start_views = _common.signal_functions(args, optimizer, loss_fn)

    def gradient(state: tuple, k: int, k_adjoint: int) -> Any:
        # The fidelity signal: the training loss's update (or gradient) on the validation states.
        return signal(*state, val_u0, val_u2, jnp.asarray(k), jnp.asarray(k_adjoint))

    def raw_gradient(state: tuple, k: int, k_adjoint: int) -> Any:
        # The start search's signal: the raw gradient on the same states.
        return raw(*state, val_u0, val_u2, jnp.asarray(k), jnp.asarray(k_adjoint))

    def gradient_iterations(k: int, k_adjoint: int) -> int:
        # One batched solve of the validation states and its reverse, counted like a training
        # step's batched solve (iterations_per_epoch).
        return k + backward_iterations(k, k_adjoint)

    @jax.jit
    def validate_jit(params: Any) -> jax.Array:
        one_step = jax.vmap(apply_net, (None, 0))
        return nmse(one_step(params, one_step(params, val_u0)), val_u2)

    def init_state() -> tuple:
        params = init_params()
        return params, optimizer.init(params)

    def backward_iterations(k: int, k_adjoint: int) -> int:
        # The reverse of a solve: k_adjoint iterations of the transposed solve (implicit) or a
        # sweep back over the same k iterations (unrolled).
        return k_adjoint if adjoint == "implicit" else (k if adjoint == "unrolled" else 0)

    def iterations_per_epoch(k: int, k_adjoint: int) -> int:
        # One batched solve per step.
        return steps_per_epoch * (k + backward_iterations(k, k_adjoint))

    trainer = _common.Trainer(init_state=init_state, run_epoch=run_epoch,
                              validate=lambda state: float(validate_jit(state[0])),
                              iterations_per_epoch=iterations_per_epoch, epochs=epochs,
                              gradient=gradient, gradient_iterations=gradient_iterations,
                              raw_gradient=raw_gradient,
                              start_views=lambda state, g, ref: start_views(*state, g, ref))

    info = {"grid": grid, "r": r, "adjoint": adjoint, "epochs": epochs,
            "k_converged": k_converged, "size": size_key, "apply_net": apply_net,
            "val_trajectory": jnp.asarray(data["val_trajectory"][:, : args.rollout + 1]),
            "setting": setting}
    return trainer, info


def make_controller(setting: dict[str, Any], k_max: int, **rule: Any) -> po.PRDPController:
    """PRDP capped at the converged count, without the latch (as the paper's code).

    ``latch=False``: after a "stop" a later plateau may still refine (the library's default,
    ``latch=True``, keeps ``K`` from the first "stop" on, as the README's loop does).

    1D and 2D: the paper's K from 1 by 1. 3D (no published setting): a converged count in the
    hundreds would take hundreds of plateaus to reach by ones, so K starts at, and grows by,
    one twentieth of the converged count (at least 1).
    """
    step = max(1, k_max // 20) if setting.get("relative_step") else 1
    return po.PRDPController(k_min=step, k_step=step, k_max=k_max, latch=False, **rule,
                             **setting["controller"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_arguments(parser, EXAMPLE,
                                 plots=", ".join(f"out/{EXAMPLE}_{d}d.png" for d in (1, 2))
                                 + f" or out/{EXAMPLE}_3d.png, by --dim")
    parser.add_argument("--dim", type=int, choices=(1, 2, 3), default=1,
                        help="1: the paper's 1D setting (default); 2: the README's main job; "
                             "3: a 3D variant with a CNN")
    parser.add_argument("--solver", choices=("jacobi", "steepest_descent"), default="jacobi",
                        help="the iterative solver of the implicit step (default: jacobi, "
                             "the paper's)")
    parser.add_argument("--adjoint", choices=("implicit", "unrolled"), default=None,
                        help="default: implicit in 1D and 3D, unrolled in 2D (the paper's)")
    parser.add_argument("--activation", choices=("relu", "linear"), default=None,
                        help="the network's activation (default: ReLU as in the paper, "
                             "except none in 3D and in the small 2D default)")
    parser.add_argument("--lr", type=float, default=None,
                        help="initial Adam learning rate, decaying tenfold over training "
                             "(default: 1e-3 as in the paper, 3e-3 in the small 2D default, "
                             "1e-2 in 3D)")
    parser.add_argument("--rollout", type=int, default=50,
                        help="steps of the validation rollout (nRMSE per step)")
    parser.add_argument("--converged-rtol", type=float, default=1e-6,
                        help="relative residual that defines the converged baseline's K")
    parser.add_argument("--k-cap", type=int, default=2000,
                        help="largest K tried when searching for the converged count")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = _common.default_out(f"{EXAMPLE}_{args.dim}d")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the example; return the result dict (also printed as the last JSON line)."""
    _common.enable_x64()
    args = parse_args(argv)
    trainer, info = build(args)
    print(f"heat {args.dim}D, grid {info['grid']}, r = {info['r']:.3g}, solver {args.solver}, "
          f"adjoint {info['adjoint']}, {info['epochs']} epochs ({info['size']}); converged "
          f"baseline K = {info['k_converged']} (rtol {args.converged_rtol:g})",
          file=sys.stderr)
    if args.sweep:
        step = max(1, info["k_converged"] // 20) if info["setting"].get("relative_step") else 1
        ks = args.sweep_ks or _report.sweep_grid(info["k_converged"], step, step)
        return _report.sweep(f"{EXAMPLE}_{args.dim}d", trainer,
                             lambda: make_controller(info["setting"], info["k_converged"],
                                                     **_common.rule_options(args)),
                             info["k_converged"], ks,
                             args.out.with_name(args.out.stem + "_sweep.png"),
                             f"BTCS heat {args.dim}D emulator: final error vs cost",
                             progress=not args.quiet, start=args.start_search)
    controller = make_controller(info["setting"], info["k_converged"],
                                 **_common.rule_options(args))
    baseline, prdp = _common.compare(trainer, controller, info["k_converged"],
                                     with_baseline=args.compare, progress=not args.quiet,
                                     start=args.start_search)
    curves = {}
    for run in (baseline, prdp):
        if run is not None:
            curves[run.label] = rollout_nrmse(info["apply_net"], run.final_state[0],
                                              info["val_trajectory"])
            print(f"{run.label}: rollout nRMSE mean over {args.rollout} steps = "
                  f"{curves[run.label].mean():.4e} (step 1: {curves[run.label][0]:.3e}, "
                  f"step {args.rollout}: {curves[run.label][-1]:.3e})", file=sys.stderr)

    def rollout_panel(ax: Any) -> None:
        for label, curve in curves.items():
            ax.semilogy(np.arange(1, len(curve) + 1), curve, label=label)
        ax.set(xlabel="rollout step", ylabel="nRMSE", title="network-alone rollout")
        ax.legend()

    return _report.finish(f"{EXAMPLE}_{args.dim}d", baseline, prdp, args.out,
                          f"BTCS heat {args.dim}D emulator: PRDP vs converged K="
                          f"{info['k_converged']}", rollout_panel)


if __name__ == "__main__":
    main()
