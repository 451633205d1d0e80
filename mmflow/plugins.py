"""Finding stage types by name, the way Python plugins are found.

Every stage type, built-in or third-party, is an entry point in the group
``mmflow.stages`` (``name = "package.module:Class"`` in its distribution's
``pyproject.toml``), so a user's package adds stage types by being installed. A
pipeline may also name a class directly as ``type: package.module:Class``.

Lookup is lazy: asking for one type imports that type's module and no other; only
listing every type (``mmflow stages``) imports them all. This is the one module of
the library, with the runner and the CLI, that may reach into ``mmflow.stages``.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from importlib.metadata import EntryPoint, entry_points

from mmflow.stage import Stage, check_stage_type

GROUP = "mmflow.stages"


class StageTypeError(ValueError):
    """A stage type that exists by name but cannot be used (import error, not a Stage, ...)."""


@lru_cache(maxsize=1)
def _entry_points() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=GROUP):
        # the same distribution seen twice on sys.path (an editable install and a build dir)
        # declares the same value; two different values for one name is a real conflict
        if ep.name in found and found[ep.name].value != ep.value:
            raise StageTypeError(
                f"stage type {ep.name!r} is declared twice in entry point group {GROUP!r}: "
                f"{found[ep.name].value} and {ep.value}"
            )
        found[ep.name] = ep
    return found


def stage_type_names() -> list[str]:
    """Every stage type name installed (entry points), without importing any of them."""
    return sorted(_entry_points())


def _checked(cls: object, where: str, name: str | None) -> type[Stage]:
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        raise StageTypeError(f"{where} is not a mmflow Stage subclass")
    problems = check_stage_type(cls)
    if name is not None and cls.type != name:
        problems.append(f"{where} declares type {cls.type!r}, not {name!r}")
    if problems:
        raise StageTypeError(f"{where}: " + "; ".join(problems))
    return cls


def get_stage_type(name: str) -> type[Stage] | None:
    """The stage type called ``name`` (an entry point) or named ``package.module:Class``;
    None when there is no such name. Raises :class:`StageTypeError` when it exists but does
    not load."""
    eps = _entry_points()
    if name in eps:
        ep = eps[name]
        where = f"stage type {name!r} (entry point {ep.value}"
        where += f" from {ep.dist.name})" if ep.dist else ")"
        try:
            cls = ep.load()
        except Exception as e:
            raise StageTypeError(f"{where} failed to import: {type(e).__name__}: {e}") from e
        return _checked(cls, where, name)
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):
                return None  # no such module: an unknown name, with suggestions
            raise StageTypeError(f"stage type {name!r} failed to import: {e}") from e
        except AttributeError:
            return None
        except Exception as e:
            raise StageTypeError(
                f"stage type {name!r} failed to import: {type(e).__name__}: {e}"
            ) from e
        return _checked(cls, f"stage type {name!r}", None)
    return None


def stage_types() -> dict[str, type[Stage]]:
    """Every installed stage type, loaded (imports every stage module)."""
    out = {}
    for name in stage_type_names():
        cls = get_stage_type(name)
        if cls is not None:
            out[name] = cls
    return out
