"""What a task is: where a run's reference policy, preference pairs and true-reward evaluation come from.

The train command asks the task for exactly three things and never looks at which task it is:

    reference_weights(ctx)          -> a directory holding the reference policy (e.g. after SFT), or None
                                       to use the model config's own weights
    inputs()                        -> the files the task reads, as (label, path): fingerprinted, so that a
                                       finished run is not reused (nor resumed) after they change
    pairs(ctx, reference)           -> (train rows, eval rows) in TRL's prompt/chosen/rejected format
    evaluate(ctx, policy, reference)-> true-reward evaluation of sampled answers on held-out prompts,
                                       or {} when the task has no reward (a user's data file)
    sample_rows(ctx, policy, reference, n) -> n held-out prompts with both models' completions and rewards, for
                                       the trackers at each evaluation ([] by default)

What evaluate() returns is declared in `metrics` (Metric: key, label, unit, range, direction, headline):
the console's final table, `midpo report`'s tables and figures and `trainer.objective=task/<name>` read
those declarations (looked up by the run's `dataset.source`), never a task's name or metric keys.

A task is registered by name (`@register_task`), chosen by `dataset.source`, and may bring a typed
settings dataclass (its YAML keys under `dataset.task`). Adding a task is a file here and a
`conf/dataset/<name>.yaml` (or the same two files in a plug-in folder named in MIDPO_PLUGINS: midpo_cli/plugins.py);
the engine, the recipe and the train command stay as they are.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from hydra.core.config_store import ConfigStore

TASKS: dict[str, type["Task"]] = {}
SCHEMA_GROUP = "schema/task"      # ConfigStore group of each task's typed settings (dataset.task)


@dataclass(frozen=True)
class Metric:
    """One number of Task.evaluate(): its key there (results.json `eval`), its column `task/<name>` (tables,
    `trainer.objective=task/<name>`), and how the console, tables and figures show it."""
    key: str                                    # key in evaluate()'s dict, e.g. "win_rate"
    name: str                                   # column task/<name>; with a reference also task/<name>_ref
    label: str                                  # what tables and axes call it, e.g. "win-rate vs reference"
    unit: str = ""                              # e.g. "fraction, ties = 1/2"
    range: tuple[float, float] | None = None    # the values it can take; None: unbounded
    direction: Literal["max", "min"] | None = None   # which way is better (an outcome); None: neither
    headline: bool = False                      # the task's main outcome (exactly one per task); with a reference
                                                # it also gives task/<name>_gain (minus the same seed's reference)
    reference: str | None = None                # key of the same quantity measured on the reference policy
    baseline: float | None = None               # its value when the policy is the reference (a dashed line)

    @property
    def scale(self) -> str:
        """`lo to hi; unit`, either part only when the other is not declared."""
        span = f"{self.range[0]:g} to {self.range[1]:g}" if self.range else ""
        return "; ".join(x for x in (span, self.unit) if x)

    @property
    def axis(self) -> str:
        """`label [lo to hi; unit]`: an axis label."""
        return f"{self.label} [{self.scale}]" if self.scale else self.label


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
    metrics: ClassVar[tuple[Metric, ...]] = ()  # what evaluate() returns (exactly one headline); () without it
    frontier: ClassVar[tuple[str, str] | None] = None  # (x, y) metric names of the trade-off figure, e.g. KL and reward

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

    def sample_rows(self, ctx: Context, policy, reference, n: int) -> list[dict]:
        """A few held-out prompts with the policy's and the reference's completions and their rewards, for the
        trackers' sample table at each evaluation: [{prompt, policy, reward_policy, reference, reward_reference}];
        [] when the task samples nothing (a user's data file)."""
        return []

    def judge(self, ctx: Context):
        """The task's true reward of a completion to one of its training prompts, as `f(prompt, completion) -> float
        | None` (None: not one of its prompts), for diagnostics of pairs a pipeline made; None: the task has none."""
        return None

    def sampler(self) -> dict | None:
        """How the task samples completions ({"temperature", "max_new_tokens"}), for pipelines that sample the
        policy (DICE's rounds); None: the pipeline's own settings."""
        return None


def register_task(name: str):
    """Class decorator: register a task under `dataset.source=<name>` and store its settings schema."""
    def wrap(cls):
        if name in TASKS:
            raise ValueError(f"task '{name}' is registered twice ({TASKS[name].__module__} and {cls.__module__})")
        _check_metrics(name, cls)
        cls.name = name
        TASKS[name] = cls
        if cls.settings is not None:
            ConfigStore.instance().store(group=SCHEMA_GROUP, name=name, node=cls.settings)
        return cls
    return wrap


def _check_metrics(name: str, cls) -> None:
    """A task with an evaluate() of its own declares its metrics: exactly one headline, names and keys unique,
    its frontier's names among them."""
    where = f"task '{name}' ({cls.__module__})"
    if cls.evaluate is not Task.evaluate and not cls.metrics:
        raise ValueError(f"{where} evaluates runs but declares no metrics (Task.metrics)")
    if cls.metrics and sum(m.headline for m in cls.metrics) != 1:
        raise ValueError(f"{where} declares {sum(m.headline for m in cls.metrics)} headline metrics: give exactly one")
    names = [m.name for m in cls.metrics]
    keys = [k for m in cls.metrics for k in (m.key, m.reference) if k]
    if len(set(names)) < len(names) or len(set(keys)) < len(keys):
        raise ValueError(f"{where} declares a metric name or key twice: {', '.join(names)}")
    if cls.frontier and not set(cls.frontier) <= set(names):
        raise ValueError(f"{where}: frontier={cls.frontier} names a metric it does not declare")


def source_of(config: dict | None) -> str | None:
    """The task (`dataset.source`) of a run's resolved config (results.json `config`, config.yaml); None if it has none."""
    return ((config or {}).get("dataset") or {}).get("source")


def metrics_of(source: str | None) -> tuple[Metric, ...]:
    """The metrics the task `dataset.source` declares; () for a task without any, or one not registered."""
    cls = TASKS.get(source) if isinstance(source, str) else None
    return cls.metrics if cls is not None else ()


def build_task(dataset_cfg) -> Task:
    name = dataset_cfg.source
    if name not in TASKS:
        close = difflib.get_close_matches(name, TASKS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"dataset.source='{name}' is not a registered task.{hint} Tasks: {', '.join(sorted(TASKS))}")
    task = TASKS[name](dataset_cfg)
    task.check()
    return task
