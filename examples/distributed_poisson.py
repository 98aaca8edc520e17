r"""A diffusion solve and its gradient sharded across processes (multi-host JAX).

What it does
------------
On the unit square with zero Dirichlet values and ``n x n`` interior nodes (spacing
:math:`h = 1 / (n + 1)`), it solves

.. math::

    -\nabla \cdot (c \nabla u) = f, \qquad
    L(c, f) = \tfrac{1}{2} h^2 \lVert u - u_{obs} \rVert^2,

with ``pj.solve(po.DiffusionStencil(c, spacing=h), f, "cg", ...)`` and takes
``jax.jit(jax.value_and_grad(L))`` with respect to the coefficient field ``c`` and the
source ``f``, twice: with the implicit adjoint (CG to a relative residual ``--rtol``,
forward and adjoint) and with the unrolled adjoint (exactly ``--unrolled-iterations`` CG
iterations, differentiated as run). ``c = 1 + sin(2 pi x) cos(3 pi y) / 2`` (so
``0.5 <= c <= 1.5``), ``f`` is two Gaussian sources of opposite sign, and ``u_obs`` one sine
mode.

The mesh is one axis, ``"rows"``, over every device of every process (``jax.devices()``
in process order); ``c``, ``f`` and ``u_obs`` are split into blocks of grid rows, one block
per device. No process ever holds the whole field: each builds only the rows of its own
devices (``jax.make_array_from_callback`` asks it for exactly those), the jitted
computation is one SPMD program in which XLA exchanges the stencil's halo rows and CG's dot
products between devices (over gloo/TCP between CPU processes, NCCL between GPUs), and the
results come back sharded the same way. Process 0 prints a summary; with ``--check PATH`` the
results are gathered to every process
(``jax.experimental.multihost_utils.process_allgather``) and process 0 writes them, with
the layout and iteration counts, to ``PATH`` (``.npz``). Run once with several processes
and once with one, and the two files agree to rounding (``tests/test_jax_distributed.py``
does exactly that).

Sizes: ``n = 32`` by default (1 024 unknowns; 151 CG iterations to ``rtol = 1e-10``; each
mode compiles in about 5 s and runs in well under a second on one CPU process), ``--n N``
for another grid (``N`` a multiple of the total device count), ``--full`` for ``n = 1024``
(about a million unknowns, a job for GPUs; not run by the tests). The implicit mode's
iteration count grows like ``n`` (151 at ``n = 32``, 626 at ``n = 128``: expect about 5 000
at ``n = 1024``); the unrolled mode runs 20 iterations at every size, a tape of ``2 n^2 x 20``
float64 numbers (335 MB at ``n = 1024``, split over the devices). Everything computes in
float64. Two CPU processes on one small machine are slower than one: each compiles the
program (15-20 s per mode on a busy 2-core machine) and every CG iteration waits for gloo's
TCP round trips (about 6 s for the implicit mode's forward and adjoint solves at
``n = 32``); the local multi-process run checks the set-up, the speed is on a cluster.

Numerics: the two gradients are not equally robust
---------------------------------------------------
The implicit gradient is two converged solves: runs that differ only in rounding (one
device or several, one process or several) agree to ``1e-11`` relative or better at every
size tried (``n`` up to 128). The unrolled gradient differentiates CG's step sizes, and that
derivative amplifies rounding steeply with ``K`` and ``n``: for this problem, one and two
devices in *one* process agree to ``1e-9`` at ``n = 32, K = 20``, but only to ``2e-3`` at
``n = 64, K = 10``, and not at all at ``n = 32, K = 100``; plain ``jax.grad`` of a textbook
CG loop does the same, and an 80-bit extended-precision forward-mode evaluation puts the
float64 value at ``n = 64, K = 10`` off by ``4e-3`` whatever the device count. Sharding
changes the order of the sums in CG's dot products, so it changes such gradients within
that noise. Use the implicit mode where the gradient must be reproducible; the unrolled one
is trustworthy only while few iterations have run on a coarse grid.

Launching
---------
One process, all of its devices (also the single-process reference)::

    python examples/distributed_poisson.py
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python examples/distributed_poisson.py

Two processes on one machine, CPU only, over the loopback (start both; the port is any
free one, process 0 serves the coordinator there)::

    export JAX_PLATFORMS=cpu
    python examples/distributed_poisson.py --coordinator 127.0.0.1:12345 \
        --num-processes 2 --process-id 0 --gloo-hostname 127.0.0.1 &
    python examples/distributed_poisson.py --coordinator 127.0.0.1:12345 \
        --num-processes 2 --process-id 1 --gloo-hostname 127.0.0.1

Add ``--local-devices 2`` to give each CPU process two devices (a 4-device mesh over two
processes).

A SLURM cluster: one task per GPU, and ``--auto``, which calls
``jax.distributed.initialize()`` without arguments: JAX reads ``SLURM_JOB_ID``,
``SLURM_NTASKS``, ``SLURM_PROCID``, ``SLURM_LOCALID`` and ``SLURM_STEP_NODELIST``, makes the
first node of the step the coordinator (port ``SLURM_JOB_ID % 4096 + 61440`` unless
``JAX_COORDINATOR_PORT`` is set) and gives each task the GPU numbered by its
``SLURM_LOCALID``::

    # 2 nodes x 4 GPUs = 8 processes, one GPU each
    srun --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 \
        python examples/distributed_poisson.py --auto --full

Leave the GPU binding to JAX there: with ``--gpus-per-task=1`` or ``--gpu-bind`` SLURM
already shows each task only its own GPU, as device 0, and ``SLURM_LOCALID`` would then name
a device the task cannot see; add ``env JAX_LOCAL_DEVICE_IDS=0`` in that case.

One task per node driving all of that node's GPUs: SLURM_LOCALID is then 0 on every node,
so name the GPUs yourself (``JAX_LOCAL_DEVICE_IDS`` is read before SLURM's defaults)::

    srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=4 \
        env JAX_LOCAL_DEVICE_IDS=0,1,2,3 python examples/distributed_poisson.py --auto --full

CPU-only nodes (gloo collectives over the cluster network; gloo listens on the address the
node's hostname resolves to)::

    srun --nodes=4 --ntasks-per-node=1 env JAX_PLATFORMS=cpu \
        python examples/distributed_poisson.py --auto --n 256

Every process must run the same program with the same arguments: each jitted call is one
collective program across all of them. (The SLURM lines follow JAX's own SLURM detection,
``jax/_src/clusters/slurm_cluster.py``; the local lines are what the test runs.)

Notes
-----
* CPU collectives are JAX's gloo implementation
  (``jax.config.update("jax_cpu_collectives_implementation", "gloo")``, set here; the
  default since JAX 0.5.1). If the installed JAX cannot provide it, the script exits with
  status 77 and says why, before any solve.
* ``--gloo-hostname`` pins the address gloo listens on (``127.0.0.1`` keeps a local run on
  the loopback). JAX has no public option for it (``jax.distributed.initialize`` takes a
  ``coordinator_bind_address``, which only covers the coordinator), so the flag installs the
  CPU client through JAX's internal ``jax._src.xla_bridge`` with
  ``make_gloo_tcp_collectives(hostname=...)``; without the flag nothing internal is used.
* A multi-process run holds no whole array anywhere: printing or saving one goes through
  ``process_allgather`` (as ``--check`` does) or ``addressable_shards``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

EXAMPLE = "distributed_poisson"
#: Exit status when the installed JAX has no usable gloo CPU collectives (automake's "skip").
EXIT_NO_GLOO = 77
#: Grid sizes: the default and ``--full``.
SIZES = {"tiny": 32, "full": 1024}
#: CG iterations of the unrolled mode (see "Numerics" in the module docstring).
UNROLLED_ITERATIONS = 20
ADJOINTS = ("implicit", "unrolled")
#: Coordinator hosts that mean "this machine only" (besides 127.x.y.z).
LOOPBACK = ("localhost", "[::1]")


# ---------------------------------------------------------------------------- the problem


def grid_coordinates(n: int, flat_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ``(x, y)`` coordinates of the nodes at row-major ``flat_index`` of an ``n x n`` grid.

    Parameters
    ----------
    n
        Interior nodes per axis.
    flat_index
        Indices into the flattened grid, any shape.

    Returns
    -------
    x, y
        Arrays shaped like ``flat_index``: row ``i`` of the grid is ``x = (i + 1) h``,
        column ``j`` is ``y = (j + 1) h``, with ``h = 1 / (n + 1)`` (interior nodes of the
        unit square).
    """
    h = 1.0 / (n + 1)
    rows, cols = np.divmod(np.asarray(flat_index), n)
    return (rows + 1) * h, (cols + 1) * h


