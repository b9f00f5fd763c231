"""Tasks: where a run's reference policy, preference pairs and true-reward evaluation come from.

Every module in this folder registers its task(s) by name (`dataset.source`); nothing else lists them.
"""
from __future__ import annotations

import importlib
import pkgutil

from midpo_cli.tasks.base import TASKS, Context, Task, build_task, has_true_reward, register_task


def _import_all() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if mod.name not in ("base", "sft"):
            importlib.import_module(f"{__name__}.{mod.name}")


_import_all()

__all__ = ["TASKS", "Context", "Task", "build_task", "has_true_reward", "register_task"]
