"""TIS-DPO (Liu et al., ICLR 2025, arXiv:2410.04350): DPO with per-token importance weights."""
from pathlib import Path
from typing import List, Literal, Optional

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
    weights=estimated (the authors' recipe) is a pipeline (midpo_cli/pipelines/tisdpo.py): two contrastive models
    pi_+ (DPO on the pairs) and pi_- (DPO on the swapped pairs) score each completion token, a per-sequence
    transform makes the weights, and the run trains on them as given weights: the loss is the same.
    """
    beta: float = 0.1            # authors' config/loss/tisdpo.yaml
    alpha: float = 0.5           # weight of the token-level KL term (used only if token_level)
    token_level: bool = False    # authors' default: no KL term
    weights: Literal["estimated", "uniform", "given"] = "estimated"   # see conf/prior/tisdpo.yaml
    contrastive: Optional[List[str]] = None   # [pi_+ dir, pi_- dir] to load; None: train both (cached)
    contrastive_beta: float = 0.1             # DPO beta of pi_+ and pi_- (authors: 0.1)
    contrastive_steps: int = 50               # optimiser steps of each (authors: a full DPO run)
    contrastive_lr: Optional[float] = None    # their learning rate; None: optimizer.lr
    contrastive_seed: int = 0                 # their seed, whatever the run's
    transform: Literal["rank_based", "threshold_and_scale", "binary", "origin"] = "rank_based"
    min_scale: float = 0.7       # lowest weight of rank_based and threshold_and_scale (authors: 0.7)
    max_scale: float = 1.3       # highest weight (authors: 1.3)
    clip_low: float = -1.5       # threshold_and_scale: scores clipped to [clip_low, clip_high] (authors: -1.5)
    clip_high: float = 1.5       # (authors: 1.5)
    top_percent: float = 100.0   # binary: the top top_percent % of a sequence's tokens get 1, the rest 0

    options = ({"token_level": False, "weights": "given"}, {"token_level": True, "weights": "given"})
    reductions = (Reduction({"weights": "given"}, {"name": "dpo", "beta": 0.1}, columns={"weights": 1.0},
                            note="(weights w = 1)"),
                  Reduction({"weights": "uniform"}, {"name": "dpo", "beta": 0.1}, note="(uniform weights)"),
                  Reduction({"weights": "estimated"}, {"name": "tisdpo", "weights": "given"},
                            note="(estimated weights train as given weights)"))

    def validate(self) -> None:
        if self.min_scale > self.max_scale:
            raise ValueError(f"prior.min_scale={self.min_scale} > prior.max_scale={self.max_scale}: the weights' range "
                             "is [min_scale, max_scale]")
        if not 0 < self.top_percent <= 100:
            raise ValueError(f"prior.top_percent={self.top_percent} must be in (0, 100] (the share of a sequence's "
                             "tokens that get weight 1 under transform=binary)")
        if self.clip_low >= self.clip_high:
            raise ValueError(f"prior.clip_low={self.clip_low} must be below prior.clip_high={self.clip_high}")
        if self.contrastive_steps < 1:
            raise ValueError(f"prior.contrastive_steps={self.contrastive_steps} must be >= 1")
        if self.contrastive_beta <= 0:
            raise ValueError(f"prior.contrastive_beta={self.contrastive_beta} must be > 0")
        if self.contrastive_lr is not None and not self.contrastive_lr > 0:
            raise ValueError(f"prior.contrastive_lr={self.contrastive_lr} must be > 0 (or null: optimizer.lr)")
        if not 0 <= self.contrastive_seed < 2 ** 32:
            raise ValueError(f"prior.contrastive_seed={self.contrastive_seed} must be in [0, 2**32 - 1]")
        if self.contrastive is not None:
            from midpo_cli.engine.model_dir import WEIGHTS
            if len(self.contrastive) != 2:
                raise ValueError(f"prior.contrastive={list(self.contrastive)} must be two model directories "
                                 "[pi_plus, pi_minus] (or null to train them)")
            for i, path in enumerate(self.contrastive):
                folder = Path(str(path)).expanduser()
                if not (folder / "config.json").is_file() or not (any((folder / f).is_file() for f in WEIGHTS)
                                                                  or any(folder.glob("*.safetensors"))):
                    raise ValueError(f"prior.contrastive[{i}]={path} is not a model directory (no config.json and "
                                     "weights there); give the model/ directory of a DPO run, or "
                                     "prior.contrastive=null to train pi_+ and pi_-")

    def knobs(self) -> tuple[str, ...]:
        return ("beta", "alpha") if self.token_level else ("beta",)

    def needs(self) -> Needs:
        return Needs(reference=True, kl_pi_ref=self.token_level,
                     token_columns=("weights",) if self.weights != "uniform" else ())

    def input_files(self) -> list:
        return [(f"prior.contrastive[{i}]", Path(str(p)).expanduser()) for i, p in enumerate(self.contrastive or ())]

    def pipeline(self):
        if self.weights != "estimated":
            return None
        from midpo_cli.pipelines.tisdpo import Estimated
        return Estimated(self)

    def w(self, v: PairView) -> Tensor:
        return torch.ones_like(v.logps) if self.weights == "uniform" else v.column("weights")

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
