"""Tasks: where a run's reference policy, preference pairs and true-reward evaluation come from.

Every module in this folder registers its task(s) by name (`dataset.source`); nothing else lists them.
"""
from __future__ import annotations

from midpo_cli.plugins import import_all
from midpo_cli.tasks.base import TASKS, Context, Task, build_task, has_true_reward, register_task

import_all(__name__, __path__, skip=("base", "sft"))

__all__ = ["TASKS", "Context", "Task", "build_task", "has_true_reward", "register_task"]
