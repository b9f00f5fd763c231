"""learned_poe (P4, our design: docs/learnable_priors.md): the reference times a learned prompt-free expert on y."""
import torch
import torch.nn.functional as F
from torch import Tensor

from midpo_cli.priors import Needs, PairView, register_prior
from midpo_cli.priors.learnable import LearnablePrior


def logits_vocabulary(policy) -> int:
    """V of the policy's logits (the ids the labels can hold): its output embeddings' rows, else its input embeddings',
    else its config's vocab_size."""
    model = getattr(policy, "module", policy)
    for get in ("get_output_embeddings", "get_input_embeddings"):
        layer = getattr(model, get)() if hasattr(model, get) else None
        weight = getattr(layer, "weight", None)
        if isinstance(weight, Tensor) and weight.dim() == 2:
            return int(weight.shape[0])
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(config, "vocab_size", None)
    if not isinstance(size, int):
        raise ValueError("prior=learned_poe sizes its token weights by the model's vocabulary, which this model does not "
                         "give (no embeddings, no config.vocab_size); use prior=learned_tilt for a length-only prior")
    return size


@register_prior("learned_poe")
class LearnedPoE(LearnablePrior):
    """Prior:    log zeta(y|x) = log pi_ref(y|x) + log q_phi(y) - log Z(x),  a = beta, where
                 log q_phi(y) = phi_len*|y| + sum_t u[y_t]   (a bag of the response's tokens, u in R^V, plus a length
              term; the prompt is not read), Z(x) = sum_y pi_ref(y|x) q_phi(y) (finite: responses have a maximum
              length). phi_len = 0 and u = 0 at initialisation: q is uniform, zeta = pi_ref, exact DPO.
    Z depends on x only and cancels in h, so zeta is a product of experts, the reference and q, in which q can absorb
    only what the response alone predicts about the labels (its length, its style, an annotator's bias for some
    tokens), as product-of-experts debiasing (Clark et al., 2019; He et al., 2019; Karimi Mahabadi et al., 2020)
    lets a bias-only model explain the biased part of the labels so the main model need not.
    Original: -logsigmoid(beta*[(d_w - d_l) - phi_len*(|y_w| - |y_l|) - (sum_t u[y_w,t] - sum_t u[y_l,t])]),
              d = log pi - log pi_ref: DPO whose implied reward is corrected by the response-only score log q(y);
              u = 0, phi_len = -alpha/beta is R-DPO (its default sign "+").
    dJ/dlog q(y_w) = +a*sigma(-h): under update=joint, q lowers on the winners' tokens and lengths and rises on the
    losers': it learns the bias's anti-preference, which takes that part of the labels off the policy (debiasing; on
    an unbiased task, the prior-side collapse of docs/learnable_priors.md). u and phi_len are plain, unbounded
    parameters: the anchor, anchor * mean (log q(y))^2/|y|, holds them. phi_len is u's common offset (u + c and
    phi_len + c give the same q), kept apart so that the length effect is learned and logged as one number (it gets
    the summed gradient of every token). V is the policy's vocabulary, read at
    `attach`; a prior never attached (the Python API, `midpo verify`'s probes) sizes u by the first view it reads.
    """

    def __post_init__(self):
        super().__post_init__()
        self.phi_len = torch.nn.Parameter(torch.zeros(()))                      # nats per response token
        self.register_parameter("u", None)                                       # [V], built by attach

    def needs(self) -> Needs:
        return Needs(reference=True, tokens=True)

    def build_weights(self, vocab: int, dtype=torch.float32) -> None:
        """u = 0 over a vocabulary of `vocab` ids, on phi_len's device (in attach: before the optimisers exist)."""
        self.u = torch.nn.Parameter(torch.zeros(vocab, dtype=dtype, device=self.phi_len.device))

    def attach(self, policy, reference) -> None:
        self.build_weights(logits_vocabulary(policy))

    def weights(self, v: PairView) -> Tensor:
        """u [V], built from the view's vocabulary when nothing attached the prior; the view's ids must fit in it."""
        vocab = v.vocab_size
        if self.u is None:
            if vocab is None:
                raise ValueError("learned_poe: its token weights are sized by the vocabulary: call "
                                 "prior.attach(policy, reference), or pass vocab_size with the tokens")
            self.build_weights(vocab, v.logps.dtype)
        elif vocab is not None and vocab > self.u.numel():
            raise ValueError(f"learned_poe: the token weights cover {self.u.numel()} ids, but the batch's vocabulary "
                             f"has {vocab} (the prior was attached to another model)")
        return self.u

    def log_q(self, v: PairView) -> Tensor:
        """log q_phi(y) [2, B]: phi_len*|y| + sum of u over the response's tokens (gathered)."""
        u = self.weights(v)
        return self.phi_len * v.lengths + v.seq(u[v.require("tokens")])

    def log_zeta(self, v: PairView) -> Tensor:
        return v.seq(v.require("ref_logps")) + self.log_q(v)

    def written_log_q(self, v: PairView) -> Tensor:
        """log q_phi(y) [2, B] written out as a bag of words: token counts [2, B, V] times u, plus phi_len*|y|."""
        u = self.weights(v)
        counts = torch.zeros(*v.tokens.shape[:2], u.numel(), dtype=v.mask.dtype, device=v.mask.device)
        counts.scatter_add_(-1, v.tokens, v.mask)                                # [2, B, V]: count of each id in y
        return self.phi_len * v.mask.sum(-1) + counts @ u.to(counts.dtype)

    def written_log_zeta(self, v: PairView) -> Tensor:
        return (v.ref_logps * v.mask).sum(-1) + self.written_log_q(v)

    def original_loss(self, v: PairView) -> Tensor:
        d = ((v.logps - v.ref_logps) * v.mask).sum(-1)                           # [2, B]
        q = self.written_log_q(v)                                                # [2, B]
        return -F.logsigmoid(self.beta * ((d[0] - d[1]) - (q[0] - q[1])))

    def gradient_check(self) -> str:
        """joint: verify checks J's gradient into (phi_len, u) from both forms; tracking cuts it by design."""
        return "prior (phi_len, u)" if self.update == "joint" else ""

    def scalars(self) -> dict:
        out = {**super().scalars(), "prior/phi_len": self.phi_len.detach()}
        if self.u is not None:
            out["prior/token_weight_norm"] = torch.linalg.vector_norm(self.u.detach().float())
        return out
