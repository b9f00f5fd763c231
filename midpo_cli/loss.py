"""The MI-DPO objective (arXiv 2501.01544), written once. Every DPO variant is a prior plugged in here.

    h = a * [(log pi(y_w|x) - log zeta_w) - (log pi(y_l|x) - log zeta_l)]
    J = -log sigmoid(h)

Shapes: B pairs; tensors stacked as [2, B] with index 0 = chosen (y_w), 1 = rejected (y_l).
`preference_loss(prior, view)` is the one place the engine, the Python API, `midpo verify` and the tests
turn a prior and a batch (a PairView) into the loss, the prior's penalty and the logged metrics.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def mi_dpo_logits(policy_logps: Tensor, log_prior: Tensor, a: float) -> Tensor:
    """h per pair [B] from sequence log-probs [2, B] and the prior's log zeta [2, B]."""
    implied = policy_logps - log_prior                                   # [2, B]: log pi/zeta per side
    return a * (implied[0] - implied[1])                                 # [B]


def mi_dpo_loss(policy_logps: Tensor, log_prior: Tensor, a: float) -> Tensor:
    """Per-pair J = -log sigmoid(h), shape [B]."""
    return -F.logsigmoid(mi_dpo_logits(policy_logps, log_prior, a))


@dataclass
class LossOutput:
    loss: Tensor        # mean J over the batch (scalar)
    penalty: Tensor     # the prior's own regularisers, outside the sigmoid (scalar; 0 for most priors)
    metrics: dict       # TRL-named floats (0-d tensors with host=False), see pair_metrics

    @property
    def total(self) -> Tensor:
        """What is differentiated: J + penalty."""
        return self.loss + self.penalty


def preference_loss(prior, view, yardstick: Tensor | None = None, host: bool = True) -> LossOutput:
    """J (batch mean), the prior's penalty and metrics for a PairView.

    yardstick: per-token reference log-probs [2, B, T] (e.g. from the reference cache) for the prior-independent
    `logratio/*` metrics; they never enter the loss, so a prior that does not declare the reference cannot read it.
    host: the metrics as floats (one device-to-host transfer); False leaves them 0-d tensors on the device, for a
    training step that reads all of its metrics in one transfer at its end.
    """
    seq = view.seq(view.logps)                                           # [2, B]
    log_zeta = prior.log_prior(view)                                     # [2, B]
    losses = mi_dpo_loss(seq, log_zeta, prior.a)                         # [B]
    penalty = prior.penalty(view)
    stats = _pair_stats(seq, log_zeta, prior.a, losses)
    stats["penalty"] = penalty.detach()
    ref = view.ref_logps if view.ref_logps is not None else yardstick
    if ref is not None:
        stats.update(_logratio_stats(seq, view.seq(ref), log_zeta))
    stats.update(prior.scalars())
    return LossOutput(losses.mean(), penalty, on_host(stats) if host else stats)


def on_host(stats: dict[str, Tensor | float]) -> dict[str, float]:
    """Scalar tensors -> floats, in one transfer (one host-device synchronisation instead of one per metric);
    values already on the host pass through."""
    held = {k: v for k, v in stats.items() if isinstance(v, Tensor)}
    values = torch.stack([v.detach().double().reshape(()) for v in held.values()]).tolist() if held else []
    read = dict(zip(held, values))
    return {k: read[k] if k in read else float(v) for k, v in stats.items()}


def pair_metrics(policy_logps: Tensor, log_prior: Tensor, a: float, losses: Tensor) -> dict[str, float]:
    """TRL-named metrics; `rewards/*` is the implied reward a*log(pi/zeta) of the prior actually trained;
    `prior/margin` = mean(log zeta_w - log zeta_l), the prior's own preference between the two responses."""
    return on_host(_pair_stats(policy_logps, log_prior, a, losses))


@torch.no_grad()
def _pair_stats(policy_logps: Tensor, log_prior: Tensor, a: float, losses: Tensor) -> dict[str, Tensor]:
    rewards = a * (policy_logps - log_prior).float()                     # [2, B]
    zeta = log_prior.float()
    return {
        "loss": losses.float().mean(),
        "rewards/chosen": rewards[0].mean(),
        "rewards/rejected": rewards[1].mean(),
        "rewards/accuracies": (rewards[0] > rewards[1]).float().mean(),
        "rewards/margins": (rewards[0] - rewards[1]).mean(),
        "logps/chosen": policy_logps[0].float().mean(),
        "logps/rejected": policy_logps[1].float().mean(),
        "prior/margin": (zeta[0] - zeta[1]).mean(),
    }


COMMON_SCALE = 0.1   # a of logratio/loss: J(pi, pi_ref) at DPO's default beta, the same for every prior


def logratio_metrics(policy_logps: Tensor, ref_logps: Tensor, log_prior: Tensor) -> dict[str, float]:
    """Prior-independent yardsticks against the reference, sequence log-probs [2, B] each:
    logratio/chosen, logratio/rejected = mean(log pi - log pi_ref) of each side (both falling while the margin
    grows is likelihood displacement, engine/monitor.py);
    logratio/margins = mean[(log pi - log pi_ref)_w - (log pi - log pi_ref)_l] (the policy's own margin);
    logratio/loss = J(pi, pi_ref) at a = COMMON_SCALE: the policy's J under one fixed prior (DPO's), comparable
    across priors whatever prior or scale each trained with (on held-out pairs: eval/logratio/loss);
    prior/shift = mean[(log zeta - log pi_ref)_w - (log zeta - log pi_ref)_l] (how far the prior's margin
    moved from the reference's; 0 for DPO, and for a learnable prior at initialisation)."""
    return on_host(_logratio_stats(policy_logps, ref_logps, log_prior))


@torch.no_grad()
def _logratio_stats(policy_logps: Tensor, ref_logps: Tensor, log_prior: Tensor) -> dict[str, Tensor]:
    ratio = (policy_logps - ref_logps).float()                           # [2, B]
    shift = (log_prior - ref_logps).float()
    return {"logratio/chosen": ratio[0].mean(),
            "logratio/rejected": ratio[1].mean(),
            "logratio/margins": (ratio[0] - ratio[1]).mean(),
            "logratio/loss": mi_dpo_loss(ratio, torch.zeros_like(ratio), COMMON_SCALE).mean(),
            "logratio/accuracies": (ratio[0] > ratio[1]).float().mean(),
            "prior/shift": (shift[0] - shift[1]).mean()}
