"""The built-in task: transform a short string (copy, reverse or sort); its quality is computed exactly.

Run as real alignment pipelines run: (a) SFT of the model on imperfect demonstrations gives the
reference policy (tasks/sft.py); (b) reference samples are ranked by the true reward into preference
pairs (optionally by a length-biased annotator); (c) preference training (the engine); (d) evaluation by
sampling held-out prompts from policy and reference. (a) and (b) are cached by config hash.
"""
from __future__ import annotations

import difflib
import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from midpo_cli.engine.cache import build_lock, config_hash, publish, read_json_entry, readable_model
from midpo_cli.engine.sampling import sample, sequence_logps
from midpo_cli.tasks.base import Context, Task, register_task
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


def preference_pairs(task, reference, tokenizer, sft_key: str, seed: int, cache_root: Path, device) -> dict:
    """Sample the reference, rank by the (optionally length-biased) true reward; cached as JSON."""
    key = config_hash({"sft": sft_key, "task": task, "seed": seed})
    path = cache_root / f"pairs-{key}.json"
    with build_lock(path):                                              # a concurrent job with this key waits
        data = read_json_entry(path, "preference pairs", ("pairs", "eval_strings"))
        if data is not None:
            return data
        rng = random.Random(seed + 1)
        strings = random_strings(rng, task.train_prompts + task.eval_prompts, task)
        train_s, eval_s = strings[:task.train_prompts], strings[task.train_prompts:]
        k = task.samples_per_prompt
        log.info("preference pairs: sampling %d x %d reference completions", len(train_s), k)
        torch.manual_seed(seed + 2)
        outs = sample(reference, tokenizer, [messages(task.kind, s) for s in train_s for _ in range(k)],
                      task.temperature, max_new_tokens=task.max_len * 2 + 2, device=device)
        rows, ties = [], 0
        for i, s in enumerate(train_s):
            cands = outs[i * k:(i + 1) * k]
            scored = sorted(((true_reward(task.kind, s, c) + task.length_bias * len(c), c) for c in cands),
                            key=lambda x: x[0])
            (lo, worst), (hi, best) = scored[0], scored[-1]
            if hi == lo:
                ties += 1
                continue
            rows.append({"prompt": messages(task.kind, s), "chosen": best, "rejected": worst,
                         "reward_chosen": true_reward(task.kind, s, best),
                         "reward_rejected": true_reward(task.kind, s, worst)})
        data = {"pairs": rows, "eval_strings": eval_s, "ties_dropped": ties}
        with publish(path) as tmp:
            tmp.write_text(json.dumps(data))
        log.info("preference pairs: %d pairs (%d prompts dropped: all samples tied)", len(rows), ties)
        return data


@torch.no_grad()
def evaluation(policy, reference, tokenizer, task, strings: list[str], device) -> dict:
    """Sample each held-out prompt once from the policy and once from the reference.

    Returns mean true reward of each, win-rate of policy over reference (ties count 1/2), an estimate
    of KL(pi || pi_ref) = E_{y~pi}[log pi(y|x) - log pi_ref(y|x)], and mean response lengths (characters).
    """
    prompts = [messages(task.kind, s) for s in strings]
    max_new = task.max_len * 2 + 2
    pol = sample(policy, tokenizer, prompts, task.temperature, max_new, device)
    ref = sample(reference, tokenizer, prompts, task.temperature, max_new, device)
    r_pol = torch.tensor([true_reward(task.kind, s, y) for s, y in zip(strings, pol)])
    r_ref = torch.tensor([true_reward(task.kind, s, y) for s, y in zip(strings, ref)])
    kl = sequence_logps(policy, tokenizer, prompts, pol, device) - sequence_logps(reference, tokenizer, prompts, pol, device)
    return {
        "true_reward/policy": r_pol.mean().item(),
        "true_reward/reference": r_ref.mean().item(),
        "win_rate": ((r_pol > r_ref).float() + 0.5 * (r_pol == r_ref).float()).mean().item(),
        "kl/policy_ref": kl.mean().item(),
        "length/policy": sum(map(len, pol)) / len(pol),
        "length/reference": sum(map(len, ref)) / len(ref),
        "exact/policy": (r_pol == 1.0).float().mean().item(),
        "exact/reference": (r_ref == 1.0).float().mean().item(),
        "samples": [{"prompt": s, "policy": a, "reference": b} for s, a, b in list(zip(strings, pol, ref))[:8]],
    }


@register_task("builtin")
class BuiltinTask(Task):
    """copy / reverse / sort a string; SFT reference on imperfect demos, pairs ranked by the exact reward."""
    settings = BuiltinSettings
    title = "built-in task: held-out evaluation (sampled)"
    evaluates_reference = True

    def check(self) -> None:
        check(self.task)

    def reference_weights(self, ctx: Context) -> str:
        self._sft = sft_reference(self.task, ctx.model_cfg, ctx.tokenizer, ctx.seed, ctx.cache_root, ctx.device)
        return str(self._sft)

    def pairs(self, ctx: Context, reference) -> tuple[list[dict], list[dict]]:
        data = preference_pairs(self.task, reference, ctx.tokenizer, self._sft.name, ctx.seed, ctx.cache_root,
                                ctx.device)
        rows = data["pairs"]
        n_eval = int(len(rows) * self.task.eval_pairs_fraction)
        self._eval_strings = data["eval_strings"]
        return rows[n_eval:], rows[:n_eval]

    def evaluate(self, ctx: Context, policy, reference) -> dict:
        log.info("evaluating: sampling %d held-out prompts from policy and reference", len(self._eval_strings))
        return evaluation(policy, reference, ctx.tokenizer, self.task, self._eval_strings, ctx.device)
