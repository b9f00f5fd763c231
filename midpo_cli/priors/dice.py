"""DICE (Chen et al., ICLR 2025, arXiv:2406.09760): DPO whose reference is the previous round's policy, in rounds."""
from typing import Literal, Optional

import torch.nn.functional as F
from torch import Tensor

from midpo_cli.priors import Needs, PairView, Prior, register_prior


@register_prior("dice")
class DICE(Prior):
    """Original (round t): -logsigmoid(beta*[log(pi/pi_{t-1})_w - log(pi/pi_{t-1})_l]).
    Prior:    log zeta(y) = log pi_{t-1}(y|x), a frozen snapshot of the previous round's policy; a = beta.
    A run is `rounds` trainings (midpo_cli/pipelines/dice.py): round 1 trains on the task's pairs with
    zeta = `snapshot` (default: the reference, i.e. DPO); each later round samples the previous round's policy,
    pairs its completions by implicit reward with a length penalty, replays offline pairs, and trains with
    zeta = that policy. The data side acts on the pairs, not on zeta: the loss of each round is the prior above.
    """
    beta: float = 0.1                      # DICE scripts: dpo_beta 0.1
    snapshot: str = "reference"            # round 1's pi_{t-1}: "reference" (the reference model) or a model path
    rounds: int = 2                        # trainings; 1 = DPO against `snapshot` (authors: 2 rounds after DPO)
    samples: int = 8                       # completions sampled per prompt each round (authors: 16)
    temperature: Optional[float] = None    # sampling temperature; null: the task's (else 1.0)
    max_new_tokens: Optional[int] = None   # sampled completion length; null: the task's (else 64)
    length_unit: Literal["chars", "tokens"] = "chars"   # what the length penalty counts (authors: characters)
    length_alpha: Optional[float] = None   # length penalty per unit; null: the authors' search over [0, 1)
    replay: float = 0.5                    # fraction of each later round's pairs drawn from the task's pairs

    def validate(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"prior.rounds={self.rounds} must be >= 1 (1 trains once against prior.snapshot: DPO)")
        if not 0 <= self.replay <= 1:
            raise ValueError(f"prior.replay={self.replay} must be in [0, 1] (the offline fraction of a round's pairs)")
        if self.samples < 2:
            raise ValueError(f"prior.samples={self.samples} must be >= 2 (a pair needs a best and a worst completion)")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"prior.temperature={self.temperature} must be >= 0 (or null: the task's)")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"prior.max_new_tokens={self.max_new_tokens} must be >= 1 (or null: the task's)")
        if self.length_alpha is not None and self.length_alpha < 0:
            raise ValueError(f"prior.length_alpha={self.length_alpha} must be >= 0 (or null: the authors' search)")

    def knobs(self) -> tuple[str, ...]:
        return ("beta",)                   # the rest acts on the pairs of later rounds, not on a step's loss

    def needs(self) -> Needs:
        return Needs(snapshot=self.snapshot)

    def pipeline(self):
        if self.rounds == 1:
            return None
        from midpo_cli.pipelines.dice import Rounds
        return Rounds(self)

    def log_prior(self, v: PairView) -> Tensor:
        return v.seq(v.require("snapshot_logps"))

    def original_loss(self, v: PairView) -> Tensor:
        d = v.seq(v.logps - v.snapshot_logps)                              # [2, B]
        return -F.logsigmoid(self.beta * (d[0] - d[1]))
