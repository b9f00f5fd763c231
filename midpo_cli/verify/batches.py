"""Probe batches for `midpo verify`: random ragged logits, real forwards of the tiny model and SmolLM2,
and TRL's own DPO / SimPO loss code called on the same log-probs.

A Probe holds every per-token input a prior may ask for (all [2, B, T], index 0 = chosen, padding 0)
and the leaf tensors the gradient is taken with respect to. `view` hands a prior only what its
needs() declares, so an undeclared input shows up as an error instead of silently being there.
"""
from __future__ import annotations

import math
import zlib
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace

import torch
from torch import Tensor

from midpo_cli.engine.views import build_view, layer_means, layer_states
from midpo_cli.priors import Needs, PairView

F64 = torch.float64
PAIRS = [("Copy: abc\n", "abc", "abd"), ("Reverse: hello\n", "olleh", "hello there"),
         ("Sort: dcba\n", "abcd", "abdc d"), ("Say hi.\n", "hi!", "Hello, how are you today?")]


@dataclass
class Probe:
    """Everything a prior may read, as the engine would get it, plus the tensors gradients are compared on.

    sources: logits [N, T, V] of "policy" (carries the gradient), "reference" and "snapshot", N = 2B rows;
    labels, mask [N, T]; activations [N, T, L] (reference, per layer); hidden [N, T, L, H] (reference, every layer's
    hidden states); columns: name -> [N, T].
    `view(probe, needs)` hands them to the engine's view builder, so verify checks the priors on exactly the
    inputs training computes, and an undeclared input shows up as an error instead of silently being there."""
    sources: dict
    labels: Tensor
    mask: Tensor
    activations: Tensor
    hidden: Tensor
    columns: dict
    params: list[Tensor]           # leaves: policy logits (random) or model parameters (real)
    label: str = ""

    @property
    def full(self) -> dict:
        """Every per-token input as [2, B, T] float64 (for checks that build a PairView by hand)."""
        everything = Needs(reference=True, kl_ref_pi=True, kl_pi_ref=True, ref_activations=True, ref_hidden=True,
                           snapshot="path", token_columns=tuple(self.columns))
        v = view(self, everything)
        return {"logps": v.logps, "mask": v.mask, "ref_logps": v.ref_logps, "kl_ref_pi": v.kl_ref_pi,
                "kl_pi_ref": v.kl_pi_ref, "snapshot_logps": v.snapshot_logps,
                "ref_activations": v.ref_activations, "ref_hidden": v.ref_hidden, "token_values": v.token_values}


def view(p: Probe, needs: Needs, owned: dict | None = None, columns: dict | None = None, **override) -> PairView:
    """The PairView the engine would build for a prior with these needs (per-token data columns: whatever the
    prior declares, generated on demand; `columns` replaces some; the prior's own models (Needs.owned): the probe's
    snapshot logits stand in for each, unless `owned` gives them; plus per-field overrides)."""
    cols = {name: (columns or {}).get(name, p.columns[name]) for name in needs.token_columns}
    if owned is None:
        owned = {name: p.sources["snapshot"] for name in needs.owned}
    cross = cross_prompts(p, needs.cross_prompts) if needs.cross_prompts else (None, None)
    v = build_view(needs, p.labels, p.mask, p.sources["policy"], reference=p.sources["reference"],
                   snapshot=p.sources["snapshot"], owned=owned, ref_activations=p.activations, ref_hidden=p.hidden,
                   columns=cols, cross_logps=cross[0], cross_mask=cross[1])
    for k, x in override.items():
        setattr(v, k, {**v.token_values, **x} if k == "token_values" else x)
    return v


def cross_prompts(p: Probe, prompts: int) -> tuple[Tensor, Tensor]:
    """Stand-ins for responses scored after other prompts of the batch (Needs.cross_prompts): [2, B, K] sequence
    log-probs, random in [-12, -2], reproducible per probe; usable everywhere but at one entry, and not at all for one
    response (its prior falls back to what it does without other prompts)."""
    B = p.mask.shape[0] // 2
    K = min(prompts, B - 1)
    g = torch.Generator().manual_seed(zlib.crc32(p.label.encode()))
    values = -2.0 - 10.0 * torch.rand(2, B, K, generator=g, dtype=F64)
    usable = torch.ones(2, B, K, dtype=F64)
    if K:
        usable[0, 0, 0] = 0.0
        usable[1, -1] = 0.0
    return values, usable


