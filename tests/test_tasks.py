"""The task interface (midpo_cli/tasks/base.py): a task of one's own is a file under tasks/ and a
conf/dataset/<name>.yaml, here or in a plug-in folder named in MIDPO_PLUGINS; its metrics are its own declarations, and nothing
outside tasks/ names a task or one of its metrics."""
import re
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

import midpo_cli
from midpo_cli.__main__ import main
from midpo_cli.config import DatasetConfig
from midpo_cli.report.objective import direction, task_columns, value
from midpo_cli.tasks import TASKS, Metric, build_task, metrics_of, register_task
from midpo_cli.tasks.files import HubDataset, LocalFile

DATA = Path(__file__).parent / "data" / "standard.jsonl"
SCORE = (Metric("score/policy", "score", "score", headline=True),)


@pytest.fixture
def throwaway():
    """Register task classes for one test, then remove them."""
    names = []

    def add(name, cls):
        names.append(name)
        return register_task(name)(cls)
    yield add
    for name in names:
        TASKS.pop(name, None)


def test_a_task_built_on_a_data_file_reads_it_under_its_own_name(throwaway):
    """A subclass of LocalFile registered under another name reads dataset.path as dataset=local does."""
    class Scored(LocalFile):
        metrics = SCORE

        def evaluate(self, ctx, policy, reference):
            return {"true_reward/policy": 1.0}

    throwaway("throwaway_scored_file", Scored)
    cfg = OmegaConf.structured(DatasetConfig(source="throwaway_scored_file", path=str(DATA), eval_fraction=0.0))
    train, _ = build_task(cfg).pairs(None, None)
    mine, _ = build_task(OmegaConf.merge(cfg, {"source": "local"})).pairs(None, None)
    assert len(train) == len(mine) > 0 and [dict(r) for r in train] == [dict(r) for r in mine]
    assert HubDataset.reader == "hub"


def test_metrics_are_read_from_the_task_not_its_name(throwaway):
    assert metrics_of("builtin") and metrics_of("sentiment")
    assert not metrics_of("local") and not metrics_of("hub") and not metrics_of("no_such_task")
    for cls in TASKS.values():
        assert not cls.metrics or sum(m.headline for m in cls.metrics) == 1, cls.name
    assert any(m.name == "positive" for m in metrics_of("sentiment"))
    assert any(m.name == "exact" for m in metrics_of("builtin"))

    class Rewarded(LocalFile):
        def evaluate(self, ctx, policy, reference):
            return {"true_reward/policy": 1.0}

    with pytest.raises(ValueError, match="declares no metrics"):
        throwaway("throwaway_undeclared", Rewarded)
    Rewarded.metrics = (*SCORE, Metric("other", "other", "other", headline=True))
    with pytest.raises(ValueError, match="2 headline metrics"):
        throwaway("throwaway_two_headlines", Rewarded)
    Rewarded.metrics = SCORE
    throwaway("throwaway_rewarded", Rewarded)
    assert metrics_of("throwaway_rewarded") == SCORE


def test_objectives_keep_their_names():
    """trainer.objective=task/<name>: the keys in use (conf/, tests, docs) resolve through the declarations."""
    ev = {"true_reward/policy": 0.6, "true_reward/reference": 0.45, "win_rate": 0.7, "kl/policy_ref": 2.0,
          "length/policy": 7.5, "exact/policy": 0.25}
    res = {"config": {"dataset": {"source": "builtin"}}, "eval": ev}
    got = {k: value(res, k) for k in ("task/true_reward", "task/win_rate", "task/exact", "task/kl", "task/length")}
    assert got == {"task/true_reward": 0.6, "task/win_rate": 0.7, "task/exact": 0.25, "task/kl": 2.0,
                   "task/length": 7.5}
    assert value(res, "task/true_reward_gain") == pytest.approx(0.15)
    assert direction("task/exact", "builtin") == direction("task/true_reward_gain") == "maximize"
    with pytest.raises(ValueError, match="no known direction"):
        direction("task/kl", "builtin")