def coefficient(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The diffusion coefficient ``c = 1 + sin(2 pi x) cos(3 pi y) / 2``, in ``[0.5, 1.5]``."""
    return 1.0 + 0.5 * np.sin(2 * np.pi * x) * np.cos(3 * np.pi * y)


def source(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The right-hand side ``f``: a positive and a negative Gaussian source."""
    return (20.0 * np.exp(-((x - 0.3) ** 2 + (y - 0.6) ** 2) / 0.01)
            - 10.0 * np.exp(-((x - 0.7) ** 2 + (y - 0.3) ** 2) / 0.02))


def observation(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The field ``u_obs`` the loss compares the solution with."""
    return 0.05 * np.sin(np.pi * x) * np.sin(2 * np.pi * y)


FIELDS = {"c": coefficient, "f": source, "u_obs": observation}


# ---------------------------------------------------------------------------- set-up


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring).

    Parameters
    ----------
    argv
        The arguments (default ``sys.argv[1:]``).

    Returns
    -------
    argparse.Namespace
        With ``n`` resolved from ``--n`` / ``--full``; inconsistent flags exit with a message
        naming them (``argparse``'s status 2).
    """
    parser = argparse.ArgumentParser(
        prog="distributed_poisson.py",
        description="A diffusion solve and its gradient (implicit and unrolled adjoints) "
                    "sharded over the devices of one or several JAX processes.")
    launch = parser.add_argument_group("processes (none of these: one process)")
    launch.add_argument("--coordinator", metavar="HOST:PORT",
                        help="address of the coordinator, served by process 0 (with "
                             "--num-processes and --process-id)")
    launch.add_argument("--num-processes", type=int, metavar="P",
                        help="number of processes taking part")
    launch.add_argument("--process-id", type=int, metavar="I",
                        help="this process's number, 0 to P - 1")
    launch.add_argument("--auto", action="store_true",
                        help="call jax.distributed.initialize() without arguments: the "
                             "cluster (SLURM, Open MPI, TPU) is detected from the environment")
    launch.add_argument("--init-timeout", type=int, default=120, metavar="S",
                        help="seconds to wait for every process to join (default 120)")
    launch.add_argument("--gloo-hostname", metavar="HOST",
                        help="address the gloo CPU collectives listen on, e.g. 127.0.0.1 "
                             "(default: what this machine's hostname resolves to; uses a "
                             "JAX internal, see the docstring)")
    launch.add_argument("--local-devices", type=int, metavar="K",
                        help="CPU only: give this process K CPU devices "
                             "(jax_num_cpu_devices; default: JAX's, normally 1)")
    problem = parser.add_argument_group("problem")
    problem.add_argument("--full", action="store_true",
                         help=f"n = {SIZES['full']} (for GPUs)")
    problem.add_argument("--n", type=int, metavar="N",
                         help=f"grid of N x N unknowns, N a multiple of the device count "
                              f"(default {SIZES['tiny']}; overrides --full)")
    problem.add_argument("--rtol", type=float, default=1e-10,
                         help="relative residual of the implicit mode's forward and adjoint "
                              "CG solves (default 1e-10)")
    problem.add_argument("--unrolled-iterations", type=int, metavar="K",
                         default=UNROLLED_ITERATIONS,
                         help="CG iterations of the unrolled mode, run exactly (default "
                              f"{UNROLLED_ITERATIONS})")
    output = parser.add_argument_group("output")
    output.add_argument("--check", type=Path, metavar="PATH",
                        help="gather the solutions and gradients and write them from process 0 "
                             "to PATH (.npz), with the layout and iteration counts")
    output.add_argument("--quiet", action="store_true",
                        help="print only the final JSON line")
    args = parser.parse_args(argv)
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
        parser.error("--coordinator, --num-processes and --process-id go together; got "
                     f"--coordinator {args.coordinator} --num-processes {args.num_processes} "
                     f"--process-id {args.process_id}")
    if args.num_processes is not None and not 0 <= args.process_id < args.num_processes:
        parser.error("--process-id must be in 0 .. --num-processes - 1; got --process-id "
                     f"{args.process_id} with --num-processes {args.num_processes}")
    if args.auto and args.coordinator is not None:
        parser.error("--auto detects the cluster; do not also give --coordinator")
    if args.local_devices is not None and args.local_devices < 1:
        parser.error(f"--local-devices must be >= 1; got {args.local_devices}")
    size = "full" if args.full else "tiny"
    args.n = SIZES[size] if args.n is None else args.n
    if args.n < 2:
        parser.error(f"--n must be >= 2; got {args.n}")
    if args.unrolled_iterations < 1:
        parser.error(f"--unrolled-iterations must be >= 1; got {args.unrolled_iterations}")
    if not (0.0 < args.rtol < 1.0):
        parser.error(f"--rtol must lie in (0, 1); got {args.rtol}")
    return args


def no_gloo(reason: str) -> SystemExit:
    """Report that gloo CPU collectives are unavailable; the exit the caller raises."""
    print(f"gloo CPU collectives unavailable: {reason}", file=sys.stderr, flush=True)
    return SystemExit(EXIT_NO_GLOO)


def configure(args: argparse.Namespace) -> None:
    """Set JAX up before it creates a backend: float64, gloo, devices, processes.

    Parameters
    ----------
    args
        From :func:`parse_args`: ``--auto`` or ``--coordinator``/``--num-processes``/
        ``--process-id`` start ``jax.distributed`` (a loopback coordinator is also bound to
        the loopback only), ``--gloo-hostname`` pins gloo's address, ``--local-devices`` sets
        the CPU device count.

    Raises
    ------
    SystemExit
        With :data:`EXIT_NO_GLOO` when this JAX has no gloo CPU collectives option, or its
        CPU backend fails to create them; the reason goes to stderr first.
    """
    import jax

    jax.config.update("jax_enable_x64", True)
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError) as error:  # no such option, or no "gloo" value
        raise no_gloo(f"jax {jax.__version__}: {error}") from error
    if args.local_devices is not None:
        jax.config.update("jax_num_cpu_devices", args.local_devices)
    if args.auto:
        jax.distributed.initialize(initialization_timeout=args.init_timeout)
    elif args.coordinator is not None:
        port = args.coordinator.rsplit(":", 1)[-1]
        host = args.coordinator.rsplit(":", 1)[0]
        jax.distributed.initialize(
            coordinator_address=args.coordinator, num_processes=args.num_processes,
            process_id=args.process_id, cluster_detection_method="deactivate",
            initialization_timeout=args.init_timeout,
            # JAX's default binds the coordinator to every interface ([::]:port); a
            # loopback coordinator address means a local run: keep it on the loopback.
            coordinator_bind_address=(f"{host}:{port}" if host in LOOPBACK
                                      or host.startswith("127.") else None))
    if args.gloo_hostname is not None:
        pin_gloo_hostname(args.gloo_hostname)
    try:
        jax.devices()  # creates the backend: the gloo collectives connect here
    except Exception as error:
        if "gloo" in str(error).lower():
            raise no_gloo(f"jax {jax.__version__}: creating the CPU backend failed: "
                          f"{error}") from error
        raise


def pin_gloo_hostname(hostname: str) -> None:
    """Make the CPU client's gloo collectives listen on ``hostname`` (JAX internals).

    ``jax.distributed`` offers no option for gloo's address; JAX's own CPU client factory
    calls ``make_gloo_tcp_collectives(distributed_client=...)`` without one, so gloo uses
    the address this machine's hostname resolves to. This re-registers the ``"cpu"``
    backend factory with the hostname given. Call after ``jax.distributed.initialize`` and
    before any backend exists.

    Parameters
    ----------
    hostname
        An address (or name) of this machine that the other processes can reach.

    Raises
    ------
    SystemExit
        When this JAX lacks the internals used, with what to do instead.
    """
    try:
        from jax._src import distributed, xla_bridge
        from jax._src.lib import _jax

        make_collectives = _jax.make_gloo_tcp_collectives
        make_client = xla_bridge.make_cpu_client
        register = xla_bridge.register_backend_factory
    except (ImportError, AttributeError) as error:
        raise SystemExit(
            f"--gloo-hostname needs JAX internals this JAX ({_jax_version()}) lacks: {error}. "
            "Run without --gloo-hostname (gloo then listens on this machine's hostname)."
        ) from error
    client = distributed.global_state.client
    if client is None:
        return  # one process: no collectives between processes

    def factory() -> Any:
        return make_client(collectives=make_collectives(distributed_client=client,
                                                        hostname=hostname))

    register("cpu", factory, priority=0, fail_quietly=False)


def _jax_version() -> str:
    import jax

    return jax.__version__


# ---------------------------------------------------------------------------- the run


def sharded_field(name: str, n: int, sharding: Any) -> Any:
    """The global ``n * n`` vector of field ``name``, each process building its rows only.

    Parameters
    ----------
    name
        A key of :data:`FIELDS`.
    n
        Interior nodes per axis.
    sharding
        How the vector is laid out over the global mesh; JAX calls back once per local device
        with that device's index (a slice of the flat vector).

    Returns
    -------
    jax.Array
        Global shape ``(n * n,)``, holding on this process only its devices' blocks.
    """
    import jax

    field = FIELDS[name]

    def local_block(index: tuple[slice, ...]) -> np.ndarray:
        flat = np.arange(n * n)[index[0]]  # the rows this device holds, flattened
        return field(*grid_coordinates(n, flat))

    return jax.make_array_from_callback((n * n,), sharding, local_block)


def make_loss(n: int, adjoint: str, rtol: float, unrolled_iterations: int,
              adjoint_callback: Any = None) -> Any:
    """``loss(c, f, u_obs) -> (L, (u, forward iterations))`` through one CG solve.

    ``L = h^2 / 2 ||u - u_obs||^2`` with ``u`` the CG solution of
    ``DiffusionStencil(c.reshape(n, n), spacing=h) u = f``.

    Parameters
    ----------
    n
        The grid is ``n x n``; ``c``, ``f`` and ``u_obs`` are flat vectors of ``n * n``.
    adjoint
        ``"implicit"``: CG to relative residual ``rtol`` (at most ``20 n^2`` iterations),
        forward and adjoint. ``"unrolled"``: exactly ``unrolled_iterations`` CG iterations,
        differentiated as run.
    rtol, unrolled_iterations
        As above.
    adjoint_callback
        Passed on to ``pj.solve``: receives the implicit adjoint solve's result on the host
        (single-process use; the test reads its iteration count).

    Returns
    -------
    callable
        The loss, to wrap in ``jax.value_and_grad(..., has_aux=True)``.
    """
    import jax.numpy as jnp
    from prdp_ops.backends import jax as pj

    import prdp_ops as po

    h = 1.0 / (n + 1)
    if adjoint == "implicit":
        settings = {"rtol": rtol, "maxiter": 20 * n * n}
    else:  # exactly K iterations, differentiated as run
        settings = {"rtol": 0.0, "maxiter": unrolled_iterations}

    def loss(c: Any, f: Any, u_obs: Any) -> tuple[Any, tuple[Any, Any]]:
        A = po.DiffusionStencil(c.reshape(n, n), spacing=h)
        u, result = pj.solve(A, f, "cg", adjoint=adjoint, return_result=True,
                             adjoint_callback=adjoint_callback, **settings)
        return 0.5 * h**2 * jnp.sum((u - u_obs) ** 2), (u, result.iterations)

    return loss


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the sharded problem, take both gradients, gather and report.

    Parameters
    ----------
    args
        From :func:`parse_args`, after :func:`configure`.

    Returns
    -------
    dict
        The summary process 0 prints as JSON: sizes, losses, iteration counts and timings
        (compilation and one run, separately) of both modes.
    """
    import jax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    n, devices = args.n, jax.devices()
    if n % len(devices):
        raise SystemExit(f"--n must be a multiple of the {len(devices)} devices of the mesh "
                         f"(row blocks of equal size); got {n}")
    mesh = jax.sharding.Mesh(np.array(devices), ("rows",))
    rows = NamedSharding(mesh, P("rows"))  # flat vectors: blocks of whole grid rows
    c, f, u_obs = (sharded_field(name, n, rows) for name in ("c", "f", "u_obs"))
    me = jax.process_index()
    local_rows = sorted({(s.index[0].start or 0) // n for s in c.addressable_shards})
    layout = {
        "processes": jax.process_count(), "devices": len(devices),
        "local_devices": jax.local_device_count(),
        # The first grid row of each of this process's blocks, gathered: (processes, blocks).
        "block_rows": multihost_utils.process_allgather(np.array(local_rows)),
    }
    outputs: dict[str, Any] = {"n": n, "rtol": args.rtol,
                               "unrolled_iterations": args.unrolled_iterations}
    gather = args.check is not None
    if gather:
        outputs["c"] = multihost_utils.process_allgather(c, tiled=True)
    for adjoint in ADJOINTS:
        loss = make_loss(n, adjoint, args.rtol, args.unrolled_iterations)
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
        start = time.perf_counter()
        compiled = step.lower(c, f, u_obs).compile()
        compile_seconds = time.perf_counter() - start
        (value, (u, iterations)), (c_bar, f_bar) = compiled(c, f, u_obs)
        jax.block_until_ready((value, u, c_bar, f_bar))
        seconds = time.perf_counter() - start - compile_seconds
        spread = {len(a.sharding.device_set) for a in (u, c_bar, f_bar)}
        outputs[f"{adjoint}_loss"] = float(value.addressable_data(0))
        outputs[f"{adjoint}_iterations"] = int(iterations.addressable_data(0))
        outputs[f"{adjoint}_devices_per_result"] = min(spread)
        outputs[f"{adjoint}_seconds"] = seconds
        outputs[f"{adjoint}_compile_seconds"] = compile_seconds
        if gather:
            for name, array in (("u", u), ("grad_c", c_bar), ("grad_f", f_bar)):
                outputs[f"{adjoint}_{name}"] = multihost_utils.process_allgather(array,
                                                                                   tiled=True)
    outputs.update(layout)
    summary = {
        "example": EXAMPLE, "n": n, "processes": layout["processes"],
        "devices": layout["devices"],
        **{f"{a}_{k}": outputs[f"{a}_{k}"] for a in ADJOINTS
           for k in ("loss", "iterations", "compile_seconds", "seconds")},
    }
    if me == 0:
        if gather:
            args.check.parent.mkdir(parents=True, exist_ok=True)
            np.savez(args.check, **{k: np.asarray(v) for k, v in outputs.items()})
        if not args.quiet:
            for adjoint in ADJOINTS:
                print(f"{adjoint:>9}: L = {outputs[f'{adjoint}_loss']:.12e}, "
                      f"{outputs[f'{adjoint}_iterations']} forward CG iterations, "
                      f"compiled in {outputs[f'{adjoint}_compile_seconds']:.1f} s, ran in "
                      f"{outputs[f'{adjoint}_seconds']:.2f} s, results on "
                      f"{outputs[f'{adjoint}_devices_per_result']} devices", file=sys.stderr)
        print(json.dumps(summary), flush=True)
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the example; process 0 prints the summary as its last JSON line.

    Parameters
    ----------
    argv
        Command-line arguments (default ``sys.argv[1:]``).

    Returns
    -------
    dict
        The summary of :func:`run`.
    """
    args = parse_args(argv)
    configure(args)
    import jax

    try:
        return run(args)
    finally:
        if jax.process_count() > 1:
            jax.distributed.shutdown()  # leave together: no process waits on a dead peer


if __name__ == "__main__":
    main()
