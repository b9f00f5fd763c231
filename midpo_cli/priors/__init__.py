"""Prior registry: every module in this folder registers its prior by name; nothing else lists them.

Adding a prior = one file here (a `@register_prior("name")` class) + `conf/prior/<name>.yaml`, or the same two files in
a plug-in folder outside midpo_cli (`MIDPO_PLUGINS`, midpo_cli/plugins.py). Its fields are its options; a `Literal[...]`
field becomes a typed enum of the config schema, so a wrong value fails when Hydra composes the config (and in
`build_prior`, for the Python API), naming the valid choices. Its arms (sweeps over arms) come from its class too.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from enum import Enum

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

from midpo_cli.plugins import import_all, import_outside
from midpo_cli.priors.base import Arm, Needs, PairView, Prior, Reduction

PRIORS: dict[str, type[Prior]] = {}
SCHEMA_GROUP = "schema/prior"   # ConfigStore group holding each prior's typed schema


def choices(hint) -> tuple | None:
    """The allowed values of a `Literal[...]` option, else None."""
    return typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None


def _schema_type(name: str, hint, renamed: dict | None = None):
    """A Literal option becomes an Enum (member names = the values as text) for OmegaConf's compose-time check.
    A renamed value ({old value: (new value, why)}, Prior.renamed) is a member too, kept in `enum.renamed`: composing
    lets it through (OmegaConf's own refusal is several lines) and the command line's check and `build_prior` refuse
    it in one line naming the new value."""
    values = choices(hint)
    if values is None:
        return hint, None
    renamed = dict(renamed or {})
    enum = Enum(name, {**{str(v): v for v in values}, **{old: old for old in renamed}})
    enum.renamed = renamed
    return enum, enum


def renamed_message(key: str, value, renamed: dict) -> str | None:
    """The one line refusing a renamed value of `key` (e.g. prior.update=marginal), or None when it is not one."""
    if str(value) not in renamed:
        return None
    new, why = renamed[str(value)]
    return f"{key}={value} was renamed: use {key}={new} ({why})"


def register_prior(name: str):
    """Class decorator: make the class a dataclass, register it, and store its typed config schema.
    A second prior under a taken name is an error (it would silently replace the first)."""
    def wrap(cls):
        if name in PRIORS:
            raise ValueError(f"prior '{name}' is registered twice ({PRIORS[name].__module__}.{PRIORS[name].__name__} "
                             f"and {cls.__module__}.{cls.__qualname__}); pick another name")
        cls = dataclasses.dataclass(eq=False, repr=False)(cls)
        cls.name = name
        hints = typing.get_type_hints(cls)
        fields = [("name", str, dataclasses.field(default=name))]
        for f in dataclasses.fields(cls):
            typ, enum = _schema_type(f"{cls.__name__}_{f.name}", hints[f.name], cls.renamed.get(f.name))
            fields.append((f.name, typ, dataclasses.field(default=enum[str(f.default)] if enum else f.default)))
        schema = dataclasses.make_dataclass(f"{cls.__name__}Config", fields)
        ConfigStore.instance().store(group=SCHEMA_GROUP, name=name, node=schema)
        PRIORS[name] = cls
        return cls
    return wrap


def unregister_prior(name: str) -> None:
    """Remove a prior and its schema (tests that register throwaway priors clean up with this)."""
    PRIORS.pop(name, None)
    ConfigStore.instance().repo.get("schema", {}).get("prior", {}).pop(f"{name}.yaml", None)


def _coerce(cls, key: str, value):
    """A config value as the prior's field expects it: enum members back to their plain value, checked; lists and
    mappings as plain Python (saved with the prior as JSON)."""
    allowed = choices(typing.get_type_hints(cls)[key])
    if allowed is None:
        return OmegaConf.to_container(value, enum_to_str=True) if isinstance(value, (DictConfig, ListConfig)) \
            else value
    value = value.value if isinstance(value, Enum) else value
    moved = renamed_message(f"prior.{key}", value, cls.renamed.get(key, {}))
    if moved:
        raise ValueError(moved)
    for v in allowed:                                   # "2" (from a YAML or the command line) matches 2
        if value == v or str(value) == str(v):
            return v
    raise ValueError(f"prior.{key}={value!r} is not one of {list(allowed)} (prior '{cls.name}')")


def prior_class(name: str) -> type[Prior]:
    if name not in PRIORS:
        close = difflib.get_close_matches(name, PRIORS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise KeyError(f"unknown prior '{name}'.{hint} Registered priors: {', '.join(sorted(PRIORS))}")
    return PRIORS[name]


def build_prior(prior_cfg) -> Prior:
    """Build a prior from its config node (a mapping with `name` plus the prior's hyperparameters)."""
    items = dict(prior_cfg.items()) if hasattr(prior_cfg, "items") else dict(prior_cfg)
    cls = prior_class(items.pop("name"))
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(items) - known
    if unknown:
        raise ValueError(f"prior '{cls.name}' has no option(s) {sorted(unknown)}; valid: {sorted(known)}")
    prior = cls(**{k: _coerce(cls, k, v) for k, v in items.items()})
    prior.check_scale()
    prior.validate()
    return prior


import_all(__name__, __path__, skip=("base",))
import_outside("priors")            # plug-in folders outside midpo_cli ($MIDPO_PLUGINS): their priors/ and conf/

__all__ = ["Arm", "Needs", "PairView", "Prior", "Reduction", "PRIORS", "register_prior", "unregister_prior",
           "prior_class", "build_prior"]
