"""TR-DPO (Gorbatovski et al., 2024, arXiv:2404.09656): DPO whose reference moves toward the policy during training,
as TRL's DPOConfig computes it with sync_ref_model=True (ref_model_sync_steps, ref_model_mixup_alpha)."""
import torch.nn.functional as F
from torch import Tensor

from midpo_cli.priors import Needs, PairView, Prior, Reduction, register_prior

MOVING = "moving_reference"     # the name of the prior's own model (Needs.owned, PairView.owned)


@register_prior("trdpo")
class TRDPO(Prior):
    """Original: -logsigmoid(beta*[(log pi_w - log pi_ref_t,w) - (log pi_l - log pi_ref_t,l)]), with pi_ref_t the
              reference at step t: pi_ref_0 = the policy at the start (DPO's reference); after every sync_every-th
              optimiser step, theta_ref <- mixup*theta + (1-mixup)*theta_ref (the paper's soft update; mixup = 1 is
              its hard update, a copy of the policy).
    Prior:    log zeta(y) = log pi_ref_t(y|x) on both sides, a = beta; no gradient through zeta. Until the first
              update it is DPO's prior exactly; between updates it is DICE's, against a frozen earlier policy.
    The moving reference is a frozen copy of the policy that the prior owns: built in `attach`, run on every batch
    (never read from the reference cache), updated in `on_step`, saved in checkpoints and beside the final policy
    (so a resumed run goes on exactly). It has no trainable parameters.
    """
    beta: float = 0.1        # TRL's DPOConfig default
    sync_every: int = 20     # optimiser steps between updates of the reference (the paper's tau; TRL's default 512)
    mixup: float = 0.6       # weight of the policy in each update (the paper's alpha; TRL's default 0.6); 1 = copy

    policy_copy = MOVING
    reductions = (Reduction({}, {"name": "dice", "snapshot": MOVING},
                            note="(the same frozen model: between updates, DPO against an earlier policy)"),)

    def validate(self) -> None:
        if self.sync_every < 1:
            raise ValueError(f"prior.sync_every={self.sync_every} must be an integer >= 1 (optimiser steps between "
                             "updates of the reference)")
        if not 0 < self.mixup <= 1:
            raise ValueError(f"prior.mixup={self.mixup} must be in (0, 1] (the policy's weight in each update: 1 "
                             "copies it; 0 would never move the reference, which is prior=dpo)")

    def knobs(self) -> tuple[str, ...]:
        """beta only: sync_every and mixup act between steps, on the moving reference (tests/test_trdpo.py and verify's
        row against TRL's SyncRefModelCallback check them), not on one step's loss."""
        return ("beta",)

    def needs(self) -> Needs:
        return Needs(owned=(MOVING,))

    def log_prior(self, v: PairView) -> Tensor:
        return v.seq(v.owned(MOVING))                                      # [2, B]

    def original_loss(self, v: PairView) -> Tensor:
        """The paper's loss with pi_ref_t's log-probs in place of pi_ref's (TRL: its synced ref_model's)."""
        policy = (v.logps * v.mask).sum(-1)                                # chosen_logps, rejected_logps
        moving = (v.owned_logps[MOVING] * v.mask).sum(-1)                  # ref_chosen_logps, ref_rejected_logps
        chosen_logratios, rejected_logratios = policy[0] - moving[0], policy[1] - moving[1]
        return -F.logsigmoid(self.beta * (chosen_logratios - rejected_logratios))

    def on_step(self, step: int, policy) -> None:
        """After optimiser step `step` (1-based): every sync_every-th, theta_ref <- mixup*theta + (1-mixup)*theta_ref
        (mix_toward); mixup = 1 leaves an exact copy of the policy's weights."""
        self.refresh_copy(step, self.sync_every, self.mixup, policy)
