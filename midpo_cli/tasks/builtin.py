"""The built-in task: transform a short string (copy, reverse or sort); its quality is computed exactly.

Run as real alignment pipelines run: (a) SFT of the model on imperfect demonstrations gives the
reference policy (tasks/sft.py); (b) reference samples are ranked by the true reward into preference
pairs (optionally by a length-biased annotator); (c) preference training (the engine); (d) evaluation by
sampling held-out prompts from policy and reference. (a) and (b) are cached by config hash.
"""
from __future__ import annotations

import difflib
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from midpo_cli.engine.cache import build_lock, config_hash, publish, readable_model
from midpo_cli.tasks.base import Context, Metric, register_task
from midpo_cli.tasks.sampled import SampledTask, sampled_metrics
from midpo_cli.tasks.sft import supervised_finetune

log = logging.getLogger("midpo")
KINDS = ("copy", "reverse", "sort")


@dataclass
class BuiltinSettings:
    """dataset.task for dataset=builtin: copy a string; quality = 1 - normalised edit distance."""
    kind: str = "copy"                  # copy | reverse | sort: what the response must do to the prompt's string
    alphabet: str = "abcdefgh"          # characters of the prompt strings
    min_len: int = 4                    # shortest prompt string
    max_len: int = 9                    # longest prompt string
    demo_noise: float = 0.3             # per-character corruption rate of the SFT demonstrations
    sft_examples: int = 4000            # SFT demonstrations (imperfect)
    sft_steps: int = 400                # SFT optimisation steps for the reference policy
    sft_lr: float = 3e-3                # SFT learning rate
    sft_batch_size: int = 64            # SFT batch size
    train_prompts: int = 640            # prompts sampled for preference pairs
    eval_prompts: int = 128             # held-out prompts for evaluation
    samples_per_prompt: int = 4         # reference samples ranked per prompt (best = chosen, worst = rejected)
    eval_samples_per_prompt: int = 4    # samples per held-out prompt from each of policy and reference (less noise)
    temperature: float = 1.0            # sampling temperature (pairs and evaluation)
    length_bias: float = 0.0            # annotator bias per character: >0 prefers longer, <0 shorter chosen
    eval_pairs_fraction: float = 0.1    # pairs held out for the preference metrics during training

def target(kind: str, s: str) -> str:
    return {"copy": s, "reverse": s[::-1], "sort": "".join(sorted(s))}[kind]


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def true_reward(kind: str, s: str, response: str) -> float:
    """1 - edit_distance(response, target) / max(len): 1.0 is perfect, 0.0 shares nothing."""
    t = target(kind, s)
    return 1.0 - edit_distance(response, t) / max(len(t), len(response), 1)


def messages(kind: str, s: str) -> list[dict]:
    return [{"role": "user", "content": f"{kind}: {s}"}]


def prompt_string(msgs: list[dict]) -> str:
    return msgs[0]["content"].split(": ", 1)[1]


def corrupt(rng: random.Random, text: str, rate: float, alphabet: str) -> str:
    """Imperfect demonstration: each character is substituted, dropped or doubled with probability rate."""
    out = []
    for ch in text:
        if rng.random() >= rate:
            out.append(ch)
            continue
        op = rng.randrange(3)
        out += [rng.choice(alphabet)] if op == 0 else [] if op == 1 else [ch, rng.choice(alphabet)]
    return "".join(out)


def random_strings(rng: random.Random, n: int, task) -> list[str]:
    return ["".join(rng.choice(task.alphabet) for _ in range(rng.randint(task.min_len, task.max_len)))
            for _ in range(n)]


def check(task) -> None:
    if task.kind not in KINDS:
        close = difflib.get_close_matches(str(task.kind), KINDS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"dataset.task.kind='{task.kind}' is not one of {', '.join(KINDS)}.{hint}")
    if not 0 < task.min_len <= task.max_len:
        raise ValueError("dataset.task needs 0 < min_len <= max_len")
    if task.eval_samples_per_prompt < 1:
        raise ValueError(f"dataset.task.eval_samples_per_prompt={task.eval_samples_per_prompt} must be >= 1")