class Columns(dict):
    """Per-token data columns [N, T] for whatever names the priors declare (Needs.token_columns), made on first
    use: uniform in [0.1, 1.3] on completion tokens, 0 on padding, reproducible per (seed, name)."""

    def __init__(self, mask: Tensor, seed: int):
        super().__init__()
        self.mask, self.seed = mask, seed

    def __missing__(self, name: str) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 7919 + zlib.crc32(name.encode()))
        self[name] = (0.1 + 1.2 * torch.rand(self.mask.shape, generator=g, dtype=F64)) * self.mask
        return self[name]


def random_probe(seed: int, B: int = 4, T: int = 7, V: int = 11, L: int = 3, H: int = 5) -> Probe:
    """Random float64 logits with unequal lengths and right padding."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64)
    lens = torch.tensor([[7, 4, 5, 2], [3, 6, 7, 5]])[:, :B]                           # [2, B], max = T
    mask = (torch.arange(T)[None, None] < lens[..., None]).to(F64).reshape(2 * B, T)  # [N, T]
    theta = rnd(2 * B, T, V).requires_grad_()                                         # [N, T, V] policy logits
    sources = {"policy": theta, "reference": rnd(2 * B, T, V), "snapshot": rnd(2 * B, T, V)}
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    acts = rnd(2 * B, T, L)                                                           # [N, T, L]
    hidden = rnd(2 * B, T, L, H)                                                      # [N, T, L, H]
    return Probe(sources, labels, mask, acts, hidden, Columns(mask, seed), [theta], f"random B={B} T={T} V={V}")


def _encode(tok, pairs) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded [2B, S] ids, attention mask, and completion mask over label positions [2B, S-1]."""
    rows = []
    for side in (1, 2):                                                                # chosen rows, then rejected
        for p in pairs:
            prompt = tok(p[0], add_special_tokens=False).input_ids
            rows.append((prompt, tok(p[side], add_special_tokens=False).input_ids + [tok.eos_token_id]))
    S = max(len(a) + len(b) for a, b in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.full((len(rows), S), pad, dtype=torch.long)
    att, comp = torch.zeros(len(rows), S), torch.zeros(len(rows), S - 1, dtype=F64)
    for i, (a, b) in enumerate(rows):
        ids[i, :len(a) + len(b)] = torch.tensor(a + b)
        att[i, :len(a) + len(b)] = 1
        comp[i, len(a) - 1:len(a) + len(b) - 1] = 1                                     # label t = token t+1
    return ids, att.long(), comp


def _model_probe(policy, ref_fn, snap_fn, tok, seed: int, label: str, params, pairs=PAIRS) -> Probe:
    ids, att, comp = _encode(tok, pairs)
    out = policy(input_ids=ids, attention_mask=att, output_hidden_states=True)
    with torch.no_grad():
        ref, snap = ref_fn(ids, att, out), snap_fn(ids, att, out)
        acts = layer_means(out.hidden_states).to(F64)                                  # [2B, S-1, L]
        states = layer_states(out.hidden_states).to(F64)                               # [2B, S-1, L, H]
    sources = {"policy": out.logits[:, :-1], "reference": ref, "snapshot": snap}       # [2B, S-1, V]
    return Probe(sources, ids[:, 1:], comp, acts, states, Columns(comp, seed), params, label)


def tiny_probe(seed: int) -> Probe:
    """The tiny Llama (float64), a real byte-tokenised batch; reference and snapshot: other seeds."""
    from midpo_cli.config import ModelConfig
    from midpo_cli.engine.models import byte_tokenizer, tiny_model

    tok = byte_tokenizer()
    cfg = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                      max_position_embeddings=128, dtype="float32")
    models = []
    for s in (seed, seed + 1, seed + 2):
        torch.manual_seed(s)
        models.append(tiny_model(cfg, tok).to(F64).eval())
    policy, ref, snap = models
    fwd = lambda m: lambda ids, att, _: m(input_ids=ids, attention_mask=att).logits[:, :-1]
    return _model_probe(policy, fwd(ref), fwd(snap), tok, seed, "tiny model forward",
                        [p for p in policy.parameters()])


