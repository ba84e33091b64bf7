"""The objective registry: declaring an objective class with ``@register`` is all it takes to add one.

Every module of ``sslpt.engine.objectives`` is imported on first use, so an objective that lives in that
package needs no list to be added to; one that lives elsewhere (a user's file or module) is imported through
the run config's top-level ``plugins = ["path/to/file.py", "package.module"]``.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path

_OBJECTIVES: dict[str, type] = {}
_discovered = False


class UnknownObjective(KeyError):
    pass


def register(cls):
    """Class decorator: ``cls.name`` (a string) and ``cls.Settings`` (its config dataclass) identify it."""
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not name.isidentifier():
        raise TypeError(f"{cls.__qualname__}.name must be an identifier string, got {name!r}")
    settings = cls.__dict__.get("Settings")
    if settings is None:
        raise TypeError(f"{cls.__qualname__} must declare its own config dataclass as `Settings`")
    existing = _OBJECTIVES.get(name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"objective {name!r} is registered twice: {existing.__module__}.{existing.__qualname__} "
                         f"and {cls.__module__}.{cls.__qualname__}")
    settings.objective = name   # the config section it is read from: [objective.<name>]
    _OBJECTIVES[name] = cls
    return cls


def discover() -> None:
    """Import every module of the objectives package once (each registers what it declares)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = importlib.import_module(__name__.rsplit(".", 1)[0] + ".objectives")
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


def load_plugin(spec: str, base_dir: Path | None = None) -> None:
    """Import a file (``*.py``, relative to ``base_dir``) or a module by dotted name; it registers objectives."""
    if spec.endswith(".py"):
        path = Path(spec)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        path = path.resolve()
        if not path.is_file():
            raise FileNotFoundError(f"plugin file {spec!r} not found (looked at {path})")
        name = f"sslpt_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        if name in sys.modules:
            return
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    else:
        importlib.import_module(spec)


def names() -> list[str]:
    discover()
    return sorted(_OBJECTIVES)


def get(name: str) -> type:
    discover()
    if name not in _OBJECTIVES:
        close = difflib.get_close_matches(name, _OBJECTIVES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownObjective(f"objective.name must be one of {sorted(_OBJECTIVES)}, got {name!r}{hint}")
    return _OBJECTIVES[name]
