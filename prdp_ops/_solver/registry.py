"""The solver registry: names to solver classes."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from prdp_ops._solver.base import IterativeSolver

__all__ = ["accepted_options", "available_solvers", "check_options", "get_solver",
           "register_solver", "resolve_solver"]

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
    # The first name a class is registered under becomes its own; later names are aliases
    # and leave the class alone (a built-in must keep reporting its name).
    if "name" not in cls.__dict__ or cls.__dict__["name"] is None:
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
    check_options(cls, options, name)
    return cls(**options)


#: Keywords of SciPy's solvers with another name here, and what to pass instead.
_RENAMED = {"tol": "rtol= (SciPy's old tol= is the relative tolerance rtol= here)"}


def accepted_options(cls: type[IterativeSolver]) -> tuple[str, ...] | None:
    """The option names ``cls.__init__`` takes (``None``: any, it has ``**kwargs``)."""
    if cls.__init__ is IterativeSolver.__init__:
        return ()
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return tuple(p.name for p in params
                 if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                               inspect.Parameter.KEYWORD_ONLY))


def check_options(cls: type[IterativeSolver], options: dict[str, Any],
                  label: str | None = None) -> None:
    """Raise a ``TypeError`` naming the solver for options its ``__init__`` does not take.

    Every keyword of ``po.solve`` that is not one of its own parameters lands here, so a
    misspelt ``rtoll=`` or SciPy's ``tol=`` must not be swallowed by a solver's
    ``**options``.
    """
    known = accepted_options(cls)
    if known is None:
        return
    unknown = sorted(set(options) - set(known))
    if not unknown:
        return
    label = label or cls.__dict__.get("name") or cls.__name__
    takes = ", ".join(known) if known else "no options"
    hints = []
    for key in unknown:
        if key in _RENAMED:
            hints.append(f"pass {_RENAMED[key]}")
        else:
            close = difflib.get_close_matches(key, [*known, *_SOLVE_KEYWORDS], n=1)
            if close:
                hints.append(f"did you mean {close[0]}= instead of {key}=?")
    hint = (" (" + "; ".join(hints) + ")") if hints else ""
    raise TypeError(
        f"solver {label!r} got unexpected option(s) {', '.join(map(repr, unknown))}{hint}; "
        f"it takes: {takes}. Keywords that are neither an argument of the solve function nor "
        "an option of the solver are errors, not ignored"
    )


#: Keywords of ``po.solve`` / ``po.solve_vjp`` / ``pj.solve``, for spelling suggestions.
_SOLVE_KEYWORDS = (
    "x0", "maxiter", "rtol", "atol", "M", "callback", "on_failure", "check_every", "adjoint",
    "adjoint_maxiter", "adjoint_rtol", "adjoint_atol", "adjoint_solver", "backend",
    "return_result", "max_steps", "checkpoint_every", "adjoint_callback", "hermitian",
)


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
        check_options(solver, options)
        return solver(**options)
    if not isinstance(solver, str):
        raise TypeError(
            f"solver must be a registered name or an IterativeSolver; got {type(solver).__name__}"
        )
    return get_solver(solver, **options)
