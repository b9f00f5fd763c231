"""Sampling completions and scoring sequences, batched, for the built-in task's pairs and evaluation."""
from __future__ import annotations

import torch

from midpo_cli.console import Bar
from midpo_cli.data.tokenize import collate, encode_pair, render
from midpo_cli.engine.forward import model_logits
from midpo_cli.engine.logps import token_logps


@torch.no_grad()
def sample(model, tokenizer, prompts: list, temperature: float, max_new_tokens: int, device,
           batch_size: int = 256, bar: Bar | None = None) -> list[str]:
    """One sampled completion per prompt (string or messages), decoded up to EOS; `bar` advances by the prompts
    done."""
    was_training = model.training
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    outs: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [render(tokenizer, p, "")[0] for p in prompts[i:i + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=True).to(device)
            gen = model.generate(**enc, do_sample=temperature > 0, temperature=temperature or None, top_k=0,
                                 top_p=1.0, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            outs += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            if bar is not None:
                bar.advance(len(texts))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outs


@torch.no_grad()
def sequence_logps(model, tokenizer, prompts: list, completions: list[str], device, batch_size: int = 128,
                   bar: Bar | None = None):
    """log p(completion + EOS | prompt) per row, summed over completion tokens: [N] fp32; `bar` advances by the
    rows done."""
    was_training = model.training
    model.eval()
    res = []
    try:
        for i in range(0, len(prompts), batch_size):
            pairs = [encode_pair(tokenizer, {"prompt": p, "chosen": c, "rejected": c}, 10_000, 10_000)
                     for p, c in zip(prompts[i:i + batch_size], completions[i:i + batch_size])]
            b = collate(pairs, tokenizer.pad_token_id)
            half = {k: b[k][:len(pairs)].to(device) for k in ("input_ids", "attention_mask", "labels", "mask")}
            logits, _ = model_logits(model, half)                          # the engine's chunked head path
            lp = token_logps(logits, half["labels"]) * half["mask"]
            res.append(lp.sum(-1).cpu())
            if bar is not None:
                bar.advance(len(pairs))
    finally:
        model.train(was_training)
    return torch.cat(res)
