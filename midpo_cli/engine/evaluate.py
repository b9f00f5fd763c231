"""Evaluation: held-out preference metrics (any data) and the built-in task's generative evaluation."""
from __future__ import annotations

import torch

from midpo_cli.tasks.builtin import messages, true_reward
from midpo_cli.engine.sampling import sample, sequence_logps


@torch.no_grad()
def task_evaluation(policy, reference, tokenizer, task, strings: list[str], device) -> dict:
    """Sample each held-out prompt once from the policy and once from the reference.

    Returns mean true reward of each, win-rate of policy over reference (ties count 1/2), an estimate
    of KL(pi || pi_ref) = E_{y~pi}[log pi(y|x) - log pi_ref(y|x)], and mean response lengths (characters).
    """
    prompts = [messages(task.kind, s) for s in strings]
    max_new = task.max_len * 2 + 2
    pol = sample(policy, tokenizer, prompts, task.temperature, max_new, device)
    ref = sample(reference, tokenizer, prompts, task.temperature, max_new, device)
    r_pol = torch.tensor([true_reward(task.kind, s, y) for s, y in zip(strings, pol)])
    r_ref = torch.tensor([true_reward(task.kind, s, y) for s, y in zip(strings, ref)])
    kl = sequence_logps(policy, tokenizer, prompts, pol, device) - sequence_logps(reference, tokenizer, prompts, pol, device)
    return {
        "true_reward/policy": r_pol.mean().item(),
        "true_reward/reference": r_ref.mean().item(),
        "win_rate": ((r_pol > r_ref).float() + 0.5 * (r_pol == r_ref).float()).mean().item(),
        "kl/policy_ref": kl.mean().item(),
        "length/policy": sum(map(len, pol)) / len(pol),
        "length/reference": sum(map(len, ref)) / len(ref),
        "exact/policy": (r_pol == 1.0).float().mean().item(),
        "exact/reference": (r_ref == 1.0).float().mean().item(),
        "samples": [{"prompt": s, "policy": a, "reference": b} for s, a, b in list(zip(strings, pol, ref))[:8]],
    }
