"""The one view builder: from logits (or chunked LM-head sources) to the PairView a prior reads.

The engine (engine/forward.py: from a batch and the models), the Python API (from the caller's logits) and
`midpo verify` (from probe logits) all build their views here, so a prior sees the same inputs everywhere.
Exactly what the prior's `needs()` declares is computed; an undeclared input stays None and reading it is
an error (PairView.require). N = 2B rows (chosen rows, then rejected), T label positions, V vocabulary.
"""
from __future__ import annotations

import torch
from torch import Tensor

from midpo_cli.engine.logps import Head, Selected, to_pairs, token_kl, token_logps
from midpo_cli.priors import Needs, PairView

Source = Tensor | Head | Selected  # logits [N, T, V] aligned with labels, final hidden states + LM head, or a packed
                                   # forward's completion positions (engine/pack.py)


def build_view(needs: Needs, labels: Tensor, mask: Tensor, policy: Source, *, reference: Source | None = None,
               snapshot: Source | None = None, owned: dict[str, Source] | None = None,
               cached_ref: Tensor | None = None, ref_activations: Tensor | None = None,
               ref_hidden: Tensor | None = None, columns: dict[str, Tensor] | None = None,
               chunk: int = 0, cross_logps: Tensor | None = None, cross_mask: Tensor | None = None) -> PairView:
    """labels, mask [N, T]; policy/reference/snapshot/owned: logits sources over the same rows and positions;
    cached_ref [N, T] per-token reference log-probs (replaces the reference's gathered log-probs);
    ref_activations [N, T, L]; ref_hidden [N, T, L, H]; columns: name -> [N, T] per-token data values;
    cross_logps, cross_mask [2, B, K]: responses scored after other prompts of the batch (engine/cross.py), mask
    default all usable. Returns [2, B, ...] fields."""
    pairs = lambda x: to_pairs(x * mask)                                   # [N, T] -> [2, B, T], zero on padding
    view = PairView(logps=pairs(token_logps(policy, labels, chunk)), mask=to_pairs(mask))
    want_ref = needs.reference or needs.snapshot == "reference"
    if want_ref and cached_ref is not None:
        ref_logps = pairs(cached_ref)
    elif want_ref:
        ref_logps = pairs(token_logps(_required(reference, "reference"), labels, chunk))
    if needs.reference:
        view.ref_logps = ref_logps
    if needs.snapshot == "reference":
        view.snapshot_logps = ref_logps
    elif needs.snapshot:
        view.snapshot_logps = pairs(token_logps(_required(snapshot, "snapshot"), labels, chunk))
    if needs.kl_ref_pi:
        view.kl_ref_pi = pairs(token_kl(_required(reference, "reference"), policy, chunk))
    if needs.kl_pi_ref:
        view.kl_pi_ref = pairs(token_kl(policy, _required(reference, "reference"), chunk))
    if needs.ref_activations:
        view.ref_activations = to_pairs(_required(ref_activations, "reference activations") * mask[..., None])
    if needs.ref_hidden:
        view.ref_hidden = to_pairs(_required(ref_hidden, "reference hidden states") * mask[..., None, None])
    if needs.tokens:
        view.tokens = to_pairs(torch.where(mask > 0, labels, torch.zeros_like(labels)).long())
        view.vocab_size = vocabulary(policy)
    for name in needs.token_columns:
        if columns is None or name not in columns:
            raise ValueError(f"this prior needs the per-token data column '{name}' (chosen_{name} / "
                             f"rejected_{name}); the batch carries {sorted(columns or {}) or 'none'}")
        view.token_values[name] = pairs(columns[name])
    for name, source in (owned or {}).items():
        view.owned_logps[name] = pairs(token_logps(source, labels, chunk))
    if needs.cross_prompts:
        if cross_logps is None:
            raise ValueError("the prior needs its responses scored after other prompts of the batch (cross_logps "
                             "[2, B, K], Needs.cross_prompts), but none were given")
        view.cross_logps = cross_logps
        view.cross_mask = torch.ones_like(cross_logps) if cross_mask is None else cross_mask
    return view


def vocabulary(source: Source) -> int:
    """V of a logits source: the logits' last dimension, or the LM head's rows."""
    if isinstance(source, Selected):
        source = source.source
    if isinstance(source, Head):
        return int(source.weight.shape[0] if source.weight is not None else source.states.shape[-1])
    return int(source.shape[-1])


def _required(x, what: str):
    if x is None:
        raise ValueError(f"the prior needs the {what} model's outputs, but none were given")
    return x


def live_reference(needs: Needs, cached: bool) -> bool:
    """Whether the reference model must run on each batch (full-vocabulary, activation or hidden-state inputs, or no
    cache)."""
    return needs.kl_ref_pi or needs.kl_pi_ref or needs.ref_activations or needs.ref_hidden or (
        (needs.reference or needs.snapshot == "reference") and not cached)


@torch.no_grad()
def layer_means(hidden_states: tuple[Tensor, ...]) -> Tensor:
    """Mean activation per layer at each label position: hidden states [N, S, H] per layer -> [N, S-1, L]
    (position t+1, the token y_t itself, as MaPO's hooks see it)."""
    return torch.stack([h.float().mean(-1) for h in hidden_states[1:]], -1)[:, 1:]


@torch.no_grad()
def layer_states(hidden_states: tuple[Tensor, ...]) -> Tensor:
    """Every layer's hidden states at each label position, aligned as layer_means: [N, S, H] per layer ->
    [N, S-1, L, H] in float32 (position t+1, the token y_t itself)."""
    return torch.stack([h.float() for h in hidden_states[1:]], -2)[:, 1:]
