"""Optimisers, schedules and the optimiser step shared by preference training and task SFT."""
from __future__ import annotations

import torch
from torch import Tensor

SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}   # ours -> transformers'


def build(make, params, device):
    """The optimiser `make` (a partial from the optimizer config) over `params`; an unset `fused` becomes the fused
    kernel where the device has one (CUDA), torch's default elsewhere."""
    if getattr(make, "keywords", {}).get("fused", False) is None:
        make.keywords["fused"] = torch.device(device).type == "cuda" or None
    return make(params)


def schedule(optimizer, name: str, warmup_steps: int, total_steps: int):
    """The learning-rate schedule (transformers.get_scheduler): linear warm-up, then constant/linear/cosine."""
    from transformers import get_scheduler
    return get_scheduler(SCHEDULES[name], optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


def grad_norm(params) -> float:
    """Total L2 norm of the gradients (inf/nan if any gradient is not finite)."""
    return float(total_norm(params))


def total_norm(params) -> Tensor:
    """grad_norm as a 0-d tensor on the gradients' device (no host synchronisation)."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def clip_and_step(params, optimizer, scheduler, max_grad_norm: float) -> float:
    """Clip (when max_grad_norm > 0), step optimiser and schedule, clear gradients; returns the gradient norm."""
    params = list(params)
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm)) if max_grad_norm > 0 else grad_norm(params)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def finite_parameters(*modules) -> bool:
    """Whether every parameter and buffer of the modules is finite (checked before anything is saved)."""
    for m in modules:
        if m is None:
            continue
        for t in list(m.parameters()) + list(m.buffers()):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return False
    return True

