"""What the CuPy GPU examples share: leave with one line (not a traceback) without a GPU."""

from __future__ import annotations

import sys
from typing import Any


def gpu_backend_or_exit(script: str) -> Any:
    """``prdp_ops.backends.cupy``, or a one-line explanation and exit status 0."""
    try:
        from prdp_ops.backends import cupy as gpu
    except ImportError as err:
        print(f"{script}: skipped, it needs CuPy and a CUDA GPU: {err}")
        sys.exit(0)
    reason = gpu.gpu_unavailable_reason()
    if reason is not None:
        print(f"{script}: skipped, it needs a CUDA GPU: {reason}")
        sys.exit(0)
    return gpu
