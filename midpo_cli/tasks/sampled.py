"""Sampled-reward tasks: the reference's own samples, ranked by a reward, are the preference pairs; the
evaluation samples held-out prompts from policy and reference and scores them with the same reward.

A subclass of SampledTask gives its prompts (split into training and held-out items), how an item becomes a
model prompt, its reward, the length of a completion and what its samples depend on (the pairs' cache key);
the sampling, ranking, caching, train/eval split of the pairs and the evaluation are here, once. Its
`metrics` are `sampled_metrics(reward, length_unit, *extra)`: the reward (the headline), win-rate, KL to the
reference and length, plus its own fractions (`fractions()`), all with the reference's value beside them.
"""
from __future__ import annotations

import json
import logging
from typing import Any, ClassVar

import torch

from midpo_cli.console import progress
from midpo_cli.engine.cache import build_lock, config_hash, publish, read_json_entry
from midpo_cli.engine.sampling import sample, sequence_logps
from midpo_cli.tasks.base import Context, Metric, Task

log = logging.getLogger("midpo")


def sampled_metrics(reward: Metric, length_unit: str, *extra: Metric) -> tuple[Metric, ...]:
    """The metrics SampledTask.evaluate() returns: `reward` (the headline, its key `true_reward/policy`), KL to
    the reference, win-rate, length (in `length_unit`) and `extra` (the task's fractions())."""
    return (reward,
            Metric("kl/policy_ref", "kl", "KL to ref", "KL(π ‖ π_ref), nats per response, sampled estimate",
                   baseline=0.0),
            Metric("win_rate", "win_rate", "win-rate", "fraction vs the reference, ties = 1/2", (0, 1), "max",
                   baseline=0.5),
            Metric("length/policy", "length", "length", f"mean, {length_unit}", reference="length/reference"),
            *extra)