def tiny_engine_setup(seed: int) -> tuple:
    """(policy, reference, batch) as the engine has them at step 0: a float64 tiny Llama, the reference as a frozen
    copy of it, and a collated batch of real pairs (pair_view's input: ids, attention mask, labels, mask)."""
    import copy

    from midpo_cli.config import ModelConfig
    from midpo_cli.engine.models import byte_tokenizer, frozen, tiny_model

    tok = byte_tokenizer()
    cfg = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                      max_position_embeddings=128, dtype="float32")
    torch.manual_seed(seed)
    policy = tiny_model(cfg, tok).to(F64)
    ids, att, comp = _encode(tok, PAIRS)
    batch = {"input_ids": ids, "attention_mask": att, "labels": ids[:, 1:], "mask": comp, "values": {}}
    return policy, frozen(copy.deepcopy(policy)), batch


def tiny_engine_batch(seed: int, pack: str | None, columns: tuple[str, ...] = ()) -> tuple:
    """(policy, reference, batch) as tiny_engine_setup, the policy moved off the reference, and the batch collated
    by the engine's own collate (padded, or with the packed layout `pack`: engine/pack.py); `columns`: per-token
    data columns the pairs carry (seeded values in [0.5, 1.5])."""
    from midpo_cli.data.tokenize import EncodedPair, collate
    from midpo_cli.engine.models import byte_tokenizer

    policy, reference, _ = tiny_engine_setup(seed)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for w in policy.parameters():
            w.add_(0.05 * torch.randn_like(w))
    tok = byte_tokenizer()
    enc = lambda text: tok(text, add_special_tokens=False).input_ids
    pairs = [EncodedPair(enc(p), enc(c) + [tok.eos_token_id], enc(r) + [tok.eos_token_id]) for p, c, r in PAIRS]
    values = torch.Generator().manual_seed(seed)
    draw = lambda n: (0.5 + torch.rand(n, generator=values, dtype=F64)).tolist()
    for p in pairs:
        p.values = {name: (draw(len(p.chosen)), draw(len(p.rejected))) for name in columns}
    return policy, reference, collate(pairs, tok.pad_token_id, pack)


def smollm2_probe(seed: int) -> Probe:
    """SmolLM2-135M-Instruct, loaded as `train model=smollm2-135m` loads it, in float64, on two real pairs;
    gradient w.r.t. its last block and final norm (cheap). Reference / snapshot: the same forward at
    temperature 1.25 / 1.6 (distinct distributions without a second model)."""
    from midpo_cli.config import ModelConfig
    from midpo_cli.engine.models import load_model, load_tokenizer

    cfg = ModelConfig(source="smollm2", dtype="float32")
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok).to(F64).eval().requires_grad_(False)
    trainable = [*model.model.layers[-1].parameters(), *model.model.norm.parameters()]
    for w in trainable:
        w.requires_grad_(True)
    temp = lambda t: lambda ids, att, out: out.logits[:, :-1].detach() / t
    return _model_probe(model, temp(1.25), temp(1.6), tok, seed, "SmolLM2-135M forward (last block)",
                        trainable, PAIRS[:2])


# ----- TRL cross-checks: TRL's own loss code on our log-probs -----------------------------------------

class _FixedOutputs:
    """Stands in for a TRL-patched model (fused LM head): returns precomputed per-token outputs."""
    training = True
    is_gradient_checkpointing = False                                      # read by trl's reference pass ...
    _modules: dict = {}                                                    # ... and by its is_peft_model

    def __init__(self, **outputs):
        self.outputs = SimpleNamespace(**outputs)

    def __call__(self, *args, **kwargs):
        return self.outputs


def _accelerator():
    same = lambda x: x
    return SimpleNamespace(device=torch.device("cpu"), gather=same, gather_for_metrics=same)


