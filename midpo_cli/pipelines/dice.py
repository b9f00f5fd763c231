"""DICE's rounds (Chen et al., ICLR 2025, arXiv:2406.09760; docs/priors.md): each round's pairs come from the policy
of the round before, and it trains with that policy as its prior.

    round 1         the task's pairs, prior = prior.snapshot (default: the reference): DPO
    round r >= 2    for each training prompt, prior.samples completions from pi_{r-1}; each scored with the implicit
                    reward log pi_{r-1}(y|x) - log pi_{r-2}(y|x) (beta only rescales it; pi_0 = round 1's prior)
                    minus alpha * length(y) (prior.length_unit); chosen = the best, rejected = the worst of a prompt;
                    alpha = prior.length_alpha, or (null) the authors' choice: the alpha in [0, 1) (steps of 0.001)
                    that makes the mean length of chosen and rejected closest; then the task's pairs mixed in so
                    that a fraction prior.replay of the round's pairs is offline; the policy starts from pi_{r-1}
                    and trains with zeta = pi_{r-1} (frozen), trainer.max_steps steps.

Rounds 1..N-1 are sub-runs in <run>/rounds/<r>/ (model, metrics, results); round r's pairs are kept in
<run>/rounds/<r>/pairs.json; the last round is the run itself. Held-out pairs (eval/*) are the task's in every round,
and the task's evaluation compares the final policy with the task's reference, as for every other prior.
"""
from __future__ import annotations

import logging
import random

import torch

from midpo_cli.pipelines import Pipeline, Runner
from midpo_cli.recipe import Stage

log = logging.getLogger("midpo")
ALPHAS = torch.arange(0, 1000, dtype=torch.float64) / 1000      # the authors' search grid for alpha: [0, 1), 0.001


