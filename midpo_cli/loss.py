"""The MI-DPO objective (arXiv 2501.01544), written once. Every DPO variant is a prior plugged in here.

    h = a * [(log pi(y_w|x) - log zeta_w) - (log pi(y_l|x) - log zeta_l)]
    J = -log sigmoid(h)

Shapes: B pairs; tensors stacked as [2, B] with index 0 = chosen (y_w), 1 = rejected (y_l).
"""
from __future__ import annotations

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


@torch.no_grad()
def pair_metrics(policy_logps: Tensor, log_prior: Tensor, a: float, losses: Tensor) -> dict[str, float]:
    """TRL-named metrics; `rewards/*` is the implied reward a*log(pi/zeta) of the prior actually trained."""
    rewards = a * (policy_logps - log_prior).float()                     # [2, B]
    return {
        "loss": losses.float().mean().item(),
        "rewards/chosen": rewards[0].mean().item(),
        "rewards/rejected": rewards[1].mean().item(),
        "rewards/accuracies": (rewards[0] > rewards[1]).float().mean().item(),
        "rewards/margins": (rewards[0] - rewards[1]).mean().item(),
        "logps/chosen": policy_logps[0].float().mean().item(),
        "logps/rejected": policy_logps[1].float().mean().item(),
    }
