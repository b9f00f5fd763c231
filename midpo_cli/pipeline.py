"""Set-up of one run: the task's reference policy and pairs, the policy, the reference (a frozen copy, or the
LoRA policy with adapters off), the snapshot, the prior's own models, the tokenised pairs and the reference
log-prob cache. The task is picked by `dataset.source`; nothing here knows which task it is.

In a multi-process run the task's expensive, cached work (SFT, sampled pairs, the reference cache) is done by
the main process first; the other processes then read the same cache entries.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

from midpo_cli.data.prepare import build_pairs, check_bad_fraction, save_report
from midpo_cli.engine import refcache
from midpo_cli.engine.inputs import pairs_digest, weights_digest
from midpo_cli.engine.rundir import check_derived
from midpo_cli.engine.draws import pairs_drawn
from midpo_cli.engine.lora import AdapterOff, add_lora
from midpo_cli.engine.models import check_lengths, frozen, load_model, load_tokenizer
from midpo_cli.engine.views import live_reference
from midpo_cli.tasks import Context, Task, build_task

log = logging.getLogger("midpo")


@dataclass
class Setup:
    task: Task
    ctx: Context
    tokenizer: object
    policy: object
    reference: object | None          # what computes pi_ref live (None when nothing needs it)
    snapshot: object | None           # a frozen earlier policy (DICE), when the prior needs one
    train_pairs: list
    eval_pairs: list
    data: dict                        # counts for results.json
    ref_cache: dict | None            # {"hit", "key", "path"} of the reference log-prob cache


def _reference_of(policy, cfg, device):
    return AdapterOff(policy) if cfg.model.lora.r > 0 else frozen(copy.deepcopy(policy)).to(device)


def scored_train_pairs(cfg, pairs: list, processes: int) -> tuple[list, str]:
    """The training pairs the reference pass scores, and why: those steps 1..max_steps draw when the run ends
    within its first epoch (the same permutation the loader deals out: engine/draws.py), else every pair. The
    cache key covers exactly the pairs scored, so a longer run later gets its own entry."""
    tc = cfg.trainer
    if tc.eval_train:
        return pairs, "trainer.eval_train=true scores every training pair at the end"
    drawn = pairs_drawn(len(pairs), cfg.seed, tc.batch_size, tc.grad_accum, processes, tc.max_steps)
    on = f"of batch_size={tc.batch_size} on {processes} process{'es' if processes > 1 else ''}"
    if drawn is None:
        return pairs, f"max_steps={tc.max_steps} x grad_accum={tc.grad_accum} micro-batches {on} cover a full epoch"
    return [pairs[i] for i in drawn], (f"those that max_steps={tc.max_steps} x grad_accum={tc.grad_accum} "
                                       f"micro-batches {on} draw, and the one micro-batch the loader collates ahead")


def prepare(cfg, prior, acc, run_dir: Path, resume_from: Path | None = None) -> Setup:
    from midpo_cli.engine.trainer import seed_everything

    needs, device = prior.needs(), acc.device
    task = build_task(cfg.dataset)
    tokenizer = load_tokenizer(cfg.model)
    ctx = Context(tokenizer, cfg.model, cfg.seed, Path(cfg.cache_dir), device)
    seed_everything(cfg.seed)
    with acc.main_process_first():                                         # e.g. SFT, cached for the others
        path = task.reference_weights(ctx)
    policy = load_model(cfg.model, tokenizer, path=path)
    reference_digest = weights_digest(policy)                          # what the run starts from, for resume
    check_lengths(cfg.dataset, policy)
    if cfg.model.lora.r > 0:
        policy = add_lora(policy, cfg.model.lora)
    policy.to(device)
    wants_reference = needs.reference_model or needs.snapshot == "reference" or task.evaluates_reference \
        or prior.learnable                                                 # a learnable prior builds on it in attach
    reference = _reference_of(policy, cfg, device) if wants_reference else None
    with acc.main_process_first():                                         # e.g. sampled pairs, cached
        train_rows, eval_rows = task.pairs(ctx, reference)
    snapshot = None
    if needs.snapshot:
        snapshot = reference if needs.snapshot == "reference" else \
            frozen(load_model(cfg.model, tokenizer, path=needs.snapshot)).to(device)
    seed_everything(cfg.seed)
    train_pairs, train_report = build_pairs(train_rows, tokenizer, cfg.dataset, needs.token_columns, "train")
    eval_pairs, eval_report = build_pairs(eval_rows, tokenizer, cfg.dataset, needs.token_columns, "eval")
    derived = {"pairs": pairs_digest(train_pairs + eval_pairs), "reference": reference_digest}
    check_derived(run_dir, derived, resume_from.parent.parent if resume_from else None, acc.is_main_process)
    if acc.is_main_process:
        save_report([train_report, eval_report], run_dir)
    else:                                                                  # the same verdict, without the table
        check_bad_fraction([train_report, eval_report], str(run_dir / "data_report.json"))
    if not train_pairs:
        raise ValueError("no training pairs left (see the data report above: data_report.json)")
    data = {"train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs),
            "truncated": train_report["truncated"] + eval_report["truncated"],
            "dropped": train_report["dropped"] + eval_report["dropped"]}
    ref_cache = None
    if cfg.trainer.ref_cache:                       # also gives every run, reference-free priors too, logratio/*
        scorer = policy if reference is None else reference                # untrained, the policy is the reference
        scored, why = scored_train_pairs(cfg, train_pairs, acc.num_processes)
        log.info("reference log-probs: %d of %d training pairs (%s), and all %d eval pairs", len(scored),
                 len(train_pairs), why, len(eval_pairs))
        with acc.main_process_first():
            ref_cache = refcache.attach([scored, eval_pairs], scorer, reference_digest, tokenizer,
                                        Path(cfg.cache_dir), cfg.trainer.precision, device, tokenizer.pad_token_id,
                                        derived["pairs"] if scored is train_pairs else None)   # hashed once
    prior.attach(policy, reference)
    prior.to(device)
    needed_live = live_reference(needs, cached=ref_cache is not None) or task.evaluates_reference
    if reference is not None and not needed_live and cfg.model.lora.r == 0:   # the cache replaces the copy
        reference = None
        snapshot = None if needs.snapshot == "reference" else snapshot
    return Setup(task, ctx, tokenizer, policy, reference, snapshot, train_pairs, eval_pairs, data, ref_cache)
