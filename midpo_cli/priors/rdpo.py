"""R-DPO (Park, Rafailov, Ermon, Finn, Findings ACL 2024, arXiv:2403.19159): DPO with a length term."""
from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from midpo_cli.priors import Needs, PairView, Prior, Reduction, register_prior


@register_prior("rdpo")
class RDPO(Prior):
    """Original: -logsigmoid(beta*(dlogp_w - dlogp_l) + s*alpha*(|y_w| - |y_l|)), dlogp = log pi - log pi_ref,
    s = +1 for sign "+" (derived from r - alpha|y|, the default; docs/priors.md, Conventions) and -1 for "-" (RainbowPO table).
    Prior:    log zeta(y) = log pi_ref(y|x) - s*(alpha/beta)*|y| on both sides; a = beta. alpha = 0 is DPO.
    """
    beta: float = 0.1      # DPO-like scale
    alpha: float = 0.01    # length coefficient per token (no official code; tune per dataset)
    sign: Literal["+", "-"] = "+"   # sign convention of the length term: docs/priors.md, Conventions

    options = ({"sign": "+"}, {"sign": "-"})
    reductions = tuple(Reduction({"alpha": 0.0, "sign": s}, {"name": "dpo", "beta": 0.1}) for s in ("+", "-"))

    @property
    def s(self) -> float:
        return 1.0 if self.sign == "+" else -1.0

    def needs(self) -> Needs:
        return Needs(reference=True)

    def log_prior(self, v: PairView) -> Tensor:
        return v.seq(v.require("ref_logps")) - self.s * self.alpha / self.beta * v.lengths

    def original_loss(self, v: PairView) -> Tensor:
        d = v.seq(v.logps) - v.seq(v.ref_logps)                            # [2, B]
        n = v.mask.sum(-1)
        return -F.logsigmoid(self.beta * (d[0] - d[1]) + self.s * self.alpha * (n[0] - n[1]))