def sft_reference(task, model_cfg, tokenizer, seed: int, cache_root: Path, device) -> Path:
    """Train (or reuse) the SFT reference policy on imperfect demonstrations; returns its directory."""
    from midpo_cli.engine.models import load_model

    model = {k: v for k, v in model_cfg.items() if k != "lr"}             # the preference lr is not the SFT's
    key = config_hash({"model": model, "task": {k: task[k] for k in task if k.startswith("sft") or k in (
        "kind", "alphabet", "min_len", "max_len", "demo_noise")}, "seed": seed})
    path = cache_root / f"sft-{key}"
    with build_lock(path):                                              # a concurrent job with this key waits
        if path.exists():
            if readable_model(path):
                log.info("SFT reference: cache hit %s", path)
                return path
            log.warning("SFT reference cache entry %s is damaged: training it again", path)
            shutil.rmtree(path, ignore_errors=True)
        log.info("SFT reference: training %d steps on %d imperfect demonstrations", task.sft_steps, task.sft_examples)
        rng = random.Random(seed)
        torch.manual_seed(seed)
        demos = [(messages(task.kind, s), corrupt(rng, target(task.kind, s), task.demo_noise, task.alphabet))
                 for s in random_strings(rng, task.sft_examples, task)]
        model = load_model(model_cfg, tokenizer).to(device)
        supervised_finetune(model, tokenizer, demos, steps=task.sft_steps, lr=task.sft_lr,
                            batch_size=task.sft_batch_size, seed=seed, device=device)
        with publish(path) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        return path


@register_task("builtin")
class BuiltinTask(SampledTask):
    """copy / reverse / sort a string; SFT reference on imperfect demos, pairs ranked by the exact reward."""
    settings = BuiltinSettings
    title = "built-in task: held-out evaluation (sampled)"
    metrics = sampled_metrics(
        Metric("true_reward/policy", "true_reward", "true reward", "mean, 1 - normalised edit distance, 1 = exact",
               (0, 1), "max", headline=True, reference="true_reward/reference"),
        "characters",
        Metric("exact/policy", "exact", "exact", "fraction of exact answers", (0, 1), "max",
               reference="exact/reference"))

    def check(self) -> None:
        check(self.task)

    def reference_weights(self, ctx: Context) -> str:
        self._sft = sft_reference(self.task, ctx.model_cfg, ctx.tokenizer, ctx.seed, ctx.cache_root, ctx.device)
        return str(self._sft)

    def split(self, ctx: Context) -> tuple[list[str], list[str]]:
        """Prompt strings drawn with seed + 1: the first train_prompts for pairs, the rest held out."""
        strings = random_strings(random.Random(ctx.seed + 1), self.task.train_prompts + self.task.eval_prompts,
                                 self.task)
        return strings[:self.task.train_prompts], strings[self.task.train_prompts:]

    def prompt(self, item: str) -> list[dict]:
        return messages(self.task.kind, item)

    def reward(self, item: str, completion: str) -> float:
        return true_reward(self.task.kind, item, completion)

    def score(self, item: str, completion: str) -> float:
        """The annotator: the true reward, plus length_bias per character."""
        return self.reward(item, completion) + self.task.length_bias * len(completion)

    def length(self, completion: str) -> float:
        return len(completion)

    def fractions(self, rewards: torch.Tensor) -> dict[str, float]:
        return {"exact": (rewards == 1.0).float().mean().item()}

    def pairs_key(self, ctx: Context) -> dict:
        return {"sft": self._sft.name, "task": self.task, "seed": ctx.seed}

    @property
    def max_new_tokens(self) -> int:
        return self.task.max_len * 2 + 2
