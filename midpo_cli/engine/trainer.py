"""The preference-training loop (accelerate): MI-DPO loss with the configured prior, metrics, checkpoints.

One process or many (DDP, FSDP, DeepSpeed through `accelerate launch` / `torchrun`): the training pairs go
through a DataLoader prepared by accelerate (each process its own shard of every global batch, resumable
by position), `trainer.batch_size` pairs per process and micro-batch, metrics averaged over processes
before they are logged, and only the main process writes. A prior with parameters gets its own optimiser
and schedule, steps as the prior's `updates(step)` says, and is saved in every checkpoint.

Nothing non-finite is ever trained on or written: a non-finite loss or gradient stops the run
(`trainer.on_nonfinite=stop`, naming the step, the term that went non-finite and the last good checkpoint)
or skips the step (`skip`, counted and reported); weights are checked before every checkpoint and save.
A stop signal (Ctrl-C, SIGTERM, SIGUSR2) ends the step, writes a checkpoint and exits (engine/stops.py).
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import send_to_device
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from midpo_cli.engine import checkpoint, refcache
from midpo_cli.engine.draws import checked_collate, data_loader, endless
from midpo_cli.engine.forward import pair_view
from midpo_cli.engine.logps import to_pairs
from midpo_cli.engine.optim import finite_parameters, grad_norm, schedule
from midpo_cli.engine.files import clean, write_text, writing
from midpo_cli.engine.stops import Signals
from midpo_cli.loss import preference_loss

log = logging.getLogger("midpo")


class NonFinite(FloatingPointError):
    """Training met a non-finite value; the message names the step, the term and the last good checkpoint."""


def _required(tc) -> tuple[str, ...]:
    """The per-token columns every pair of the run carries: the cached reference log-probs, when cached."""
    return (refcache.COLUMN,) if tc.ref_cache else ()


def step_loss(batch, policy, prior, models, chunk):
    """The loss to differentiate (J + the prior's penalty), the step's metrics, and the view (for diagnosis)."""
    view = pair_view(batch, policy, prior, chunk=chunk, **models)
    cached = batch["values"].get("ref_logps")                              # prior-independent yardstick
    out = preference_loss(prior, view, None if cached is None else to_pairs(cached * batch["mask"]))
    out.metrics["tokens"] = int(batch["attention_mask"].sum())
    return out.total, out.metrics, view


def diagnose(view, prior) -> str:
    """Which input of the loss went non-finite first: policy log-probs, reference, prior, or the loss itself."""
    bad = lambda t: t is not None and not bool(torch.isfinite(t).all())
    if bad(view.logps):
        return "the policy's log-probs (the model's weights or activations overflowed)"
    refs = [view.ref_logps, view.kl_ref_pi, view.kl_pi_ref, view.snapshot_logps, *view.owned_logps.values()]
    if any(bad(t) for t in refs):
        return "the reference/snapshot inputs (reference log-probs, KL terms or the prior's own model)"
    with torch.no_grad():
        if bad(prior.log_prior(view)):
            return "the prior's log zeta"
    return "the loss (the implied reward overflowed: lower optimizer.lr or the prior's scale)"


def _reduce(acc, values: dict, keys: list[str], op: str = "mean") -> dict:
    """Average (or sum) a dict of floats over processes in one collective; non-finite values stay non-finite."""
    if acc.num_processes == 1:
        return values
    t = torch.tensor([float(values.get(k, float("nan"))) for k in keys], dtype=torch.float64, device=acc.device)
    t = acc.reduce(t, reduction=op)
    return dict(zip(keys, t.tolist()))


@torch.no_grad()
def evaluate_pairs(acc, policy, prior, models, eval_pairs, cfg, pad_id, prefix: str = "eval/") -> dict:
    """Preference metrics of a set of pairs (held-out ones, or the training pairs with prefix "train/"): each
    process scores its share of the pairs; sums are reduced."""
    mine = eval_pairs[acc.process_index::acc.num_processes]
    was = policy.training
    policy.eval()
    sums, keys = {}, None
    for i in range(0, len(mine), cfg.eval_batch_size):
        chunk = mine[i:i + cfg.eval_batch_size]
        batch = send_to_device(checked_collate(chunk, pad_id, _required(cfg)), acc.device)
        with acc.autocast():
            _, m, _ = step_loss(batch, policy, prior, models, cfg.kl_chunk)
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v * len(chunk)
        keys = sorted(m)
    policy.train(was)
    if keys is None and acc.num_processes == 1:
        return {}
    keys = _agree(acc, keys)
    if not keys:
        return {}
    n = _reduce(acc, {"n": float(len(mine))}, ["n"], "sum")["n"]
    total = _reduce(acc, {k: sums.get(k, 0.0) for k in keys}, keys, "sum")
    return {f"{prefix}{k}": v / n for k, v in total.items() if k != "tokens"}


def _agree(acc, keys):
    """The metric names of a process that had eval pairs (a process with none gets them from the main one)."""
    if acc.num_processes == 1:
        return keys
    from accelerate.utils import broadcast_object_list
    box = [keys]
    return broadcast_object_list(box, from_process=0)[0]


def window_row(window: list[dict]) -> dict:
    """One metrics.jsonl row from the steps since the last one: means, but tokens summed and running
    values (learning rate, skipped-step count) as they are now."""
    last = window[-1]
    return {k: sum(w[k] for w in window) if k == "tokens" else last[k] if k in ("lr", "skipped_steps")
            else sum(w[k] for w in window) / len(window) for k in last}


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def metrics_upto(run_dir: Path, source: Path, step: int) -> None:
    """Start this run's metrics.jsonl with `source`'s lines up to `step` (none past it)."""
    src = source / "metrics.jsonl"
    lines = src.read_text().splitlines() if src.exists() else []
    kept = []
    for x in lines:
        try:
            if x.strip() and json.loads(x)["step"] <= step:
                kept.append(x)
        except (ValueError, KeyError):                                     # a torn last line from a kill
            continue
    write_text(run_dir / "metrics.jsonl", "".join(x + "\n" for x in kept))


def append_row(metrics_file, row: dict) -> None:
    """One metrics.jsonl line, on disk at once (a killed run keeps its rows); a failed write is one line."""
    with writing(Path(metrics_file.name)):
        metrics_file.write(json.dumps(clean(row), allow_nan=False) + "\n")
        metrics_file.flush()


def train_loop(acc, cfg, policy, prior, models, train_pairs, eval_pairs, pad_id, run_dir: Path,
               resume_from: Path | None = None, rerun: str = "") -> dict:
    """Run cfg.trainer.max_steps optimiser steps; returns final train metrics, eval metrics and throughput.
    `rerun`: the command that continues this run, named when a stop signal ends it early."""
    from hydra.utils import instantiate

    tc = cfg.trainer
    optimizer = instantiate(cfg.optimizer)([p for p in policy.parameters() if p.requires_grad])
    sched = schedule(optimizer, tc.lr_schedule, tc.warmup_steps, tc.max_steps)
    loader = data_loader(train_pairs, tc.batch_size, cfg.seed, pad_id, _required(tc))
    prior_params = prior.trainable()
    extra = []
    if prior_params:                                                       # a learnable prior: its own optimiser
        prior_opt = instantiate(cfg.optimizer, lr=prior.lr)(prior_params)
        extra = [prior_opt, schedule(prior_opt, tc.lr_schedule, tc.warmup_steps, tc.max_steps)]
    policy, optimizer, sched, loader, *extra = acc.prepare(policy, optimizer, sched, loader, *extra)
    prior_opt, prior_sched = extra if extra else (None, None)
    lrs = "optimizer.lr" + (" or prior.lr" if prior_opt is not None else "")   # what a non-finite stop suggests
    device = acc.device
    start_step = 0
    if resume_from is not None:
        start_step = checkpoint.load(acc, resume_from, prior, tc.max_steps)  # weights, optimisers, schedules, RNG
        metrics_upto(run_dir, resume_from.parent.parent, start_step) if acc.is_main_process else None
        log.info("resumed from %s at step %d", resume_from, start_step)
    elif acc.is_main_process:
        write_text(run_dir / "metrics.jsonl", "")                          # a restart without checkpoint
    it = endless(acc, loader, start_step * tc.grad_accum)
    metrics_file = (run_dir / "metrics.jsonl").open("a") if acc.is_main_process else None
    window, history, tokens, skipped, warnings, t0 = [], {}, 0, 0, [], time.perf_counter()
    last_ckpt = str(resume_from) if resume_from else None
    policy.train()
    progress = Progress(TextColumn("[bold]train[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[info]}"), disable=not acc.is_main_process)
    with progress, Signals() as signals:
        bar = progress.add_task("train", total=tc.max_steps, completed=start_step, info="")
        for step in range(start_step + 1, tc.max_steps + 1):
            policy_on, prior_on = prior.updates(step)
            micro, views = [], []
            for _ in range(tc.grad_accum):
                batch = next(it)
                with acc.accumulate(policy), acc.autocast():
                    loss, m, view = step_loss(batch, policy, prior, models, tc.kl_chunk)
                    acc.backward(loss)
                micro.append(m)
                views.append(view)
            if prior_params and acc.num_processes > 1:                     # the prior is not DDP-wrapped
                for p in prior_params:
                    if p.grad is not None:
                        p.grad = acc.reduce(p.grad, reduction="mean")
            m = {k: sum(x[k] for x in micro) / len(micro) for k in micro[0] if k != "tokens"}
            m["tokens"] = float(sum(x["tokens"] for x in micro))
            m["_bad"] = float(not all(math.isfinite(x["loss"]) for x in micro))
            m["_signal"] = float(signals.got > 0)
            m = _reduce(acc, m, sorted(m))                                 # one collective: means over processes
            m["tokens"] *= acc.num_processes
            bad, stop = m.pop("_bad") > 0, m.pop("_signal") > 0
            m["grad_norm"] = grad_norm(policy.parameters()) if tc.max_grad_norm <= 0 else \
                float(acc.clip_grad_norm_(policy.parameters(), tc.max_grad_norm))
            if prior_params:
                m["prior/grad_norm"] = float(torch.nn.utils.clip_grad_norm_(prior_params, prior.max_grad_norm)) \
                    if prior.max_grad_norm > 0 else grad_norm(prior_params)
            finite = not bad and math.isfinite(m["grad_norm"]) and math.isfinite(m.get("prior/grad_norm", 0))
            if not finite:
                where = next((diagnose(v, prior) for v, x in zip(views, micro) if not math.isfinite(x["loss"])),
                             "the gradients (finite loss, non-finite gradient norm)")
                weights_ok = finite_parameters(acc.unwrap_model(policy), prior)
                if tc.on_nonfinite == "stop" or not weights_ok:
                    optimizer.zero_grad(set_to_none=True)
                    raise NonFinite(f"non-finite values at step {step}, in {where}; "
                                    + ("the weights themselves are no longer finite; " if not weights_ok else "")
                                    + "nothing was trained on them and no non-finite weights were written; "
                                    + (f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was written")
                                    + f". Lower {lrs}, check the data, or trainer.on_nonfinite=skip")
                skipped += 1
                log.warning("step %d skipped (trainer.on_nonfinite=skip): non-finite values in %s", step, where)
                optimizer.zero_grad(set_to_none=True)
                if prior_opt is not None:
                    prior_opt.zero_grad(set_to_none=True)
            else:
                if policy_on:
                    optimizer.step()
                    sched.step()
                if prior_opt is not None and prior_on:
                    prior_opt.step()
                    prior_sched.step()
                optimizer.zero_grad(set_to_none=True)
                if prior_opt is not None:
                    prior_opt.zero_grad(set_to_none=True)
                prior.on_step(step, acc.unwrap_model(policy))
            m["lr"] = sched.get_last_lr()[0]
            m["skipped_steps"] = skipped
            tokens += m["tokens"]
            window.append(m)
            progress.update(bar, advance=1, info=f"loss {m['loss']:.4f}  acc {m['rewards/accuracies']:.2f}")
            row = None
            if step % tc.log_every == 0 or step == tc.max_steps:
                row = {"step": step, **window_row(window)}
                window = []
            if tc.eval_every and step % tc.eval_every == 0 or step == tc.max_steps:
                ev = evaluate_pairs(acc, policy, prior, models, eval_pairs, tc, pad_id)
                if not all(math.isfinite(v) for v in ev.values()):
                    raise NonFinite(f"non-finite held-out metrics at step {step} ({', '.join(k for k, v in ev.items() if not math.isfinite(v))}); "
                                    + (f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was written")
                                    + f". Lower {lrs} or check the eval data")
                row = (row or {"step": step}) | ev
            if tc.eval_train and step == tc.max_steps:                     # the final J on every training pair
                row = (row or {"step": step}) | evaluate_pairs(acc, policy, prior, models, train_pairs, tc, pad_id,
                                                               prefix="train/")
            if row:
                for w in prior.monitor(row):
                    if acc.is_main_process:
                        log.warning("step %d: %s", step, w)
                    warnings.append({"step": step, "warning": w})
            if row and acc.is_main_process:
                append_row(metrics_file, row)
                if acc.trackers:
                    acc.log({k: v for k, v in clean(row).items() if k != "step" and v is not None}, step=step)
                history.update(row)
            if (tc.save_every and step % tc.save_every == 0 and step < tc.max_steps) or (stop and step < tc.max_steps):
                if not finite_parameters(acc.unwrap_model(policy), prior):
                    raise NonFinite(f"the weights are not finite at step {step}; no checkpoint was written"
                                    + (f"; last good checkpoint: {last_ckpt}" if last_ckpt else ""))
                last_ckpt = str(checkpoint.save(acc, run_dir, step, cfg, prior))
            if stop and step == tc.max_steps:                              # nothing left to continue: finish
                log.warning("signal %d at the last step: finishing the run (evaluation, saving) instead of "
                            "stopping", int(signals.got or 0))
            elif stop:
                if metrics_file:
                    metrics_file.close()
                signals.stop(step, last_ckpt, rerun)
    if metrics_file:
        metrics_file.close()
    wall = time.perf_counter() - t0
    return {"final": history, "train_wall_s": wall, "tokens_per_s": tokens / wall if wall else 0.0,
            "skipped_steps": skipped, "warnings": warnings, "peak_memory_mb": peak_memory_mb(device), "policy": acc.unwrap_model(policy),
            "world_size": acc.num_processes}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
