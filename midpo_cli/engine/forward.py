"""One concatenated forward for chosen and rejected, then exactly the inputs the prior declared it needs."""
from __future__ import annotations

import torch

from midpo_cli.engine.logps import Head, to_pairs, token_kl, token_logps
from midpo_cli.priors import Needs, PairView


def lm_head_weight(model):
    """The LM-head weight when logits are a plain linear map of the final hidden states, else None."""
    inner = getattr(model, "module", model)                                # DDP / accelerate wrappers
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    conf = getattr(inner, "config", None)
    plain = (isinstance(head, torch.nn.Linear) and head.bias is None
             and not getattr(conf, "final_logit_softcapping", None) and getattr(conf, "logit_scale", 1.0) in (None, 1.0))
    return head.weight if plain else None


def model_logits(model, batch, hidden: bool = False):
    """Forward; returns (logits source aligned with labels, output). With a plain LM head the model only
    forms the last position's logits and the rest are formed chunk-wise from the hidden states (Head)."""
    weight = lm_head_weight(model)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                output_hidden_states=hidden or weight is not None, **({"logits_to_keep": 1} if weight is not None else {}))
    src = Head(out.hidden_states[-1][:, :-1], weight) if weight is not None else out.logits[:, :-1]
    return src, out


def pair_view(batch: dict, policy, needs: Needs, reference=None, snapshot=None, chunk: int = 0) -> PairView:
    """Build the PairView of a collated batch (on the right device). Only the policy carries gradient.
    Reference log-probs come from the batch's cached `ref_logps` column when present (engine/refcache.py)."""
    labels, mask = batch["labels"], batch["mask"]                          # [2B, T]
    logits, _ = model_logits(policy, batch)                                # [2B, T, V] or Head([2B, T, H])
    view = PairView(logps=to_pairs(token_logps(logits, labels, chunk) * mask), mask=to_pairs(mask))
    cached = batch["values"].get("ref_logps")
    if cached is not None:
        if needs.reference:
            view.ref_logps = to_pairs(cached * mask)
        if needs.snapshot == "reference":
            view.snapshot_logps = to_pairs(cached * mask)
    live = needs.kl_ref_pi or needs.kl_pi_ref or needs.ref_activations or (needs.reference and cached is None)
    if live:
        if reference is None:
            raise RuntimeError("the prior needs the reference model, but none was loaded")
        with torch.no_grad():
            ref_logits, out = model_logits(reference, batch, hidden=needs.ref_activations)
        if needs.reference and cached is None:
            view.ref_logps = to_pairs(token_logps(ref_logits, labels, chunk) * mask)
        if needs.kl_ref_pi:
            view.kl_ref_pi = to_pairs(token_kl(ref_logits, logits, chunk) * mask)
        if needs.kl_pi_ref:
            view.kl_pi_ref = to_pairs(token_kl(logits, ref_logits, chunk) * mask)
        if needs.ref_activations:                                          # mean activation per layer, at y_t
            acts = torch.stack([h.float().mean(-1) for h in out.hidden_states[1:]], -1)[:, 1:]
            view.ref_activations = to_pairs(acts)                          # [2, B, T, L]
        del out, ref_logits
    if needs.snapshot and view.snapshot_logps is None:
        with torch.no_grad():
            snap_logits, _ = model_logits(snapshot, batch)
            view.snapshot_logps = to_pairs(token_logps(snap_logits, labels, chunk) * mask)
    for name in needs.token_columns:
        view.token_values[name] = to_pairs(batch["values"][name])
    return view
