"""One concatenated forward for chosen and rejected, then exactly the inputs the prior declared it needs."""
from __future__ import annotations

import torch

from midpo_cli.engine.logps import to_pairs, token_kl, token_logps
from midpo_cli.priors import Needs, PairView


def _run(model, batch, hidden: bool = False):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 output_hidden_states=hidden, use_cache=False)


def pair_view(batch: dict, policy, needs: Needs, reference=None, snapshot=None, chunk: int = 8) -> PairView:
    """Build the PairView of a collated batch (on the right device). Only the policy carries gradient."""
    labels, mask = batch["labels"], batch["mask"]                          # [2B, T]
    logits = _run(policy, batch).logits[:, :-1]                            # [2B, T, V], model dtype
    view = PairView(logps=to_pairs(token_logps(logits, labels, chunk) * mask), mask=to_pairs(mask))
    if needs.reference_model:
        if reference is None:
            raise RuntimeError("the prior needs the reference model, but none was loaded")
        with torch.no_grad():
            out = _run(reference, batch, hidden=needs.ref_activations)
        ref_logits = out.logits[:, :-1]
        if needs.reference:
            view.ref_logps = to_pairs(token_logps(ref_logits, labels, chunk) * mask)
        if needs.kl_ref_pi:
            view.kl_ref_pi = to_pairs(token_kl(ref_logits, logits, chunk) * mask)
        if needs.kl_pi_ref:
            view.kl_pi_ref = to_pairs(token_kl(logits, ref_logits, chunk) * mask)
        if needs.ref_activations:                                          # mean activation per layer, at y_t
            acts = torch.stack([h.float().mean(-1) for h in out.hidden_states[1:]], -1)[:, 1:]
            view.ref_activations = to_pairs(acts)                          # [2, B, T, L]
        del out, ref_logits
    if needs.snapshot:
        with torch.no_grad():
            snap_logits = _run(snapshot, batch).logits[:, :-1]
            view.snapshot_logps = to_pairs(token_logps(snap_logits, labels, chunk) * mask)
    for name in needs.token_columns:
        view.token_values[name] = to_pairs(batch["values"][name])
    return view
