"""learned_marginal (ours: docs/learnable_priors.md): the paper's Lemma 1 optimum, the policy's prompt-free marginal,
estimated on each batch from a lagged copy of the policy and ramped in from the reference."""
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from midpo_cli.priors import Arm, Needs, PairView, Prior, Reduction, register_prior

SNAPSHOT = "snapshot"      # the prior's own model (Prior.owned_models): the lagged policy pi_snap


@register_prior("learned_marginal")
class LearnedMarginal(Prior):
    """Lemma 1: for a fixed policy pi, the zeta minimising E_x KL(pi(.|x) || zeta) is the prompt-free marginal
    pibar(y) = sum_x p(x) pi(y|x). Estimated on a batch of B pairs, for each response y of pair i:

        log m(y) = log (1/K_y) sum_k exp log pi_snap(y | x'_k)       (a log-mean-exp)

    over the prompts x'_k of pairs i+1, ..., i+K of the batch (in rotation; K = min(prompts, B-1)), leaving out a
    prompt equal to y's own and one after which y would be cut by max_length (K_y of them remain; engine/cross.py).
    pi_snap is a frozen copy of the policy owned by the prior, taken at attach (so pi_snap = pi_ref at the start) and
    refreshed every refresh_every steps, snap <- mixup*pi + (1-mixup)*snap (mixup = 1: a hard copy): the marginal is
    fitted to the current policy, then the policy is trained against it, a Blahut-Arimoto alternation. No gradient
    of J reaches it: it is fitted without labels and cannot learn the anti-preference.

    Prior:    log zeta(y|x) = (1 - w) log pi_ref(y|x) + w log m(y), a = beta, no gradient through zeta; w ramps
              linearly from 0 at step 0 to `weight` after `ramp_steps` optimiser steps (ramp_steps = 0: w = weight
              throughout). The normalised geometric interpolation pi_ref(y|x)^(1-w) m(y)^w / Z(x), with
              Z(x) = sum_y pi_ref(y|x)^(1-w) m(y)^w, differs from it by log Z(x), which depends on x only and cancels
              in h: both give the same loss. At w = 0 it is DPO's prior exactly (the run starts as DPO); at w = 1 the
              implied reward a*log(pi(y|x)/m(y)) is a (scaled) pointwise mutual information between x and y.
              A response with no usable other prompt (a batch of one pair, or every x' its own or too long) keeps
              log m(y) = log pi_ref(y|x), i.e. zeta = pi_ref for it.
    Original: -logsigmoid(beta * [ (log pi_w - log pi_l) - (1 - w)(log pi_ref,w - log pi_ref,l)
                                   - w (log mbar_w - log mbar_l) ]),
              mbar(y) = (1/K_y) sum_k pi_snap(y | x'_k), written with probabilities.
    """
    beta: float = 0.1            # the scale a of MI-DPO (DPO's beta)
    prompts: int = 8             # K: other prompts of the batch per response (at most B-1 are used)
    weight: float = 1.0          # w at the end of the ramp: 1 = the marginal alone (the PMI reward)
    ramp_steps: int = 50         # optimiser steps over which w grows from 0 to weight (0 = weight from the start)
    refresh_every: int = 20      # optimiser steps between refreshes of pi_snap from the policy
    mixup: float = 1.0           # snap <- mixup*policy + (1-mixup)*snap at each refresh (1 = hard copy)

    policy_copy = SNAPSHOT
    learnable: ClassVar[bool] = True      # zeta moves with the policy (fitted label-free; no parameter J trains)
    options = ({}, {"ramp_steps": 0}, {"ramp_steps": 0, "weight": 0.5})   # w = 0, 1, 0.5 on verify's probes
    reductions = (Reduction({"weight": 0.0}, {"name": "dpo", "beta": 0.1}, note="(w = 0 throughout)"),)
    arms: ClassVar[dict[str, Arm]] = {
        "ramp": Arm({}, "zeta ramped from pi_ref to the batch marginal of a lagged policy (Lemma 1), no labels"),
    }

    def __post_init__(self):
        super().__post_init__()
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))   # the ramp's clock, checkpointed
        self._gap = math.nan

    def validate(self) -> None:
        if self.prompts < 1:
            raise ValueError(f"prior.prompts={self.prompts} must be an integer >= 1 (other prompts of the batch per "
                             "response; at most trainer.batch_size - 1 are used)")
        if self.weight < 0:
            raise ValueError(f"prior.weight={self.weight} must be >= 0 (the marginal's share of log zeta at the end "
                             "of the ramp: 0 = DPO, 1 = the marginal alone)")
        if self.ramp_steps < 0 or self.refresh_every < 1:
            raise ValueError(f"prior.ramp_steps={self.ramp_steps} must be >= 0 and prior.refresh_every="
                             f"{self.refresh_every} >= 1 (optimiser steps)")
        if not 0 < self.mixup <= 1:
            raise ValueError(f"prior.mixup={self.mixup} must be in (0, 1] (the policy's weight in each refresh)")

    def warnings(self) -> list[str]:
        out = super().warnings()
        if self.weight > 1:
            out.append(f"learned_marginal with weight={self.weight}: w > 1 extrapolates past the marginal (log zeta "
                       "= (1-w) log pi_ref + w log m weighs the reference negatively)")
        if self.ramp_steps == 0 and self.weight > 0:
            out.append(f"learned_marginal with ramp_steps=0: w = {self.weight} from step 0, so the run does not start "
                       "as DPO (set prior.ramp_steps > 0 to ramp the marginal in)")
        return out

    def knobs(self) -> tuple[str, ...]:
        """beta; weight where it acts at step 0 (ramp_steps = 0). The ramp, refresh and mixup act between steps
        (tests/test_learned_marginal.py checks them)."""
        return ("beta", "weight") if self.ramp_steps == 0 else ("beta",)

    def needs(self) -> Needs:
        return Needs(reference=True, cross_prompts=self.prompts, cross_model=SNAPSHOT)

    def initial_equivalent(self) -> dict:
        """DPO while the ramp starts at w = 0; with ramp_steps = 0 (w = weight at once) no registered prior."""
        return {"name": "dpo", "beta": self.a} if self.w == 0 else {}

    @property
    def w(self) -> float:
        """The marginal's share of log zeta now: weight * min(1, steps / ramp_steps)."""
        if self.ramp_steps == 0:
            return float(self.weight)
        return float(self.weight) * min(1.0, int(self.steps_done) / self.ramp_steps)

    def share(self) -> Tensor | float:
        """w, computed where the ramp's clock lives (a training step reads it without waiting on the device)."""
        if self.ramp_steps == 0:
            return float(self.weight)
        return self.weight * (self.steps_done.float() / self.ramp_steps).clamp(max=1.0)

    def log_marginal(self, v: PairView) -> Tensor:
        """log m(y) [2, B]: log-mean-exp of log pi_snap(y | x'_k) over the usable k; log pi_ref(y|x) where none is."""
        ref = v.seq(v.require("ref_logps"))
        cross, usable = v.require("cross_logps").to(ref.dtype), v.cross_mask.to(ref.dtype)
        n = usable.sum(-1)
        lme = torch.logsumexp(cross.masked_fill(usable == 0, -math.inf), -1) - n.clamp(min=1).log()
        return torch.where(n > 0, lme, ref)

    def log_prior(self, v: PairView) -> Tensor:
        ref = v.seq(v.require("ref_logps"))                                # [2, B]
        m = self.log_marginal(v)
        with torch.no_grad():
            self._gap = (m - ref).mean()
        w = self.share()
        return ((1 - w) * ref + w * m).detach()

    def original_loss(self, v: PairView) -> Tensor:
        """The MI-DPO loss with the geometric interpolation's log-ratio written out, the marginal as a mean of
        probabilities (shifted by its largest term against underflow)."""
        policy = (v.logps * v.mask).sum(-1)
        ref = (v.ref_logps * v.mask).sum(-1)
        cross, usable = v.cross_logps.to(ref.dtype), v.cross_mask.to(ref.dtype)
        count = usable.sum(-1)
        top = cross.masked_fill(usable == 0, -math.inf).amax(-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))          # no usable prompt: unused
        mean = (torch.exp(cross - top) * usable).sum(-1) / count.clamp(min=1)
        log_mbar = torch.where(count > 0, top.squeeze(-1) + torch.log(mean.clamp(min=1e-300)), ref)
        w = self.share()
        h = (policy[0] - policy[1]) - (1 - w) * (ref[0] - ref[1]) - w * (log_mbar[0] - log_mbar[1])
        return -F.logsigmoid(self.beta * h)

    @torch.no_grad()
    def on_step(self, step: int, policy) -> None:
        """After optimiser step `step` (1-based): the ramp's clock; every refresh_every-th, pi_snap moves to pi."""
        self.steps_done.fill_(step)
        self.refresh_copy(step, self.refresh_every, self.mixup, policy)

    def scalars(self) -> dict:
        """prior/weight: w now; prior/marginal_gap: mean log m(y) - log pi_ref(y|x) over the last batch (nats)."""
        return {"prior/weight": self.share(), "prior/marginal_gap": self._gap}
