"""`midpo train`: one run = data -> policy/reference -> MI-DPO training with the prior -> evaluation -> results."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from midpo_cli import console
from midpo_cli.engine import checkpoint
from midpo_cli.priors import build_prior

log = logging.getLogger("midpo")
RUN_FILES = ("results.json", "metrics.jsonl", "config.yaml")
CHOICES = {"trainer.precision": ("fp32", "bf16", "fp16"), "trainer.lr_schedule": ("constant", "linear", "cosine"),
           "dataset.truncation": ("keep_end", "drop")}


def run_dir_of() -> Path:
    from hydra.core.hydra_config import HydraConfig
    return Path(HydraConfig.get().runtime.output_dir)


def claim(run_dir: Path, resuming: bool) -> None:
    """Refuse a directory that already holds a run: nothing written by an earlier run is ever overwritten.
    Resuming may continue an unfinished run (no results.json) in its own directory."""
    taken = [f for f in RUN_FILES if (run_dir / f).exists()]
    if resuming and taken and not (run_dir / "results.json").exists():
        return
    if taken:
        raise ValueError(f"run directory {run_dir} already holds a run ({', '.join(taken)}); "
                         "pick a new hydra.run.dir / hydra.sweep.dir (nothing was changed)")
    run_dir.mkdir(parents=True, exist_ok=True)


def check_settings(cfg: DictConfig) -> None:
    for key, valid in CHOICES.items():
        if OmegaConf.select(cfg, key) not in valid:
            raise ValueError(f"{key}='{OmegaConf.select(cfg, key)}' is not one of {valid}")
    for key in ("max_steps", "batch_size", "grad_accum"):
        if cfg.trainer[key] < 1:
            raise ValueError(f"trainer.{key}={cfg.trainer[key]} must be >= 1")


def in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    return HydraConfig.get().mode == RunMode.MULTIRUN


def record_failure(run_dir: Path, exc: BaseException) -> None:
    """A failed sweep job leaves error.json (its row in the sweep table) and lets the sweep go on."""
    import traceback
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "error.json").write_text(json.dumps({
        "status": "failed", "error": f"{type(exc).__name__}: {exc}", "overrides": _overrides(),
        "traceback": "".join(traceback.format_exception(exc))}, indent=2))


def run(cfg: DictConfig) -> float | None:
    """Hydra task. Bad input exits 1 with one message and no traceback; in a sweep, a failing job is
    recorded (error.json) and the sweep continues. Returns trainer.objective (what a sweeper optimises);
    None for a failed job or a missing/non-finite objective (the Optuna sweeper marks that trial failed)."""
    run_dir = run_dir_of()
    try:
        claim(run_dir, bool(cfg.trainer.resume))
        console.setup_logging(run_dir / "train.log")
        check_settings(cfg)
        prior = build_prior(cfg.prior)
        resume_from = checkpoint.find(cfg.trainer.resume, run_dir, cfg) if cfg.trainer.resume else None
        for w in prior.warnings():
            log.warning(w)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        results = train(cfg, prior, run_dir, resume_from)
    except (ValueError, KeyError, FileNotFoundError, FloatingPointError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        console.error(f"{type(e).__name__}: {msg}")
        if in_sweep():
            record_failure(run_dir, e)
            return
        sys.exit(1)
    except Exception as e:                                                 # a crash: keep the sweep going
        if not in_sweep():
            raise
        console.error(f"job failed: {type(e).__name__}: {e}")
        record_failure(run_dir, e)
        return
    console.final_table(results)
    log.info("run directory: %s", run_dir)
    return objective_of(results, cfg.trainer.objective)


def objective_of(results: dict, key: str) -> float | None:
    from midpo_cli.report import objective
    score = objective.value(results, key)
    if score is None:
        log.warning("trainer.objective=%s is not in this run's results; it has: %s", key,
                    ", ".join(objective.available(results)))
    return score


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become strings (trackers take scalars)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig
    return list(HydraConfig.get().overrides.task)


def train(cfg: DictConfig, prior, run_dir: Path, resume_from: Path | None = None) -> dict:
    import torch
    from accelerate import Accelerator
    from hydra.utils import instantiate

    from midpo_cli.data.prepare import build_pairs, save_report
    from midpo_cli.engine import refcache
    from midpo_cli.engine.evaluate import task_evaluation
    from midpo_cli.engine.trainer import seed_everything, train_loop
    from midpo_cli.engine.lora import merged_for_saving
    from midpo_cli.pipeline import prepare

    t_start = time.perf_counter()
    needs = prior.needs()
    mp = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.trainer.precision]
    trackers = list(cfg.trainer.trackers)
    acc = Accelerator(mixed_precision=mp, gradient_accumulation_steps=cfg.trainer.grad_accum,
                      cpu=not torch.cuda.is_available(), log_with=trackers or None, project_dir=str(run_dir))
    if trackers:
        acc.init_trackers("tracking", config=flatten(OmegaConf.to_container(cfg, resolve=True)))
    seed_everything(cfg.seed)
    s = prepare(cfg, needs, acc.device)
    seed_everything(cfg.seed)
    train_pairs, train_report = build_pairs(s.train_rows, s.tokenizer, cfg.dataset, needs.token_columns, "train")
    eval_pairs, eval_report = build_pairs(s.eval_rows, s.tokenizer, cfg.dataset, needs.token_columns, "eval")
    save_report([train_report, eval_report], run_dir)
    if not train_pairs:
        raise ValueError("no training pairs left (see the data report above: data_report.json)")
    report = {"train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs),
              "truncated": train_report["truncated"] + eval_report["truncated"],
              "dropped": train_report["dropped"] + eval_report["dropped"]}
    ref_cache = None
    if cfg.trainer.ref_cache and s.reference is not None:                  # also gives the logratio/* yardstick
        base = s.policy.get_base_model() if cfg.model.lora.r > 0 else s.reference
        ref_cache = refcache.attach([train_pairs, eval_pairs], s.reference, base, s.tokenizer, Path(cfg.cache_dir),
                                    cfg.trainer.precision, acc.device, s.tokenizer.pad_token_id)
        live = needs.kl_ref_pi or needs.kl_pi_ref or needs.ref_activations
        if not live and s.task is None and cfg.model.lora.r == 0:         # the cache replaces the reference copy
            s.reference = None
            s.snapshot = None if needs.snapshot == "reference" else s.snapshot
    optimizer = instantiate(cfg.optimizer)([p for p in s.policy.parameters() if p.requires_grad])
    models = {"reference": s.reference, "snapshot": s.snapshot}
    out = train_loop(acc, cfg, s.policy, prior, models, optimizer, train_pairs, eval_pairs,
                     s.tokenizer.pad_token_id, run_dir, resume_from)
    policy = out.pop("policy")
    results = {"config": OmegaConf.to_container(cfg, resolve=True), "overrides": _overrides(),
               "prior": prior.name, "seed": cfg.seed, "data": report, "ref_cache": ref_cache,
               "resumed_from": str(resume_from) if resume_from else None, **out}
    if s.task is not None:
        log.info("evaluating: sampling %d held-out prompts from policy and reference", len(s.eval_strings))
        seed_everything(cfg.seed + 3)
        results["eval"] = task_evaluation(policy, s.reference, s.tokenizer, s.task, s.eval_strings, acc.device)
    if cfg.trainer.save_model and acc.is_main_process:
        saved = merged_for_saving(policy) if cfg.model.lora.r > 0 else policy
        saved.save_pretrained(run_dir / "model", safe_serialization=True)
        s.tokenizer.save_pretrained(run_dir / "model")
    if trackers:
        acc.end_training()
    results["wall_time_s"] = time.perf_counter() - t_start
    if acc.is_main_process:
        (run_dir / "results.json").write_text(json.dumps(results, indent=2, default=float))
    return results
