"""Tape memory for the NumPy driver: blocks reused from one unrolled solve to the next.

An unrolled solve keeps a few n-vectors per iteration (CG: three) until its reverse sweep
has run. Left to the allocator, those vectors are fresh memory on every call: glibc hands a
freed tape of hundreds of megabytes back to the kernel, and the next call page-faults all of
it in again (zeroed by the kernel), which measured as long as the forward pass itself at
256^2. Here the tape's vectors are copies (``ops.keep``) into rows of large blocks that stay
allocated between calls, so a repeated solve of the same shape writes into memory that is
already mapped.

A block is reused only when nothing refers to it any more: every row handed out is a view
whose ``base`` is the block, so the block's reference count tells whether a tape, a pending
vjp, a deferred cotangent or a user still holds any part of it. A solve whose vjp is kept
alive therefore keeps its blocks, and the next solve takes others (or new ones): nothing
anybody holds is ever overwritten.

The cache holds at most :func:`tape_cache_limit` bytes: a solve that needs more first drops
free blocks, those of the shapes least recently used first, and past the limit takes
ordinary memory, freed with its tape. :func:`clear_tape_cache` drops every cached block.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from prdp_ops._array_ops import NumpyOps

__all__ = ["TapeArena", "TapingOps", "cached_tape_bytes", "clear_tape_cache",
           "default_tape_cache_limit", "set_tape_cache_limit", "tape_cache_limit"]

#: Target size of one block: large enough that allocation is rare, small enough that a short
#: solve does not reserve much more than it uses.
_BLOCK_BYTES = 8 << 20
#: Rows per block, at most (tiny vectors: a block of 8 MiB would be mostly unused).
_MAX_ROWS = 256
#: How many recently kept arrays :meth:`TapeArena.keep` recognises (copies each once).
_RECENT = 8



def default_tape_cache_limit() -> int:
    """A quarter of the machine's physical memory, or 2 GiB where the platform does not say.

    Why a share of memory rather than a fixed size: the cache only ever holds blocks some
    solve has used, so its size is that of the largest tape the process runs, and a tape
    left outside it is page-faulted in fresh on every call, which costs as much as the
    forward pass (measured: BiCGSTAB unrolled at 512^2, K = 200, a 2.84 GiB tape, ran at 4.07x
    its forward with a 2 GiB limit and 2.43x with 6 GiB). A quarter leaves the rest to the
    solve's other memory and to everything else; :func:`set_tape_cache_limit` overrides it
    and :func:`clear_tape_cache` returns the memory.
    """
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX, or the name is unknown
        return 2 << 30
    return physical // 4 if physical > 0 else 2 << 30


_cache: dict[tuple[tuple[int, ...], str], list[np.ndarray]] = {}
_limit = [default_tape_cache_limit()]  # bytes; a list so the setter needs no global


def _references(blocks: list[np.ndarray], i: int) -> int:
    return sys.getrefcount(blocks[i])


# The count of a block that only the cache holds, measured once through the same code path
# (the list's reference plus getrefcount's argument), so the test does not depend on the
# interpreter's counting conventions.
_FREE = _references([np.empty(1)], 0)


def tape_cache_limit() -> int:
    """The most bytes of tape blocks kept for reuse between solves (default: a quarter of
    physical memory, :func:`default_tape_cache_limit`)."""
    return _limit[0]


def set_tape_cache_limit(nbytes: int) -> int:
    """Set :func:`tape_cache_limit` and return the previous limit.

    Blocks already cached beyond a lowered limit are dropped when no tape uses them;
    ``0`` turns the reuse off (every tape is fresh memory, freed with its vjp).
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"nbytes must be an int >= 0 (bytes of tape cache); got {nbytes!r}")
    previous, _limit[0] = _limit[0], nbytes
    _trim()
    return previous


def cached_tape_bytes() -> int:
    """Bytes held by the tape cache now (blocks in use by a live tape included)."""
    return sum(block.nbytes for blocks in _cache.values() for block in blocks)


def clear_tape_cache() -> None:
    """Drop every cached tape block; memory still used by a live tape (a vjp not yet
    called or still held) is freed when that tape goes."""
    _cache.clear()


def _trim(room: int = 0) -> None:
    """Drop free blocks, other shapes' first (least recently used), while the cache holds
    more than the limit less ``room``."""
    total = cached_tape_bytes()
    for key in list(_cache):  # dicts keep insertion order: the least recently used first
        blocks = _cache[key]
        i = len(blocks) - 1
        while i >= 0 and total > _limit[0] - room:
            if _references(blocks, i) == _FREE:
                total -= blocks[i].nbytes
                del blocks[i]
            i -= 1


