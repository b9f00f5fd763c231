"""Tasks: where a run's reference policy, preference pairs and true-reward evaluation come from.

Every module in this folder registers its task(s) by name (`dataset.source`), and so does every module in the
tasks/ folder of a plug-in folder named in MIDPO_PLUGINS (midpo_cli/plugins.py); nothing else lists them.
"""
from __future__ import annotations

from midpo_cli.plugins import import_all, import_outside
from midpo_cli.tasks.base import (TASKS, Context, Metric, Task, build_task, metrics_of, register_task,
                                   source_of)

import_all(__name__, __path__, skip=("base", "sampled", "sft"))
import_outside("tasks")            # plug-in folders outside midpo_cli ($MIDPO_PLUGINS): their tasks/ and conf/

__all__ = ["TASKS", "Context", "Metric", "Task", "build_task", "metrics_of", "register_task", "source_of"]
