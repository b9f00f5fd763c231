"""SparsePO (Christopoulou et al., arXiv:2410.05102): token masks on the reward and on the KL."""
from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from midpo_cli.priors import Needs, PairView, Prior, Reduction, register_prior


def zn_rescale(x: Tensor, mask: Tensor) -> Tensor:
    """Z-normalise over each sequence's completion tokens, then min-max to [0, 1] (MaPO's mapping).
    x: [2, B, T, L] per-layer activations, mask: [2, B, T]; returns [2, B, T, L]."""
    m = mask[..., None]
    n = m.sum(2, keepdim=True).clamp(min=1)
    mean = (x * m).sum(2, keepdim=True) / n
    std = (((x - mean) ** 2 * m).sum(2, keepdim=True) / n).sqrt().clamp(min=1e-6)
    z = (x - mean) / std
    lo = z.masked_fill(m == 0, float("inf")).amin(2, keepdim=True)
    hi = z.masked_fill(m == 0, float("-inf")).amax(2, keepdim=True)
    return ((z - lo) / (hi - lo).clamp(min=1e-6)) * m


@register_prior("sparsepo")
class SparsePO(Prior):
    """u = sum_t m^u_t (log pi - log pi_ref) per side; c_s = sum_t m^d_t * token_kl with the code's
    token_kl = -KL_t(pi_ref || pi) (sign trap); loss = -logsigmoid(beta*((u_w - u_l) - (c_w - c_l))) + L1.
    Prior: log zeta = sum_t [(1 - m^u) log pi + m^u log pi_ref] - sum_t m^d KL_t(pi_ref || pi); a = beta.
    m^u = m^d = 1 is TDPO1; m^u = 1, m^d = 0 is DPO. The L1 penalties sit outside the sigmoid (penalty()).
    masks="given": per-token columns `mask` (common) or `mask_u`/`mask_d` (independent) from the data;
    masks="activation": MaPO's masks from the reference's activations (zn_rescale, mean over layers; common).
    """
    beta: float = 0.1          # README: 0.1 (HH), 0.8 (IMDB, TL;DR)
    masks: Literal["activation", "given"] = "activation"  # MaPO masks (no learning) | data columns
    common: bool = True        # one mask for reward and KL (rw_kl_independent=False)
    l1_u: float = 0.0          # L1 coefficient on reward masks (code default 0; 0.001 for HH-common)
    l1_d: float = 0.0          # L1 coefficient on KL masks

    options = ({"masks": "given", "common": True, "l1_u": 0.001, "l1_d": 0.001},
               {"masks": "given", "common": False, "l1_u": 0.001, "l1_d": 0.002},
               {"masks": "activation", "common": True})
    reductions = (Reduction({"masks": "given", "common": False}, {"name": "tdpo", "variant": 1},
                            columns={"mask_u": 1.0, "mask_d": 1.0}, note="(m_u = m_d = 1)"),
                  Reduction({"masks": "given", "common": False}, {"name": "dpo", "beta": 0.1},
                            columns={"mask_u": 1.0, "mask_d": 0.0}, note="(m_u = 1, m_d = 0)"))

    def validate(self) -> None:
        if self.masks == "activation" and not self.common:
            raise ValueError("prior.masks=activation gives one common mask; set prior.common=true "
                             "or use prior.masks=given with mask_u/mask_d columns")

    def needs(self) -> Needs:
        cols = () if self.masks == "activation" else ("mask",) if self.common else ("mask_u", "mask_d")
        return Needs(reference=True, kl_ref_pi=True, ref_activations=self.masks == "activation",
                     token_columns=cols)

    def mask_pair(self, v: PairView) -> tuple[Tensor, Tensor]:
        """(m^u, m^d), each [2, B, T]."""
        if self.masks == "activation":
            m = zn_rescale(v.require("ref_activations"), v.mask).mean(-1)
            return m, m
        if self.common:
            return v.column("mask"), v.column("mask")
        return v.column("mask_u"), v.column("mask_d")

    def log_prior(self, v: PairView) -> Tensor:
        m_u, m_d = self.mask_pair(v)
        return v.seq((1 - m_u) * v.logps + m_u * v.require("ref_logps")) - v.seq(m_d * v.require("kl_ref_pi"))

    def original_loss(self, v: PairView) -> Tensor:
        m_u, m_d = self.mask_pair(v)
        u = v.seq(m_u * (v.logps - v.ref_logps))                           # masked reward terms
        c = v.seq(m_d * -v.kl_ref_pi)                                      # token_kl = -KL(ref || pi)
        return -F.logsigmoid(self.beta * ((u[0] - u[1]) - (c[0] - c[1])))

    def penalty(self, v: PairView) -> Tensor:
        m_u, m_d = self.mask_pair(v)
        scale = 0.5 if self.common else 1.0                                # common mask: halved (sparse_config)
        l1 = lambda m: (m.abs() * v.mask).sum(-1).sum(0).mean()           # ||m_w||_1 + ||m_l||_1, batch mean
        return scale * (self.l1_u * l1(m_u) + self.l1_d * l1(m_d))
