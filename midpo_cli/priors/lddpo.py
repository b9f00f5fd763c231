"""LD-DPO (length desensitisation, arXiv:2409.06411), as TRL's DPOConfig.ld_alpha computes it: the tokens of
the longer response past the shorter one's length count ld_alpha times, for policy and reference alike."""
import torch.nn.functional as F
from torch import Tensor

from midpo_cli.priors import Needs, PairView, Prior, Reduction, register_prior


def tail(v: PairView) -> Tensor:
    """[2, B, T] 1.0 on completion tokens past min(|y_w|, |y_l|) of their pair (only the longer side has any)."""
    position = v.mask.cumsum(-1) * v.mask                                  # 1, 2, ... on completion tokens
    shared = v.lengths.min(0).values                                       # [B]
    return (position > shared[None, :, None]).to(v.mask.dtype) * v.mask


@register_prior("lddpo")
class LDDPO(Prior):
    """Original: -logsigmoid(beta*[(ld(log pi_w) - ld(log pi_ref_w)) - (ld(log pi_l) - ld(log pi_ref_l))]), where
              ld(x) = sum over the shared tokens of x + ld_alpha * sum over the tail tokens of x.
    Prior:    log zeta(y) = (1 - ld_alpha) * tail(log pi(y|x)) + ld(log pi_ref(y|x)), a = beta: then
              a*log(pi/zeta) = beta*(ld(log pi) - ld(log pi_ref)). The gradient flows through pi inside zeta.
              ld_alpha = 1 is DPO.
    """
    beta: float = 0.1       # TRL's DPOConfig default
    ld_alpha: float = 0.5   # weight of the longer response's tail; 1 = DPO, 0 = only the shared length counts

    reductions = (Reduction({"ld_alpha": 1.0}, {"name": "dpo", "beta": 0.1}),)

    def needs(self) -> Needs:
        return Needs(reference=True)

    def _ld(self, v: PairView, x: Tensor) -> Tensor:
        return v.seq(x) - (1 - self.ld_alpha) * (x * tail(v)).sum(-1)

    def log_prior(self, v: PairView) -> Tensor:
        return (1 - self.ld_alpha) * (v.logps * tail(v)).sum(-1) + self._ld(v, v.require("ref_logps"))

    def stop_gradient_variants(self) -> dict:
        return {"zeta detached": lambda v: self.log_prior(v).detach()}   # the gradient must flow through pi in zeta

    def original_loss(self, v: PairView) -> Tensor:
        position = v.mask.cumsum(-1)                                       # TRL's comp_pos, written out again
        shared = v.mask.sum(-1).min(0).values[None, :, None]
        shared_mask = ((position > 0) & (position <= shared)) * v.mask
        tail_mask = (position > shared) * v.mask

        def ld(x: Tensor) -> Tensor:
            return (x * shared_mask).sum(-1) + self.ld_alpha * (x * tail_mask).sum(-1)

        logits = (ld(v.logps) - ld(v.ref_logps))                           # [2, B]
        return -F.logsigmoid(self.beta * (logits[0] - logits[1]))
