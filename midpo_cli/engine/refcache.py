"""Reference log-prob cache: per-token log pi_ref of every completion token, computed once, kept on disk.

The key hashes everything that changes the values: the reference weights, the tokenizer (vocabulary and
chat template), the exact token ids of every pair scored (so the dataset, template rendering and truncation
settings are all in it), the compute dtype/precision and the device type. A changed input is a new key:
a stale entry can never be read. Sweep jobs sharing cache_dir share the entries. A run that ends within its
first epoch scores only the training pairs it draws (recipe.scored_train_pairs): its entry is keyed by
those, so a longer run gets an entry of its own.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from accelerate.utils import send_to_device

from midpo_cli.console import progress
from midpo_cli.engine.cache import build_lock, publish
from midpo_cli.data.tokenize import collate
from midpo_cli.engine.forward import model_logits
from midpo_cli.engine.inputs import pairs_digest
from midpo_cli.engine.logps import token_logps

log = logging.getLogger("midpo")
COLUMN = "ref_logps"


def key_of(weights: str, tokenizer, pairs: list, precision: str, device, digest: str | None = None) -> str:
    """The entry's key: the reference weights' digest (engine/inputs.py weights_digest), the tokenizer and chat
    template, precision and device type, and the token ids of every pair scored (`digest`: their pairs_digest,
    when the caller has it already)."""
    h = hashlib.sha256()
    h.update(weights.encode())
    h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    h.update(f"{precision}|{torch.device(device).type}".encode())
    h.update((digest or pairs_digest(pairs)).encode())
    return h.hexdigest()[:20]


@torch.no_grad()
def compute(reference, pairs: list, pad_id: int, device, batch_size: int = 32, chunk: int = 0,
            pack: str | None = None) -> list:
    """[(chosen per-token logps, rejected per-token logps)] for each pair, in eval mode (the untrained policy
    itself scores when a prior keeps no reference: no dropout, and its mode is restored); `pack`: batches packed
    as in training (engine/pack.py). Batches of the pass's own size (trainer.eval_batch_size in a run), the pairs
    taken longest first so that a batch holds pairs of like lengths (less padding, tighter packed rows); the values
    come back in the pairs' order. No gradient, but not inference mode: a model that caches a tensor (a rotary
    table, say) during this pass would hand training an inference tensor it cannot save for backward, and on this
    machine inference mode was no faster (docs/benchmarks.md)."""
    out, was_training = [None] * len(pairs), reference.training
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i].prompt) + max(len(pairs[i].chosen),
                                                                                 len(pairs[i].rejected))))
    reference.eval()
    try:
        with progress("reference log-probs", -(-len(pairs) // batch_size), "batches") as bar:
            for i in range(0, len(order), batch_size):
                group = [pairs[k] for k in order[i:i + batch_size]]
                b = send_to_device(collate(group, pad_id, pack), device)
                src, _ = model_logits(reference, b)
                lp = token_logps(src, b["labels"], chunk).float().cpu()    # [2n, T]
                n = len(group)
                for j, (k, p) in enumerate(zip(order[i:i + batch_size], group)):
                    st = len(p.prompt) - 1
                    out[k] = (lp[j, st:st + len(p.chosen)].tolist(), lp[n + j, st:st + len(p.rejected)].tolist())
                bar.advance()
    finally:
        reference.train(was_training)
    return out


def save_values(values: list, path: Path) -> None:
    """[(chosen per-token values, rejected per-token values)] per pair as one flat float32 tensor + per-row lengths
    (safetensors), and its content hash in the metadata."""
    from safetensors.torch import save_file
    flat = [x for pair in values for side in pair for x in side]
    lens = [len(side) for pair in values for side in pair]
    tensors = {"values": torch.tensor(flat, dtype=torch.float32), "lengths": torch.tensor(lens, dtype=torch.int64)}
    save_file(tensors, str(path), metadata={"checksum": _checksum(tensors)})


def _checksum(tensors: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_values(path: Path, n_pairs: int) -> list:
    """The values save_values wrote for `n_pairs` pairs, or ValueError saying why the entry cannot be trusted."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in ("values", "lengths")}
    except Exception as e:                                                 # noqa: BLE001 (truncated, not safetensors...)
        raise ValueError(f"unreadable ({type(e).__name__})") from None
    if meta.get("checksum") != _checksum(tensors):
        raise ValueError("checksum mismatch")
    lens = tensors["lengths"].tolist()
    if len(lens) != 2 * n_pairs or sum(lens) != tensors["values"].numel():
        raise ValueError("wrong number of values")
    flat, out, i = tensors["values"].tolist(), [], 0
    for j in range(0, len(lens), 2):
        a, b = lens[j], lens[j + 1]
        out.append((flat[i:i + a], flat[i + a:i + a + b]))
        i += a + b
    return out


def attach(pair_sets: list[list], reference, weights: str, tokenizer, cache_root: Path, precision: str, device,
           pad_id: int, digest: str | None = None, pack: str | None = None, batch_size: int = 32) -> dict:
    """Put cached (or freshly computed) reference log-probs on every pair as the per-token column
    `ref_logps`; `weights`: the digest of the reference weights (LoRA adapters excluded); `digest`: the
    pairs_digest of the pairs, when the caller has it; `batch_size`: pairs per forward of the pass. Returns {"hit",
    "key", "path"} for the run's results. A damaged entry (truncated, changed, unreadable) is recomputed with a warning
    and replaced."""
    flat = [p for s in pair_sets for p in s]
    key = key_of(weights, tokenizer, flat, precision, device, digest)
    path = cache_root / "ref_logps" / f"{key}.safetensors"
    with build_lock(path):                                              # a concurrent job with this key waits
        values, hit = None, path.exists()
        if hit:
            try:
                values = load_values(path, len(flat))
                log.info("reference log-probs: cache hit %s", path)
            except ValueError as e:
                log.warning("reference log-prob cache entry %s is damaged (%s): recomputing it", path, e)
                path.unlink(missing_ok=True)
                hit = False
        if values is None:
            log.info("reference log-probs: computing for %d pairs (cached at %s)", len(flat), path)
            values = compute(reference, flat, pad_id, device, batch_size, pack=pack)
            with publish(path) as tmp:
                save_values(values, tmp)
    for p, v in zip(flat, values):
        p.values[COLUMN] = v
    return {"hit": hit, "key": key, "path": str(path)}
