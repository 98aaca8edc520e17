"""Placeholder: being implemented (a helper replaces this file)."""

from __future__ import annotations

from prdp_ops._solver.base import IterativeSolver

__all__ = ["SOR"]


class SOR(IterativeSolver):
    def init(self, ops, A, b, x0, M):  # noqa: D102
        raise NotImplementedError("sor is not implemented yet")

    def step(self, ops, A, b, state, M):  # noqa: D102
        raise NotImplementedError("sor is not implemented yet")
