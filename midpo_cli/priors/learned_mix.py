"""learned_mix (P3, our design: docs/learnable_priors.md): per-token mixture of the reference and a lagged policy."""
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from midpo_cli.priors import Needs, PairView, Reduction, register_prior
from midpo_cli.priors.learnable import LearnablePrior
from midpo_cli.priors.sparsepo import zn_rescale


@register_prior("learned_mix")
class LearnedMix(LearnablePrior):
    """Prior:    log zeta(y|x) = sum_t log( lam_t * pi_ref(y_t|s_t) + (1 - lam_t) * pi_snap(y_t|s_t) ), a = beta,
              lam_t = sigmoid(g_t); gate=scalar: g_t = b | gate=token: g_t = b + w * m_t, m_t = MaPO's feature of the
              reference's activations (zn_rescale, mean over layers; SparsePO's masks). b = gate_init, w = 0 at start.
    An arithmetic mixture of two normalised next-token distributions: normalised per token, no partition to cancel,
    and zeta stays in the convex hull of the two models (bounded collapse). pi_snap is a frozen copy of the policy
    taken at `attach` (the policy then equals the reference, so zeta = pi_ref exactly at step 0 whatever lam is),
    refreshed every sync_every steps as TR-DPO does (TRL sync_ref_model): snap <- mixup*pi + (1-mixup)*snap.
    It lags the policy (snap = pi would make log(pi/zeta) -> 0 as lam -> 0 and stall learning) and is checkpointed.
    Original: -logsigmoid(beta*[(log pi - log zeta)_w - (...)_l]) with the mixture written with probabilities.
    """
    gate: Literal["scalar", "token"] = "scalar"   # scalar: one lam | token: lam_t from the reference's activations
    gate_init: float = 6.0       # b at start: lam = sigmoid(6) = 0.9975 (lam ~ 1: mostly the reference)
    sync_every: int = 20         # steps between snapshot refreshes (TRL ref_model_sync_steps: 512 on real runs)
    mixup: float = 0.6           # snapshot <- mixup*policy + (1-mixup)*snapshot (TRL ref_model_mixup_alpha: 0.6)

    options = ({"update": "joint"}, {"update": "tracking"}, {"update": "joint", "gate": "token"})
    policy_copy = "snapshot"
    loss_knobs = ("anchor", "gate_init")
    reductions = (Reduction({"gate_init": 40.0}, {"name": "dpo", "beta": 0.1}, note="(lam = sigmoid(40) = 1)"),)

    def __post_init__(self):
        super().__post_init__()
        self.bias = torch.nn.Parameter(torch.tensor(float(self.gate_init)))     # b
        self.weight = torch.nn.Parameter(torch.zeros(()), requires_grad=self.gate == "token")   # w

    def validate(self) -> None:
        super().validate()
        if self.sync_every < 1 or not 0 < self.mixup <= 1:
            raise ValueError(f"prior.sync_every={self.sync_every} must be >= 1 and prior.mixup={self.mixup} in (0, 1]")

    def needs(self) -> Needs:
        return Needs(reference=True, ref_activations=self.gate == "token", owned=("snapshot",))

    def gate_logits(self, v: PairView) -> Tensor:
        """g: a scalar, or [2, B, T] per token, in the view's precision (1 - lam is small: no float32 rounding)."""
        b, w = self.bias.to(v.logps.dtype), self.weight.to(v.logps.dtype)
        if self.gate == "scalar":
            return b
        return b + w * zn_rescale(v.require("ref_activations"), v.mask).mean(-1)

    def log_zeta(self, v: PairView) -> Tensor:
        g = self.gate_logits(v)
        ref, snap = v.require("ref_logps"), v.owned("snapshot")                 # [2, B, T] each
        return v.seq(torch.logaddexp(F.logsigmoid(g) + ref, F.logsigmoid(-g) + snap))

    def written_log_zeta(self, v: PairView) -> Tensor:
        lam = torch.sigmoid(self.gate_logits(v))
        mixture = lam * torch.exp(v.ref_logps) + (1 - lam) * torch.exp(v.owned("snapshot"))
        return (torch.log(mixture) * v.mask).sum(-1)

    @torch.no_grad()
    def on_step(self, step: int, policy) -> None:
        super().on_step(step, policy)
        self.refresh_copy(step, self.sync_every, self.mixup, policy)

    def scalars(self) -> dict:
        out = {**super().scalars(), "prior/lambda": torch.sigmoid(self.bias.detach())}
        if self.gate == "token":
            out["prior/gate_weight"] = self.weight.detach()
        return out
