"""Python API for people who bring their own trainer: any variant's loss from your logits or log-probs, and
the per-token log-probs the engine trains on (completion_logps).

    from midpo_cli.api import prior, loss_from_logits, loss_from_logps
    p = prior("tdpo", beta=0.1, variant=2)
    loss, metrics = loss_from_logits(p, policy_logits, labels, mask, ref_logits=ref_logits)

Layout: index 0 of the leading dimension is the chosen response, 1 the rejected one.
policy_logits/ref_logits [2, B, T, V] aligned with labels [2, B, T] (logits at t predict labels[t]),
mask [2, B, T] = 1 on completion tokens. Per-token log-probs are [2, B, T] with zeros on padding.
"""
from __future__ import annotations

import torch
from torch import Tensor

from midpo_cli.engine.forward import model_logits
from midpo_cli.engine.logps import token_logps
from midpo_cli.engine.views import build_view
from midpo_cli.loss import preference_loss
from midpo_cli.priors import PRIORS, PairView, Prior, build_prior


def prior(name: str, **hyperparameters) -> Prior:
    """A registered prior with the given hyperparameters (the rest at the authors' defaults)."""
    return build_prior({"name": name, **hyperparameters})


def loss(p: Prior, view: PairView) -> tuple[Tensor, dict]:
    """Mean MI-DPO loss + the prior's penalty (also reported apart, as `penalty`) and TRL-named metrics."""
    out = preference_loss(p, view)
    return out.total, out.metrics


def loss_from_logps(p: Prior, logps: Tensor, mask: Tensor, **inputs) -> tuple[Tensor, dict]:
    """From per-token log-probs [2, B, T]; `inputs` are the PairView fields the prior needs
    (ref_logps, kl_ref_pi, kl_pi_ref, ref_activations, ref_hidden, snapshot_logps, token_values, owned_logps,
    cross_logps, cross_mask)."""
    return loss(p, PairView(logps=logps * mask, mask=mask, **inputs))


def loss_from_logits(p: Prior, policy_logits: Tensor, labels: Tensor, mask: Tensor, ref_logits: Tensor | None = None,
                     snapshot_logits: Tensor | None = None, ref_activations: Tensor | None = None,
                     ref_hidden: Tensor | None = None, token_values: dict[str, Tensor] | None = None,
                     owned_logits: dict[str, Tensor] | None = None, cross_logps: Tensor | None = None,
                     cross_mask: Tensor | None = None) -> tuple[Tensor, dict]:
    """From full logits [2, B, T, V]: the engine's view builder computes exactly the per-token quantities the
    prior declares it needs (ref_activations [2, B, T, L], ref_hidden [2, B, T, L, H], token_values name -> [2, B, T],
    owned_logits: name -> [2, B, T, V] logits of the models a learnable prior owns; cross_logps [2, B, K]: each
    response's sequence log-prob after K other prompts of the batch under the prior's Needs.cross_model, with
    cross_mask [2, B, K] (1 = usable; default all), e.g. learned_marginal)."""
    flat = lambda x: None if x is None else x.reshape(-1, *x.shape[2:])
    view = build_view(p.needs(), flat(labels), flat(mask), flat(policy_logits), reference=flat(ref_logits),
                      snapshot=flat(snapshot_logits), ref_activations=flat(ref_activations), ref_hidden=flat(ref_hidden),
                      owned={k: flat(v) for k, v in (owned_logits or {}).items()},
                      columns={k: flat(v) for k, v in (token_values or {}).items()}, cross_logps=cross_logps,
                      cross_mask=cross_mask)
    return loss(p, view)


def completion_logps(model, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, chunk: int = 0) -> Tensor:
    """Per-token log-probs exactly as the engine trains on them (the same forward and chunked LM head).

    input_ids, attention_mask [N, S]; labels [N, S] as in transformers: a copy of input_ids with -100 on
    the tokens not scored (prompt, padding). Returns [N, S-1] fp32, with gradient into the model:
    out[:, t] = log p(labels[:, t+1] | input_ids[:, :t+1]) (the logits at position t predict token t+1),
    and 0 where labels[:, t+1] == -100. Sum over t for log p(completion | prompt). `chunk`: rows per chunk
    of the LM head (0 = automatic, about 512 MB of fp32 logits).
    """
    if labels.shape != input_ids.shape:
        raise ValueError(f"completion_logps: labels {tuple(labels.shape)} must have input_ids' shape "
                         f"{tuple(input_ids.shape)} (a copy of input_ids with -100 on tokens not scored)")
    targets = labels[:, 1:]                                                # [N, S-1]
    scored = targets != -100
    source, _ = model_logits(model, {"input_ids": input_ids, "attention_mask": attention_mask})
    logps = token_logps(source, targets.masked_fill(~scored, 0), chunk)   # [N, S-1]
    return torch.where(scored, logps, torch.zeros_like(logps))


__all__ = ["PRIORS", "PairView", "prior", "loss", "loss_from_logps", "loss_from_logits", "completion_logps"]
