"""Per-token log-probabilities and full-vocabulary KL, computed in row chunks.

The input is either logits [N, T, V] or a `Head` (what the LM head reads [N, T, H], its weight [V, H] and
bias [V], and the architecture's logit map: engine/head.py); with a Head the logits are formed chunk by
chunk and never exist whole. Each chunk is upcast to fp32 on its own and recomputed in the backward pass
(activation checkpointing), so no fp32 [N, T, V] tensor is ever held whole, for either model.
N sequences (2B), T positions, V vocabulary.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


class LogitMap(NamedTuple):
    """How an architecture turns the head's input h into logits (engine/head.py reads it from the model):
    logits = softcap * tanh(z / softcap) (if softcap), z = scale * (W (hidden_scale * h) + b)."""
    hidden_scale: float = 1.0      # multiplies h before the head (MiniCPM3: 1 / logits_scaling)
    scale: float = 1.0             # multiplies the head's output (Cohere: logit_scale; Granite: 1 / logits_scaling)
    softcap: float | None = None   # tanh soft-capping (Gemma2: final_logit_softcapping)


class Head(NamedTuple):
    states: Tensor                 # [N, T, H] what the LM head reads (the decoder's output)
    weight: Tensor | None = None   # [V, H] LM-head weight; None means `states` already are logits [N, T, V]
    bias: Tensor | None = None     # [V] LM-head bias
    form: LogitMap = LogitMap()    # the architecture's scaling and soft-capping


def form_logits(states: Tensor, weight: Tensor | None, bias: Tensor | None = None,
                form: LogitMap = LogitMap()) -> Tensor:
    """Logits [..., V] in fp32 at least: the head in the weights' dtype (as the model runs it), the
    architecture's scaling and soft-capping in fp32 (float64 kept)."""
    if weight is None:
        x = states
    else:
        x = F.linear(states * form.hidden_scale if form.hidden_scale != 1.0 else states, weight, bias)
    x = x if x.dtype == torch.float64 else x.float()
    if form.scale != 1.0:
        x = x * form.scale
    if form.softcap:
        x = torch.tanh(x / form.softcap) * form.softcap
    return x


def _gathered(states, weight, bias, labels, form) -> Tensor:
    x = form_logits(states, weight, bias, form)
    return x.gather(-1, labels[..., None]).squeeze(-1) - x.logsumexp(-1)


def _kl(p_states, p_weight, p_bias, q_states, q_weight, q_bias, p_form, q_form) -> Tensor:
    """KL_t(p || q) per position, over the vocabulary."""
    lp = form_logits(p_states, p_weight, p_bias, p_form).log_softmax(-1)
    lq = form_logits(q_states, q_weight, q_bias, q_form).log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


CHUNK_ELEMENTS = 2**27   # automatic chunks hold about this many fp32 logits (512 MB)


def rows_per_chunk(chunk: int, states: Tensor, weight: Tensor | None) -> int:
    """`chunk` rows, or (chunk <= 0) as many as keep one chunk's fp32 logits near CHUNK_ELEMENTS."""
    if chunk > 0:
        return chunk
    vocab = weight.shape[0] if weight is not None else states.shape[-1]
    return max(1, CHUNK_ELEMENTS // max(1, states.shape[1] * vocab))


def _chunked(fn, chunk: int, args: list, rows: tuple[bool, ...], consts: tuple = ()) -> Tensor:
    """Apply fn over row chunks of the args flagged in `rows` (the others, weights, pass whole; `consts`,
    plain values, follow the args)."""
    n = args[0].shape[0]
    chunk = rows_per_chunk(chunk, args[0], args[1])
    grad = torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in args)
    outs = []
    for i in range(0, n, max(1, chunk)):
        parts = [a[i:i + chunk] if r else a for a, r in zip(args, rows)] + list(consts)
        outs.append(checkpoint(fn, *parts, use_reentrant=False) if grad else fn(*parts))
    return torch.cat(outs)


class Selected(NamedTuple):
    """A logits source at some positions of the [N, T] grid only (a packed forward's completion positions:
    engine/pack.py): log-probs and KL are computed there and scattered back, zero elsewhere."""
    source: Tensor | Head          # logits [M, 1, V] or a Head over [M, 1, H]
    index: Tensor                  # [M] positions in the flattened [N, T] grid, ascending
    shape: tuple[int, int]         # (N, T)


def select(x: Tensor | Head | Selected, index: Tensor, shape: tuple[int, int], at: Tensor | None = None) -> Selected:
    """Any source as a Selected one at grid positions `index`, read from its flattened rows `at` (default: `index`,
    a padded source [N, T, ...]; a packed forward's rows differ: engine/pack.py). A Selected source is kept."""
    if isinstance(x, Selected):
        return x
    h = _head(x)
    picked = h.states.reshape(-1, *h.states.shape[2:])[index if at is None else at][:, None]
    return Selected(picked if isinstance(x, Tensor) else h._replace(states=picked), index, shape)


def _scatter(values: Tensor, s: Selected) -> Tensor:
    """[M, 1] values at s.index -> [N, T], zero elsewhere."""
    out = values.new_zeros(s.shape[0] * s.shape[1])
    return out.index_copy(0, s.index, values[:, 0]).view(s.shape)


def _positions(chunk: int, s: Selected) -> int:
    """A chunk of `chunk` [N, T] rows as Selected positions (0: automatic)."""
    return chunk * s.shape[1] if chunk > 0 else 0


def _head(x) -> Head:
    return x if isinstance(x, Head) else Head(x, None)


def token_logps(logits: Tensor | Head | Selected, labels: Tensor, chunk: int = 0) -> Tensor:
    """log p(labels_t | s_t): logits [N, T, V] (or a Head, or a Selected source) aligned to labels [N, T] ->
    [N, T] fp32."""
    if isinstance(logits, Selected):
        picked = labels.reshape(-1)[logits.index][:, None]
        return _scatter(token_logps(logits.source, picked, _positions(chunk, logits)), logits)
    h = _head(logits)
    return _chunked(_gathered, chunk, [h.states, h.weight, h.bias, labels.clamp(min=0)], (True, False, False, True),
                    (h.form,))


def token_kl(p_logits: Tensor | Head | Selected, q_logits: Tensor | Head | Selected, chunk: int = 0) -> Tensor:
    """KL_t(p || q) [N, T] fp32; gradient flows into whichever side carries it. When either side is Selected,
    both are taken at its positions."""
    s = next((x for x in (p_logits, q_logits) if isinstance(x, Selected)), None)
    if s is not None:
        p, q = (select(x, s.index, s.shape).source for x in (p_logits, q_logits))
        return _scatter(token_kl(p, q, _positions(chunk, s)), s)
    p, q = _head(p_logits), _head(q_logits)
    return _chunked(_kl, chunk, [p.states, p.weight, p.bias, q.states, q.weight, q.bias],
                    (True, False, False, True, False, False), (p.form, q.form))


def to_pairs(x: Tensor) -> Tensor:
    """[2B, ...] (chosen rows, then rejected rows) -> [2, B, ...]."""
    return x.view(2, x.shape[0] // 2, *x.shape[1:])
