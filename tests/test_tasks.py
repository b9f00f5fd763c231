"""The task interface (midpo_cli/tasks/base.py): a task of one's own is a file under tasks/ and a
conf/dataset/<name>.yaml; nothing outside tasks/ names a task."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from midpo_cli.config import DatasetConfig
from midpo_cli.tasks import TASKS, build_task, has_true_reward, register_task
from midpo_cli.tasks.files import HubDataset, LocalFile

DATA = Path(__file__).parent / "data" / "standard.jsonl"


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
        def evaluate(self, ctx, policy, reference):
            return {"true_reward/policy": 1.0}

    throwaway("throwaway_scored_file", Scored)
    cfg = OmegaConf.structured(DatasetConfig(source="throwaway_scored_file", path=str(DATA), eval_fraction=0.0))
    train, _ = build_task(cfg).pairs(None, None)
    mine, _ = build_task(OmegaConf.merge(cfg, {"source": "local"})).pairs(None, None)
    assert len(train) == len(mine) > 0 and [dict(r) for r in train] == [dict(r) for r in mine]
    assert HubDataset.reader == "hub"


def test_true_reward_is_read_from_the_task_not_its_name(throwaway):
    assert has_true_reward("builtin") and has_true_reward("sentiment")
    assert not has_true_reward("local") and not has_true_reward("hub") and not has_true_reward("no_such_task")

    class Rewarded(LocalFile):
        def evaluate(self, ctx, policy, reference):
            return {"true_reward/policy": 1.0}

    throwaway("throwaway_rewarded", Rewarded)
    assert has_true_reward("throwaway_rewarded")
