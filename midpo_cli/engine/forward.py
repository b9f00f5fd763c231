"""One concatenated forward for chosen and rejected of every model a prior reads, then the view builder."""
from __future__ import annotations

import torch

from midpo_cli.engine.cross import Layout, other_prompt_logps
from midpo_cli.engine.head import logits_source
from midpo_cli.engine.views import build_view, layer_means, layer_states, live_reference
from midpo_cli.priors import PairView


def model_logits(model, batch, hidden: bool = False):
    """Forward; returns (logits source aligned with labels, output). For an architecture engine/head.py knows,
    the model forms only the last position's logits and the rest are formed chunk-wise from what its LM head
    reads (a Head [N, S-1, H]); otherwise the model's own logits [N, S-1, V]. `hidden`: output.hidden_states
    holds every layer's hidden states."""
    return logits_source(model, batch, hidden)


def pair_view(batch: dict, policy, prior, reference=None, snapshot=None, chunk: int = 0,
              layout: Layout | None = None) -> PairView:
    """The PairView of a collated batch (on the right device): forwards of the policy (with gradient), of the
    reference and snapshot when the prior needs them live (no gradient), and of the prior's own models
    (with gradient into the prior's parameters). Reference log-probs come from the batch's cached
    `ref_logps` column when present (engine/refcache.py). Responses scored after other prompts of the batch
    (Needs.cross_prompts) are laid out by the run's `layout` (engine/cross.py; None: no length limit)."""
    needs = prior.needs()
    cached = batch["values"].get("ref_logps")
    logits, _ = model_logits(policy, batch)                                # [2B, T, V] or Head([2B, T, H])
    ref_logits = acts = states = snap_logits = None
    if live_reference(needs, cached is not None):
        if reference is None:
            raise RuntimeError("the prior needs the reference model, but none was loaded")
        with torch.no_grad():
            ref_logits, out = model_logits(reference, batch, hidden=needs.ref_activations or needs.ref_hidden)
            acts = layer_means(out.hidden_states) if needs.ref_activations else None
            states = layer_states(out.hidden_states) if needs.ref_hidden else None
    if needs.snapshot and needs.snapshot != "reference":
        with torch.no_grad():
            snap_logits, _ = model_logits(snapshot, batch)
    models = prior.owned_models() if needs.owned or needs.cross_prompts else {}
    wanted = (*needs.owned, needs.cross_model) if needs.cross_prompts else needs.owned
    missing = [name for name in wanted if name not in models]
    if missing:
        raise RuntimeError(f"prior '{prior.name}' reads its own model(s) {missing}, which owned_models() does not "
                           "return (attach(policy, reference) builds them before training)")
    owned = {name: model_logits(models[name], batch)[0] for name in needs.owned}
    cross = other_prompt_logps(models[needs.cross_model], batch, needs.cross_prompts, layout, chunk) \
        if needs.cross_prompts else (None, None)
    return build_view(needs, batch["labels"], batch["mask"], logits, reference=ref_logits, snapshot=snap_logits,
                      owned=owned, cached_ref=cached, ref_activations=acts, ref_hidden=states, columns=batch["values"],
                      chunk=chunk, cross_logps=cross[0], cross_mask=cross[1])
