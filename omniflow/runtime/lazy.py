"""Package namespaces that import their sub-modules on first use (PEP 562).

A script that only reads option classes or constants of a package should not pay seconds of torch imports
before it parses its flags; ``from package import Name`` still works and imports Name's module then.
"""
from __future__ import annotations

from importlib import import_module
from typing import Callable


def lazy_exports(package: str, exports: dict[str, tuple[str, ...]]) -> tuple[Callable[[str], object], list[str]]:
    """``(__getattr__, __all__)`` for ``package``: ``exports`` maps a relative module name ('.model') to the
    names it provides."""
    module_of = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str):
        if name not in module_of:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(module_of[name], package), name)

    return __getattr__, sorted(module_of)
