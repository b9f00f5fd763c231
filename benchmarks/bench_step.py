"""midpo's training step on the TRL anchor harness's shapes (bench_anchor.py: docs/benchmarks.md), same output format.

Model: Qwen2 at Qwen2.5-0.5B sizes, random init, bf16, sdpa; data: random tokens, prompt U[64,128],
chosen/rejected U[192,384]; tokens counted = 2*prompt + chosen + rejected. Prints `RESULT {json}` lines.
Usage: python benchmarks/bench_step.py PRIOR [PRIOR...]   (env BS, PROMPT, COMP, STEPS, CHUNK)
Variants (env): CACHED=1 reference log-probs precomputed (no reference model, like TRL precompute);
LORA=r LoRA rank-r adapters with the reference = adapters off (one copy); LORA=r TWO_COPIES=1 LoRA with a
separate reference copy (for the memory comparison).
"""
import json
import os
import random
import sys
import time

import torch

from midpo_cli.data.tokenize import EncodedPair, collate
from accelerate.utils import send_to_device

from midpo_cli.engine.trainer import step_loss
from midpo_cli.priors import build_prior

BS, PROMPT, COMP = int(os.environ.get("BS", 8)), int(os.environ.get("PROMPT", 128)), int(os.environ.get("COMP", 384))
STEPS, WARM, CHUNK = int(os.environ.get("STEPS", 25)), 5, int(os.environ.get("CHUNK", 0))
SMOKE = os.environ.get("SMOKE") == "1"      # a CPU smoke test of this script at toy sizes
VOCAB = 1000 if SMOKE else 151936
DEV = "cpu" if SMOKE else "cuda"


def model():
    from transformers import AutoModelForCausalLM, Qwen2Config
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4) if SMOKE else \
        dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14)
    cfg = Qwen2Config(**size, num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=4096, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").to(DEV)


def batch_pairs(rng):
    pairs, ntok = [], 0
    for _ in range(BS):
        p, c, r = (rng.randint(n // 2, n) for n in (PROMPT, COMP, COMP))
        ids = lambda n: [rng.randrange(VOCAB - 3) for _ in range(n)]
        pairs.append(EncodedPair(ids(p), ids(c), ids(r)))
        ntok += 2 * p + c + r
    return pairs, ntok


CACHED, LORA, TWO = os.environ.get("CACHED") == "1", int(os.environ.get("LORA", 0)), os.environ.get("TWO_COPIES") == "1"


def bench(name: str):
    from midpo_cli.engine import refcache
    from midpo_cli.engine.lora import AdapterOff, add_lora
    from types import SimpleNamespace
    random.seed(0); torch.manual_seed(0)
    rng = random.Random(0)
    prior = build_prior({"name": name})
    policy = model()
    n_params = sum(p.numel() for p in policy.parameters())
    needs = prior.needs()
    wants_ref = needs.reference_model or needs.snapshot
    if LORA:
        policy = add_lora(policy, SimpleNamespace(r=LORA, alpha=2 * LORA, dropout=0.0, target_modules=None))
        ref = (model().eval().requires_grad_(False) if TWO else AdapterOff(policy)) if wants_ref else None
    else:
        ref = model().eval().requires_grad_(False) if wants_ref and not CACHED else None
    batches = []
    for _ in range(STEPS + WARM):
        pairs, ntok = batch_pairs(rng)
        if CACHED:                                                         # precomputed before training, as TRL does
            for p, v in zip(pairs, refcache.compute(policy, pairs, VOCAB - 3, DEV, batch_size=BS, chunk=CHUNK)):
                p.values["ref_logps"] = v
        batches.append((pairs, ntok))
    models = {"reference": ref, "snapshot": ref}
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-6, fused=not SMOKE)
    times, toks = [], []
    if not SMOKE:
        torch.cuda.reset_peak_memory_stats()
    for pairs, ntok in batches:
        b = send_to_device(collate(pairs, VOCAB - 3), DEV)
        sync(); t = time.perf_counter()
        loss, _, _ = step_loss(b, policy, prior, models, CHUNK)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        sync(); times.append(time.perf_counter() - t); toks.append(ntok)
    st = sorted(times[WARM:])[len(times[WARM:]) // 2]
    tps = sum(toks[WARM:]) / len(toks[WARM:]) / st
    flops = (8 if ref is not None else 6) * n_params
    tag = f"midpo_{name}" + ("_cached" if CACHED else "") + (f"_lora{LORA}" if LORA else "") + ("_2copies" if TWO else "")
    print("RESULT " + json.dumps(dict(mode=tag, step_s=round(st, 4), tokens_per_s=round(tps),
                                      peak_gib=0.0 if SMOKE else round(torch.cuda.max_memory_allocated() / 2**30, 2),
                                      mfu=round(tps * flops / 989e12, 3), n_params=n_params, bs=BS)), flush=True)
    del policy, ref, opt
    if not SMOKE:
        torch.cuda.empty_cache()


def sync():
    if not SMOKE:
        torch.cuda.synchronize()


if __name__ == "__main__":
    for name in sys.argv[1:] or ["dpo"]:
        bench(name)
