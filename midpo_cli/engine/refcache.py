"""Reference log-prob cache: per-token log pi_ref of every completion token, computed once, kept on disk.

The key hashes everything that changes the values: the reference weights, the tokenizer (vocabulary and
chat template), the exact token ids of every pair (so the dataset, template rendering and truncation
settings are all in it), the compute dtype/precision and the device type. A changed input is a new key:
a stale entry can never be read. Sweep jobs sharing cache_dir share the entries.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from midpo_cli.engine.cache import publish
from midpo_cli.data.tokenize import collate
from midpo_cli.engine.forward import model_logits
from midpo_cli.engine.logps import token_logps

log = logging.getLogger("midpo")
COLUMN = "ref_logps"


def weights_hash(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if "lora_" in name:                                                # the reference is adapters-off
            continue
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def key_of(reference_model, tokenizer, pairs: list, precision: str, device) -> str:
    h = hashlib.sha256()
    h.update(weights_hash(reference_model).encode())
    h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    h.update(f"{precision}|{torch.device(device).type}".encode())
    for p in pairs:
        h.update(repr((p.prompt, p.chosen, p.rejected)).encode())
    return h.hexdigest()[:20]


@torch.no_grad()
def compute(reference, pairs: list, pad_id: int, device, batch_size: int = 16, chunk: int = 0) -> list:
    """[(chosen per-token logps, rejected per-token logps)] for each pair."""
    out = []
    for i in range(0, len(pairs), batch_size):
        group = pairs[i:i + batch_size]
        b = collate(group, pad_id)
        b = {k: v.to(device) for k, v in b.items() if torch.is_tensor(v)}
        src, _ = model_logits(reference, b)
        lp = token_logps(src, b["labels"], chunk).float().cpu()            # [2n, T]
        n = len(group)
        for j, p in enumerate(group):
            st = len(p.prompt) - 1
            out.append((lp[j, st:st + len(p.chosen)].tolist(), lp[n + j, st:st + len(p.rejected)].tolist()))
    return out


def attach(pair_sets: list[list], reference, ref_model, tokenizer, cache_root: Path, precision: str, device,
           pad_id: int) -> dict:
    """Put cached (or freshly computed) reference log-probs on every pair as the per-token column
    `ref_logps`; returns {"hit", "key", "path"} for the run's results."""
    flat = [p for s in pair_sets for p in s]
    key = key_of(ref_model, tokenizer, flat, precision, device)
    path = cache_root / "ref_logps" / f"{key}.pt"
    hit = path.exists()
    if hit:
        values = torch.load(path)
        log.info("reference log-probs: cache hit %s", path)
    else:
        log.info("reference log-probs: computing for %d pairs (cached at %s)", len(flat), path)
        values = compute(reference, flat, pad_id, device)
        with publish(path) as tmp:
            torch.save(values, tmp)
    for p, v in zip(flat, values):
        p.values[COLUMN] = v
    return {"hit": hit, "key": key, "path": str(path)}
