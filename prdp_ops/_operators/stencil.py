"""Matrix-free finite-difference stencils: the Laplacian and variable-coefficient diffusion.

Both operators discretise ``-div(c grad u)`` on a regular grid of 1, 2 or 3 dimensions in
flux form. Along axis ``a`` with spacing ``h``, the face between neighbouring nodes ``i`` and
``i + 1`` carries the flux ``c_{i+1/2} (u_{i+1} - u_i) / h``, and

    (A u)_i = sum_a [c_{i+1/2} (u_i - u_{i+1}) + c_{i-1/2} (u_i - u_{i-1})] / h_a^2.

Written with the face-difference operator ``G_a`` (one row per face, ``(G_a u)_f = u_right -
u_left``) this is ``A = sum_a G_a^T diag(c_faces_a / h_a^2) G_a``: symmetric, and positive
definite with zero Dirichlet boundaries (positive semi-definite, constants in the null space,
when every axis is periodic). The same factorisation gives the parameter cotangents in closed
form: ``y_bar^T dA x = sum_a sum_f d(c_f) (G_a y_bar)_f (G_a x)_f / h_a^2``.

Boundaries
----------
``"dirichlet"``
    Zero Dirichlet values; the unknowns are the interior nodes, the boundary nodes (one
    beyond each end of every axis) are not stored. Each axis of ``n`` unknowns has ``n + 1``
    faces; the two faces that touch the boundary take the coefficient of their interior node
    (the boundary value of ``c`` is not an unknown of the problem, and the nearest known
    value keeps the scheme first-order consistent there without asking for extra data).
``"periodic"``
    Node ``n - 1`` neighbours node ``0``; each axis of ``n`` nodes has ``n`` faces (face
    ``i`` joins nodes ``i`` and ``i + 1 mod n``). Each periodic axis needs at least 3 nodes,
    so that a node's two neighbours are distinct.

Interior face coefficients are the arithmetic mean of the two adjacent node values.

Vectors are flattened grids in row-major (C) order, so ``strict_lower`` / ``strict_upper``
(used by SOR) refer to that natural ordering; the periodic wrap-around couplings land in the
corners of the matrix (the entry in row ``n - 1``, column ``0`` of an axis is in the lower
triangle).

Backends
--------
Everything is written over the array namespace of the operator's arrays (numpy, cupy or
jax.numpy) with functional operations only (slicing, ``concatenate``, ``roll``, ``where``), so it
traces under JAX. The stencil application is the module-level :func:`apply_stencil`, called
from :meth:`_StencilOperator._apply`, the one dispatch point for backend kernels: for CuPy
arrays it calls the fused ``ElementwiseKernel`` of ``prdp_ops.backends.cupy`` instead (a
subclass may override it the same way).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import scipy.sparse

from prdp_ops._array_ops import ArrayOps, ops_for
from prdp_ops._operators.base import PARTS, LinearOperator, MatrixFreeError

__all__ = ["DiffusionStencil", "LaplacianStencil", "apply_stencil"]

BOUNDARIES = ("dirichlet", "periodic")
#: Largest size for which ``to_matrix`` of an operator holding JAX arrays builds a dense
#: matrix (JAX has no general sparse format that SOR-style triangular solves could use).
MAX_DENSE_JAX = 4096


# -- stencil arithmetic over the last ``len(faces)`` axes of an array ---------------------------
# Axes are negative so a leading batch axis (matmat, batched cotangents) broadcasts for free.
def _along(axis: int, start: int | None, stop: int | None) -> tuple[Any, ...]:
    """The index ``[start:stop]`` along a negative ``axis``, everything along the others."""
    return (Ellipsis, slice(start, stop), *([slice(None)] * (-axis - 1)))


def _face_difference(xp: Any, u: Any, axis: int, boundary: str) -> Any:
    """``G_a u``: ``u_right - u_left`` on every face along ``axis``."""
    if boundary == "dirichlet":
        # n unknowns, n + 1 faces; the outer faces see a zero boundary value.
        inner = u[_along(axis, 1, None)] - u[_along(axis, None, -1)]
        return xp.concatenate([u[_along(axis, None, 1)], inner, -u[_along(axis, -1, None)]],
                              axis=axis)
    return xp.roll(u, -1, axis=axis) - u


def _face_divergence_T(xp: Any, flux: Any, axis: int, boundary: str) -> Any:
    """``G_a^T flux``: the transpose of :func:`_face_difference` (minus a divergence)."""
    if boundary == "dirichlet":
        return flux[_along(axis, None, -1)] - flux[_along(axis, 1, None)]
    return xp.roll(flux, 1, axis=axis) - flux


def _face_left_right(xp: Any, v: Any, axis: int, boundary: str) -> tuple[Any, Any]:
    """The values of ``v`` at the left and right node of every face (0 beyond a boundary)."""
    if boundary == "dirichlet":
        zero = xp.zeros_like(v[_along(axis, None, 1)])
        return xp.concatenate([zero, v], axis=axis), xp.concatenate([v, zero], axis=axis)
    return v, xp.roll(v, -1, axis=axis)


def apply_stencil(xp: Any, faces: tuple[Any, ...], u: Any, boundary: str) -> Any:
    """Return ``sum_a G_a^T (faces[a] * G_a u)`` over the last ``len(faces)`` axes of ``u``.

    This is the whole matrix-free operator; fused backend kernels replace exactly this.

    Parameters
    ----------
    xp
        The array namespace of ``u``.
    faces
        Per axis, the face coefficients already divided by ``h_a^2``: an array with the
        grid's shape except ``n + 1`` (Dirichlet) or ``n`` (periodic) entries along that
        axis, or a scalar for a constant coefficient.
    u
        The grid values, shape ``(..., *grid)``.
    boundary
        ``"dirichlet"`` or ``"periodic"``.
    """
    d = len(faces)
    out = None
    for a, face in enumerate(faces):
        axis = a - d
        term = _face_divergence_T(xp, face * _face_difference(xp, u, axis, boundary), axis,
                                  boundary)
        out = term if out is None else out + term
    return out


def _node_means(xp: Any, c: Any, axis: int, boundary: str) -> Any:
    """Face coefficients from node values: means of neighbours (edge value at a boundary)."""
    if boundary == "dirichlet":
        # A boundary face takes its interior node's value (the boundary has no unknown c).
        inner = 0.5 * (c[_along(axis, None, -1)] + c[_along(axis, 1, None)])
        return xp.concatenate([c[_along(axis, None, 1)], inner, c[_along(axis, -1, None)]],
                              axis=axis)
    return 0.5 * (c + xp.roll(c, -1, axis=axis))


def _node_means_T(xp: Any, face_bar: Any, axis: int, boundary: str) -> Any:
    """Transpose of :func:`_node_means`: face cotangents back to the nodes."""
    if boundary == "periodic":
        return 0.5 * (face_bar + xp.roll(face_bar, 1, axis=axis))
    # Node i sits between faces i and i + 1; the two boundary faces depend on their interior
    # node alone (weight 1, not 1/2), so they come back once more, in full.
    halves = 0.5 * (face_bar[_along(axis, None, -1)] + face_bar[_along(axis, 1, None)])
    n = halves.shape[axis]
    shape = [1] * face_bar.ndim
    shape[axis] = n
    index = xp.reshape(xp.arange(n), shape)
    first, last = face_bar[_along(axis, None, 1)], face_bar[_along(axis, -1, None)]
    return halves + 0.5 * (xp.where(index == 0, first, 0) + xp.where(index == n - 1, last, 0))


def _face_cotangents(xp: Any, x: Any, y_bar: Any, axis: int, boundary: str, part: str) -> Any:
    """``dsum(y_bar * A_part x) / d(face coefficient)`` along one axis, before the 1/h^2.

    On one face joining nodes ``l`` and ``r``, the face coefficient ``f`` enters ``A`` as
    ``+f`` at ``(l, l)`` and ``(r, r)`` and as ``-f`` at ``(l, r)`` and ``(r, l)``.
    """
    if part == "full":
        return _face_difference(xp, y_bar, axis, boundary) * _face_difference(xp, x, axis,
                                                                                boundary)
    x_l, x_r = _face_left_right(xp, x, axis, boundary)
    y_l, y_r = _face_left_right(xp, y_bar, axis, boundary)
    if part == "diagonal":
        return y_l * x_l + y_r * x_r
    # Row-major order: the right node comes later, except across the periodic wrap face
    # (right node 0, left node n - 1), where the roles swap.
    below, above = -(y_r * x_l), -(y_l * x_r)
    if boundary == "periodic":
        n = x.shape[axis]
        shape = [1] * x.ndim
        shape[axis] = n
        wrap = xp.reshape(xp.arange(n), shape) == n - 1
        below, above = xp.where(wrap, above, below), xp.where(wrap, below, above)
    return below if part == "strict_lower" else above


def _check_part(part: str) -> None:
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}; got {part!r}")


# -- argument checking --------------------------------------------------------------------------
def _check_grid(shape: Any, boundary: Any) -> tuple[int, ...]:
    if boundary not in BOUNDARIES:
        raise ValueError(f"boundary must be one of {BOUNDARIES}; got {boundary!r}")
    if isinstance(shape, numbers.Integral):
        shape = (shape,)
    try:
        grid = tuple(shape)
    except TypeError:
        grid = None
    if (grid is None or not 1 <= len(grid) <= 3
            or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool)
                       for s in grid)):
        raise ValueError(
            f"shape must be the grid shape: 1 to 3 positive ints, e.g. (64, 64); got {shape!r}"
        )
    grid = tuple(int(s) for s in grid)
    smallest = 3 if boundary == "periodic" else 1
    if min(grid) < smallest:
        raise ValueError(
            f"every axis of a {boundary} grid needs at least {smallest} nodes; got shape {grid}"
        )
    return grid


def _check_spacing(spacing: Any, ndim: int) -> tuple[float, ...]:
    values = (spacing,) * ndim if isinstance(spacing, numbers.Real) else spacing
    try:
        values = tuple(values)
    except TypeError:
        values = ()
    if (len(values) != ndim
            or not all(isinstance(h, numbers.Real) and not isinstance(h, bool) for h in values)
            or not all(math.isfinite(h) and h > 0 for h in values)):
        raise ValueError(
            f"spacing must be a finite number > 0, or one per axis ({ndim} here); got "
            f"{spacing!r}"
        )
    return tuple(float(h) for h in values)


def _check_coefficient(c: Any, ops: ArrayOps) -> Any:
    if getattr(c, "ndim", None) not in (1, 2, 3):
        raise ValueError(
            "c must be the coefficient field at the grid nodes, a 1-, 2- or 3-D array; got "
            f"{type(c).__name__} with shape {getattr(c, 'shape', None)}"
        )
    dtype = np.dtype(c.dtype)
    if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
        c = ops.xp.asarray(c, dtype=np.float64)  # a converted copy; the caller's c is kept
    elif not np.issubdtype(dtype, np.floating):
        raise TypeError(
            f"c must be real (the operator is symmetric positive definite); got dtype {dtype}"
        )
    # JAX values may be traced (unknown until run): only NumPy and CuPy values are checked.
    if ops.name != "jax" and not bool(ops.xp.all(ops.xp.isfinite(c) & (c > 0))):
        raise ValueError(
            "c must be finite and > 0 at every node (a diffusion coefficient); got "
            f"min {float(ops.xp.min(c))}, max {float(ops.xp.max(c))}"
        )
    return c


# -- the operators ------------------------------------------------------------------------------
class _StencilOperator(LinearOperator):
    """Shared machinery of the stencil operators (see the module docstring)."""

    hermitian = True

    def __init__(self, grid: tuple[int, ...], boundary: str, spacing: tuple[float, ...],
                 dtype: Any) -> None:
        n = math.prod(grid)
        super().__init__((n, n), dtype)
        self.grid_shape = grid
        self.boundary = boundary
        self.spacing = spacing
        self._matrix: Any = None  # the assembled sparse matrix, built on demand

    # The face coefficients divided by h^2, per axis (see ``apply_stencil``).
    def _scaled_faces(self) -> tuple[Any, ...]:
        raise NotImplementedError

    def _namespace(self, u: Any) -> Any:
        return ops_for(u).xp

    def _apply(self, u: Any) -> Any:
        """``A u`` on grid-shaped values ``(..., *grid)``: the backend dispatch point."""
        xp = self._namespace(u)
        if getattr(xp, "__name__", "") == "cupy":
            # One fused CUDA kernel instead of ~10 array operations per axis; the module
            # (and cupy) is imported only once CuPy data is in use.
            from prdp_ops.backends.cupy import apply_stencil_fused

            return apply_stencil_fused(self._scaled_faces(), u, self.boundary)
        return apply_stencil(xp, self._scaled_faces(), u, self.boundary)

    def _matvec(self, x: Any) -> Any:
        return self._apply(x.reshape(self.grid_shape)).reshape(-1)

    def _matmat(self, X: Any) -> Any:
        # Columns become a leading batch axis: one stencil pass for all of them.
        k = X.shape[1]
        return self._apply(X.T.reshape((k, *self.grid_shape))).reshape(k, -1).T

    def diagonal(self) -> Any:
        # Built once at construction: Jacobi divides by it at every iteration.
        return self._diagonal

    def _assemble_diagonal(self) -> Any:
        # Node i's diagonal is the sum of its faces' coefficients (over h^2).
        faces = self._scaled_faces()
        xp = self._namespace(faces[0]) if hasattr(faces[0], "shape") else np
        total = 0.0
        for a, face in enumerate(faces):
            axis = a - len(faces)
            face = face if hasattr(face, "shape") else xp.full(self._face_shape(a), face)
            if self.boundary == "dirichlet":
                left_faces, right_faces = face[_along(axis, None, -1)], face[_along(axis, 1, None)]
            else:
                left_faces, right_faces = xp.roll(face, 1, axis=axis), face
            total = total + left_faces + right_faces
        return xp.asarray(total, dtype=self.dtype).reshape(-1)

    def _face_shape(self, a: int) -> tuple[int, ...]:
        shape = list(self.grid_shape)
        shape[a] += 1 if self.boundary == "dirichlet" else 0
        return tuple(shape)

    def _host_faces(self) -> list[np.ndarray]:
        ops = self.ops
        return [np.broadcast_to(ops.to_host(face) if hasattr(face, "shape") else face,
                                self._face_shape(a))
                for a, face in enumerate(self._scaled_faces())]

    def _scipy_matrix(self) -> scipy.sparse.csr_matrix:
        """``sum_a G_a^T diag(faces_a) G_a`` assembled with Kronecker products (CSR)."""
        n = self.shape[0]
        total = scipy.sparse.csr_matrix((n, n), dtype=self.dtype)
        for a, face in enumerate(self._host_faces()):
            G = _difference_matrix(self.grid_shape, a, self.boundary)
            total = total + G.T @ scipy.sparse.diags(face.reshape(-1)) @ G
        total = total.astype(self.dtype).tocsr()
        total.sum_duplicates()
        return total

    def to_matrix(self) -> Any:
        """The matrix: scipy.sparse CSR for NumPy data, cupyx CSR for CuPy, dense for JAX.

        The sparse matrix is assembled on the first call and reused (SOR asks for it at
        every iteration); treat it as read-only.

        Raises
        ------
        MatrixFreeError
            For JAX data when ``n > 4096`` (a dense matrix would be too large).
        """
        ops = self.ops
        if ops.name == "jax":
            # Not cached: under tracing the result is a tracer that must not outlive it.
            n = self.shape[0]
            if n > MAX_DENSE_JAX:
                raise MatrixFreeError(
                    f"{type(self).__name__} holds JAX arrays and has n = {n} unknowns; "
                    f"to_matrix builds a dense matrix only up to n = {MAX_DENSE_JAX}. Use a "
                    "matrix-free solver (cg, jacobi, richardson) instead of sor"
                )
            return self._matmat(ops.xp.eye(n, dtype=self.dtype))
        if self._matrix is None:
            self._matrix = self._scipy_matrix()
            if ops.name == "cupy":
                import cupyx.scipy.sparse  # lazily: only when CuPy data is in use

                self._matrix = cupyx.scipy.sparse.csr_matrix(self._matrix)
        return self._matrix

    def __repr__(self) -> str:
        return (f"<{self.shape[0]}x{self.shape[1]} {type(self).__name__} on a {self.boundary} "
                f"grid {self.grid_shape} with dtype={self.dtype}>")


def _difference_matrix(grid: tuple[int, ...], a: int, boundary: str) -> scipy.sparse.csr_matrix:
    """``G_a`` on row-major flattened grids: faces along axis ``a`` by nodes."""
    n = grid[a]
    if boundary == "dirichlet":
        # Face j joins unknown j - 1 (left) and unknown j (right); n + 1 faces.
        G1 = scipy.sparse.diags([-1.0, 1.0], [-1, 0], shape=(n + 1, n))
    else:
        # Face j joins node j (left) and node j + 1 mod n (right); n faces.
        rows = np.concatenate([np.arange(n), np.arange(n)])
        cols = np.concatenate([np.arange(n), (np.arange(n) + 1) % n])
        vals = np.concatenate([-np.ones(n), np.ones(n)])
        G1 = scipy.sparse.coo_matrix((vals, (rows, cols)), shape=(n, n))
    before = scipy.sparse.identity(math.prod(grid[:a]))
    after = scipy.sparse.identity(math.prod(grid[a + 1 :]))
    return scipy.sparse.kron(scipy.sparse.kron(before, G1), after, format="csr")


class LaplacianStencil(_StencilOperator):
    """The negative Laplacian ``-Δ`` (symmetric positive definite with Dirichlet boundaries).

    In 1D with spacing ``h``: ``(A u)_i = (-u_{i-1} + 2 u_i - u_{i+1}) / h^2``; in 2D and 3D
    the sum of that along every axis (5- and 7-point stencils). Matrix-free; it holds no
    parameters and works on numpy, cupy and jax vectors alike.

    Parameters
    ----------
    shape
        The grid of unknowns, 1 to 3 positive ints (an int means 1D). With Dirichlet
        boundaries these are the interior nodes.
    boundary
        ``"dirichlet"`` (zero boundary values) or ``"periodic"`` (at least 3 nodes per axis;
        the operator is then singular, its null space the constants).
    spacing
        Grid spacing ``h > 0``, one number or one per axis.
    dtype
        The operator's dtype (default float64).

    Notes
    -----
    The operator acts on flattened grids of length ``prod(shape)`` in row-major order.
    """

    def __init__(self, shape: int | tuple[int, ...], *, boundary: str = "dirichlet",
                 spacing: float | tuple[float, ...] = 1.0, dtype: Any = np.float64) -> None:
        grid = _check_grid(shape, boundary)
        super().__init__(grid, boundary, _check_spacing(spacing, len(grid)), dtype)
        self._diagonal = self._assemble_diagonal()

    def _scaled_faces(self) -> tuple[Any, ...]:
        return tuple(1.0 / h**2 for h in self.spacing)


class DiffusionStencil(_StencilOperator):
    """Variable-coefficient diffusion ``-div(c grad u)`` with ``c`` a differentiable parameter.

    Face coefficients are the arithmetic mean of the two adjacent node values of ``c``; with
    Dirichlet boundaries, the face between an edge unknown and the boundary takes that
    unknown's own ``c`` (see the module docstring). ``c = 1`` gives :class:`LaplacianStencil`.

    Parameters
    ----------
    c
        The coefficient at the grid nodes (the unknowns), a 1-, 2- or 3-D real array (numpy,
        cupy or jax) whose shape is the grid shape. Finite and > 0 (checked unless traced
        by JAX). Referenced, never modified.
    boundary
        ``"dirichlet"`` (zero boundary values) or ``"periodic"`` (at least 3 nodes per axis).
    spacing
        Grid spacing ``h > 0``, one number or one per axis.

    Notes
    -----
    ``parameters()`` is ``{"c": c}``; :meth:`param_vjp` gives the cotangent of ``c`` in closed
    form for the full operator and for its diagonal, strictly lower and strictly upper parts
    (row-major order), which is what the implicit adjoint, Jacobi and SOR differentiate.
    """

    def __init__(self, c: Any, *, boundary: str = "dirichlet",
                 spacing: float | tuple[float, ...] = 1.0) -> None:
        ops = ops_for(c)
        c = _check_coefficient(c, ops)
        grid = _check_grid(c.shape, boundary)
        super().__init__(grid, boundary, _check_spacing(spacing, len(grid)), c.dtype)
        self.c = c
        self._ops = ops
        self._faces = tuple(_node_means(ops.xp, c, a - c.ndim, boundary) / h**2
                            for a, h in enumerate(self.spacing))
        self._diagonal = self._assemble_diagonal()

    def _scaled_faces(self) -> tuple[Any, ...]:
        return self._faces

    def _namespace(self, u: Any) -> Any:
        return self._ops.xp

    # -- parameters -------------------------------------------------------------------------
    def parameters(self) -> dict[str, Any]:
        return {"c": self.c}

    def with_parameters(self, params: dict[str, Any]) -> LinearOperator:
        c = params["c"]
        if getattr(c, "shape", None) != self.grid_shape:
            raise ValueError(
                f"c must keep the grid shape {self.grid_shape}; got {getattr(c, 'shape', None)}"
            )
        return DiffusionStencil(c, boundary=self.boundary, spacing=self.spacing)

    def param_vjp(self, x: Any, y_bar: Any, part: str = "full") -> dict[str, Any]:
        """Cotangent of ``c`` for ``y = A_part(c) x`` (JAX's convention).

        Returns ``{"c": c_bar}`` with ``sum(c_bar * dc) == sum(y_bar * (dA_part x))``; for
        complex vectors ``c_bar`` is the real part of that (``c`` is real).
        """
        return self._c_cotangent(x.reshape(self.grid_shape), y_bar.reshape(self.grid_shape),
                                 part, batched=False)

    def param_vjp_batch(self, X: Any, Y_bar: Any, part: str = "full") -> dict[str, Any]:
        """Sum of :meth:`param_vjp` over the rows of ``X`` and ``Y_bar`` (one pass)."""
        k = X.shape[0]
        return self._c_cotangent(X.reshape((k, *self.grid_shape)),
                                 Y_bar.reshape((k, *self.grid_shape)), part, batched=True)

    def _c_cotangent(self, x: Any, y_bar: Any, part: str, batched: bool) -> dict[str, Any]:
        _check_part(part)
        xp = self._ops.xp
        d = len(self.grid_shape)
        c_bar = None
        for a, h in enumerate(self.spacing):
            axis = a - d
            face_bar = _face_cotangents(xp, x, y_bar, axis, self.boundary, part) / h**2
            if batched:  # the faces -> c map is linear: sum the batch first
                face_bar = xp.sum(face_bar, axis=0)
            term = _node_means_T(xp, face_bar, axis, self.boundary)
            c_bar = term if c_bar is None else c_bar + term
        if xp.iscomplexobj(c_bar):
            c_bar = xp.real(c_bar)
        return {"c": xp.asarray(c_bar, dtype=self.c.dtype)}
