"""Plug-in folders (priors/, tasks/): every module in the folder is imported and registers itself by name.

A plug-in that fails to import (a duplicate name, a syntax error, a missing package) stops the command with
one line naming its file and line, instead of a traceback through the registry."""
from __future__ import annotations

import importlib
import pkgutil
import traceback
from pathlib import Path


class PluginError(Exception):
    """A plug-in module could not be imported; the message names the file and line."""


def import_all(package: str, path, skip: tuple[str, ...] = ()) -> None:
    for mod in pkgutil.iter_modules(path):
        if mod.name in skip:
            continue
        name = f"{package}.{mod.name}"
        try:
            importlib.import_module(name)
        except Exception as e:                                             # noqa: BLE001  (reported, not hidden)
            raise PluginError(f"{_where(e, Path(mod.module_finder.path) / f'{mod.name}.py')}: "
                              f"{type(e).__name__}: {e}") from e


def _where(e: Exception, file: Path) -> str:
    """FILE:LINE of the failure inside the plug-in (its own file first, else the innermost frame)."""
    if isinstance(e, SyntaxError) and e.filename:
        return f"{e.filename}:{e.lineno}"
    frames = traceback.extract_tb(e.__traceback__)
    own = [f for f in frames if Path(f.filename) == file]
    frame = (own or frames or [None])[-1]
    return f"{frame.filename}:{frame.lineno}" if frame else str(file)
