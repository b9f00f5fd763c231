"""DICE (Chen et al., ICLR 2025, arXiv:2406.09760): DPO whose reference is the previous iteration's policy."""
import torch.nn.functional as F
from torch import Tensor

from midpo_cli.priors import Needs, PairView, Prior, register_prior


@register_prior("dice")
class DICE(Prior):
    """Original (iteration t): -logsigmoid(beta*[log(pi/pi_{t-1})_w - log(pi/pi_{t-1})_l]).
    Prior:    log zeta(y) = log pi_{t-1}(y|x), a frozen snapshot of an earlier policy; a = beta.
    The data side of DICE (sampling, implicit-reward scoring, length-regularised pairing, replay)
    acts on the pairs, not on zeta. snapshot="reference" uses the reference model as pi_{t-1}.
    """
    beta: float = 0.1              # DICE scripts: dpo_beta 0.1
    snapshot: str = "reference"    # "reference" or a model path/name holding pi_{t-1}

    def needs(self) -> Needs:
        return Needs(snapshot=self.snapshot)

    def log_prior(self, v: PairView) -> Tensor:
        return v.seq(v.require("snapshot_logps"))

    def original_loss(self, v: PairView) -> Tensor:
        d = v.seq(v.logps - v.snapshot_logps)                              # [2, B]
        return -F.logsigmoid(self.beta * (d[0] - d[1]))
