"""Supervised fine-tuning for tasks whose reference policy is trained from demonstrations.

It reuses the engine's pieces: the same tokenisation and batching (data/tokenize.py: prompt and completion
tokenised apart, EOS once, the completion mask) and the same optimiser step (engine/optim.py); what is
task-specific is only the objective, the mean token NLL of the demonstrations, computed from the model's own
logits with cross-entropy exactly as the built-in task always has, so its cached references, sampled pairs
and every number downstream stay what they were.
"""
from __future__ import annotations

import logging

import torch

from midpo_cli.console import progress
from midpo_cli.data.tokenize import collate, encode_pair
from midpo_cli.engine.optim import clip_and_step

log = logging.getLogger("midpo")


def supervised_finetune(model, tokenizer, demos: list[tuple], steps: int, lr: float, batch_size: int, seed: int,
                        device, warmup: int = 20, floor: float = 0.05, max_grad_norm: float = 1.0) -> None:
    """Train `model` in place on (prompt, completion) demonstrations: mean token NLL of the completions,
    AdamW, `warmup` steps of linear warm-up then a linear decay to `floor` x lr, batches drawn with
    replacement from a generator seeded with `seed`."""
    examples = [encode_pair(tokenizer, {"prompt": p, "chosen": c, "rejected": c}, 10_000, 10_000) for p, c in demos]
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup) * max(floor, 1 - i / steps))
    gen = torch.Generator().manual_seed(seed)
    with progress("SFT", steps, "steps") as bar:
        for step in range(steps):
            idx = torch.randint(len(examples), (batch_size,), generator=gen).tolist()
            b = collate([examples[i] for i in idx], tokenizer.pad_token_id)
            half = {k: b[k][:len(idx)].to(device) for k in ("input_ids", "attention_mask", "labels", "mask")}  # chosen
            logits = model(input_ids=half["input_ids"], attention_mask=half["attention_mask"]).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), half["labels"], reduction="none")
            loss = (nll * half["mask"]).sum() / half["mask"].sum()            # [2B, T] -> mean over completion tokens
            loss.backward()
            clip_and_step(model.parameters(), opt, sched, max_grad_norm)      # (it reads the norm: .item() is free)
            bar.info = f"nll {loss.item():.3f}"
            bar.advance()
            if step % 100 == 0 or step == steps - 1:
                log.info("  sft step %d/%d  nll %.3f", step + 1, steps, loss.item())
