"""cEntropy / H-DPO (Omura et al., arXiv:2411.07595): DPO with a controllable entropy weight."""
from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from midpo_cli.priors import Needs, PairView, Prior, Reduction, register_prior


@register_prior("hdpo")
class HDPO(Prior):
    """Original: -logsigmoid(alpha*beta*(log pi_w - log pi_l) - beta*(log pi_ref_w - log pi_ref_l)).
    Prior, form "fixed":  a = alpha*beta, log zeta = log pi_ref / alpha (pi-independent, unnormalised).
    Prior, form "policy": a = beta, log zeta = (1 - alpha) log pi + log pi_ref (gradient through pi).
    alpha = 1 is DPO; alpha < 1 sharpens the optimal policy (lower entropy).
    """
    beta: float = 0.1      # DPO-like scale
    alpha: float = 0.9     # entropy weight alpha_H; 1.0 = DPO (no official code; paper uses < 1)
    form: Literal["fixed", "policy"] = "fixed"    # which exact prior expresses it

    options = ({"form": "fixed"}, {"form": "policy"})
    reductions = tuple(Reduction({"alpha": 1.0, "form": f}, {"name": "dpo", "beta": 0.1}) for f in ("fixed", "policy"))

    @property
    def a(self) -> float:
        return self.alpha * self.beta if self.form == "fixed" else self.beta

    def validate(self) -> None:
        if self.alpha <= 0:
            raise ValueError(f"prior.alpha={self.alpha} must be > 0")

    def needs(self) -> Needs:
        return Needs(reference=True)

    def log_prior(self, v: PairView) -> Tensor:
        ref = v.seq(v.require("ref_logps"))
        return ref / self.alpha if self.form == "fixed" else (1 - self.alpha) * v.seq(v.logps) + ref

    def original_loss(self, v: PairView) -> Tensor:
        pi, ref = v.seq(v.logps), v.seq(v.ref_logps)
        return -F.logsigmoid(self.alpha * self.beta * (pi[0] - pi[1]) - self.beta * (ref[0] - ref[1]))