def trl_dpo_loss(p: Probe, beta: float, loss_type: str = "sigmoid", ld_alpha: float | None = None,
                 reference: str = "ref_logps") -> Tensor:
    """trl.DPOTrainer._compute_loss (reverse_kl; `loss_type`, `ld_alpha`), called unbound on a minimal trainer
    namespace with a model that returns our per-token log-probs. The reference log-probs are precomputed sums,
    or, with ld_alpha or another `reference` (a Probe.full key: "snapshot_logps", the logits verify stands in for
    a prior's own model, e.g. TR-DPO's moving reference), TRL's own reference pass over a stand-in reference model
    (it weights their tail too; TRL's sync_ref_model needs that live ref_model, not precomputed sums)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    logps, mask, ref = p.full["logps"], p.full["mask"], p.full[reference]
    n, T = 2 * logps.shape[1], logps.shape[-1]
    zeros = torch.zeros(n, T, dtype=F64)
    model = _FixedOutputs(log_probs=logps.reshape(n, T), entropy=zeros, mean_logits=zeros,
                          is_top1=zeros.bool(), log_sum_sq_probs=None, aux_loss=None)
    ref_seq = (ref * mask).sum(-1)                                                    # [2, B]
    inputs = {"input_ids": torch.zeros(n, T + 1, dtype=torch.long), "attention_mask": torch.ones(n, T + 1),
              "completion_mask": torch.cat([torch.zeros(n, 1), mask.reshape(n, T).float()], 1),
              "ref_chosen_logps": ref_seq[0], "ref_rejected_logps": ref_seq[1]}
    ref_model = _FixedOutputs(log_probs=ref.reshape(n, T), entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(),
                              log_sum_sq_probs=None, aux_loss=None)
    trainer = SimpleNamespace(
        model=model, ref_model=ref_model, accelerator=_accelerator(), aux_loss_enabled=False, ld_alpha=ld_alpha,
        precompute_ref_logps=ld_alpha is None and reference == "ref_logps", f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0], beta=beta, use_weighting=False,
        label_smoothing=0.0, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1, args=SimpleNamespace(gradient_checkpointing_kwargs=None))
    return DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)


def trl_sync_step(policy, reference, step: int, sync_every: int, mixup: float) -> None:
    """TRL's SyncRefModelCallback.on_step_end after optimiser step `step` (global_step): its schedule (every
    ref_model_sync_steps steps) and its update (sync_target_model) of TRL's ref_model `reference`, in place. TRL asks
    the accelerator state whether DeepSpeed ZeRO-3 is on; verify initialises no accelerator, so a state without
    DeepSpeed stands in (TRL then runs its plain update)."""
    from unittest import mock

    from trl.trainer import callbacks

    callback = callbacks.SyncRefModelCallback(ref_model=reference, accelerator=None)
    args = SimpleNamespace(ref_model_sync_steps=sync_every, ref_model_mixup_alpha=mixup)
    with mock.patch.object(callbacks, "AcceleratorState", lambda: SimpleNamespace(deepspeed_plugin=None)):
        callback.on_step_end(args, SimpleNamespace(global_step=step), None, model=policy)


def trl_simpo_loss(p: Probe, beta: float, simpo_gamma: float) -> Tensor:
    """trl.experimental.cpo.CPOTrainer.get_batch_loss_metrics with loss_type=simpo, cpo_alpha=0: TRL's own
    concatenation, length-averaged log-probs (get_batch_logps) and cpo_loss. TRL takes logits; to feed it the
    SAME per-token log-probs, the stand-in model's next-token distribution is two-way, {label: p_t, rest: 1-p_t},
    whose log-softmax at the label is log p_t exactly, with the same gradient."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    lp, mask = p.full["logps"], p.full["mask"]                                        # [2, B, T]
    B, T = lp.shape[1:]
    safe = torch.where(mask > 0, lp, torch.full_like(lp, -math.log(2)))              # no log(0) on padding
    two = torch.stack([safe, torch.log1p(-safe.exp())], -1)                           # [2, B, T, 2]
    logits = torch.cat([two, two.new_zeros(2, B, 1, 2)], 2)                           # [2, B, T+1, 2]: last unused
    labels = torch.zeros(2, B, T, dtype=torch.long).masked_fill(mask == 0, -100)
    labels = torch.cat([torch.full((2, B, 1), -100), labels], 2)                       # label t+1 scores logits t
    batch = {f"{side}_{k}": v[i] for i, side in enumerate(("chosen", "rejected")) for k, v in
             {"input_ids": labels.clamp(min=0), "attention_mask": torch.ones(2, B, T + 1, dtype=torch.long),
              "labels": labels}.items()}
    model = _FixedOutputs(logits=logits.reshape(2 * B, T + 1, 2))
    t = SimpleNamespace(is_encoder_decoder=False, pad_token_id=0, accelerator=_accelerator(), aux_loss_enabled=False,
                        cpo_alpha=0.0, loss_type="simpo", beta=beta, simpo_gamma=simpo_gamma, label_smoothing=0.0,
                        alpha=0.0, concatenated_inputs=CPOTrainer.concatenated_inputs,
                        get_batch_logps=CPOTrainer.get_batch_logps)
    t.concatenated_forward = partial(CPOTrainer.concatenated_forward, t)
    t.cpo_loss = partial(CPOTrainer.cpo_loss, t)
    loss, _ = CPOTrainer.get_batch_loss_metrics(t, model, batch)
    return loss