def test_nothing_outside_tasks_names_a_task_or_its_metrics():
    """midpo_cli/**.py outside tasks/ never names a task that declares metrics (as a word) nor any declared
    metric's key or `task/<column>`: they read the declarations. (The data-file tasks `local` and `hub` declare
    none: they are data/sources.py's readers.)"""
    root = Path(midpo_cli.__file__).parent
    names = [n for n, cls in TASKS.items() if cls.metrics]
    keys = {k for cls in TASKS.values() for m in cls.metrics for k in (m.key, m.reference) if k}
    columns = {c for cls in TASKS.values() for c in task_columns(cls.metrics)}
    found = re.compile("|".join([*(rf"\b{re.escape(n)}\b" for n in names), *(rf"\b{re.escape(k)}\b" for k in keys),
                                 *(rf"{re.escape(c)}\b" for c in columns)]))
    hits = [f"{f.relative_to(root.parent)}:{i}: {line.strip()}" for f in sorted(root.rglob("*.py"))
            if root / "tasks" not in f.parents
            for i, line in enumerate(f.read_text().splitlines(), 1) if found.search(line)]
    assert names and keys and not hits, "\n".join(hits)


PLUGIN = """
from midpo_cli.tasks import Metric, register_task
from midpo_cli.tasks.files import LocalFile


@register_task("throwaway_sparkle")
class Sparkle(LocalFile):
    title = "sparkle task"
    metrics = (Metric("sparkle/policy", "sparkle", "sparkle index", "stars", (0, 5), "max", headline=True,
                      reference="sparkle/reference"),)

    def evaluate(self, ctx, policy, reference):
        return {"sparkle/policy": 4.25, "sparkle/reference": 1.5}
"""


def test_a_plugin_task_declares_a_metric_that_console_tables_and_figures_show(tmp_path, monkeypatch, capsys):
    """A task of one's own in a plug-in folder outside midpo_cli (MIDPO_PLUGINS: its module and its dataset YAML): `midpo train` prints its metric with
    its label, `midpo report` tables it and draws it with its label, unit and range."""
    from midpo_cli.report import plots

    plug = tmp_path / "plug"                                               # the task's own two files, nothing else
    (plug / "tasks").mkdir(parents=True)
    (plug / "tasks" / "throwaway_sparkle.py").write_text(PLUGIN)
    (plug / "conf" / "dataset").mkdir(parents=True)
    (plug / "conf" / "dataset" / "sparkle.yaml").write_text(
        "defaults:\n  - /schema/dataset@_here_\n  - _self_\nsource: throwaway_sparkle\npath: ???\n")
    monkeypatch.setenv("MIDPO_PLUGINS", str(plug))
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.extend(a.get_xlabel() for a in fig.axes) or path)
    try:
        main(["train", "dataset=sparkle", f"dataset.path={DATA}",
              "trainer.max_steps=2", "trainer.batch_size=4", "trainer.eval_every=0", "trainer.save_model=false",
              f"cache_dir={tmp_path}/cache", f"hydra.run.dir={tmp_path}/runs/0"])
        out = capsys.readouterr().out
        assert "sparkle task" in out and re.search(r"sparkle index\s.*4\.250.*1\.500.*stars", out), out
        main(["report", str(tmp_path / "runs")])
        out = capsys.readouterr().out
    finally:
        TASKS.pop("throwaway_sparkle", None)
        sys.modules.pop("midpo_plugins.tasks.throwaway_sparkle", None)
    runs = pd.read_csv(tmp_path / "runs" / "report" / "runs.csv")
    assert (runs["task/sparkle"][0], runs["task/sparkle_ref"][0], runs["task/sparkle_gain"][0]) == (4.25, 1.5, 2.75)
    assert "sparkle index" in out and "sparkle index" in (tmp_path / "runs" / "report" / "report.md").read_text()
    assert "sparkle index\n[0 to 5; stars]" in drawn
