"""learned_tilt (P2, our design: docs/learnable_priors.md): an exponential length tilt of the reference, learned."""
import torch
from torch import Tensor

from midpo_cli.priors import Needs, PairView, register_prior
from midpo_cli.priors.learnable import LearnablePrior


@register_prior("learned_tilt")
class LearnedTilt(LearnablePrior):
    """Prior:    log zeta(y|x) = log pi_ref(y|x) - phi_1*|y| - phi_2*log|y|  (- log Z_phi(x), which cancels in h),
              phi_i = c_i * tanh(raw_i), raw = 0 at initialisation (exact DPO); same on both sides; a = beta.
    Original: R-DPO with a learned length coefficient: -logsigmoid(beta*[(d_w - d_l) + phi_1*(|y_w| - |y_l|)
              + phi_2*(log|y_w| - log|y_l|)]), d = log pi - log pi_ref; phi_1 = alpha_R/beta is R-DPO exactly.
    dJ/dphi_1 = -a*sigma(-h)*(|y_w| - |y_l|): under update=joint it explains away a length difference that correlates
    with the labels (debiasing, and the collapse direction on a length-biased annotator); the tanh bounds cap it.
    The anchor is here a quadratic form in phi (the phi^2 penalty), weighted by the data's lengths.
    """
    bound_len: float = 0.5       # c_1: |phi_1| <= c_1 nats per token (R-DPO alpha/beta = 0.1 at its defaults)
    bound_loglen: float = 2.0    # c_2: |phi_2| <= c_2 nats per unit of log|y|

    def __post_init__(self):
        super().__post_init__()
        self.raw = torch.nn.Parameter(torch.zeros(2))                            # [2]: (raw_1, raw_2)

    def needs(self) -> Needs:
        return Needs(reference=True)

    def phi(self) -> Tensor:
        return torch.stack([self.bound_len * torch.tanh(self.raw[0]), self.bound_loglen * torch.tanh(self.raw[1])])

    def log_zeta(self, v: PairView) -> Tensor:
        phi, n = self.phi(), v.lengths                                           # [2], [2, B]
        return v.seq(v.require("ref_logps")) - phi[0] * n - phi[1] * n.log()

    def original_loss(self, v: PairView) -> Tensor:
        d = v.seq(v.logps) - v.seq(v.ref_logps)                                  # [2, B]
        n = v.mask.sum(-1)
        phi_1 = self.bound_len * torch.tanh(self.raw[0])
        phi_2 = self.bound_loglen * torch.tanh(self.raw[1])
        length_term = phi_1 * (n[0] - n[1]) + phi_2 * (torch.log(n[0]) - torch.log(n[1]))
        return -torch.nn.functional.logsigmoid(self.beta * ((d[0] - d[1]) + length_term))

    def scalars(self) -> dict[str, float]:
        phi = self.phi().detach()
        return {"prior/phi_len": float(phi[0]), "prior/phi_loglen": float(phi[1])}
