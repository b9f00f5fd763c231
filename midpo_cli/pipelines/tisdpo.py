"""TIS-DPO's token weights estimated as its authors ran them (Liu et al., ICLR 2025, arXiv:2410.04350; docs/priors.md).

    1. contrastive models  pi_+ = DPO (beta prior.contrastive_beta) on the task's pairs, pi_- = DPO on the same pairs
                           with chosen and rejected swapped; both from the run's reference, prior.contrastive_steps
                           steps at prior.contrastive_lr (null: optimizer.lr) with seed prior.contrastive_seed; or
                           loaded from prior.contrastive = [pi_+ dir, pi_- dir]
    2. scores              raw_t = log pi_-(y_t|s_t) - log pi_+(y_t|s_t) per completion token; a chosen completion
                           uses -raw_t, a rejected one raw_t (the authors' sign per side: a token pi_+ prefers weighs
                           more in a chosen answer and less in a rejected one)
    3. transform           per completion, prior.transform: rank_based | threshold_and_scale | binary | origin
    4. zeros               the prompt carries no weight (only completion tokens do), the completion's final EOS 0
    5. training            the run itself, on the task's rows with the weights as their chosen_weights and
                           rejected_weights columns and weights=given: the loss `midpo verify` checks for given
                           weights, and the weights enter the pairs' digest, so a resumed run checks them too

Shared by runs: pi_+ and pi_- are sub-runs in <cache_dir>/tisdpo/contrastive/<key>/{plus,minus}, keyed like the
reference cache (engine/refcache.py: the reference's weights, the tokenizer, precision and device, the pairs' token
ids) and by the sub-runs' own settings (DPO beta, steps, learning rate, seed, model, optimiser, trainer); the weights
are kept in <cache_dir>/tisdpo/weights/<key>.safetensors, keyed by the pairs, both models' weight files and the
transform's settings. A sweep over the run's beta (or, on data that does not depend on it, its seed) trains them
once; concurrent jobs wait for the one building them.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from torch import Tensor

from midpo_cli.pipelines import Pipeline, Runner
from midpo_cli.recipe import Stage

log = logging.getLogger("midpo")
BOUNDS_TOL = 1e-6                       # weights are kept as float32: "at a bound" within this


def side_scores(plus: Tensor, minus: Tensor, chosen: bool) -> Tensor:
    """One completion's token scores [T] from the contrastive models' log-probs of its tokens [T]:
    raw = log pi_- - log pi_+; a chosen completion uses -raw, a rejected one raw."""
    raw = minus - plus
    return -raw if chosen else raw


def rank_based(x: Tensor, low: float, high: float) -> Tensor:
    """The i-th smallest of n scores (ties in order of position) gets low + i/(n-1)*(high - low); a single token
    the middle of the range (the authors' 1.0 at their [0.7, 1.3])."""
    n = x.numel()
    if n < 2:
        return torch.full_like(x, (low + high) / 2)
    rank = torch.empty_like(x)
    rank[torch.argsort(x, stable=True)] = torch.arange(n, dtype=x.dtype)
    return low + rank / (n - 1) * (high - low)


def threshold_and_scale(x: Tensor, clip_low: float, clip_high: float, low: float, high: float) -> Tensor:
    """Scores clipped to [clip_low, clip_high], then mapped linearly onto [low, high]."""
    return low + (x.clamp(clip_low, clip_high) - clip_low) * (high - low) / (clip_high - clip_low)


def binary(x: Tensor, top_percent: float) -> Tensor:
    """1 for the top int(n * top_percent / 100) scores, 0 for the rest; tied scores share the lower value (a
    score gets 1 when at most that many scores are >= it, as the authors' table of values does)."""
    k = int(x.numel() * top_percent / 100)
    at_least = (x[None, :] >= x[:, None]).sum(-1)                          # [T] scores >= each one
    return (at_least <= k).to(x.dtype)


def transform(x: Tensor, p) -> Tensor:
    """prior.transform of one completion's scores [T] (p: the TIS-DPO prior, its settings)."""
    if p.transform == "rank_based":
        return rank_based(x, p.min_scale, p.max_scale)
    if p.transform == "threshold_and_scale":
        return threshold_and_scale(x, p.clip_low, p.clip_high, p.min_scale, p.max_scale)
    if p.transform == "binary":
        return binary(x, p.top_percent)
    return x                                                               # origin: the raw scores


def transform_settings(p) -> dict:
    """The settings the prior's transform reads (the weights' cache key: other settings share an entry)."""
    used = {"rank_based": ("min_scale", "max_scale"), "binary": ("top_percent",), "origin": (),
            "threshold_and_scale": ("clip_low", "clip_high", "min_scale", "max_scale")}[p.transform]
    return {"transform": p.transform, **{k: float(getattr(p, k)) for k in used}}


def bounds(p) -> tuple[float, float] | None:
    """The range the transform's weights lie in (None: origin, unbounded)."""
    return {"binary": (0.0, 1.0), "origin": None}.get(p.transform, (p.min_scale, p.max_scale))


def sequence_weights(plus: list[float], minus: list[float], chosen: bool, ends_with_eos: bool, p) -> list[float]:
    """One completion's weights, a value per token: the transform of its scores, 0 on its final EOS."""
    n = len(plus) - int(ends_with_eos)
    x = side_scores(torch.tensor(plus[:n], dtype=torch.float64), torch.tensor(minus[:n], dtype=torch.float64), chosen)
    return (transform(x, p).tolist() if n else []) + [0.0] * (len(plus) - n)


def encoded(rows: list, tokenizer, dataset, split: str) -> list:
    """Each row's pair as the run tokenises it (data/prepare.py), None for a row the run drops."""
    from midpo_cli.data.prepare import pairs_of_rows
    pairs, positions, _ = pairs_of_rows(rows, tokenizer, dataset, split=split)
    out = [None] * len(rows)
    for i, p in zip(positions, pairs):
        out[i] = p
    return out


def with_columns(row, columns: dict):
    """A copy of a row with more columns (a file's row keeps where it came from)."""
    from midpo_cli.data.rows import Row
    if isinstance(row, Row):
        return Row({**row, **columns}, row.where, row.index, row.problem)
    return {**row, **columns}


def swapped(rows: list, dataset) -> list:
    """The rows with chosen and rejected exchanged (the data's own column names)."""
    from midpo_cli.data.settings import DataSettings
    names = DataSettings.of(dataset).columns
    c, r = names["chosen"], names["rejected"]
    return [with_columns(row, {c: row[r], r: row[c]}) if c in row and r in row else row for row in rows]


class Estimated(Pipeline):
    """prior.weights=estimated: see the module's docstring. `prior`: the TIS-DPO prior (its options)."""

    def __init__(self, prior):
        self.prior = prior

    def run(self, runner: Runner) -> dict:
        p, cfg, tok = self.prior, runner.cfg, runner.tokenizer()
        rows = runner.offline_rows()
        pairs = [encoded(split, tok, cfg.dataset, name) for split, name in zip(rows, ("train", "eval"))]
        kept = [x for split in pairs for x in split if x is not None]
        if not any(x is not None for x in pairs[0]):
            raise ValueError(f"prior.weights=estimated: no training pairs left to estimate token weights on (all "
                             f"{len(rows[0])} training rows are bad, too long for dataset.truncation="
                             f"{cfg.dataset.truncation} or identical once tokenised); fix the data or "
                             "dataset.max_length")
        from midpo_cli.engine.inputs import pairs_digest
        digest = pairs_digest(kept)
        dirs, models = self.loaded() if p.contrastive else self.trained(runner, rows, digest)
        n_train = sum(x is not None for x in pairs[0])
        values, weights = self.weights(runner, dirs, kept, digest, n_train)
        it = iter(values)
        weighted = tuple([with_columns(row, dict(zip(("chosen_weights", "rejected_weights"),
                                                     next(it) if pair is not None else ([], []))))
                          for row, pair in zip(split, split_pairs)] for split, split_pairs in zip(rows, pairs))
        for side in ("chosen", "rejected"):
            w = weights[side]
            log.info("TIS-DPO weights, %s side: mean %.3f, min %.3f, max %.3f over %d training tokens", side,
                     w.get("mean", 0), w.get("min", 0), w.get("max", 0), w["tokens"])
        where = f"in {Path(dirs[0]).parent.parent}" if not p.contrastive else f"loaded from {', '.join(dirs)}"
        title = (f"TIS-DPO: pi_+ = DPO on the pairs, pi_- = DPO on them swapped ({where}); token weights w "
                 f"({', '.join(f'{k}={v}' for k, v in weights['transform'].items())})")

        def add(results):
            final = results.get("final", {})
            rows = [{k: m[k] for k in ("stage", "status", "steps", "loss", "accuracy")} for m in models]
            rows += [{"stage": f"w {side}", "status": weights["status"], "mean": weights[side].get("mean"),
                      "min": weights[side].get("min"), "max": weights[side].get("max"),
                      "at bounds": weights[side].get("at bounds")} for side in ("chosen", "rejected")]
            rows.append({"stage": "this run", "status": "trained", "steps": cfg.trainer.max_steps,
                         "loss": final.get("loss"), "accuracy": final.get("rewards/accuracies")})
            results["pipeline"] = {"title": title, "rows": rows}
            results["tisdpo"] = {"contrastive": models, "weights": weights}
        return runner.final(Stage(prior={"weights": "given"}, rows=weighted), on_results=add)

    def stages(self, runner: Runner, rows: tuple) -> dict[str, Stage]:
        """pi_+ and pi_- as sub-runs: DPO on the pairs, and on the pairs swapped."""
        p, cfg = self.prior, runner.cfg
        lr = p.contrastive_lr if p.contrastive_lr is not None else cfg.optimizer.lr
        config = {"trainer.max_steps": p.contrastive_steps, "optimizer.lr": lr}
        dpo = {"name": "dpo", "beta": p.contrastive_beta}
        return {"plus": Stage(name="contrastive/plus", prior=dpo, rows=rows, config=config, seed=p.contrastive_seed),
                "minus": Stage(name="contrastive/minus", prior=dpo, rows=tuple(swapped(s, cfg.dataset) for s in rows),
                               config=config, seed=p.contrastive_seed)}

    def trained(self, runner: Runner, rows: tuple, digest: str) -> tuple[list[str], list[dict]]:
        """Train (or reuse) pi_+ and pi_- under the cache; their model directories and what they are (model_row)."""
        from midpo_cli.engine import refcache
        from midpo_cli.engine.cache import build_lock, config_hash
        from midpo_cli.engine.inputs import weights_digest

        cfg, tok = runner.cfg, runner.tokenizer()
        stages = self.stages(runner, rows)
        reference = weights_digest(runner.reference())
        key = config_hash({"pairs": refcache.key_of(reference, tok, [], cfg.trainer.precision, runner.device(), digest),
                           **{side: runner.sub_recipe(s).config_hash for side, s in stages.items()}})
        root = Path(cfg.cache_dir) / "tisdpo" / "contrastive" / key
        dirs, table = [], []
        main = runner.state.is_main_process
        with build_lock(root) if main else contextlib.nullcontext():     # a concurrent job with this key waits
            for side, stage in stages.items():
                path = root / side
                reused = runner.shared(main and (path / "results.json").exists())
                log.info("TIS-DPO contrastive model pi_%s: %s %s", "+" if side == "plus" else "-",
                         "reusing" if reused else "training", path)
                results = runner.subrun(stage, directory=path)
                dirs.append(str(path / "model"))
                table.append(model_row(side, "reused" if reused else "trained", results, path))
        return dirs, table

    def loaded(self) -> tuple[list[str], list[dict]]:
        """pi_+ and pi_- from prior.contrastive; a directory's run (<run>/model) says what they are (model_row)."""
        from midpo_cli.engine.files import read_json
        dirs = [str(Path(str(d)).expanduser()) for d in self.prior.contrastive]
        table = []
        for side, d in zip(("plus", "minus"), dirs):
            results = read_json(Path(d).parent / "results.json")
            table.append(model_row(side, "loaded", results if isinstance(results, dict) else {}, Path(d)))
        return dirs, table

    def weights(self, runner: Runner, dirs: list[str], kept: list, digest: str, n_train: int) -> tuple[list, dict]:
        """Every kept pair's (chosen weights, rejected weights), cached; and their statistics over the training pairs
        (the first `n_train`)."""
        from midpo_cli.engine import refcache
        from midpo_cli.engine.cache import build_lock, config_hash, publish
        from midpo_cli.engine.inputs import files_of
        from midpo_cli.engine.models import frozen, load_model

        p, cfg, tok, device = self.prior, runner.cfg, runner.tokenizer(), runner.device()
        memo = Path(cfg.cache_dir) / "fingerprints"
        models = "|".join(config_hash({k: v["xxh3"] for k, v in files_of([("m", Path(d))], memo).items()})
                          for d in dirs)
        key = config_hash({"pairs": refcache.key_of(models, tok, [], cfg.trainer.precision, device, digest),
                           "transform": transform_settings(p)})
        path = Path(cfg.cache_dir) / "tisdpo" / "weights" / f"{key}.safetensors"
        hit = False
        with runner.state.main_process_first(), build_lock(path):
            values = None
            if path.exists():
                try:
                    values, hit = refcache.load_values(path, len(kept)), True
                    log.info("TIS-DPO weights: cache hit %s", path)
                except ValueError as e:
                    log.warning("TIS-DPO weights cache entry %s is damaged (%s): computing it again", path, e)
                    path.unlink(missing_ok=True)
            if values is None:
                log.info("TIS-DPO weights: scoring %d pairs with pi_+ and pi_- (cached at %s)", len(kept), path)
                logps = [refcache.compute(frozen(load_model(cfg.model, tok, path=d)).to(device), kept,
                                          tok.pad_token_id, device) for d in dirs]
                eos = tok.eos_token_id
                made = [tuple(sequence_weights(plus[s], minus[s], s == 0, bool(ids) and ids[-1] == eos, p)
                              for s, ids in enumerate((pair.chosen, pair.rejected)))
                        for pair, plus, minus in zip(kept, *logps)]
                with publish(path) as tmp:
                    refcache.save_values(made, tmp)
                values = refcache.load_values(path, len(kept))            # float32, as a later run reads them
        info = {"path": str(path), "status": "reused" if hit else "computed", "transform": transform_settings(p),
                "pairs": len(kept), **{side: weight_stats([v[i] for v in values[:n_train]], [
                    pair.rejected if i else pair.chosen for pair in kept[:n_train]], tok.eos_token_id, bounds(p))
                    for i, side in enumerate(("chosen", "rejected"))}}
        return values, info


def weight_stats(weights: list[list[float]], completions: list[list[int]], eos, limits) -> dict:
    """One side's weights over its weighted tokens (each completion's final EOS, weight 0, left out): tokens, mean,
    min, max, and the shares at the transform's lower bound, upper bound and either."""
    flat = []
    for w, ids in zip(weights, completions):
        flat += w[:-1] if ids and ids[-1] == eos else w
    x = torch.tensor(flat, dtype=torch.float64)
    out = {"tokens": len(flat)}
    if not len(flat):
        return out
    out |= {"mean": x.mean().item(), "min": x.min().item(), "max": x.max().item()}
    if limits is not None:
        low, high = ((x - b).abs().le(BOUNDS_TOL) for b in limits)
        out |= {"at low": low.double().mean().item(), "at high": high.double().mean().item(),
                "at bounds": (low | high).double().mean().item()}
    return out


def model_row(side: str, status: str, results: dict, where: Path) -> dict:
    """A contrastive model's table row: its final training loss and accuracy, held-out accuracy, where it is."""
    final = results.get("final") or {}
    steps = ((results.get("config") or {}).get("trainer") or {}).get("max_steps")
    return {"stage": "pi_+" if side == "plus" else "pi_-", "status": status, "steps": steps,
            "loss": final.get("loss"), "accuracy": final.get("rewards/accuracies"),
            "eval accuracy": final.get("eval/rewards/accuracies"), "where": str(where)}
