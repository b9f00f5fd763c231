"""What a task is: where a run's reference policy, preference pairs and true-reward evaluation come from.

The train command asks the task for exactly three things and never looks at which task it is:

    reference_weights(ctx)          -> a directory holding the reference policy (e.g. after SFT), or None
                                       to use the model config's own weights
    inputs()                        -> the files the task reads, as (label, path): fingerprinted, so that a
                                       finished run is not reused (nor resumed) after they change
    pairs(ctx, reference)           -> (train rows, eval rows) in TRL's prompt/chosen/rejected format
    evaluate(ctx, policy, reference)-> true-reward evaluation of sampled answers on held-out prompts,
                                       or {} when the task has no reward (a user's data file)

A task is registered by name (`@register_task`), chosen by `dataset.source`, and may bring a typed
settings dataclass (its YAML keys under `dataset.task`). Adding a task is a file here and a
`conf/dataset/<name>.yaml`; the engine, the recipe and the train command stay as they are.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from hydra.core.config_store import ConfigStore

TASKS: dict[str, type["Task"]] = {}
SCHEMA_GROUP = "schema/task"      # ConfigStore group of each task's typed settings (dataset.task)

# The keys every true-reward evaluation returns (the sweep table and `midpo report` read them).
EVAL_KEYS = ("true_reward/policy", "true_reward/reference", "win_rate", "kl/policy_ref",
             "length/policy", "length/reference")


@dataclass
class Context:
    """What a task may use: the run's tokenizer, model settings, seed, cache folder and device."""
    tokenizer: Any
    model_cfg: Any
    seed: int
    cache_root: Path
    device: Any


class Task:
    """Base class: a dataset of preference pairs with no reward model and no reference of its own."""
    name: ClassVar[str] = ""
    settings: ClassVar[type | None] = None     # typed settings dataclass (dataset.task), if any
    title: ClassVar[str] = "held-out evaluation (sampled)"
    evaluates_reference: ClassVar[bool] = False  # evaluate() samples the live reference model

    def __init__(self, dataset_cfg):
        self.cfg = dataset_cfg
        self.task = dataset_cfg.get("task") if hasattr(dataset_cfg, "get") else None

    def check(self) -> None:
        """Raise ValueError naming the setting when the task's settings are inconsistent."""

    def inputs(self) -> list[tuple[str, Path]]:
        return []

    def reference_weights(self, ctx: Context) -> str | None:
        return None

    def pairs(self, ctx: Context, reference) -> tuple[list[dict], list[dict]]:
        raise NotImplementedError

    def evaluate(self, ctx: Context, policy, reference) -> dict:
        return {}


def register_task(name: str):
    """Class decorator: register a task under `dataset.source=<name>` and store its settings schema."""
    def wrap(cls):
        if name in TASKS:
            raise ValueError(f"task '{name}' is registered twice ({TASKS[name].__module__} and {cls.__module__})")
        cls.name = name
        TASKS[name] = cls
        if cls.settings is not None:
            ConfigStore.instance().store(group=SCHEMA_GROUP, name=name, node=cls.settings)
        return cls
    return wrap


def has_true_reward(source: str) -> bool:
    """Whether the task `dataset.source` names evaluates sampled answers with a true reward (its own evaluate()),
    so that `task/...` objectives exist for its runs."""
    cls = TASKS.get(source)
    return cls is not None and cls.evaluate is not Task.evaluate


def build_task(dataset_cfg) -> Task:
    name = dataset_cfg.source
    if name not in TASKS:
        close = difflib.get_close_matches(name, TASKS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"dataset.source='{name}' is not a registered task.{hint} Tasks: {', '.join(sorted(TASKS))}")
    task = TASKS[name](dataset_cfg)
    task.check()
    return task
