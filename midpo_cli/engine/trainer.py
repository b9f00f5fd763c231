"""The preference-training loop (accelerate): MI-DPO loss with the configured prior, metrics, checkpoints."""
from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from midpo_cli.data.tokenize import collate
from midpo_cli.engine import checkpoint
from midpo_cli.engine.forward import pair_view
from midpo_cli.engine.logps import to_pairs
from midpo_cli.loss import preference_loss

log = logging.getLogger("midpo")


def batches(pairs: list, batch_size: int, seed: int, pad_id: int, skip: int = 0):
    """Endless shuffled micro-batches; epoch e uses permutation seed+e, so a position can be replayed."""
    per_epoch = max(1, len(pairs) // batch_size)
    epoch, start = divmod(skip, per_epoch)
    while True:
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for i in range(start, per_epoch):
            yield collate([pairs[j] for j in order[i * batch_size:(i + 1) * batch_size]], pad_id)
        epoch, start = epoch + 1, 0


def lr_lambda(cfg):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return {"constant": 1.0, "linear": 1.0 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac))}[cfg.lr_schedule]
    return f


def _to(batch: dict, device) -> dict:
    out = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
    out["values"] = {k: v.to(device) for k, v in batch["values"].items()}
    return out


def step_loss(batch, policy, prior, models, chunk):
    """The loss to differentiate (J + the prior's penalty) and the step's metrics."""
    view = pair_view(batch, policy, prior, chunk=chunk, **models)
    cached = batch["values"].get("ref_logps")                              # prior-independent yardstick
    out = preference_loss(prior, view, None if cached is None else to_pairs(cached * batch["mask"]))
    out.metrics["tokens"] = int(batch["attention_mask"].sum())
    return out.total, out.metrics


@torch.no_grad()
def evaluate_pairs(policy, prior, models, eval_pairs, cfg, pad_id, device) -> dict:
    if not eval_pairs:
        return {}
    policy.eval()
    sums, n = {}, 0
    for i in range(0, len(eval_pairs), cfg.eval_batch_size):
        chunk = eval_pairs[i:i + cfg.eval_batch_size]
        _, m = step_loss(_to(collate(chunk, pad_id), device), policy, prior, models, cfg.kl_chunk)
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v * len(chunk)
        n += len(chunk)
    policy.train()
    return {f"eval/{k}": v / n for k, v in sums.items() if k != "tokens"}


def _mean(rows: list[dict]) -> dict:
    keys = rows[0].keys()
    return {k: (sum(r[k] for r in rows) if k == "tokens" else sum(r[k] for r in rows) / len(rows)) for k in keys}


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _metrics_upto(run_dir: Path, source: Path, step: int) -> None:
    """Start this run's metrics.jsonl with the resumed run's lines up to `step` (none past it)."""
    src = source / "metrics.jsonl"
    lines = src.read_text().splitlines() if src.exists() else []
    kept = [x for x in lines if x.strip() and json.loads(x)["step"] <= step]
    (run_dir / "metrics.jsonl").write_text("".join(x + "\n" for x in kept))


def train_loop(acc, cfg, policy, prior, models, optimizer, train_pairs, eval_pairs, pad_id, run_dir: Path,
               resume_from: Path | None = None) -> dict:
    """Run cfg.trainer.max_steps optimiser steps; returns final train metrics, eval metrics and throughput."""
    tc = cfg.trainer
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc))
    policy, optimizer = acc.prepare(policy, optimizer)                     # the schedule counts optimiser steps
    acc.register_for_checkpointing(sched)
    device = acc.device
    start_step = 0
    if resume_from is not None:
        acc.load_state(str(resume_from))                                   # weights, optimiser, schedule, RNG
        start_step = checkpoint.step_of(resume_from)
        _metrics_upto(run_dir, resume_from.parent.parent, start_step)
        log.info("resumed from %s at step %d", resume_from, start_step)
    it = batches(train_pairs, tc.batch_size, cfg.seed, pad_id, skip=start_step * tc.grad_accum)
    metrics_file = (run_dir / "metrics.jsonl").open("a")
    window, history, tokens, t0 = [], {}, 0, time.perf_counter()
    policy.train()
    progress = Progress(TextColumn("[bold]train[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[info]}"), disable=not acc.is_main_process)
    with progress:
        bar = progress.add_task("train", total=tc.max_steps, completed=start_step, info="")
        for step in range(start_step + 1, tc.max_steps + 1):
            micro = []
            for _ in range(tc.grad_accum):
                batch = _to(next(it), device)
                with acc.accumulate(policy), acc.autocast():
                    loss, m = step_loss(batch, policy, prior, models, tc.kl_chunk)
                    acc.backward(loss)
                    if acc.sync_gradients and tc.max_grad_norm > 0:
                        m["grad_norm"] = float(acc.clip_grad_norm_(policy.parameters(), tc.max_grad_norm))
                    optimizer.step()
                    if acc.sync_gradients:
                        sched.step()
                    optimizer.zero_grad(set_to_none=True)
                micro.append(m)
            if not all(math.isfinite(x["loss"]) for x in micro):
                raise FloatingPointError(f"non-finite loss at step {step}: lower optimizer.lr or check the data "
                                         "(empty completions?); metrics so far are in metrics.jsonl")
            m = _mean([{k: v for k, v in x.items() if k != "grad_norm"} for x in micro])
            m["grad_norm"] = micro[-1].get("grad_norm", float("nan"))
            m["lr"] = sched.get_last_lr()[0]
            tokens += m["tokens"]
            window.append(m)
            progress.update(bar, advance=1, info=f"loss {m['loss']:.4f}  acc {m['rewards/accuracies']:.2f}")
            row = None
            if step % tc.log_every == 0 or step == tc.max_steps:
                row = {"step": step, **_mean(window)}
                window = []
            if tc.eval_every and step % tc.eval_every == 0 or step == tc.max_steps:
                row = (row or {"step": step}) | evaluate_pairs(policy, prior, models, eval_pairs, tc, pad_id, device)
            if row and acc.is_main_process:
                metrics_file.write(json.dumps(row) + "\n"); metrics_file.flush()
                if acc.trackers:
                    acc.log({k: v for k, v in row.items() if k != "step"}, step=step)
                history.update(row)
            if tc.save_every and step % tc.save_every == 0 and step < tc.max_steps:
                checkpoint.save(acc, run_dir, step, cfg)
    metrics_file.close()
    wall = time.perf_counter() - t0
    return {"final": history, "train_wall_s": wall, "tokens_per_s": tokens / wall if wall else 0.0,
            "peak_memory_mb": peak_memory_mb(device), "policy": acc.unwrap_model(policy)}


def seed_everything(seed: int) -> None:
    random.seed(seed); np.random.seed(seed); torch.manual_seed(seed)
