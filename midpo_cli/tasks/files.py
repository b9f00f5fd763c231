"""Preference pairs from the user's data: a local file (jsonl/json/parquet/csv) or a hub dataset id.

No reference of their own (the model config's weights are the reference) and no true reward: the run is
evaluated on held-out pairs only (the engine's preference metrics)."""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from midpo_cli.data.sources import load_rows
from midpo_cli.tasks.base import Context, Task, register_task


class DataFile(Task):
    """Pairs read from dataset.path; a task of its own built on a data file subclasses LocalFile or HubDataset."""
    reader: ClassVar[str] = "local"     # local: a file | hub: a hub dataset id

    def inputs(self) -> list[tuple[str, Path]]:
        return [("dataset.path", Path(self.cfg.path))] if self.reader == "local" and self.cfg.path else []

    def pairs(self, ctx: Context, reference) -> tuple[list[dict], list[dict]]:
        return load_rows(self.cfg, self.reader)


@register_task("local")
class LocalFile(DataFile):
    """dataset=local dataset.path=FILE"""


@register_task("hub")
class HubDataset(DataFile):
    """dataset=hub dataset.path=ID"""
    reader = "hub"
