"""The bridge under ``jax.vmap``: a batch of right-hand sides is one block solve on the host.

The bridge's callbacks use ``vmap_method="expand_dims"``: under ``vmap`` the host function
receives every argument with the batch axes in front (one per ``vmap``), an unbatched one
with axes of size 1. When only ``b`` and ``x0`` (and, backwards, ``x`` and ``x_bar``) carry
the batch -- the training-batch case, ``jax.vmap(solve, (None, 0))`` -- the host solves the
``k`` right-hand sides as one block ``b`` of shape ``(n, k)``: one loop, one product of
``A`` with ``k`` columns per iteration (:mod:`prdp_ops._solve_block`). Anything else batched
(``A``, ``M``, tolerances, ``maxiter``) is solved one problem at a time, as before.

Per example means per example: ``jax.vmap(jax.grad(loss))`` asks for each example's
cotangent of ``A`` (JAX sums them itself when ``A`` was not batched), so the block backward
returns ``A``'s cotangent column by column.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from prdp_ops import _solve as core
from prdp_ops import _solve_block

__all__ = ["batched_backward", "batched_forward"]

# Positions in the host functions' arguments (params, constants, m_params, m_constants, b,
# x0, controls[, x, x_bar]): the per-example vectors, which a block solve batches.
_VECTORS = (4, 5, 7, 8)


def _leading(tree: Any, axes: int) -> list[tuple[int, ...]]:
    return [np.shape(leaf)[:axes] for leaf in jax.tree_util.tree_leaves(tree)]


def _index(tree: Any, index: tuple[int, ...]) -> Any:
    """One example of every leaf (size-1 batch axes broadcast)."""
    def pick(leaf: Any) -> Any:
        return leaf[tuple(0 if size == 1 else i
                          for i, size in zip(index, np.shape(leaf)[:len(index)], strict=True))]

    return jax.tree_util.tree_map(pick, tree)


def _stack(outputs: list[Any], batch: tuple[int, ...]) -> Any:
    return jax.tree_util.tree_map(
        lambda *leaves: np.stack(leaves).reshape(batch + np.shape(leaves[0])), *outputs)


def _run(one: Callable, block: Callable, args: tuple, axes: int) -> Any:
    """``one`` per example, or ``block`` on the whole batch when only vectors are batched."""
    batch = tuple(np.broadcast_shapes(*_leading(args, axes)))
    shared = [a for i, a in enumerate(args) if i not in _VECTORS]
    size = int(np.prod(batch))
    if size > 1 and all(set(s) <= {1} for s in _leading(shared, axes)):
        squeezed = [jax.tree_util.tree_map(lambda leaf: leaf.reshape(np.shape(leaf)[axes:]), a)
                    if i not in _VECTORS else
                    np.broadcast_to(a, batch + np.shape(a)[axes:]).reshape(size, -1).T
                    for i, a in enumerate(args)]
        return jax.tree_util.tree_map(
            lambda leaf: leaf.reshape(batch + np.shape(leaf)[1:]), block(*squeezed))
    return _stack([one(*_index(args, index)) for index in np.ndindex(*batch)], batch)


def batched_forward(bridge: Any, args: tuple) -> Any:
    """The bridge's forward host function on a batch."""
    return _run(bridge.forward_one, lambda *a: _forward_block(bridge, *a), args,
                np.ndim(args[4]) - 1)


def batched_backward(bridge: Any, args: tuple) -> Any:
    """The bridge's backward host function on a batch."""
    return _run(bridge.backward_one, lambda *a: _backward_block(bridge, *a), args,
                np.ndim(args[4]) - 1)


def _forward_block(bridge: Any, params: dict, constants: tuple, m_params: dict,
                   m_constants: tuple, B: Any, X0: Any, controls: Any) -> tuple:
    """``k`` solves as one block: outputs with the examples on the leading axis."""
    problem = bridge.problem(params, constants, m_params, m_constants, B, X0, controls)
    result = _solve_block.solve(problem, None)
    encoded = [bridge.encode(result.column(j)) for j in range(result.columns)]
    xp = bridge.xp(B)
    return (xp.asarray(result.x.T, dtype=bridge.dtype),
            *(np.stack(parts) for parts in zip(*encoded, strict=True)))


def _backward_block(bridge: Any, params: dict, constants: tuple, m_params: dict,
                    m_constants: tuple, B: Any, X0: Any, controls: Any, X: Any,
                    X_bar: Any) -> tuple:
    """The block's cotangents, each example's own (``A``'s too), examples leading."""
    problem = bridge.problem(params, constants, m_params, m_constants, B, X0, controls)
    xp = bridge.xp(B)
    if bridge.adjoint == "unrolled":
        run = _solve_block._forward(problem, keep_tape=True)
        b_bar, x0_bar, column_params = _solve_block.unrolled_columns(
            problem, run, X_bar.astype(problem.dtype, copy=True))
    else:
        settings = core._adjoint_problem(problem, bridge.adjoint_solver, int(controls[3]),
                                         float(controls[4]), float(controls[5]))
        cotangents = _solve_block._implicit_vjp(problem, settings, X.astype(problem.dtype))(
            X_bar)
        b_bar, x0_bar = cotangents.b, None
        adjoint = cotangents.adjoint_result
        if bridge.adjoint_callback is not None:
            for j in range(adjoint.columns):
                bridge.adjoint_callback(adjoint.column(j))

        def column_params(j: int) -> dict:
            return problem.A.param_vjp(X[:, j].astype(problem.dtype), -cotangents.b[:, j])
    columns = B.shape[1]
    params_bar = [bridge.host_params_bar(problem.A.format_cotangent(column_params(j)),
                                         params, constants) if params else {}
                  for j in range(columns)]
    out = (xp.asarray(b_bar.T, dtype=bridge.dtype),
           jax.tree_util.tree_map(lambda *leaves: xp.stack(leaves), *params_bar)
           if params else {})
    if bridge.adjoint == "unrolled":
        out = (*out, xp.asarray(x0_bar.T, dtype=bridge.dtype))
    return out
