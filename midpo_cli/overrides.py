"""The command line's overrides, checked before Hydra runs: a key or a group option that does not exist
fails in one line naming it, the nearest valid name(s) and the valid choices.

Why: Hydra itself adds `+trainer.max_step=3` (a typo of `trainer.max_steps`) to the config and the run
silently ignores it, and answers `prior=simpoo` with several lines and no suggestion. midpo's configs are
typed (midpo_cli/config.py), so every key a run reads exists in its schema and no key ever needs adding:
`+` / `++` are only for config groups outside the defaults list (`+experiment=<preset>`).

The check composes the config the way Hydra will (same config files, same group choices; each option of a
swept group once), then looks each override's key up in it. `hydra.*` and `hydra/...` overrides, and runs
that change Hydra's config source (--config-path/--config-name/--config-dir), are left to Hydra.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import io
import shutil
import types
import typing
from enum import Enum

from omegaconf import DictConfig, ListConfig, OmegaConf

from midpo_cli.compat import hydra_args_parser

ADDING = ("midpo's configs are typed, so + and ++ cannot add a key; + is only for a config group "
          "outside the defaults list, e.g. +experiment=<preset>")


class BadOverride(ValueError):
    """An override naming a key or a group option the composed config does not have."""


def check_overrides(command: str, argv: list[str], config_path: str) -> None:
    """Raise BadOverride for the first override (in `argv`, Hydra's arguments of `midpo <command>`) that names
    an unknown key or group option. Anything this check cannot judge is left for Hydra to report."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    args = _hydra_args(argv)
    if args is None:
        return
    modes = [flag for flag, on in (("--run", args.run), ("--multirun", args.multirun), ("--cfg", args.cfg),
                                   ("--info", args.info), ("--shell-completion", args.shell_completion)) if on]
    if len(modes) > 1:                                                     # Hydra answers with a traceback
        raise BadOverride(f"{' and '.join(modes)} cannot be combined: give one of them (a sweep's config: "
                          "drop --multirun and show it with --cfg job)")
    if args.help or args.hydra_help or args.info or args.shell_completion or \
            args.config_path or args.config_name or args.config_dir or args.experimental_rerun:
        return
    try:
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except HydraException:
        return                                                             # a syntax error: Hydra explains it
    for o in overrides:
        if o.key_or_group in ("hydra.run.dir", "hydra.sweep.dir") and isinstance(o.value(), str):
            _check_directory(o)
        if o.key_or_group == "hydra/launcher" and o.value() == "slurm" and args.multirun and not shutil.which("sbatch"):
            raise BadOverride("hydra/launcher=slurm submits jobs with SLURM's sbatch, and there is none here: run it "
                              "on the cluster's login node, or try the same sweep on this machine with "
                              f"hydra/launcher=local (in `{o.input_line}`)")
    overrides = [o for o in overrides if o.package is None and not _is_hydras(o.key_or_group)]
    if not overrides:
        return
    with _initialized(config_path) as loader:
        is_group = [_is_group(loader, o.key_or_group) and not isinstance(o.value(), dict) for o in overrides]
        group_overrides = [o for o, g in zip(overrides, is_group) if g]
        keys = [o for o, g in zip(overrides, is_group) if not g]
        selected = [_selected(o, _options(loader, o.key_or_group)) for o in group_overrides]
        if not keys:
            return
        swept = {o.key_or_group for o in group_overrides if any(k.key_or_group.startswith(o.key_or_group + ".")
                                                                 for k in keys)}
        selected = [lines if o.key_or_group in swept else lines[:1] for o, lines in zip(group_overrides, selected)]
        try:
            configs = [(v, _compose(command, v)) for v in _variants(selected)]
        except (HydraException, OmegaConfBaseException):
            return                                                         # e.g. `experiment=x` without +
        for o in keys:
            for variant, cfg in configs:
                _check_key(o, cfg, loader, variant if len(configs) > 1 else [])


def _check_directory(o) -> None:
    """hydra.run.dir / hydra.sweep.dir must be a directory midpo can create or use (Hydra creates it first,
    with a traceback when it cannot)."""
    import os
    from pathlib import Path

    if "${" in o.value():
        return                                                             # resolved by Hydra: checked when used
    path = Path(o.value()).expanduser()
    existing = next(p for p in (path, *path.parents) if p.exists() or p == Path(p.anchor or "."))
    if existing.exists() and not existing.is_dir():
        raise BadOverride(f"{o.key_or_group}={o.value()}: {existing} is a file, not a directory; pick another "
                          f"directory (in `{o.input_line}`)")
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        raise BadOverride(f"{o.key_or_group}={o.value()}: {existing} is not writable; pick a directory you can "
                          f"write (in `{o.input_line}`)")


def _hydra_args(argv: list[str]):
    """Hydra's own reading of the command line (the parser hydra.main uses), or None when it would refuse it
    (Hydra then says why) or when this Hydra version has no such parser (the check is skipped)."""
    parser = hydra_args_parser()
    if parser is None:
        return None
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        try:
            return parser.parse_args(argv)
        except SystemExit:
            return None


@contextlib.contextmanager
def _initialized(config_path: str):
    from hydra import initialize_config_dir, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    init = initialize_config_module(config_path.removeprefix("pkg://"), version_base="1.3") \
        if config_path.startswith("pkg://") else initialize_config_dir(config_path, version_base="1.3")
    with init:
        yield GlobalHydra.instance().config_loader()


def _is_hydras(key: str) -> bool:
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def _is_group(loader, name: str) -> bool:
    parent, _, leaf = name.rpartition("/")
    return leaf in loader.list_groups(parent)


def _options(loader, group: str) -> list[str]:
    from hydra.core.object_type import ObjectType
    return sorted(loader.get_group_options(group, results_filter=ObjectType.CONFIG))


def _selected(o, options: list[str]) -> list[str]:
    """The group override as one override per option it selects (a sweep selects several), each checked."""
    from hydra.core.override_parser.types import Glob

    value = o.value()
    if o.is_delete() and value is None:
        return [o.input_line]
    if isinstance(value, Glob):
        picked = value.filter(options)
    elif o.is_discrete_sweep():
        picked = list(o.sweep_string_iterator())
    elif o.is_sweep_override():
        return []                                                          # an interval: a sweeper plugin's job
    else:
        picked = value if isinstance(value, list) else [value]
    for name in map(str, picked):
        if name not in options:
            close = _closest(name, options, cutoff=0.5)
            hint = f" Did you mean {_names(close)}?" if close else ""
            raise BadOverride(f"unknown option '{name}' for config group '{o.key_or_group}' (in `{o.input_line}`)."
                              f"{hint} Valid choices: {', '.join(options)}.")
    if isinstance(value, list) and not o.is_sweep_override():
        return [o.input_line]                                              # a list of options: one selection
    return [f"{o.get_key_element()}={name}" for name in picked]


def _variants(selected: list[list[str]]) -> list[list[str]]:
    """Group overrides to compose with: every group at its first option, then each other option of a swept
    group in turn (the keys a group brings depend on that group's own option only; the caller keeps only
    the first option of a group none of whose keys is overridden)."""
    selected = [lines for lines in selected if lines]
    first = [lines[0] for lines in selected]
    variants = [first]
    for i, lines in enumerate(selected):
        variants += [first[:i] + [line] + first[i + 1:] for line in lines[1:]]
    return variants


def _compose(command: str, overrides: list[str]) -> DictConfig:
    from hydra import compose
    return compose(command, overrides=overrides)


def _node(cfg, parts: list[str]) -> tuple[DictConfig | ListConfig, int, str | int | None]:
    """(container, found, leaf) along the longest existing prefix of `parts` (`found` parts long): the container it
    names, or, where it ends at a value (a leaf, an interpolation, a missing value), that value's container and its
    key `leaf` there. Values are never read, so no interpolation is resolved."""
    node = cfg
    for i, part in enumerate(parts):
        if isinstance(node, DictConfig) and part in node.keys():
            key = part
        elif isinstance(node, ListConfig) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            key = int(part)
        else:
            return node, i, None
        child = None if OmegaConf.is_interpolation(node, key) or OmegaConf.is_missing(node, key) else node[key]
        if not isinstance(child, (DictConfig, ListConfig)):
            return node, i + 1, key
        node = child
    return node, len(parts), None


def _paths(node, prefix: str = "") -> list[str]:
    """Every dotted key under a config node."""
    out = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            path = f"{prefix}{k}"
            if path != "hydra":
                out.append(path)
                if not OmegaConf.is_interpolation(node, k) and not OmegaConf.is_missing(node, k):
                    out += _paths(node[k], path + ".")
    return out


def _schema(node) -> type | None:
    """The dataclass a typed config node was built from (midpo_cli/config.py, a prior's or task's schema), else None."""
    typ = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
    return typ if dataclasses.is_dataclass(typ) else None


def _declared(parent, leaf) -> type | None:
    """The type the schema declares for parent[leaf] (Optional[...] unwrapped), or None where it declares none."""
    schema = _schema(parent)
    hint = typing.get_type_hints(schema).get(leaf) if schema is not None and isinstance(leaf, str) else None
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else None
    return hint if isinstance(hint, type) else None


def _check_choice(o, enum: type[Enum]) -> None:
    """A setting with a fixed set of values (an enum: trainer.precision, prior.form, ...): each value must be one."""
    renamed = getattr(enum, "renamed", {})                      # old value -> (new value, why): Prior.renamed
    names = [n for n in enum.__members__ if n not in renamed]
    values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [str(o.value())]
    for v in values:
        moved = renamed.get(v)
        if moved:
            raise BadOverride(f"{o.key_or_group}={v} was renamed: use {o.key_or_group}={moved[0]} ({moved[1]}) "
                              f"(in `{o.input_line}`)")
        if v not in names:
            close = _closest(v, names, cutoff=0.5)
            hint = f" Did you mean {_names(close)}?" if close else ""
            raise BadOverride(f"{o.key_or_group}={v!r} is not one of {', '.join(names)} (in `{o.input_line}`).{hint}")


_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "text"}


