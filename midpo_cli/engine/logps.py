"""Per-token log-probabilities and full-vocabulary KL, computed in row chunks.

Logits stay in the model's dtype; each chunk is upcast to fp32 on its own and recomputed in the
backward pass (activation checkpointing), so no fp32 [N, T, V] tensor is ever held whole, for either model.
Shapes: N sequences (2B: chosen rows then rejected rows), T positions, V vocabulary.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def _gathered(logits: Tensor, labels: Tensor) -> Tensor:
    x = logits.float()
    return x.gather(-1, labels[..., None]).squeeze(-1) - x.logsumexp(-1)


def _kl(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """KL_t(p || q) per position, over the vocabulary."""
    lp, lq = p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def _chunked(fn, chunk: int, *tensors: Tensor) -> Tensor:
    n = tensors[0].shape[0]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    outs = []
    for i in range(0, n, max(1, chunk)):
        parts = [t[i:i + chunk] for t in tensors]
        outs.append(checkpoint(fn, *parts, use_reentrant=False) if grad else fn(*parts))
    return torch.cat(outs)


def token_logps(logits: Tensor, labels: Tensor, chunk: int = 8) -> Tensor:
    """log p(labels_t | s_t): logits [N, T, V] (already aligned to labels), labels [N, T] -> [N, T] fp32."""
    return _chunked(_gathered, chunk, logits, labels.clamp(min=0))


def token_kl(p_logits: Tensor, q_logits: Tensor, chunk: int = 8) -> Tensor:
    """KL_t(p || q) [N, T] fp32 from two logits tensors [N, T, V]; gradient flows into whichever needs it."""
    return _chunked(_kl, chunk, p_logits, q_logits)


def to_pairs(x: Tensor) -> Tensor:
    """[2B, ...] (chosen rows, then rejected rows) -> [2, B, ...]."""
    return x.view(2, x.shape[0] // 2, *x.shape[1:])
