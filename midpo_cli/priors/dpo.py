"""DPO (Rafailov et al., NeurIPS 2023, arXiv:2305.18290)."""
import torch.nn.functional as F
from torch import Tensor

from midpo_cli.priors import Needs, PairView, Prior, register_prior


@register_prior("dpo")
class DPO(Prior):
    """Original: -logsigmoid(beta*[(log pi_w - log pi_ref_w) - (log pi_l - log pi_ref_l)]).
    Prior:    log zeta(y) = log pi_ref(y|x) on both sides, a = beta. Symmetric, fixed, normalised.
    """
    beta: float = 0.1     # reward scale; authors' examples and TRL default 0.1

    def needs(self) -> Needs:
        return Needs(reference=True)

    def log_prior(self, v: PairView) -> Tensor:
        return v.seq(v.require("ref_logps"))                               # [2, B]

    def original_loss(self, v: PairView) -> Tensor:
        pi_logratios = v.seq(v.logps)[0] - v.seq(v.logps)[1]              # eric-mitchell preference_loss
        ref_logratios = v.seq(v.ref_logps)[0] - v.seq(v.ref_logps)[1]
        return -F.logsigmoid(self.beta * (pi_logratios - ref_logratios))
