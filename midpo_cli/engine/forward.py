"""One concatenated forward for chosen and rejected of every model a prior reads, then the view builder."""
from __future__ import annotations

import torch

from midpo_cli.engine.logps import Head
from midpo_cli.engine.views import build_view, layer_means, live_reference
from midpo_cli.priors import PairView


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


def pair_view(batch: dict, policy, prior, reference=None, snapshot=None, chunk: int = 0) -> PairView:
    """The PairView of a collated batch (on the right device): forwards of the policy (with gradient), of the
    reference and snapshot when the prior needs them live (no gradient), and of the prior's own models
    (with gradient into the prior's parameters). Reference log-probs come from the batch's cached
    `ref_logps` column when present (engine/refcache.py)."""
    needs = prior.needs()
    cached = batch["values"].get("ref_logps")
    logits, _ = model_logits(policy, batch)                                # [2B, T, V] or Head([2B, T, H])
    ref_logits = acts = snap_logits = None
    if live_reference(needs, cached is not None):
        if reference is None:
            raise RuntimeError("the prior needs the reference model, but none was loaded")
        with torch.no_grad():
            ref_logits, out = model_logits(reference, batch, hidden=needs.ref_activations)
            acts = layer_means(out.hidden_states) if needs.ref_activations else None
    if needs.snapshot and needs.snapshot != "reference":
        with torch.no_grad():
            snap_logits, _ = model_logits(snapshot, batch)
    models = prior.owned_models() if needs.owned else {}
    missing = [name for name in needs.owned if name not in models]
    if missing:
        raise RuntimeError(f"prior '{prior.name}' reads its own model(s) {missing}, which owned_models() does not "
                           "return (attach(policy, reference) builds them before training)")
    owned = {name: model_logits(models[name], batch)[0] for name in needs.owned}
    return build_view(needs, batch["labels"], batch["mask"], logits, reference=ref_logits, snapshot=snap_logits,
                      owned=owned, cached_ref=cached, ref_activations=acts, columns=batch["values"], chunk=chunk)
