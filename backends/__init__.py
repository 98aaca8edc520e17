"""Array backends of prdp_ops (installed as ``prdp_ops.backends``).

``numpy`` holds the loop driver and reverse sweeps shared by NumPy and CuPy; ``cupy`` the
CuPy-specific pieces; ``jax`` the JAX driver and its ``custom_vjp`` bridge. Only these
modules import cupy or jax, and only when an array of theirs is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["get_ops"]


def get_ops(name: str) -> Any:
    """Return the ``ArrayOps`` instance of backend ``name`` ("numpy", "cupy" or "jax")."""
    if name == "numpy":
        from prdp_ops._array_ops import NumpyOps

        return NumpyOps()
    if name not in ("cupy", "jax"):
        raise ValueError(f"unknown array backend {name!r}; expected 'numpy', 'cupy' or 'jax'")
    module = importlib.import_module(f"prdp_ops.backends.{name}")
    return module.OPS
