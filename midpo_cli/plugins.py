"""Plug-ins: every module in priors/ and tasks/ is imported and registers itself by name (@register_prior,
@register_task).

Plug-ins from outside midpo_cli: `MIDPO_PLUGINS` names folders (separated by os.pathsep, like PATH) laid out as midpo's
own tree, e.g. `<folder>/priors/<name>.py` and `<folder>/conf/prior/<name>.yaml`, or `<folder>/tasks/<name>.py` and
`<folder>/conf/dataset/<name>.yaml`. Each module of `<folder>/priors/` and `<folder>/tasks/` is imported as midpo's
own are, and each `<folder>/conf/<group>/<name>.yaml` joins config group <group> (Hydra's
ConfigStore, so the command line, `--multirun` globs and the launchers' job processes all see it).

A plug-in that fails to import (a duplicate name, a syntax error, a missing package) stops the command with
one line naming its file and line, instead of a traceback through the registry."""
from __future__ import annotations

import importlib
import importlib.util
import itertools
import os
import pkgutil
import re
import sys
import traceback
from pathlib import Path

ENV = "MIDPO_PLUGINS"                                    # plug-in folders outside midpo_cli, os.pathsep-separated
PACKAGE_HEADER = re.compile(r"#\s*@package\s+(\S+)")     # a YAML's `# @package <package>` line, as Hydra reads it


class PluginError(Exception):
    """A plug-in module could not be imported; the message names the file and line."""


def import_all(package: str, path, skip: tuple[str, ...] = ()) -> None:
    for mod in pkgutil.iter_modules(path):
        if mod.name in skip:
            continue
        _reported(Path(mod.module_finder.path) / f"{mod.name}.py", importlib.import_module, f"{package}.{mod.name}")


def outside_folders() -> list[Path]:
    """The plug-in folders `MIDPO_PLUGINS` names (none when it is unset)."""
    return [Path(p).expanduser() for p in os.environ.get(ENV, "").split(os.pathsep) if p]


def import_outside(kind: str, folders: list[Path] | None = None) -> None:
    """Import `<folder>/<kind>/*.py` of each plug-in folder (default: `MIDPO_PLUGINS`) as module
    `midpo_plugins.<kind>.<stem>` (a file already imported is skipped), then store its `conf/` YAMLs."""
    for folder in outside_folders() if folders is None else folders:
        if not folder.is_dir():
            raise PluginError(f"{ENV}: {folder} is not a directory")
        for file in sorted((folder / kind).glob("*.py")):
            name = f"midpo_plugins.{kind}.{file.stem}"
            known = sys.modules.get(name)
            if known is not None and Path(known.__file__).resolve() == file.resolve():
                continue
            if known is not None:
                raise PluginError(f"{file}: a plug-in module {kind}/{file.stem}.py is also in {known.__file__}; "
                                  "rename one")
            _reported(file, _load, name, file)
        store_configs(folder / "conf")


def store_configs(conf: Path) -> None:
    """Every `<conf>/<group>/<name>.yaml` as config <name> of group <group> in Hydra's ConfigStore (its
    `# @package` line kept)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    for file in sorted(conf.rglob("*.yaml")):
        group = file.parent.relative_to(conf).as_posix()
        lines = file.read_text().splitlines()
        leading = itertools.takewhile(lambda line: line.startswith("#") or not line.strip(), lines)
        header = next((m.group(1) for m in map(PACKAGE_HEADER.match, leading) if m), None)
        try:
            node = OmegaConf.load(file)
        except Exception as e:                                             # noqa: BLE001  (reported, not hidden)
            raise PluginError(f"{file}: {type(e).__name__}: {' '.join(str(e).split())}") from e
        ConfigStore.instance().store(group=None if group == "." else group, name=file.stem, node=node, package=header)


def _load(name: str, file: Path) -> None:
    """Import the module at `file` under `name` (in sys.modules, so dataclasses and pickling find it)."""
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def _reported(file: Path, load, *args) -> None:
    """load(*args); a failure becomes a PluginError naming the file and line."""
    try:
        load(*args)
    except Exception as e:                                             # noqa: BLE001  (reported, not hidden)
        raise PluginError(f"{_where(e, file)}: {type(e).__name__}: {e}") from e


def _where(e: Exception, file: Path) -> str:
    """FILE:LINE of the failure inside the plug-in (its own file first, else the innermost frame)."""
    if isinstance(e, SyntaxError) and e.filename:
        return f"{e.filename}:{e.lineno}"
    frames = traceback.extract_tb(e.__traceback__)
    own = [f for f in frames if Path(f.filename) == file]
    frame = (own or frames or [None])[-1]
    return f"{frame.filename}:{frame.lineno}" if frame else str(file)
