"""What every learnable prior shares (design: docs/learnable_priors.md): update rules, anchor, schedule, collapse watch.

A learnable prior writes log zeta(y|x) = log pi_ref(y|x) + f_phi(x, y) with its own parameters phi, initialised so that
f_phi = 0: at step 0 it is exactly DPO's prior (loss and policy gradient; `midpo verify` checks it). Its options:

  update=joint     phi follows the gradient of J (+ anchor): the paper's min over (pi, zeta). By docs/priors.md,
                   dJ/dlog zeta_w = +a*sigma(-h) and dJ/dlog zeta_l = -a*sigma(-h): an unconstrained prior learns the
                   anti-preference and can take J towards 0 while pi stands still (collapse).
  update=tracking  J sees zeta with phi detached (no gradient of J reaches phi); phi minimises a label-free fit to the
                   policy on both responses, mean over pairs and sides of (log zeta - sg[log pi])^2 / |y|, so the prior
                   TRACKS the policy (as TR-DPO's moving reference does, fitted instead of copied). Every learnable prior
                   here depends on the prompt x (through pi_ref at least), and over priors that may depend on x the
                   minimiser of this fit, as of E_x KL(pi||zeta), is zeta = pi itself: the rule moves zeta towards pi
                   as far as the family allows. It is NOT Lemma 1's prompt-free marginal q(y) = sum_x p(x) pi(y|x)
                   (that is the prior learned_marginal). It cannot absorb the labels and never changes the policy's
                   gradient (sg on pi, no pi inside zeta). Was called update=marginal.
  update=frozen    phi never moves and J sees zeta with phi detached: a fixed member of the family (e.g. learned_tilt
                   with prior.init_len = R-DPO), to compare a learned prior with the fixed ones it could have chosen.
  anchor           weight of anchor * A, A = mean over pairs and sides of (log zeta - log pi_ref)^2 / |y| (label-free):
                   pulls zeta back to the reference. Both penalties and their policy gradients are 0 at initialisation.
  anchor_mode      penalty: the fixed weight `anchor` | constraint: A <= anchor_eps held by dual ascent, the weight a
                   multiplier lam >= 0 (from 0) moved after each step by lam <- max(0, lam + dual_lr * (A - anchor_eps))
                   on that step's A (averaged over processes); lam is checkpointed and logged as prior/dual.
  schedule         simultaneous: both step every step | alternating: policy_steps policy steps, then prior_steps
                   prior steps, repeated (the engine asks `updates(step)`).
  lr, max_grad_norm  the prior's own optimiser (same optimizer config as the policy, this learning rate) and clipping.

Every logged row carries prior/margin, prior/shift (the prior's margin minus the reference's; 0 at initialisation),
logratio/margins and the prior's scalars; `monitor` warns once when the collapse signature appears.
None of these priors reads the policy: zeta depends on phi, the reference and frozen models only, so detaching log zeta
(update=tracking) stops exactly the gradient into phi.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Literal

import torch
from torch import Tensor

from midpo_cli.priors.base import Arm, PairView, Prior

COLLAPSE = "collapse signature"        # the words of `monitor`'s warning (midpo report counts the runs that raised it)


@dataclasses.dataclass(eq=False, repr=False)
class LearnablePrior(Prior):
    """Base of the learnable priors (not registered itself). Subclasses implement `log_zeta` (log zeta [2, B] with the
    gradient into phi), `written_log_zeta` (the same prior written out independently, for `original_loss`) and
    `scalars`; they may build models in `attach` and list model state that `attach` rebuilds in `derived_state` (Prior)."""
    beta: float = 0.1                                          # the scale a of MI-DPO (DPO's beta)
    update: Literal["joint", "tracking", "frozen"] = "joint"   # joint: gradient of J | tracking: label-free fit to pi
    anchor: float = 0.1                                        # weight of the pull of zeta towards pi_ref
    anchor_mode: Literal["penalty", "constraint"] = "penalty"  # fixed weight | A <= anchor_eps by dual ascent
    anchor_eps: float = 0.01                                   # constraint: the bound on A (nats^2 per token)
    dual_lr: float = 10.0                                      # constraint: step size of the multiplier's ascent
    lr: float = 0.01                                           # the prior's own learning rate
    max_grad_norm: float = 1.0                                 # clipping of the prior's gradient (0 = off)
    schedule: Literal["simultaneous", "alternating"] = "simultaneous"   # who steps when
    policy_steps: int = 1                                      # alternating: policy steps per cycle
    prior_steps: int = 1                                       # alternating: prior steps per cycle
    collapse_shift: float = 1.0                                # warn when prior/shift falls below -this (nats) ...
    collapse_ratio: float = 1.0                                # ... while logratio/margins < this * |prior/shift|

    learnable: ClassVar[bool] = True
    options: ClassVar[tuple[dict, ...]] = ({"update": "joint"}, {"update": "tracking"})
    renamed = {"update": {"marginal": ("tracking", "the rule makes the prior track the policy; it is not Lemma 1's "
                                                   "prompt-free marginal, docs/learnable_priors.md")}}
    arms: ClassVar[dict[str, Arm]] = {                         # the update rules, each an arm <name>-<suffix>
        "joint": Arm({"update": "joint"}, "prior trained on J + its default anchor (the paper's joint min, anchored)"),
        "joint0": Arm({"update": "joint", "anchor": 0.0},
                      "prior trained on J alone (the unconstrained min over pi and zeta)"),
        "tracking": Arm({"update": "tracking"},
                        "prior fitted label-free to the policy (it tracks pi) + its default anchor"),
    }
    loss_knobs: ClassVar[tuple[str, ...]] = ()                 # float options that change the loss at initialisation

    def __post_init__(self):
        super().__post_init__()
        self._collapse_warned = False
        self.register_buffer("dual", torch.zeros((), dtype=torch.float64))   # lam of anchor_mode=constraint
        self._excess = None                                    # A - anchor_eps of the last training batch

    # ----- what a subclass writes ----------------------------------------------------------------------

    def log_zeta(self, v: PairView) -> Tensor:                # [2, B], gradient into phi
        raise NotImplementedError

    def written_log_zeta(self, v: PairView) -> Tensor:        # [2, B], the same prior written out independently
        raise NotImplementedError

    # ----- the MI-DPO prior and its regularisers -------------------------------------------------------

    def log_prior(self, v: PairView) -> Tensor:
        z = self.log_zeta(v)
        return z if self.update == "joint" else z.detach()

    def original_loss(self, v: PairView) -> Tensor:
        """The paper's J with the prior spelled out: -logsigmoid(a*[(log pi - log zeta)_w - (log pi - log zeta)_l])."""
        pi, zeta = v.seq(v.logps), self.written_log_zeta(v)                        # [2, B] each
        return -torch.nn.functional.logsigmoid(self.beta * ((pi[0] - zeta[0]) - (pi[1] - zeta[1])))

    def penalty(self, v: PairView) -> Tensor:
        """w * A, A = mean (log zeta - log pi_ref)^2 / |y| (w = anchor, or the multiplier lam under anchor_mode=
        constraint), plus (update=tracking) mean (log zeta - sg[log pi])^2 / |y|; means over pairs and both
        responses, no labels. Neither carries a gradient into the policy; a frozen prior has none."""
        z, n = self.log_zeta(v), v.lengths                                          # [2, B]
        if self.update == "frozen":
            return z.new_zeros(())
        drift = ((z - v.seq(v.require("ref_logps"))) ** 2 / n).mean()               # A
        if self.anchor_mode == "penalty":
            out = self.anchor * drift
        else:
            out = self.dual.to(drift.dtype) * (drift - self.anchor_eps)
            if self.training:
                self._excess = drift.detach() - self.anchor_eps
        if self.update == "tracking":
            out = out + ((z - v.seq(v.logps).detach()) ** 2 / n).mean()
        return out

    # ----- options ---------------------------------------------------------------------------------------

    def validate(self) -> None:
        for key in ("lr",):
            if getattr(self, key) <= 0:
                raise ValueError(f"prior.{key}={getattr(self, key)} must be > 0")
        for key in ("anchor", "anchor_eps", "dual_lr", "max_grad_norm", "collapse_shift", "collapse_ratio"):
            if getattr(self, key) < 0:
                raise ValueError(f"prior.{key}={getattr(self, key)} must be >= 0")
        for key in ("policy_steps", "prior_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"prior.{key}={getattr(self, key)} must be >= 1 (steps per alternating cycle)")

    def knobs(self) -> tuple[str, ...]:
        """beta and the subclass's `loss_knobs`. Not knobs: lr, max_grad_norm, schedule and the collapse thresholds act
        on training, not on one step's loss; the anchor and learned_tilt's bounds act only once zeta has left pi_ref
        (learned_adapter and learned_mix list the anchor: verify's stand-in models already put their zeta elsewhere;
        tests/test_learnable.py checks the anchor's pull on a moved learned_tilt)."""
        return ("beta", *self.loss_knobs)

    def warnings(self) -> list[str]:
        out = super().warnings()
        if self.update == "joint" and self.anchor == 0:
            out.append(f"{self.name}: prior.update=joint with prior.anchor=0 is the unconstrained min over (pi, zeta); "
                       "its prior can learn the anti-preference and lower J without moving the policy (docs/learnable_priors.md). "
                       "The run warns if prior/shift shows it; prior.anchor>0 or prior.update=tracking prevent it.")
        return out

    # ----- training hooks ----------------------------------------------------------------------------------

    def updates(self, step: int) -> tuple[bool, bool]:
        if self.schedule == "simultaneous":
            return True, self.update != "frozen"
        position = (step - 1) % (self.policy_steps + self.prior_steps)
        return position < self.policy_steps, position >= self.policy_steps and self.update != "frozen"

    @torch.no_grad()
    def on_step(self, step: int, policy) -> None:
        """anchor_mode=constraint: one ascent step of the multiplier on this step's A - anchor_eps (the mean over
        processes, so every process holds the same lam). Subclasses that override on_step call this first."""
        if self.anchor_mode != "constraint" or self._excess is None:
            return
        excess = self._excess.to(self.dual)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(excess)
            excess /= torch.distributed.get_world_size()
        self.dual.copy_((self.dual + self.dual_lr * excess).clamp(min=0))
        self._excess = None

    def scalars(self) -> dict:
        """prior/dual (lam) under anchor_mode=constraint; subclasses add their parameters to these."""
        return {"prior/dual": self.dual.detach()} if self.anchor_mode == "constraint" else {}

    def monitor(self, row: dict) -> list[str]:
        """The collapse signature (docs/learnable_priors.md), once per run: the prior's margin fell collapse_shift nats below the
        reference's while the policy's own margin moved less than collapse_ratio times as far. A non-finite value
        (a step skipped under trainer.on_nonfinite=skip) is no signature: the non-finite step is reported already."""
        shift, policy = row.get("prior/shift"), row.get("logratio/margins")
        if self._collapse_warned or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in (shift, policy)) \
                or shift > -self.collapse_shift or policy >= self.collapse_ratio * -shift:
            return []
        self._collapse_warned = True
        return [f"{self.name}: {COLLAPSE} at step {row.get('step')}: the prior's margin fell {-shift:.2f} nats "
                f"below the reference's (prior/shift) while the policy's own margin moved {policy:.2f} nats "
                f"(logratio/margins): the prior is learning the anti-preference and lowers J without changing the "
                f"policy (docs/learnable_priors.md). Raise prior.anchor (now {self.anchor}), lower prior.lr (now {self.lr}), or use "
                "prior.update=tracking."]
