"""The sentiment task: VADER's reward, the held-out split, ranked and cached pairs, a run end to end on the tiny
model (its samples stubbed: a random model writes no words), config composition, and a short SmolLM2 run."""
import itertools
import json

import pytest
import torch
from omegaconf import OmegaConf

from midpo_cli.__main__ import main
from midpo_cli.tasks import sampled, sentiment
from midpo_cli.tasks.base import Context
from midpo_cli.tasks.sentiment import SentimentSettings, SentimentTask, reward, split_prompts, split_subjects

pytest.importorskip("vaderSentiment")

TEXTS = ["What a wonderful, delightful film. I loved it!", "Terrible service, awful food, a horrible night.",
         "It was a building with a door.", "Good, but the ending was sad."]


def settings(**kw):
    task = OmegaConf.structured(SentimentSettings)
    for k, v in kw.items():
        task[k] = v
    return task


def task_of(**kw) -> SentimentTask:
    return SentimentTask(OmegaConf.create({"source": "sentiment", "task": settings(**kw)}))


def stub_sample(texts=TEXTS):
    """A stand-in for engine.sampling.sample: cycles through fixed texts; counts its calls."""
    def fake(model, tokenizer, prompts, temperature, max_new_tokens, device, batch_size=256, bar=None):
        fake.calls += 1
        return [t for t, _ in zip(itertools.cycle(texts), prompts)]
    fake.calls = 0
    return fake


def test_reward_ranks_positive_above_negative():
    pos, neg, flat = reward(TEXTS[0]), reward(TEXTS[1]), reward(TEXTS[2])
    assert pos > 0.5 and neg < -0.5 and flat == 0.0
    assert -1.0 <= neg < flat < pos <= 1.0


def test_split_is_disjoint_by_subject_and_deterministic():
    task = settings(train_prompts=300, eval_prompts=100)
    train_subs, held_subs = split_subjects(task)
    assert not {s for _, _, s in train_subs} & {s for _, _, s in held_subs}
    assert {c for c, _, _ in held_subs} == set(sentiment.CATEGORIES)          # every category is evaluated
    train, held = split_prompts(task)
    assert (train, held) == split_prompts(task) and len(train) == 300 and len(held) == 100
    assert len(set(held)) == 100                                              # no repeats below the pool size
    for p in held:                                                            # held-out prompts name unseen subjects
        assert any(s in p for _, _, s in held_subs) and not any(s in p for _, _, s in train_subs)
    other = split_prompts(settings(train_prompts=300, eval_prompts=100, split_seed=1))
    assert other[1] != held
    chat = split_prompts(settings(chat=True, train_prompts=3, eval_prompts=3))[0]
    assert chat[0][0]["role"] == "user" and "review" in chat[0][0]["content"]


def test_rank_picks_most_positive_and_most_negative():
    row = task_of().rank("p", TEXTS)
    assert (row["chosen"], row["rejected"]) == (TEXTS[0], TEXTS[1])
    assert row["reward_chosen"] > row["reward_rejected"]
    assert task_of().rank("p", ["A chair.", "A table."]) is None             # all tied: dropped


def test_pairs_are_ranked_cached_and_rebuilt_when_damaged(tmp_path, monkeypatch):
    fake = stub_sample([TEXTS[0], TEXTS[1], TEXTS[2], TEXTS[3], "A chair.", "A table.", "A lamp.", "A door."])
    monkeypatch.setattr(sampled, "sample", fake)
    task = task_of(train_prompts=6, samples_per_prompt=4)
    ctx = Context(None, OmegaConf.create({"source": "tiny", "lr": 1e-4}), 0, tmp_path, torch.device("cpu"))
    data = task.sampled_pairs(ctx, None)
    assert data["ties_dropped"] == 3 and len(data["pairs"]) == 3              # every other prompt: all neutral
    assert all(r["chosen"] == TEXTS[0] and r["rejected"] == TEXTS[1] for r in data["pairs"])
    ctx.model_cfg.lr = 1.0                                                    # lr does not change the samples
    assert task.sampled_pairs(ctx, None) == data and fake.calls == 1      # cache hit
    (path,) = tmp_path.glob("sentiment-pairs-*.json")
    path.write_text("{ half-writ")
    assert task.sampled_pairs(ctx, None) == data and fake.calls == 2      # damaged: sampled again


