"""SimPO (Meng, Xia, Chen, NeurIPS 2024, arXiv:2405.14734): reference-free, length-normalised, margin."""
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from midpo_cli.priors import PairView, Prior, Reduction, register_prior


@register_prior("simpo")
class SimPO(Prior):
    """Original: -logsigmoid((beta/|y_w|) log pi_w - (beta/|y_l|) log pi_l - gamma_abs).
    Prior:    log zeta_w = (1 - 1/|y_w|) log pi(y_w|x) + gamma_abs/beta,
              log zeta_l = (1 - 1/|y_l|) log pi(y_l|x);  a = beta.
    The gradient flows through pi inside zeta (no stop-gradient). gamma = 0 gives reference-free,
    length-averaged DPO. gamma_convention: "ratio" = SimPO repo's gamma_beta_ratio (gamma_abs =
    beta*gamma); "absolute" = TRL CPO's simpo_gamma (gamma_abs = gamma).
    """
    beta: float = 2.0                  # SimPO code default 2.0 (paper 2.0-2.5; 10 for later Llama-3/Gemma-2)
    gamma: float = 0.25                # margin, read per gamma_convention; code default gamma_beta_ratio 0.25
    gamma_convention: Literal["ratio", "absolute"] = "ratio"   # SimPO repo's gamma_beta_ratio | TRL's simpo_gamma

    options = ({"gamma_convention": "ratio"}, {"gamma_convention": "absolute"})
    reductions = (Reduction({"gamma": 0.0, "beta": 2.0}, {"name": "dpo", "beta": 2.0},
                            other_view="length_averaged_reference_free",
                            note="reference-free, on length-averaged log-probs"),)
    typical_beta = (1.0, 20.0)

    @property
    def gamma_abs(self) -> float:
        return self.beta * self.gamma if self.gamma_convention == "ratio" else self.gamma

    def log_prior(self, v: PairView) -> Tensor:
        seq = v.seq(v.logps)                                               # [2, B]
        margin = torch.tensor([self.gamma_abs / self.beta, 0.0], dtype=seq.dtype, device=seq.device)
        return (1 - 1 / v.lengths) * seq + margin[:, None]

    def stop_gradient_variants(self) -> dict:
        return {"zeta detached": lambda v: self.log_prior(v).detach()}   # the gradient must flow through pi in zeta

    def original_loss(self, v: PairView) -> Tensor:
        avg = v.seq(v.logps) / v.mask.sum(-1)                              # get_batch_logps(average_log_prob=True)
        logits = (avg[0] - avg[1]) - self.gamma_abs / self.beta           # simpo_loss: pi_logratios - gamma_beta_ratio
        return -F.logsigmoid(self.beta * logits)

    def warnings(self) -> list[str]:
        if self.beta < 1.0:
            return [f"SimPO with beta={self.beta}: SimPO's length-averaged rewards need beta 2-10 "
                    "(paper); DPO-style beta=0.1 is known to produce gibberish (LLaMA-Factory #5181)."]
        return super().warnings()
