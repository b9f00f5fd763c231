"""The built-in task: transform a short string (copy, reverse or sort); its quality is computed exactly.

Run as real alignment pipelines run: (a) SFT of the tiny model on imperfect demonstrations gives the
reference policy; (b) reference samples are ranked by the true reward into preference pairs (optionally
by a length-biased annotator); (c) preference training (the engine); (d) evaluation by sampling
held-out prompts from policy and reference (engine/evaluate.py). (a) and (b) are cached by config hash.
"""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch

from midpo_cli.engine.cache import config_hash, publish
from midpo_cli.data.tokenize import collate, encode_pair
from midpo_cli.engine.sampling import sample

log = logging.getLogger("midpo")
KINDS = ("copy", "reverse", "sort")


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
        raise ValueError(f"dataset.task.kind='{task.kind}' is not one of {KINDS}")
    if not 0 < task.min_len <= task.max_len:
        raise ValueError("dataset.task needs 0 < min_len <= max_len")


def sft_reference(task, model_cfg, tokenizer, seed: int, cache_root: Path, device) -> Path:
    """Train (or reuse) the SFT reference policy on imperfect demonstrations; returns its directory."""
    from midpo_cli.engine.models import load_model

    key = config_hash({"model": model_cfg, "task": {k: task[k] for k in task if k.startswith("sft") or k in (
        "kind", "alphabet", "min_len", "max_len", "demo_noise")}, "seed": seed})
    path = cache_root / f"sft-{key}"
    if (path / "config.json").exists():
        log.info("SFT reference: cache hit %s", path)
        return path
    log.info("SFT reference: training %d steps on %d imperfect demonstrations", task.sft_steps, task.sft_examples)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    rows = []
    for s in random_strings(rng, task.sft_examples, task):
        demo = corrupt(rng, target(task.kind, s), task.demo_noise, task.alphabet)
        rows.append({"prompt": messages(task.kind, s), "chosen": demo, "rejected": demo})
    pairs = [encode_pair(tokenizer, r, 10_000, 10_000) for r in rows]
    model = load_model(model_cfg, tokenizer).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=task.sft_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 20) * max(0.05, 1 - i / task.sft_steps))
    gen = torch.Generator().manual_seed(seed)
    for step in range(task.sft_steps):
        idx = torch.randint(len(pairs), (task.sft_batch_size,), generator=gen).tolist()
        b = collate([pairs[i] for i in idx], tokenizer.pad_token_id)
        half = len(idx)                                                    # chosen rows only
        logits = model(input_ids=b["input_ids"][:half].to(device),
                       attention_mask=b["attention_mask"][:half].to(device)).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), b["labels"][:half].to(device),
                                                reduction="none")
        m = b["mask"][:half].to(device)
        loss = (nll * m).sum() / m.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == task.sft_steps - 1:
            log.info("  sft step %d/%d  nll %.3f", step + 1, task.sft_steps, loss.item())
    with publish(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return path


def preference_pairs(task, reference, tokenizer, sft_key: str, seed: int, cache_root: Path, device) -> dict:
    """Sample the reference, rank by the (optionally length-biased) true reward; cached as JSON."""
    key = config_hash({"sft": sft_key, "task": task, "seed": seed})
    path = cache_root / f"pairs-{key}.json"
    if path.exists():
        log.info("preference pairs: cache hit %s", path)
        return json.loads(path.read_text())
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
