"""SparsePO (Christopoulou et al., arXiv:2410.05102): token masks on the reward and on the KL."""
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from midpo_cli.priors import Needs, PairView, Prior, Reduction, register_prior

LN_EPS = 1e-5        # the mask heads' LayerNorm epsilon (torch's default)


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


class MaskHead(torch.nn.Module):
    """A learned mask m >= 0 per token from the reference's hidden states of every layer (the authors' `simple_all`):

        s_l = ReLU(w_l . LN(h_l) + b_l)     for each layer l = 1..L (LN: LayerNorm over the hidden size, no affine)
        m   = ReLU(sum_l c_l s_l)           a bias-free mixer over the layers; unbounded above

    with dropout of probability `dropout` on every s_l and on m while training, where the authors apply it.
    Initialisation, without randomness: w_l = 0, b_l = 1, c_l = 1/L, so s_l = 1 and m = 1 on every token. Both ReLUs
    start at +1, away from their kink, so every parameter gets a gradient as soon as dJ/dm is non-zero:
    dm/dc_l = s_l = 1, dm/db_l = c_l, dm/dw_l = c_l * LN(h_l). LN has no weight and bias of its own: in front of a
    linear map to one output they are redundant (w . (g*x + e) = (w*g) . x + w . e), and with w = 0 they would get
    no gradient at all.
    """

    def __init__(self, layers: int, hidden: int, dropout: float, dtype=torch.float32):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(layers, hidden, dtype=dtype))           # w_l, [L, H]
        self.bias = torch.nn.Parameter(torch.ones(layers, dtype=dtype))                      # b_l, [L]
        self.mixer = torch.nn.Parameter(torch.full((layers,), 1.0 / layers, dtype=dtype))    # c_l, [L]
        self.dropout = dropout

    def _cast(self, h: Tensor) -> tuple[Tensor, ...]:
        """The input and the parameters in the wider of the two dtypes (float64 probes stay float64)."""
        dtype = torch.promote_types(h.dtype, self.weight.dtype)
        return h.to(dtype), self.weight.to(dtype), self.bias.to(dtype), self.mixer.to(dtype)

    def forward(self, h: Tensor) -> Tensor:
        """h [..., L, H] -> m [...]."""
        h, w, b, c = self._cast(h)
        x = F.layer_norm(h, h.shape[-1:], eps=LN_EPS)                                        # [..., L, H]
        s = F.dropout(F.relu(torch.einsum("...lh,lh->...l", x, w) + b), self.dropout, self.training)   # [..., L]
        return F.dropout(F.relu((s * c).sum(-1)), self.dropout, self.training)

    def written(self, h: Tensor) -> Tensor:
        """The same mask as the authors' modules compute it, one layer's linear map at a time (verify's second form)."""
        h, w, b, c = self._cast(h)
        scores = []
        for layer in range(h.shape[-2]):
            x = F.layer_norm(h[..., layer, :], h.shape[-1:], eps=LN_EPS)                    # [..., H]
            score = F.relu(F.linear(x, w[layer:layer + 1], b[layer:layer + 1]))             # [..., 1]
            scores.append(F.dropout(score, self.dropout, self.training))
        mixed = F.relu(F.linear(torch.cat(scores, -1), c[None]))                            # [..., 1]
        return F.dropout(mixed, self.dropout, self.training)[..., 0]


