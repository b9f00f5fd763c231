"""Python API for people who bring their own trainer: any variant's loss from your logits or log-probs.

    from midpo_cli.api import prior, loss_from_logits, loss_from_logps
    p = prior("tdpo", beta=0.1, variant=2)
    loss, metrics = loss_from_logits(p, policy_logits, labels, mask, ref_logits=ref_logits)

Layout: index 0 of the leading dimension is the chosen response, 1 the rejected one.
policy_logits/ref_logits [2, B, T, V] aligned with labels [2, B, T] (logits at t predict labels[t]),
mask [2, B, T] = 1 on completion tokens. Per-token log-probs are [2, B, T] with zeros on padding.
"""
from __future__ import annotations

from torch import Tensor

from midpo_cli.engine.logps import token_kl, token_logps
from midpo_cli.loss import mi_dpo_loss, pair_metrics
from midpo_cli.priors import PRIORS, PairView, Prior, build_prior


def prior(name: str, **hyperparameters) -> Prior:
    """A registered prior with the given hyperparameters (the rest at the authors' defaults)."""
    return build_prior({"name": name, **hyperparameters})


def loss(p: Prior, view: PairView) -> tuple[Tensor, dict]:
    """Mean MI-DPO loss (+ the prior's penalty, reported apart) and TRL-named metrics."""
    seq = view.seq(view.logps)
    log_zeta = p.log_prior(view)
    losses = mi_dpo_loss(seq, log_zeta, p.a)
    penalty = p.penalty(view)
    metrics = pair_metrics(seq, log_zeta, p.a, losses) | {"penalty": float(penalty)}
    return losses.mean() + penalty, metrics


def loss_from_logps(p: Prior, logps: Tensor, mask: Tensor, **inputs) -> tuple[Tensor, dict]:
    """From per-token log-probs [2, B, T]; `inputs` are the PairView fields the prior needs
    (ref_logps, kl_ref_pi, kl_pi_ref, ref_activations, snapshot_logps, token_values)."""
    return loss(p, PairView(logps=logps * mask, mask=mask, **inputs))


def loss_from_logits(p: Prior, policy_logits: Tensor, labels: Tensor, mask: Tensor, ref_logits: Tensor | None = None,
                     snapshot_logits: Tensor | None = None, **inputs) -> tuple[Tensor, dict]:
    """From full logits [2, B, T, V]: computes exactly the per-token quantities the prior declares it needs."""
    needs = p.needs()
    flat = lambda x: x.reshape(-1, *x.shape[2:])
    unflat = lambda x: x.reshape(*labels.shape)
    view = PairView(logps=unflat(token_logps(flat(policy_logits), flat(labels))) * mask, mask=mask, **inputs)
    if needs.reference_model and ref_logits is None and not needs.ref_activations:
        raise ValueError(f"prior '{p.name}' needs ref_logits")
    if needs.reference:
        view.ref_logps = unflat(token_logps(flat(ref_logits), flat(labels))) * mask
    if needs.kl_ref_pi:
        view.kl_ref_pi = unflat(token_kl(flat(ref_logits), flat(policy_logits))) * mask
    if needs.kl_pi_ref:
        view.kl_pi_ref = unflat(token_kl(flat(policy_logits), flat(ref_logits))) * mask
    if needs.snapshot:
        if snapshot_logits is None:
            raise ValueError(f"prior '{p.name}' needs snapshot_logits (the earlier policy's logits)")
        view.snapshot_logps = unflat(token_logps(flat(snapshot_logits), flat(labels))) * mask
    return loss(p, view)


__all__ = ["PRIORS", "PairView", "prior", "loss", "loss_from_logps", "loss_from_logits"]