class TapeArena:
    """The rows one taped solve copies its kept vectors into.

    Parameters
    ----------
    shape, dtype
        Of the vectors kept (the solve's ``b``). Arrays of another shape or dtype are kept
        by reference, as without an arena.
    """

    def __init__(self, shape: tuple[int, ...], dtype: Any) -> None:
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        itemsize = max(self.dtype.itemsize * int(np.prod(self.shape)), 1)
        self._rows = int(min(max(_BLOCK_BYTES // itemsize, 1), _MAX_ROWS))
        # Blocks grow geometrically up to that size (a short solve takes little).
        self._grow = min(self._rows, 16)
        self._key = (self.shape, self.dtype.str)
        self._block: np.ndarray | None = None
        self._next = 0
        # The last few arrays kept and their rows: a solver's record may keep the same
        # forward array at two steps (e.g. as "after" and then as "before", or a constant
        # like BiCGSTAB's shadow residual), and it is copied once. Forward states are never
        # modified in place, so identity means equal contents; the references held here
        # keep the identities valid.
        self._recent: list[tuple[Any, np.ndarray]] = []
        # The ids of the blocks this arena has handed rows from (held by their rows, so the
        # ids stay valid while a row is alive): a row of them is kept as it is.
        self._blocks: set[int] = set()

    def keep(self, a: Any) -> Any:
        """A copy of ``a`` in the next free row (``a`` itself if its shape/dtype differ, or if
        it is a row of this arena already: :meth:`fresh`)."""
        if not isinstance(a, np.ndarray) or a.shape != self.shape or a.dtype != self.dtype:
            return a
        if id(a.base) in self._blocks and a.base is not None:
            return a
        for source, row in self._recent:
            if source is a:
                return row
        row = self._row()
        np.copyto(row, a)
        self._recent = [(a, row), *self._recent[: _RECENT - 1]]
        return row

    def fresh(self, a: Any) -> Any:
        """A copy of ``a`` in the next free row, for a forward step to update in place into
        a vector its record keeps (then :meth:`keep` returns that row as it is, no second
        copy); ``a.copy()`` if its shape/dtype differ."""
        if not isinstance(a, np.ndarray) or a.shape != self.shape or a.dtype != self.dtype:
            return a.copy()
        row = self._row()
        np.copyto(row, a)
        return row

    def _row(self) -> np.ndarray:
        if self._block is None or self._next == len(self._block):
            self._block, self._next = self._new_block(), 0
            self._blocks.add(id(self._block))
        row = self._block[self._next]
        self._next += 1
        return row

    def adopt(self, a: Any) -> Any:
        """:meth:`keep` of ``a`` if it is an array of its own (a vector a reverse step
        computed, e.g. BiCGSTAB's ``s``), else ``a`` itself: a view (a tape row, a row of
        GMRES's basis) is memory its owner holds anyway. For the vectors of A's deferred
        cotangent, which live as long as the tape."""
        if getattr(a, "base", None) is not None:
            return a
        return self.keep(a)

    def _new_block(self) -> np.ndarray:
        # This shape becomes the most recently used (moved to the end of the dict).
        blocks = _cache.pop(self._key, [])
        _cache[self._key] = blocks
        rows, self._grow = self._grow, min(2 * self._grow, self._rows)
        for i in range(len(blocks)):
            # Free: no row of it is held (this arena's current block is not: it holds it).
            if _references(blocks, i) == _FREE:
                return blocks[i]
        block = np.empty((rows, *self.shape), dtype=self.dtype)
        if cached_tape_bytes() + block.nbytes > _limit[0]:
            _trim(room=block.nbytes)  # free blocks of other shapes make room first
        if cached_tape_bytes() + block.nbytes <= _limit[0]:
            blocks.append(block)
        return block


class TapingOps(NumpyOps):
    """:class:`~prdp_ops._array_ops.NumpyOps` whose :meth:`keep` copies into a
    :class:`TapeArena`, and whose :meth:`fresh_copy` copies into it as well; the driver
    passes it to ``solver.step`` and ``solver.record`` while it records a tape."""

    def __init__(self, arena: TapeArena) -> None:
        super().__init__()
        self.arena = arena

    def keep(self, a: Any) -> Any:
        return self.arena.keep(a)

    def fresh_copy(self, a: Any) -> Any:
        return self.arena.fresh(a)
