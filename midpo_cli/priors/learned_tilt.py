"""learned_tilt (P2, our design: docs/learnable_priors.md): an exponential length tilt of the reference, learned."""
import math

import torch
from torch import Tensor

from midpo_cli.priors import Needs, PairView, register_prior
from midpo_cli.priors.learnable import LearnablePrior


@register_prior("learned_tilt")
class LearnedTilt(LearnablePrior):
    """Prior:    log zeta(y|x) = log pi_ref(y|x) - phi_1*|y| - phi_2*log|y|  (- log Z_phi(x), which cancels in h),
              phi_i = c_i * tanh(raw_i), raw = 0 at initialisation (exact DPO); same on both sides; a = beta.
              init_len starts phi_1 elsewhere: the run then starts as R-DPO with alpha = init_len * beta (and with
              update=frozen stays there: a grid of fixed tilts in phi_1 itself).
    Original: R-DPO with a learned length coefficient: -logsigmoid(beta*[(d_w - d_l) + phi_1*(|y_w| - |y_l|)
              + phi_2*(log|y_w| - log|y_l|)]), d = log pi - log pi_ref; phi_1 = alpha_R/beta is R-DPO exactly.
    dJ/dphi_1 = -a*sigma(-h)*(|y_w| - |y_l|): under update=joint it explains away a length difference that correlates
    with the labels (debiasing, and the collapse direction on a length-biased annotator); the tanh bounds cap it.
    The anchor is here a quadratic form in phi (the phi^2 penalty), weighted by the data's lengths.
    """
    bound_len: float = 0.5       # c_1: |phi_1| <= c_1 nats per token (R-DPO alpha/beta = 0.1 at its defaults)
    bound_loglen: float = 2.0    # c_2: |phi_2| <= c_2 nats per unit of log|y|
    init_len: float = 0.0        # phi_1 at step 0 (0: DPO; else R-DPO with alpha = init_len*beta); |init_len| < c_1

    options = (*LearnablePrior.options, {"update": "frozen", "init_len": 0.2})   # verify: starts as R-DPO, stays

    def __post_init__(self):
        super().__post_init__()
        start = math.atanh(self.init_len / self.bound_len) if abs(self.init_len) < self.bound_len else 0.0
        self.raw = torch.nn.Parameter(torch.tensor([start, 0.0], dtype=torch.float64))   # [2]: (raw_1, raw_2); float64:
                                                                         # phi_1 = init_len to 1e-17, not 1e-8

    def validate(self) -> None:
        super().validate()
        if self.bound_len <= 0 or self.bound_loglen <= 0:
            raise ValueError(f"prior.bound_len={self.bound_len} and prior.bound_loglen={self.bound_loglen} must be > 0")
        if not abs(self.init_len) < self.bound_len:
            raise ValueError(f"prior.init_len={self.init_len} must lie strictly inside +-prior.bound_len="
                             f"{self.bound_len} (phi_1 = bound_len * tanh(raw)): raise prior.bound_len")

    def initial_equivalent(self) -> dict:
        """DPO, or R-DPO with alpha = init_len * beta when the tilt starts off 0."""
        if self.init_len == 0:
            return super().initial_equivalent()
        return {"name": "rdpo", "beta": self.beta, "alpha": self.init_len * self.beta}

    def needs(self) -> Needs:
        return Needs(reference=True)

    def phi(self) -> Tensor:
        return torch.stack([self.bound_len * torch.tanh(self.raw[0]), self.bound_loglen * torch.tanh(self.raw[1])])

    def log_zeta(self, v: PairView) -> Tensor:
        phi, n = self.phi().to(v.logps.dtype), v.lengths                        # [2], [2, B]
        return v.seq(v.require("ref_logps")) - phi[0] * n - phi[1] * n.log()

    def original_loss(self, v: PairView) -> Tensor:
        d = v.seq(v.logps) - v.seq(v.ref_logps)                                  # [2, B]
        n = v.mask.sum(-1)
        phi_1 = self.bound_len * torch.tanh(self.raw[0])
        phi_2 = self.bound_loglen * torch.tanh(self.raw[1])
        length_term = phi_1 * (n[0] - n[1]) + phi_2 * (torch.log(n[0]) - torch.log(n[1]))
        return -torch.nn.functional.logsigmoid(self.beta * ((d[0] - d[1]) + length_term))

    def scalars(self) -> dict:
        phi = self.phi().detach()
        return {**super().scalars(), "prior/phi_len": phi[0], "prior/phi_loglen": phi[1]}
