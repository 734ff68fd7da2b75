"""Name registries for models, guides and estimators.

A built-in is found by its short name; a user's own class by import path
``package.module:ClassName``, anywhere a built-in name is accepted.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from pyro_vae.errors import UnknownNameError


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable] = {}

    def register(self, name: str):
        def decorator(obj):
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return decorator

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> Callable:
        if name in self._entries:
            return self._entries[name]
        if ":" in name:
            return import_object(name, self.kind)
        raise UnknownNameError(
            f"unknown {self.kind} {name!r}. Known {self.kind}s: {', '.join(self.names())}; "
            f"or give your own as 'package.module:ClassName'."
        )


def import_object(path: str, kind: str = "object", implicit_paths_removed: bool = False):
    """Import ``package.module:attr``, with an error that says what went wrong."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise UnknownNameError(f"{kind} path {path!r} must look like 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        where = (" (a run's code is never imported from the run directory or the current directory)"
                 if implicit_paths_removed else "")
        raise UnknownNameError(
            f"cannot import module {module_name!r} for {kind} {path!r}: {e}. "
            f"Is the package installed, or its folder on PYTHONPATH?{where}"
        ) from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise UnknownNameError(f"module {module_name!r} has no {attr!r} (for {kind} {path!r})") from None


MODELS = Registry("model")
GUIDES = Registry("guide")
ESTIMATORS = Registry("estimator")