def _check_value(o, parent, leaf, typ: type | None) -> None:
    """A typed setting (int, float, bool, str; parent[leaf]): each value of the override must convert (set on a copy
    of the parent), or fail in one line (Hydra's own answer is several lines)."""
    import copy

    from omegaconf.errors import ValidationError

    kind = _KINDS.get(typ)
    if kind is None or (o.is_sweep_override() and not o.is_discrete_sweep()):
        return
    probe = copy.deepcopy(parent)
    values = list(o.sweep_iterator()) if o.is_discrete_sweep() else [o.value()]
    for v in values:
        try:
            probe[leaf] = v
        except ValidationError:
            shown = "null" if v is None else repr(v)
            raise BadOverride(f"{o.key_or_group}={shown} is not {kind} (in `{o.input_line}`)") from None


def _check_list(o) -> None:
    """A list setting (trainer.trackers, ...): each value of the override must be a list, written in brackets."""
    if o.is_sweep_override() and not o.is_discrete_sweep():
        return
    key, values = o.key_or_group, list(o.sweep_iterator()) if o.is_discrete_sweep() else [o.value()]
    bad = [v for v in values if not isinstance(v, (list, tuple))]
    if None in bad:
        raise BadOverride(f"{key}=null is not a list (in `{o.input_line}`): {key}=[] for none")
    if bad:
        raise BadOverride(f"{key} takes a list, in brackets (in `{o.input_line}`): "
                          f"{key}=[{','.join(str(v) for v in bad)}]")