@register_prior("sparsepo")
class SparsePO(Prior):
    """u = sum_t m^u_t (log pi - log pi_ref) per side; c_s = sum_t m^d_t * token_kl with the code's
    token_kl = -KL_t(pi_ref || pi) (sign trap); loss = -logsigmoid(beta*((u_w - u_l) - (c_w - c_l))) + L1.
    Prior: log zeta = sum_t [(1 - m^u) log pi + m^u log pi_ref] - sum_t m^d KL_t(pi_ref || pi); a = beta.
    m^u = m^d = 1 is TDPO1; m^u = 1, m^d = 0 is DPO. The L1 penalties sit outside the sigmoid (penalty()).
    masks="learned" (SparsePO as its authors ran it, mask_model simple_all): MaskHead on the reference's hidden states
    of every layer, trained jointly with the policy by the prior's own optimiser (prior.lr, prior.max_grad_norm,
    weight decay mask_weight_decay on w_l and c_l); one head for a common mask, or two (m^u, m^d) with common=false.
    Initialisation: m^u = m^d = 1 on every completion token, so a learned-mask run starts as TDPO1 exactly (both
    kinds); dropout, while training, leaves that true on average. At step 1 the policy equals the reference, so J's
    gradient into the masks (through log pi - log pi_ref and KL_t, both 0) is 0: they move from step 2 on.
    masks="activation": MaPO's masks from the reference's activations (zn_rescale, mean over layers; common).
    masks="given": per-token columns `mask` (common) or `mask_u`/`mask_d` (independent) from the data.
    """
    beta: float = 0.1          # README: 0.1 (HH), 0.8 (IMDB, TL;DR)
    masks: Literal["learned", "activation", "given"] = "learned"   # mask heads | MaPO masks (no learning) | data columns
    common: bool = True        # one mask for reward and KL (rw_kl_independent=False)
    l1_u: float = 0.0          # L1 coefficient on reward masks (code default 0; 0.001 for HH-common)
    l1_d: float = 0.0          # L1 coefficient on KL masks
    mask_dropout: float = 0.01         # masks=learned: dropout in the mask heads (sparse_config mask_dropout)
    mask_weight_decay: float = 0.01    # masks=learned: weight decay on w_l and c_l (sparse_config mask_weight_decay)
    lr: float = 5e-5           # masks=learned: the heads' learning rate (conf/prior/sparsepo.yaml: the policy's)
    max_grad_norm: float = 1.0         # masks=learned: clipping of the heads' gradient (0 = off)

    options = ({"masks": "given", "common": True, "l1_u": 0.001, "l1_d": 0.001},
               {"masks": "given", "common": False, "l1_u": 0.001, "l1_d": 0.002},
               {"masks": "activation", "common": True},
               {"masks": "learned", "common": True},
               {"masks": "learned", "common": False})
    reductions = (Reduction({"masks": "given", "common": False}, {"name": "tdpo", "variant": 1},
                            columns={"mask_u": 1.0, "mask_d": 1.0}, note="(m_u = m_d = 1)"),
                  Reduction({"masks": "given", "common": False}, {"name": "dpo", "beta": 0.1},
                            columns={"mask_u": 1.0, "mask_d": 0.0}, note="(m_u = 1, m_d = 0)"),
                  Reduction({"masks": "learned", "common": False}, {"name": "tdpo", "variant": 1},
                            note="(mask heads at their initialisation: m_u = m_d = 1)"))

    def __post_init__(self):
        super().__post_init__()
        self.learnable = self.masks == "learned"      # this setting owns parameters (Prior.learnable)
        self.heads = None                             # masks=learned: name -> MaskHead, built by attach
        self._stats = {}

    def validate(self) -> None:
        if self.masks == "activation" and not self.common:
            raise ValueError("prior.masks=activation gives one common mask; set prior.common=true "
                             "or use prior.masks=given with mask_u/mask_d columns")
        if not 0 <= self.mask_dropout < 1:
            raise ValueError(f"prior.mask_dropout={self.mask_dropout} must be in [0, 1) (the mask heads' dropout "
                             "probability, prior.masks=learned)")
        for key, ok, rule in (("mask_weight_decay", self.mask_weight_decay >= 0, ">= 0"), ("lr", self.lr > 0, "> 0"),
                              ("max_grad_norm", self.max_grad_norm >= 0, ">= 0 (0 = off)")):
            if not ok:
                raise ValueError(f"prior.{key}={getattr(self, key)} must be {rule} (the mask heads' optimiser, "
                                 "prior.masks=learned)")

    def knobs(self) -> tuple[str, ...]:
        """beta and the L1 coefficients; the heads' dropout, weight decay, lr and clipping act on training only."""
        return ("beta", "l1_u", "l1_d")

    def needs(self) -> Needs:
        cols = ("mask",) if self.common else ("mask_u", "mask_d")
        return Needs(reference=True, kl_ref_pi=True, ref_activations=self.masks == "activation",
                     ref_hidden=self.masks == "learned", token_columns=cols if self.masks == "given" else ())

    # ----- the learned masks ---------------------------------------------------------------------------------

    def build_heads(self, layers: int, hidden: int, dtype=torch.float32) -> None:
        """The mask heads at their initialisation (m = 1): one ("m") for a common mask, else "u" and "d"."""
        names = ("m",) if self.common else ("u", "d")
        heads = torch.nn.ModuleDict({n: MaskHead(layers, hidden, self.mask_dropout, dtype) for n in names})
        self.heads = heads.train(self.training)                           # built late: in the prior's own mode

    def attach(self, policy, reference) -> None:
        """masks=learned: heads sized by the model's config (layers, hidden size), before the optimisers exist."""
        if self.masks != "learned":
            return
        config = getattr(getattr(policy, "module", policy), "config", None)
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        layers, hidden = getattr(config, "num_hidden_layers", None), getattr(config, "hidden_size", None)
        if not (isinstance(layers, int) and isinstance(hidden, int)):
            raise ValueError("prior.masks=learned sizes its mask heads by the model config's num_hidden_layers and "
                             "hidden_size, which this model's config does not give; use prior.masks=activation")
        self.build_heads(layers, hidden)

    def _hidden(self, v: PairView) -> Tensor:
        """The reference's hidden states [2, B, T, L, H]; heads built from their shape when nothing attached them
        (the Python API, `midpo verify`'s probes), else checked against it."""
        h = v.require("ref_hidden")
        layers, hidden = h.shape[-2:]
        if self.heads is None:
            self.build_heads(layers, hidden, h.dtype)
        elif next(iter(self.heads.values())).weight.shape != (layers, hidden):
            built = tuple(next(iter(self.heads.values())).weight.shape)
            raise ValueError(f"sparsepo: the mask heads were built for {built[0]} layers of size {built[1]}, but the "
                             f"reference gives {layers} of size {hidden} (model config and hidden states disagree)")
        return h

    def _learned(self, v: PairView) -> tuple[Tensor, Tensor]:
        h = self._hidden(v)
        pair = (self.heads["m"](h),) * 2 if self.common else (self.heads["u"](h), self.heads["d"](h))
        with torch.no_grad():
            n = v.mask.sum().clamp(min=1)
            named = {"mask": pair[0]} if self.common else {"mask_u": pair[0], "mask_d": pair[1]}
            self._stats = {f"prior/{k}_{what}": x for k, m in named.items() for what, x in
                           (("mean", (m * v.mask).sum() / n), ("zero", ((m == 0) * v.mask).sum() / n))}
        return pair

    def mask_pair(self, v: PairView) -> tuple[Tensor, Tensor]:
        """(m^u, m^d), each [2, B, T]; learned masks once per view (one dropout draw for log zeta and the penalty)."""
        if self.masks == "learned":
            if self not in v.memo:
                v.memo[self] = self._learned(v)
            return v.memo[self]
        if self.masks == "activation":
            m = zn_rescale(v.require("ref_activations"), v.mask).mean(-1)
            return m, m
        if self.common:
            return v.column("mask"), v.column("mask")
        return v.column("mask_u"), v.column("mask_d")

    def written_masks(self, v: PairView) -> tuple[Tensor, Tensor]:
        """(m^u, m^d) for original_loss: learned masks through MaskHead.written, the others as mask_pair."""
        if self.masks != "learned":
            return self.mask_pair(v)
        h = self._hidden(v)
        return (self.heads["m"].written(h),) * 2 if self.common else \
            (self.heads["u"].written(h), self.heads["d"].written(h))

    def param_groups(self) -> list[dict]:
        """Weight decay on the heads' weights w_l and c_l, none on the biases (the authors' optimiser groups)."""
        if self.heads is None:
            return super().param_groups()
        heads = list(self.heads.values())
        return [{"params": [p for h in heads for p in (h.weight, h.mixer)], "weight_decay": self.mask_weight_decay},
                {"params": [h.bias for h in heads], "weight_decay": 0.0}]

    def initial_equivalent(self) -> dict:
        return {"name": "tdpo", "variant": 1, "beta": self.beta} if self.masks == "learned" else \
            super().initial_equivalent()

    def gradient_check(self) -> str:
        return "learned-mask" if self.masks == "learned" else ""

    def scalars(self) -> dict:
        """Learned masks on the last batch: prior/mask_mean and prior/mask_zero (the fraction of completion tokens
        at 0), or the same for mask_u and mask_d."""
        return dict(self._stats)

    # ----- the loss --------------------------------------------------------------------------------------------

    def log_prior(self, v: PairView) -> Tensor:
        m_u, m_d = self.mask_pair(v)
        return v.seq((1 - m_u) * v.logps + m_u * v.require("ref_logps")) - v.seq(m_d * v.require("kl_ref_pi"))

    def original_loss(self, v: PairView) -> Tensor:
        m_u, m_d = self.written_masks(v)
        u = v.seq(m_u * (v.logps - v.ref_logps))                           # masked reward terms
        c = v.seq(m_d * -v.kl_ref_pi)                                      # token_kl = -KL(ref || pi)
        return -F.logsigmoid(self.beta * ((u[0] - u[1]) - (c[0] - c[1])))

    def penalty(self, v: PairView) -> Tensor:
        m_u, m_d = self.mask_pair(v)
        scale = 0.5 if self.common else 1.0                                # common mask: halved (sparse_config)
        l1 = lambda m: (m.abs() * v.mask).sum(-1).sum(0).mean()           # ||m_w||_1 + ||m_l||_1, batch mean
        return scale * (self.l1_u * l1(m_u) + self.l1_d * l1(m_d))
