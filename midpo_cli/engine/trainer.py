"""The pieces of a training step the recipe (midpo_cli/recipe.py) is made of: the loss of a batch and its metrics,
the diagnosis of a non-finite value, metrics reduced over processes, held-out evaluation, metrics.jsonl rows.
"""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import send_to_device

from midpo_cli.console import progress
from midpo_cli.engine import refcache
from midpo_cli.engine.draws import checked_collate
from midpo_cli.engine.files import clean, write_text, writing
from midpo_cli.engine.forward import pair_view
from midpo_cli.engine.logps import to_pairs
from midpo_cli.engine.pack import pack_kind
from midpo_cli.loss import preference_loss

log = logging.getLogger("midpo")


class NonFinite(FloatingPointError):
    """Training met a non-finite value; the message names the step, the term and the last good checkpoint."""


def _required(tc) -> tuple[str, ...]:
    """The per-token columns every pair of the run carries: the cached reference log-probs, when cached."""
    return (refcache.COLUMN,) if tc.ref_cache else ()


def step_loss(batch, policy, prior, models, chunk, host: bool = True):
    """The loss to differentiate (J + the prior's penalty), the batch's metrics (floats; with host=False 0-d
    tensors still on the device, and the prior's host values as they are) and the view (for diagnosis)."""
    view = pair_view(batch, policy, prior, chunk=chunk, **models)
    cached = batch["values"].get("ref_logps")                              # prior-independent yardstick
    out = preference_loss(prior, view, None if cached is None else to_pairs(cached * batch["mask"]), host)
    out.metrics["tokens"] = batch["tokens"]                               # counted by collate: no device sync
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


def reduce_metrics(acc, values: dict, keys: list[str], op: str = "mean") -> dict:
    """Average (or sum) a dict of floats over processes in one collective; non-finite values stay non-finite."""
    if acc.num_processes == 1:
        return values
    t = torch.tensor([float(values.get(k, float("nan"))) for k in keys], dtype=torch.float64, device=acc.device)
    t = acc.reduce(t, reduction=op)
    return dict(zip(keys, t.tolist()))


@torch.no_grad()
def evaluate_pairs(acc, policy, prior, models, eval_pairs, tc, pad_id, prefix: str = "eval/") -> dict:
    """Preference metrics of a set of pairs (held-out ones, or the training pairs with prefix "train/"): each
    process scores its share of the pairs; sums are reduced."""
    mine = eval_pairs[acc.process_index::acc.num_processes]
    pack = pack_kind(policy) if tc.packing else None
    was, prior_was = policy.training, prior.training
    policy.eval()
    prior.eval()                                                           # e.g. no dropout in SparsePO's mask heads
    sums, keys = {}, None
    with progress(f"{prefix}* metrics", len(mine), "pairs") as bar:         # the main process's share
        for i in range(0, len(mine), tc.eval_batch_size):
            chunk = mine[i:i + tc.eval_batch_size]
            batch = send_to_device(checked_collate(chunk, pad_id, _required(tc), pack), acc.device)
            with acc.autocast():
                _, m, _ = step_loss(batch, policy, prior, models, tc.kl_chunk)
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v * len(chunk)
            keys = sorted(m)
            bar.advance(len(chunk))
    policy.train(was)
    prior.train(prior_was)
    if keys is None and acc.num_processes == 1:
        return {}
    keys = _agree(acc, keys)
    if not keys:
        return {}
    n = reduce_metrics(acc, {"n": float(len(mine))}, ["n"], "sum")["n"]
    total = reduce_metrics(acc, {k: sums.get(k, 0.0) for k in keys}, keys, "sum")
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
    kept = [json.dumps(row, allow_nan=False) for row in metrics_rows(source / "metrics.jsonl") if row["step"] <= step]
    write_text(run_dir / "metrics.jsonl", "".join(x + "\n" for x in kept))


def metrics_rows(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl, in order; a torn last line (from a kill) is left out."""
    rows = []
    for x in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(x) if x.strip() else None
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def append_row(metrics_file, row: dict) -> None:
    """One metrics.jsonl line, on disk at once (a killed run keeps its rows); a failed write is one line."""
    with writing(Path(metrics_file.name)):
        metrics_file.write(json.dumps(clean(row), allow_nan=False) + "\n")
        metrics_file.flush()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