def _check_key(o, cfg: DictConfig, loader, variant: list[str]) -> None:
    key = o.key_or_group
    parts = key.split(".")
    node, found, leaf = _node(cfg, parts)
    if found == len(parts):
        declared = _declared(node, leaf) if leaf is not None else None
        if o.is_delete():
            if _schema(node if leaf is not None else _node(cfg, parts[:-1])[0]) is not None:
                raise BadOverride(f"{key} cannot be deleted (in `{o.input_line}`): midpo's configs are typed, "
                                  f"so every key has a value; set it instead ({key}=<value>)")
        elif declared is not None and issubclass(declared, Enum):
            _check_choice(o, declared)
        elif leaf is not None:
            _check_value(o, node, leaf, declared)
        elif isinstance(node, ListConfig) and not o.is_delete():
            _check_list(o)
        return
    where = ".".join(parts[:found])
    chosen = f" with {' '.join(variant)}" if variant else ""
    level = [str(k) for k in node.keys()] if isinstance(node, DictConfig) and leaf is None else []
    close = [".".join([*parts[:found], c]) for c in _closest(parts[found], level, cutoff=0.6)]
    tail = parts[found + 1:]
    close = [".".join([c, *tail]) if _node(cfg, [*c.split("."), *tail])[1] == len(parts) else c for c in close]
    if not close:                                      # a key under the wrong parent: `max_steps` -> trainer.max_steps
        leaves = {p: p.rsplit(".", 1)[-1] for p in _paths(cfg)}
        near = _closest(parts[-1], set(leaves.values()), cutoff=0.8)
        close = [p for p, leaf in leaves.items() if leaf in near][:3]
    hint = f" Did you mean {_names(close)}?" if close else ""
    if found == 0 and close and "." not in close[0] and _is_group(loader, close[0]):
        hint += f" ({close[0]} is a config group: {close[0]}=<option>, one of {', '.join(_options(loader, close[0]))})"
    valid = f"Keys under {where}{chosen}: {', '.join(level)}." if where else f"Top-level keys: {', '.join(level)}."
    if leaf is not None or not isinstance(node, DictConfig):
        valid = f"{where} is a value, not a group of keys."
    adding = f" ({ADDING}.)" if o.is_add() or o.is_force_add() else ""
    raise BadOverride(f"unknown key '{key}' (in `{o.input_line}`).{hint} {valid}{adding}")


def _closest(word: str, options, cutoff: float) -> list[str]:
    """The nearest options (difflib's ratio), best first: at most 3, each within 0.1 of the best."""
    close = difflib.get_close_matches(word, options, n=3, cutoff=cutoff)
    score = [difflib.SequenceMatcher(None, word, c).ratio() for c in close]
    return [c for c, r in zip(close, score) if r >= score[0] - 0.1]


def _names(names: list[str]) -> str:
    return " or ".join(f"'{n}'" for n in names)