def select(scores: torch.Tensor, lengths: torch.Tensor, alpha: float | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Length-regularised best/worst per prompt. scores, lengths: [P, K] (one row per prompt). Returns (chosen index
    [P], rejected index [P], alpha): argmax and argmin of scores - alpha*lengths; alpha=None searches ALPHAS for
    the smallest |mean(len chosen) - mean(len rejected)| (the first such alpha)."""
    def pick(a: torch.Tensor):                                               # a: [A] -> indices [A, P]
        shaped = scores[None] - a[:, None, None] * lengths[None]           # [A, P, K]
        return shaped.argmax(-1), shaped.argmin(-1)

    grid = ALPHAS if alpha is None else torch.tensor([float(alpha)], dtype=torch.float64)
    best, worst = pick(grid)
    gap = (lengths.gather(1, best.T).T - lengths.gather(1, worst.T).T).mean(-1).abs()   # [A]
    i = int(gap.argmin())
    return best[i], worst[i], float(grid[i])


def mix(generated: list[dict], offline: list[dict], replay: float, seed: int) -> tuple[list[dict], int]:
    """The round's pairs: the generated ones plus offline pairs drawn without replacement (seeded), so that a fraction
    `replay` of the result is offline (as near as whole pairs allow, capped by the offline pairs there are); replay 1:
    every offline pair and no generated one."""
    rng = random.Random(seed)
    if replay >= 1:
        n = len(offline)
    else:
        n = min(len(offline), round(replay * len(generated) / (1 - replay)))
    drawn = rng.sample(offline, n)
    rows = (generated if replay < 1 else []) + drawn
    rng.shuffle(rows)
    return rows, n


class Rounds(Pipeline):
    """prior.rounds trainings; see the module's docstring. `prior`: the DICE prior (its options)."""

    def __init__(self, prior):
        self.prior = prior

    def run(self, runner: Runner) -> dict:
        p, table = self.prior, []
        before, prev = p.snapshot, None        # pi_{r-2} and pi_{r-1} as model directories ("reference": the task's)
        for r in range(1, p.rounds + 1):
            if r == 1:
                stage = Stage(name="rounds/1", prior={"rounds": 1})
                data = {"generated": 0, "replayed": None, "dropped": None, "alpha": None}
            else:
                data = runner.made_once(runner.run_dir / f"rounds/{r}/pairs.json",
                                        lambda: self.pairs(runner, r, prev, before))
                rows = (data["pairs"], runner.offline_rows()[1])
                stage = Stage(name=f"rounds/{r}", prior={"rounds": 1, "snapshot": prev}, start=prev, rows=rows)
            info = {"round": r, **{k: data.get(k) for k in ("generated", "replayed", "dropped", "alpha",
                                                            "labels_right", "labels_tied")}}
            if r < p.rounds:
                results = runner.subrun(stage)
                table.append(info | row_of(results))
                log.info("DICE round %d of %d: %s", r, p.rounds, ", ".join(f"{k} {v}" for k, v in table[-1].items()))
                before = prev if prev is not None else p.snapshot
                prev = str(runner.run_dir / f"rounds/{r}/model")
            else:
                def add(results, info=info):
                    results["pipeline"] = {
                        "title": f"DICE rounds (trainer.max_steps={runner.cfg.trainer.max_steps} per round; the last "
                                 "round is this run)", "rows": table + [info | row_of(results)]}
                return runner.final(stage, on_results=add)
        raise AssertionError("unreachable: rounds >= 1")

    def pairs(self, runner: Runner, r: int, prev: str, before: str) -> dict:
        """Round r's training pairs (module docstring), with what was made: generated, replayed, dropped, alpha."""
        from midpo_cli.engine.models import frozen, load_model
        from midpo_cli.engine.sampling import sample, sequence_logps
        from midpo_cli.engine.trainer import seed_everything

        p, cfg, tok, device = self.prior, runner.cfg, runner.tokenizer(), runner.device()
        offline_train, _ = runner.offline_rows()
        prompts, seen = [], set()
        for row in offline_train:                                          # each training prompt once, in order
            key = repr(row["prompt"])
            if key not in seen:
                seen.add(key)
                prompts.append(row["prompt"])
        sampler = runner.recipe.task.sampler() or {}
        temperature = p.temperature if p.temperature is not None else sampler.get("temperature", 1.0)
        new_tokens = p.max_new_tokens if p.max_new_tokens is not None else sampler.get("max_new_tokens", 64)
        policy = frozen(load_model(cfg.model, tok, path=prev)).to(device)
        older = runner.reference() if before == "reference" else frozen(load_model(cfg.model, tok, path=before)).to(device)
        k = p.samples
        log.info("DICE round %d: sampling %d prompts x %d completions from round %d's policy", r, len(prompts), k, r - 1)
        seed_everything(cfg.seed + 7919 * r)
        flat = [x for x in prompts for _ in range(k)]
        outs = sample(policy, tok, flat, temperature, new_tokens, device)
        scores = sequence_logps(policy, tok, flat, outs, device) - sequence_logps(older, tok, flat, outs, device)
        lengths = torch.tensor([float(len(y)) if p.length_unit == "chars" else
                                float(len(tok(y, add_special_tokens=False)["input_ids"])) for y in outs])
        scores, lengths = scores.double().view(-1, k), lengths.double().view(-1, k)
        empty = torch.tensor([not y.strip() for y in outs]).view(-1, k)
        scores = scores.masked_fill(empty, float("nan"))                   # an empty completion is never picked
        keep = (~empty).sum(-1) >= 2
        best, worst, alpha = select(torch.nan_to_num(scores[keep], nan=-1e30), lengths[keep], p.length_alpha) \
            if keep.any() else (torch.zeros(0, dtype=torch.long),) * 2 + (0.0,)
        generated, dropped = [], int((~keep).sum())
        for j, (i, b, w) in enumerate(zip(keep.nonzero().flatten().tolist(), best.tolist(), worst.tolist())):
            chosen, rejected = outs[i * k + b], outs[i * k + w]
            if chosen == rejected:                                         # all its samples alike: no preference
                dropped += 1
                continue
            generated.append({"prompt": prompts[i], "chosen": chosen, "rejected": rejected})
        agreement = label_agreement(generated, runner.recipe.task.judge(runner.context()))
        if not generated and p.replay < 1:
            raise ValueError(f"DICE round {r}: no pairs left from {len(prompts)} prompts x {k} samples (every prompt's "
                             "samples were alike or empty); raise prior.samples or prior.temperature")
        rows, replayed = mix(generated, offline_train, p.replay, cfg.seed + r)
        log.info("DICE round %d: %d generated pairs (%d prompts dropped: samples alike or empty), %d offline pairs "
                 "replayed, alpha %.3f", r, len(generated), dropped, replayed, alpha)
        return {"pairs": rows, "generated": len(generated), "replayed": replayed, "dropped": dropped, "alpha": alpha,
                **agreement}


def label_agreement(pairs: list[dict], judge) -> dict:
    """How often the implicit reward's choice agrees with the task's true reward on the generated pairs: the share
    where the chosen completion's true reward is higher (`labels_right`) and equal (`labels_tied`); {} when the
    task has no reward for them."""
    scored = [(judge(r["prompt"], r["chosen"]), judge(r["prompt"], r["rejected"])) for r in pairs] if judge else []
    scored = [(c, w) for c, w in scored if c is not None and w is not None]
    if not scored:
        return {}
    return {"labels_right": sum(c > w for c, w in scored) / len(scored),
            "labels_tied": sum(c == w for c, w in scored) / len(scored)}


def row_of(results: dict) -> dict:
    """A round's outcome for the rounds table: its final training loss, held-out loss and accuracy, and the task's
    headline metric when it has one."""
    from midpo_cli.tasks import metrics_of, source_of
    final, ev = results.get("final", {}), results.get("eval") or {}
    out = {"pairs": (results.get("data") or {}).get("train_pairs"),
           **{k: final.get(k) for k in ("loss", "eval/loss", "eval/rewards/accuracies")}}
    for m in metrics_of(source_of(results.get("config"))):
        if m.headline and isinstance(ev.get(m.key), (int, float)):
            out[f"task/{m.name}"] = ev[m.key]
    return out
