"""Length-normalised DPO: TRL's DPOTrainer with loss_type="sigmoid_norm" (DPO's log-ratios averaged per token)."""
import torch.nn.functional as F
from torch import Tensor

from midpo_cli.priors import Needs, PairView, Prior, register_prior


@register_prior("dpo_norm")
class DPONorm(Prior):
    """Original: -logsigmoid(beta*[(log pi_w - log pi_ref_w)/|y_w| - (log pi_l - log pi_ref_l)/|y_l|]).
    Prior:    log zeta(y) = (1 - 1/|y|) log pi(y|x) + log pi_ref(y|x)/|y| on both sides, a = beta: then
              a*log(pi/zeta) = beta*(log pi - log pi_ref)/|y|. The gradient flows through pi inside zeta
              (no stop-gradient), as in SimPO; a one-token response is DPO's.
    """
    beta: float = 0.1     # TRL's DPOConfig default

    def needs(self) -> Needs:
        return Needs(reference=True)

    def log_prior(self, v: PairView) -> Tensor:
        n = v.lengths
        return (1 - 1 / n) * v.seq(v.logps) + v.seq(v.require("ref_logps")) / n

    def stop_gradient_variants(self) -> dict:
        return {"zeta detached": lambda v: self.log_prior(v).detach()}   # the gradient must flow through pi in zeta

    def original_loss(self, v: PairView) -> Tensor:
        n = v.mask.sum(-1).clamp(min=1.0)                                  # TRL: completion_mask.sum().clamp(min=1)
        avg = (v.seq(v.logps) - v.seq(v.ref_logps)) / n                    # chosen/rejected_scores / length
        return -F.logsigmoid(self.beta * (avg[0] - avg[1]))
