"""TDPO (Zeng et al., ICML 2024, arXiv:2404.11999): token-level DPO with a sequential forward KL."""
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from midpo_cli.priors import Needs, PairView, Prior, register_prior


@register_prior("tdpo")
class TDPO(Prior):
    """D_s = sum_t KL_t(pi_ref || pi) on side s (full vocabulary, reference first).
    Original TDPO1: -logsigmoid(beta*[(dlogp_w - dlogp_l) - (D_l - D_w)])
    Original TDPO2: -logsigmoid(beta*[(dlogp_w - dlogp_l) - alpha*(D_l - sg[D_w])])
    Prior TDPO1: log zeta = log pi_ref - D on both sides; TDPO2: log zeta_w = log pi_ref - alpha*sg[D_w],
    log zeta_l = log pi_ref - alpha*D_l (asymmetric through the stop-gradient); a = beta.
    """
    beta: float = 0.1     # authors' config/loss/tdpo.yaml
    alpha: float = 0.5    # weight of the KL term in TDPO2 (unused by TDPO1)
    variant: Literal[1, 2] = 1   # the authors' yaml default is TDPO1 (their README recommends TDPO2)

    options = ({"variant": 1}, {"variant": 2})

    def knobs(self) -> tuple[str, ...]:
        return ("beta",) if self.variant == 1 else ("beta", "alpha")

    def needs(self) -> Needs:
        return Needs(reference=True, kl_ref_pi=True)

    def log_prior(self, v: PairView) -> Tensor:
        ref, kl = v.seq(v.require("ref_logps")), v.seq(v.require("kl_ref_pi"))   # [2, B]
        if self.variant == 1:
            return ref - kl
        return ref - self.alpha * torch.stack([kl[0].detach(), kl[1]])

    def stop_gradient_variants(self) -> dict:
        if self.variant == 1:
            return {}
        no_sg = lambda v: v.seq(v.require("ref_logps")) - self.alpha * v.seq(v.require("kl_ref_pi"))
        return {"no stop-gradient on D_w": no_sg}

    def original_loss(self, v: PairView) -> Tensor:
        margin = v.seq(v.logps - v.ref_logps)                              # tdpo_loss: chosen/rejected margins
        kl_w, kl_l = v.seq(v.kl_ref_pi)
        if self.variant == 1:
            logits = margin[0] - margin[1] - (kl_l - kl_w)
        else:
            logits = margin[0] - margin[1] - self.alpha * (kl_l - kl_w.detach())
        return -F.logsigmoid(self.beta * logits)