class SampledTask(Task):
    """Pairs: K reference samples per training item, best = chosen, worst = rejected by `score` (items whose
    samples all score the same are dropped and counted); cached as JSON by `pairs_key`. Evaluation: each
    held-out item sampled `eval_samples` times from policy and from reference (global RNG, seeded by the run)."""
    evaluates_reference = True
    frontier = ("kl", "true_reward")
    pairs_file: ClassVar[str] = "pairs"         # cache entry: <cache_dir>/<pairs_file>-<key>.json

    def split(self, ctx: Context) -> tuple[list, list]:
        """(training items, held-out items): deterministic in the settings and the seed."""
        raise NotImplementedError

    def prompt(self, item) -> Any:
        """The model's prompt for an item (text or chat messages)."""
        return item

    def reward(self, item, completion: str) -> float:
        raise NotImplementedError

    def score(self, item, completion: str) -> float:
        """What ranks an item's samples into a pair (the annotator); the reward itself by default."""
        return self.reward(item, completion)

    def length(self, completion: str) -> float:
        raise NotImplementedError

    def fractions(self, rewards: torch.Tensor) -> dict[str, float]:
        """The task's own shares of the sampled rewards (e.g. exact answers): {name: fraction}, each returned as
        <name>/policy and <name>/reference."""
        return {}

    def pairs_key(self, ctx: Context) -> dict:
        """What the reference's samples depend on (hashed into the cache entry's name)."""
        raise NotImplementedError

    @property
    def max_new_tokens(self) -> int:
        return self.task.max_new_tokens

    @property
    def eval_samples(self) -> int:
        """Samples per held-out item from each of policy and reference."""
        return self.task.eval_samples_per_prompt

    def judge(self, ctx: Context):
        items = {repr(self.prompt(x)): x for x in self.split(ctx)[0]}
        return lambda prompt, completion: None if repr(prompt) not in items else \
            self.reward(items[repr(prompt)], completion)

    def sampler(self) -> dict:
        return {"temperature": self.task.temperature, "max_new_tokens": self.max_new_tokens}

    def pairs(self, ctx: Context, reference) -> tuple[list[dict], list[dict]]:
        rows = self.sampled_pairs(ctx, reference)["pairs"]
        n_eval = int(len(rows) * self.task.eval_pairs_fraction)
        return rows[n_eval:], rows[:n_eval]

    def sampled_pairs(self, ctx: Context, reference) -> dict:
        """{pairs, ties_dropped, reference_mean_reward}: sampled and ranked, or read from the cache."""
        path = ctx.cache_root / f"{self.pairs_file}-{config_hash(self.pairs_key(ctx))}.json"
        with build_lock(path):                                          # a concurrent job with this key waits
            data = read_json_entry(path, "preference pairs", ("pairs",))
            if data is not None:
                return data
            items, _ = self.split(ctx)
            k = self.task.samples_per_prompt
            log.info("preference pairs: sampling %d prompts x %d reference completions", len(items), k)
            torch.manual_seed(ctx.seed + 2)
            with progress("preference pairs", len(items) * k, "samples") as bar:
                outs = sample(reference, ctx.tokenizer, [self.prompt(x) for x in items for _ in range(k)],
                              self.task.temperature, self.max_new_tokens, ctx.device, bar=bar)
            rows = [self.rank(x, outs[i * k:(i + 1) * k]) for i, x in enumerate(items)]
            data = {"pairs": [r for r in rows if r is not None], "ties_dropped": rows.count(None),
                    "reference_mean_reward": sum(self.reward(x, y) for x, y in zip(
                        (x for x in items for _ in range(k)), outs)) / len(outs)}
            with publish(path) as tmp:
                tmp.write_text(json.dumps(data))
            log.info("preference pairs: %d pairs (%d prompts dropped: all samples scored the same)",
                     len(data["pairs"]), data["ties_dropped"])
            return data

    def rank(self, item, completions: list[str]) -> dict | None:
        """The pair of one item: highest score = chosen, lowest = rejected (first of equals: the sort is stable);
        None when all tie. reward_chosen/rejected are the rewards (without the annotator's bias)."""
        scored = sorted(((self.score(item, c), c) for c in completions), key=lambda x: x[0])
        (lo, worst), (hi, best) = scored[0], scored[-1]
        if hi == lo:
            return None
        return {"prompt": self.prompt(item), "chosen": best, "rejected": worst,
                "reward_chosen": self.reward(item, best), "reward_rejected": self.reward(item, worst)}

    @torch.no_grad()
    def sample_rows(self, ctx: Context, policy, reference, n: int) -> list[dict]:
        """One completion of each model for the first n held-out items, with its reward (the reference's columns
        are None without a reference model)."""
        items = self.split(ctx)[1][:n]
        prompts = [self.prompt(x) for x in items]
        done = {who: sample(model, ctx.tokenizer, prompts, self.task.temperature, self.max_new_tokens, ctx.device)
                for who, model in (("policy", policy), ("reference", reference)) if model is not None}
        rows = []
        for i, x in enumerate(items):
            row = {"prompt": x if isinstance(x, str) else x[-1]["content"]}
            for who in ("policy", "reference"):
                y = done[who][i] if who in done else None
                row[who], row[f"reward_{who}"] = y, None if y is None else round(self.reward(x, y), 4)
            rows.append(row)
        return rows

    @torch.no_grad()
    def evaluate(self, ctx: Context, policy, reference) -> dict:
        """Mean reward of policy and reference samples, win-rate of the policy's i-th sample over the
        reference's (ties 1/2), KL(pi || pi_ref) estimated as E_{y~pi}[log pi(y|x) - log pi_ref(y|x)] (y + EOS,
        summed over tokens), mean lengths, the task's fractions, and the first 8 samples. Policy and reference
        sample from the same random state (common random numbers): the reference's figures are the same for every
        run of a seed whatever its policy, and a policy equal to the reference draws the reference's samples."""
        _, held = self.split(ctx)
        log.info("evaluating: sampling %d held-out prompts x %d from policy and reference", len(held),
                 self.eval_samples)
        items = [x for x in held for _ in range(self.eval_samples)]
        prompts = [self.prompt(x) for x in items]
        cuda = [ctx.device] if torch.device(ctx.device).type == "cuda" else []
        sampler = (self.task.temperature, self.max_new_tokens, ctx.device)
        with progress("evaluation", 4 * len(prompts), "prompts") as bar:   # sampled twice, scored twice
            bar.info = "sampling the policy"
            with torch.random.fork_rng(devices=cuda):                  # restored after: the reference starts there too
                pol = sample(policy, ctx.tokenizer, prompts, *sampler, bar=bar)
            bar.info = "sampling the reference"
            ref = sample(reference, ctx.tokenizer, prompts, *sampler, bar=bar)
            bar.info = "scoring the policy's samples (KL)"
            kl = sequence_logps(policy, ctx.tokenizer, prompts, pol, ctx.device, bar=bar) \
                - sequence_logps(reference, ctx.tokenizer, prompts, pol, ctx.device, bar=bar)
        r_pol = torch.tensor([self.reward(x, y) for x, y in zip(items, pol)])
        r_ref = torch.tensor([self.reward(x, y) for x, y in zip(items, ref)])
        shown = [x if isinstance(x, str) else x[-1]["content"] for x in items]
        return {
            "true_reward/policy": r_pol.mean().item(),
            "true_reward/reference": r_ref.mean().item(),
            "win_rate": ((r_pol > r_ref).float() + 0.5 * (r_pol == r_ref).float()).mean().item(),
            "kl/policy_ref": kl.mean().item(),
            "length/policy": sum(map(self.length, pol)) / len(pol),
            "length/reference": sum(map(self.length, ref)) / len(ref),
            **{f"{name}/{who}": v for who, r in (("policy", r_pol), ("reference", r_ref))
               for name, v in self.fractions(r).items()},
            "samples": [{"prompt": s, "policy": a, "reward_policy": round(float(x), 3), "reference": b,
                         "reward_reference": round(float(z), 3)}
                        for s, a, b, x, z in list(zip(shown, pol, ref, r_pol, r_ref))[:8]],
        }
