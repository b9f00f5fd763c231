"""The built-in task: exact reward, imperfect demos, pairs, and a run that beats its reference."""
import json
import random

import pytest

from midpo_cli.__main__ import main
from midpo_cli.tasks.builtin import corrupt, edit_distance, target, true_reward


def test_reward_is_exact():
    assert edit_distance("kitten", "sitting") == 3
    assert true_reward("copy", "abcd", "abcd") == 1.0
    assert true_reward("copy", "abcd", "abce") == 0.75
    assert true_reward("reverse", "abcd", "dcba") == 1.0
    assert true_reward("sort", "dbca", "abcd") == 1.0
    assert true_reward("copy", "abcd", "") == 0.0
    assert target("sort", "hgab") == "abgh"


def test_demonstrations_are_imperfect_but_close():
    rng = random.Random(0)
    demos = [corrupt(rng, "abcdefgh", 0.3, "abcdefgh") for _ in range(200)]
    rewards = [true_reward("copy", "abcdefgh", d) for d in demos]
    assert 0.5 < sum(rewards) / len(rewards) < 0.9
    assert len({len(d) for d in demos}) > 2          # lengths vary, so length biases can show


@pytest.mark.slow
def test_default_task_improves_over_reference(tmp_path):
    """A short fixed-seed DPO run of the default task: the policy's sampled true reward beats the reference's."""
    run = tmp_path / "run"
    main(["train", "trainer.max_steps=100", "trainer.eval_every=0", "dataset.task.eval_prompts=200",
          f"cache_dir={tmp_path}/cache", f"hydra.run.dir={run}"])
    ev = json.loads((run / "results.json").read_text())["eval"]
    assert ev["true_reward/policy"] > ev["true_reward/reference"] + 0.02, ev
    assert ev["win_rate"] > 0.5


def test_length_bias_shapes_pairs(tmp_path, fast):
    """With a strong annotator length bias the chosen responses are longer on average."""
    from omegaconf import OmegaConf
    from midpo_cli.tasks.base import Context
    from midpo_cli.tasks.builtin import BuiltinSettings, BuiltinTask
    from midpo_cli.config import ModelConfig
    from midpo_cli.engine.models import byte_tokenizer, load_model
    import torch

    cfg = OmegaConf.create({"source": "builtin", "task": OmegaConf.structured(BuiltinSettings)})
    task = cfg.task
    task.sft_steps, task.sft_examples, task.train_prompts, task.eval_prompts = 60, 500, 64, 4
    model_cfg = OmegaConf.structured(ModelConfig)
    tok = byte_tokenizer()
    ctx = Context(tok, model_cfg, 0, tmp_path, torch.device("cpu"))
    builtin = BuiltinTask(cfg)
    ref = load_model(model_cfg, tok, path=builtin.reference_weights(ctx))
    lens = {}
    for bias in (0.5, -0.5):
        task.length_bias = bias
        rows = builtin.sampled_pairs(ctx, ref)["pairs"]
        lens[bias] = sum(len(r["chosen"]) - len(r["rejected"]) for r in rows) / len(rows)
    assert lens[0.5] > 0 > lens[-0.5]


def test_evaluation_pairs_policy_and_reference_draws(tmp_path):
    """The held-out evaluation draws eval_samples_per_prompt samples per prompt, and the reference's figures do not
    depend on the policy sampled before it (common random numbers): a policy equal to the reference draws the
    reference's very samples (gain 0, win-rate 1/2), and any other policy leaves the reference's reward unchanged."""
    import torch
    from omegaconf import OmegaConf
    from midpo_cli.config import ModelConfig
    from midpo_cli.engine.models import byte_tokenizer, load_model
    from midpo_cli.tasks.base import Context
    from midpo_cli.tasks.builtin import BuiltinSettings, BuiltinTask

    cfg = OmegaConf.create({"source": "builtin", "task": OmegaConf.structured(BuiltinSettings)})
    cfg.task.eval_prompts, cfg.task.eval_samples_per_prompt = 6, 3
    model_cfg, tok = OmegaConf.structured(ModelConfig), byte_tokenizer()
    ctx = Context(tok, model_cfg, 0, tmp_path, torch.device("cpu"))
    task = BuiltinTask(cfg)
    torch.manual_seed(0)
    reference, other = load_model(model_cfg, tok), load_model(model_cfg, tok)
    runs = []
    for policy in (reference, other):
        torch.manual_seed(5)
        runs.append(task.evaluate(ctx, policy, reference))
    same, moved = runs
    assert same["true_reward/policy"] == same["true_reward/reference"] and same["win_rate"] == 0.5
    assert [s["policy"] for s in same["samples"]] == [s["reference"] for s in same["samples"]]
    assert moved["true_reward/reference"] == same["true_reward/reference"]
    assert [s["reference"] for s in moved["samples"]] == [s["reference"] for s in same["samples"]]
    assert len(same["samples"]) == 8 and same["samples"][0]["prompt"] == same["samples"][2]["prompt"]  # 3 per prompt
