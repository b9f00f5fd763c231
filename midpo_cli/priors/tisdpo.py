"""TIS-DPO (Liu et al., ICLR 2025, arXiv:2410.04350): DPO with per-token importance weights."""
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from midpo_cli.priors import Needs, PairView, Prior, Reduction, register_prior


@register_prior("tisdpo")
class TISDPO(Prior):
    """U_s = sum_t w_t (log pi - log pi_ref)(y_s,t);  K_s = sum_t w_t KL_t(pi || pi_ref) (reverse KL).
    Original (exlaw/TIS-DPO tisdpo_loss): -logsigmoid(beta*(U_w - U_l)), and with token_level
    -logsigmoid(beta*[(U_w - U_l) - alpha*(K_w - K_l)]).
    Prior: log zeta_s = sum_t [(1 - w_t) log pi + w_t log pi_ref] (+ alpha*K_s if token_level); a = beta.
    Weights are label-dependent (estimated with opposite signs per side); w = 1 everywhere is DPO.
    """
    beta: float = 0.1            # authors' config/loss/tisdpo.yaml
    alpha: float = 0.5           # weight of the token-level KL term (used only if token_level)
    token_level: bool = False    # authors' default: no KL term
    weights: Literal["uniform", "given"] = "uniform"   # w = 1 | the data's chosen_weights/rejected_weights

    options = ({"token_level": False, "weights": "given"}, {"token_level": True, "weights": "given"})
    reductions = (Reduction({"weights": "given"}, {"name": "dpo", "beta": 0.1}, columns={"weights": 1.0},
                            note="(weights w = 1)"),
                  Reduction({}, {"name": "dpo", "beta": 0.1}, note="(default: uniform weights)"))

    def knobs(self) -> tuple[str, ...]:
        return ("beta", "alpha") if self.token_level else ("beta",)

    def needs(self) -> Needs:
        return Needs(reference=True, kl_pi_ref=self.token_level,
                     token_columns=("weights",) if self.weights == "given" else ())

    def w(self, v: PairView) -> Tensor:
        return v.column("weights") if self.weights == "given" else torch.ones_like(v.logps)

    def log_prior(self, v: PairView) -> Tensor:
        w = self.w(v)
        logz = v.seq((1 - w) * v.logps + w * v.require("ref_logps"))
        if self.token_level:
            logz = logz + self.alpha * v.seq(w * v.require("kl_pi_ref"))
        return logz

    def original_loss(self, v: PairView) -> Tensor:
        w = self.w(v)
        u = v.seq(w * (v.logps - v.ref_logps))                             # _get_batch_logps_tisdpo
        logits = u[0] - u[1]
        if self.token_level:
            k = v.seq(w * v.kl_pi_ref)
            logits = logits - self.alpha * (k[0] - k[1])
        return -F.logsigmoid(self.beta * logits)
