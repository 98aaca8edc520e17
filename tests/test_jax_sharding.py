"""Sharded solves: ``pj.solve`` on arrays split across devices gives the unsharded results
and gradients, and keeps the input's sharding.

Four CPU devices exist only if XLA is told so before JAX starts, so the check runs in a
subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import agree_tol

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    jax.config.update("jax_enable_x64", True)
    sys.path.insert(0, sys.argv[1])
    from helpers import random_vector, spd
    from prdp_ops.backends import jax as pj

    assert len(jax.devices()) == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("x",))
    n, grid = 16, 8
    A, b = jnp.asarray(spd(n)), jnp.asarray(random_vector(n))
    c = jnp.asarray(np.random.default_rng(0).uniform(0.5, 2.0, grid * grid))
    rhs = jnp.asarray(random_vector(grid * grid, seed=3))

    def laplacian(c):  # a matrix-free 5-point stencil plus a coefficient field
        def matvec(u):
            v = jnp.pad(u.reshape(grid, grid), 1)
            lap = 4 * v[1:-1, 1:-1] - v[:-2, 1:-1] - v[2:, 1:-1] - v[1:-1, :-2] - v[1:-1, 2:]
            return lap.reshape(-1) + c * u
        return matvec

    def losses(A, b, c, rhs, adjoint):
        kw = dict(rtol=1e-12, maxiter=200) if adjoint == "implicit" else dict(
            rtol=0.0, maxiter=6)
        x = pj.solve(A, b, adjoint=adjoint, **kw)
        y = pj.solve(laplacian(c), rhs, adjoint=adjoint, **kw)
        return jnp.sum(x ** 2) + jnp.sum(y ** 2), (x, y)

    out = {}
    shard_rows = NamedSharding(mesh, P("x", None))
    shard_vec = NamedSharding(mesh, P("x"))
    sharded = (jax.device_put(A, shard_rows), jax.device_put(b, shard_vec),
               jax.device_put(c, shard_vec), jax.device_put(rhs, shard_vec))
    for adjoint in ("implicit", "unrolled"):
        f = jax.jit(jax.value_and_grad(losses, argnums=(0, 1, 2, 3), has_aux=True),
                    static_argnums=4)
        (_, xs), grads = f(A, b, c, rhs, adjoint)
        (_, xs_sh), grads_sh = f(*sharded, adjoint)
        relative = lambda u, v: float(jnp.max(jnp.abs(u - v)) / jnp.max(jnp.abs(u)))
        out[adjoint] = {
            "x_error": max(relative(u, v) for u, v in zip(xs, xs_sh)),
            "grad_error": max(relative(u, v) for u, v in zip(grads, grads_sh)),
            "x_sharding_kept": [v.sharding.is_equivalent_to(shard_vec, 1) for v in xs_sh],
            "grad_sharding_kept": [g.sharding.is_equivalent_to(s.sharding, g.ndim)
                                   for g, s in zip(grads_sh, sharded)],
            "devices": [len(v.sharding.device_set) for v in xs_sh],
        }
    eager = pj.solve(sharded[0], sharded[1], rtol=1e-12, maxiter=200)
    out["eager_sharding_kept"] = eager.sharding.is_equivalent_to(shard_vec, 1)
    print(json.dumps(out))
""")


@pytest.mark.slow  # a subprocess of its own with four host devices: about 8 s of compiles
def test_sharded_solve_matches_unsharded_and_keeps_sharding() -> None:
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    # four host devices, on top of the flags the suite runs with (conftest.py)
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
    env = {**os.environ, "XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, tests_dir], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # Sharded sums are reduced across devices in another order: relative to the largest
    # entry, x agrees to eps cond k and the gradients to eps cond^2 (2k) (forward and
    # adjoint steps), cond <= 50 (spd(16); the stencil's is ~13), k <= maxiter.
    for adjoint, maxiter in (("implicit", 200), ("unrolled", 6)):
        report = out[adjoint]
        assert report["x_error"] <= agree_tol(np.float64, 50.0, maxiter), report
        assert report["grad_error"] <= agree_tol(np.float64, 50.0, 2 * maxiter, power=2), report
        assert all(report["x_sharding_kept"]), report
        assert all(report["grad_sharding_kept"]), report
        assert report["devices"] == [4, 4], report
    assert out["eager_sharding_kept"]
