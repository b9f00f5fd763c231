"""Prior registry: every module in this folder registers its prior by name; nothing else lists them.

Adding a prior = one file here (a `@register_prior("name")` class) + `conf/prior/<name>.yaml`.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import pkgutil
import typing

from hydra.core.config_store import ConfigStore

from midpo_cli.priors.base import Needs, PairView, Prior

PRIORS: dict[str, type[Prior]] = {}
SCHEMA_GROUP = "schema/prior"   # ConfigStore group holding each prior's typed schema


def register_prior(name: str):
    """Class decorator: make the class a dataclass, register it, and store its typed config schema."""
    def wrap(cls):
        cls = dataclasses.dataclass(eq=False, repr=False)(cls)
        cls.name = name
        PRIORS[name] = cls
        hints = typing.get_type_hints(cls)
        fields = [("name", str, dataclasses.field(default=name))] + [
            (f.name, hints[f.name], dataclasses.field(default=f.default)) for f in dataclasses.fields(cls)]
        schema = dataclasses.make_dataclass(f"{cls.__name__}Config", fields)
        ConfigStore.instance().store(group=SCHEMA_GROUP, name=name, node=schema)
        return cls
    return wrap


def _import_all() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base":
            importlib.import_module(f"{__name__}.{mod.name}")


def prior_class(name: str) -> type[Prior]:
    if name not in PRIORS:
        close = difflib.get_close_matches(name, PRIORS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise KeyError(f"unknown prior '{name}'.{hint} Registered priors: {', '.join(sorted(PRIORS))}")
    return PRIORS[name]


def build_prior(cfg) -> Prior:
    """Build a prior from its config node (a mapping with `name` plus the prior's hyperparameters)."""
    items = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
    cls = prior_class(items.pop("name"))
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(items) - known
    if unknown:
        raise ValueError(f"prior '{cls.name}' has no option(s) {sorted(unknown)}; valid: {sorted(known)}")
    prior = cls(**items)
    prior.check_scale()
    prior.validate()
    return prior


_import_all()

__all__ = ["Needs", "PairView", "Prior", "PRIORS", "register_prior", "prior_class", "build_prior"]
