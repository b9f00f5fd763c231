"""The arms of a sweep over priors (+experiment=learnable_priors), from the priors' own declarations.

An arm is a prior with settings over its defaults: every fixed prior is the arm `<name>` (its defaults), and each
`Arm` a prior class declares under `arms` is the arm `<name>-<suffix>` (LearnablePrior declares the update rules
joint, joint0 and tracking, so every learnable prior has them unless it declares its own). They are Hydra configs
of the group `arm` (ConfigStore), so `+arm=learned_tilt-joint` and `+arm: glob(*)` need no file per arm. A sweep
over every arm (a glob over the group) stops before its first job, in one line, when a learnable prior declares no
arm: it would be left out without a word.
"""
from __future__ import annotations

from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from midpo_cli.priors import PRIORS, Arm

GROUP = "arm"


def arms() -> dict[str, tuple[str, Arm]]:
    """arm name -> (prior, Arm), over every registered prior, by name."""
    out = {}
    for name, cls in sorted(PRIORS.items()):
        if not cls.learnable:
            out[name] = (name, Arm({}, f"the prior {name} with its defaults (conf/prior/{name}.yaml)"))
        out.update({f"{name}-{suffix}": (name, arm) for suffix, arm in cls.arms.items()})
    return out


def register_arms() -> None:
    """Every arm as config `arm/<name>` in Hydra's ConfigStore (the group rebuilt: a prior registered or removed since
    counts): `override /prior: <prior>` plus the arm's settings under `prior`, at the global package."""
    cs = ConfigStore.instance()
    cs.repo.pop(GROUP, None)
    for name, (prior, arm) in arms().items():
        node: dict = {"defaults": [{"override /prior": prior}]}
        if arm.settings:
            node["prior"] = dict(arm.settings)
        cs.store(group=GROUP, name=name, node=node, package="_global_")


def armless() -> list[str]:
    """The learnable priors that declare no arm."""
    return sorted(name for name, cls in PRIORS.items() if cls.learnable and not cls.arms)


def check_arms() -> None:
    """ValueError naming each learnable prior that declares no arm (a sweep over every arm would miss it)."""
    missing = armless()
    if missing:
        classes = ", ".join(f"{PRIORS[n].__module__}.{PRIORS[n].__qualname__}" for n in missing)
        raise ValueError(f"learnable prior {', '.join(repr(n) for n in missing)} declares no arms, so a sweep over "
                         f"every arm (+experiment=learnable_priors) would leave it out: give {classes} `arms` (name "
                         "suffix -> Arm(settings, text)), as LearnablePrior's joint, joint0 and tracking")


def sweeps_every_arm(config: DictConfig) -> bool:
    """Whether the sweep's parameters or command line globs the `arm` group."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob
    from hydra.errors import HydraException

    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    try:
        overrides = OverridesParser.create().parse_overrides([*params, *config.hydra.overrides.task])
    except HydraException:                             # another sweeper's own syntax: not a glob over arms
        return False
    return any(o.key_or_group == GROUP and isinstance(o.value(), Glob) for o in overrides)


class CheckArms(Callback):
    """Hydra callback (conf/train.yaml): a sweep over every arm stops before its first job, in one line, when a
    learnable prior declares no arm."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not sweeps_every_arm(config):
            return
        try:
            check_arms()
        except ValueError as e:
            from midpo_cli import console
            console.error(str(e))
            raise SystemExit(1) from None