def test_missing_vader_is_one_line_error(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vaderSentiment" else real(name, *a))
    with pytest.raises(ValueError, match=r"vaderSentiment.*pip install"):
        reward("good")


def test_train_on_tiny_model_end_to_end(tmp_path, monkeypatch):
    """`midpo train dataset=sentiment model=tiny`: pairs, training, evaluation; results.json has every declared
    metric (and its reference's value)."""
    monkeypatch.setattr(sampled, "sample", stub_sample())
    run = tmp_path / "run"
    main(["train", "dataset=sentiment", "model=tiny", "dataset.task.train_prompts=24", "dataset.task.eval_prompts=4",
          "dataset.max_length=160", "dataset.max_prompt_length=96", "trainer.max_steps=2", "trainer.batch_size=4",
          "trainer.eval_every=0", "trainer.save_model=false", f"cache_dir={tmp_path}/cache", f"hydra.run.dir={run}"])
    res = json.loads((run / "results.json").read_text())
    assert res["data"]["train_pairs"] > 0 and res["config"]["optimizer"]["lr"] == 5e-5
    keys = [k for m in SentimentTask.metrics for k in (m.key, m.reference) if k]
    assert set(keys) <= set(res["eval"]) and res["eval_title"].startswith("sentiment task")
    assert all(isinstance(res["eval"][k], float) for k in keys)
    assert res["eval"]["true_reward/policy"] == pytest.approx(sum(map(reward, TEXTS)) / 4)


def compose(overrides):
    from hydra import compose as hydra_compose, initialize_config_module
    from midpo_cli.config import register_schemas
    register_schemas()
    with initialize_config_module(version_base="1.3", config_module="midpo_cli.conf"):
        return hydra_compose("train", overrides=overrides)


def test_task_selects_its_model_and_the_model_brings_its_lr():
    cfg = compose(["dataset=sentiment"])
    assert cfg.model.source == "smollm2" and cfg.optimizer.lr == cfg.model.lr < 1e-4
    assert compose(["dataset=sentiment", "model=tiny"]).model.source == "tiny"
    assert compose([]).optimizer.lr == 5e-5                                   # the toy keeps its rate
    assert compose(["model=smollm2-135m", "optimizer=rmsprop"]).optimizer.lr == cfg.model.lr
    assert compose(["model=smollm2-135m", "optimizer.lr=3e-5"]).optimizer.lr == 3e-5


@pytest.mark.slow
def test_smollm2_short_real_run(tmp_path):
    """A few steps on SmolLM2-135M-Instruct (skipped unless `make smollm` installed it): real samples rank into
    pairs and the evaluation is finite."""
    from midpo_cli.engine.models import smollm2_gguf
    try:
        smollm2_gguf()
    except ValueError as e:
        pytest.skip(str(e))
    run = tmp_path / "run"
    main(["train", "dataset=sentiment", "dataset.task.train_prompts=16", "dataset.task.eval_prompts=4",
          "dataset.task.max_new_tokens=16", "trainer.max_steps=2", "trainer.batch_size=4", "trainer.eval_every=0",
          "trainer.save_model=false", f"cache_dir={tmp_path}/cache", f"hydra.run.dir={run}"])
    res = json.loads((run / "results.json").read_text())
    pairs = json.loads(next((tmp_path / "cache").glob("sentiment-pairs-*.json")).read_text())["pairs"]
    assert pairs and all(p["reward_chosen"] > p["reward_rejected"] for p in pairs)
    assert all(-1 <= res["eval"][k] <= 1 for k in ("true_reward/policy", "true_reward/reference"))
    assert abs(res["eval"]["kl/policy_ref"]) < 50
