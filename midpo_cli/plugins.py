"""Plug-ins: every module in priors/ and tasks/ is imported and registers itself by name (@register_prior,
@register_task); so are the modules of one's own named in the MIDPO_PLUGINS environment variable
(comma-separated importable module names, e.g. `MIDPO_PLUGINS=my_tasks PYTHONPATH=dir midpo train
dataset.source=my_task`), without editing midpo_cli. A task of one's own with settings brings its
conf/dataset/<name>.yaml on Hydra's search path (hydra.searchpath); one without can run as
`dataset=local dataset.source=<name>`.

A plug-in that fails to import (a duplicate name, a syntax error, a missing package) stops the command with
one line naming its file and line, instead of a traceback through the registry."""
from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import sys
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


def import_external() -> None:
    """Import the modules MIDPO_PLUGINS names (each once: a module already imported is not imported again)."""
    for name in filter(None, (n.strip() for n in os.environ.get("MIDPO_PLUGINS", "").split(","))):
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except Exception as e:                                             # noqa: BLE001  (reported, not hidden)
            spec = importlib.util.find_spec(name) if not isinstance(e, ModuleNotFoundError) else None
            where = _where(e, Path(spec.origin)) if spec and spec.origin else f"MIDPO_PLUGINS={name}"
            raise PluginError(f"{where}: {type(e).__name__}: {e}") from e


def _where(e: Exception, file: Path) -> str:
    """FILE:LINE of the failure inside the plug-in (its own file first, else the innermost frame)."""
    if isinstance(e, SyntaxError) and e.filename:
        return f"{e.filename}:{e.lineno}"
    frames = traceback.extract_tb(e.__traceback__)
    own = [f for f in frames if Path(f.filename) == file]
    frame = (own or frames or [None])[-1]
    return f"{frame.filename}:{frame.lineno}" if frame else str(file)
