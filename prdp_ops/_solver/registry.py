"""The solver registry: names to solver classes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from prdp_ops._solver.base import IterativeSolver

__all__ = ["available_solvers", "get_solver", "register_solver", "resolve_solver"]

_S = TypeVar("_S", bound=type[IterativeSolver])

# The one piece of module state: which class answers to which name. It only grows (or is
# overwritten on request); solvers themselves keep no global state.
_REGISTRY: dict[str, type[IterativeSolver]] = {}


def register_solver(
    cls: _S | None = None, name: str | None = None, *, overwrite: bool = False
) -> _S | Callable[[_S], _S]:
    """Register a solver class under ``name`` (default: its ``name`` attribute, else the
    lower-cased class name). Works as a function and as a decorator.

    Parameters
    ----------
    cls
        A subclass of :class:`IterativeSolver`.
    name
        The name ``po.solve(..., solver=name)`` will use.
    overwrite
        Replace an existing registration of the same name.

    Raises
    ------
    TypeError
        If ``cls`` is not an :class:`IterativeSolver` subclass.
    ValueError
        If ``name`` is taken and ``overwrite`` is False.
    """
    if cls is None:
        return lambda c: register_solver(c, name, overwrite=overwrite)  # type: ignore[return-value]
    if not (isinstance(cls, type) and issubclass(cls, IterativeSolver)):
        raise TypeError(
            f"register_solver needs a subclass of prdp_ops.IterativeSolver; got {cls!r}"
        )
    key = name or cls.__dict__.get("name") or cls.__name__.lower()
    if not isinstance(key, str) or not key:
        raise ValueError(f"name must be a non-empty string; got {key!r}")
    if key in _REGISTRY and _REGISTRY[key] is not cls and not overwrite:
        raise ValueError(
            f"a solver named {key!r} is already registered ({_REGISTRY[key].__name__}); pass "
            "overwrite=True to replace it, or choose another name"
        )
    cls.name = key
    _REGISTRY[key] = cls
    return cls


def available_solvers() -> tuple[str, ...]:
    """Return the registered solver names, sorted."""
    return tuple(sorted(_REGISTRY))


def get_solver(name: str, **options: Any) -> IterativeSolver:
    """Return an instance of the solver registered as ``name``, built with ``options``.

    Raises
    ------
    KeyError
        If no solver has that name; the message lists the registered names.
    """
    try:
        cls = _REGISTRY[name]
    except (KeyError, TypeError):
        raise KeyError(
            f"unknown solver {name!r}; registered solvers: {', '.join(available_solvers())}. "
            "Register your own with prdp_ops.register_solver."
        ) from None
    return cls(**options)


def resolve_solver(solver: str | IterativeSolver, options: dict[str, Any]) -> IterativeSolver:
    """Turn the ``solver`` argument of ``solve`` (a name or an instance) into an instance."""
    if isinstance(solver, IterativeSolver):
        if options:
            raise TypeError(
                f"solver options {sorted(options)} were given with a solver instance "
                f"{solver!r}; pass them to its constructor instead"
            )
        return solver
    if isinstance(solver, type) and issubclass(solver, IterativeSolver):
        return solver(**options)
    if not isinstance(solver, str):
        raise TypeError(
            f"solver must be a registered name or an IterativeSolver; got {type(solver).__name__}"
        )
    return get_solver(solver, **options)
