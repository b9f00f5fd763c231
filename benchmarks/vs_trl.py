"""midpo's training step against TRL's DPOTrainer, timed in one run on the same weights, batches and settings.

    python benchmarks/vs_trl.py                     # CPU: a small Llama, fp32; with a GPU: Qwen2.5-0.5B's shape, bf16
    python benchmarks/vs_trl.py --smoke             # tiny model, one dataset, 1+2 steps: checks the harness itself
    python benchmarks/vs_trl.py --datasets wide --modes trl,midpo_dpo --batch 8 --steps 12 --out vs_trl.json

Same inputs. One seeded random init is saved once and every mode loads it. The data are random words through a
WordLevel tokenizer built here (`w123` is token 123): `builtin` (prompt U[16,64] tokens, completions U[16,128], like
short instruction data) and `wide` (prompt U[8,256], completions log-uniform in [4,512]). TRL tokenises the rows
itself (EOS appended to each completion, no BOS, no truncation: max_length=None); a preparing subprocess reads TRL's
tokenised rows in its sampler's order (sequential) and every midpo mode trains on exactly those token ids, batch for
batch (each TRL mode checks that it got the same). Both: AdamW (lr, betas, eps, weight decay 0; fused on CUDA only),
constant schedule without warm-up, gradient clipping at 1.0, beta 0.1, sigmoid loss, no dropout; on CUDA bf16
weights under bf16 autocast (TRL's bf16=True, midpo's precision=bf16).

Modes, each in its own subprocess (its own peak RSS and allocator): trl (live reference), trl_precompute
(precompute_ref_log_probs), midpo_dpo (packed when this tree and model can pack), midpo_dpo_padded, midpo_dpo_cached
(reference log-probs from engine/refcache.compute before timing; packed), midpo_tdpo (the live reference for its
full-vocabulary KL; packed). A precomputed or cached reference is scored by the untrained policy, without a copy.

What each timer covers. midpo, as its training loop runs a step: collate (its DataLoader collates on the fly),
send_to_device, step_loss (policy and reference forwards, loss, metrics), backward, clip_grad_norm_, optimizer step,
zero_grad. TRL: from the end of one optimiser step to the end of the next (the Trainer's on_step_end callback): the
DataLoader's next batch (DataCollatorForPreference pads it), moving it to the device, compute_loss (forwards, loss,
the metrics TRL logs), backward, clipping, optimiser and scheduler step, zero_grad and the Trainer's bookkeeping;
`core_s` in the JSON is on_step_begin..on_step_end, without fetching and collating the batch. Tokenising, TRL's
precompute and midpo's reference pass are outside both timers.

Figures: median step seconds; tokens/s = tokens of the timed steps / their time, tokens = 2*prompt + chosen + rejected
(EOS included; the same count for both); peak RSS of the mode's process (ru_maxrss) on CPU, torch.cuda.max_memory_
allocated while training on GPU; MFU with 6N FLOPs/token for the policy's forward and backward plus 2N for a live
reference forward (N = all parameters) against 989 TFLOP/s bf16 on GPU, or on CPU against this machine's fp32 matmul
rate measured at start. Ratios: baseline median step / median step (vs TRL: >1 means midpo is faster), peak memory /
the baseline's. Default sizes per device: DEFAULTS (on 2 CPU cores a step at batch 8 takes 3-4 s on builtin and
10-18 s on wide, so the CPU default is batch 4, 1+5 steps: 5-6 minutes for both datasets on a quiet machine).
The losses agree to ~1e-6 in fp32: the forwards agree (with --smoke --lr 1e-7 the losses are bit-equal), and the
optimiser steps carry the rounding differences of the two gradient computations into the next steps' losses.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from importlib.metadata import version
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MODES = ("trl", "trl_precompute", "midpo_dpo", "midpo_dpo_padded", "midpo_dpo_cached", "midpo_tdpo")
OPTIONAL = ("midpo_dpo_compiled",)     # trainer.compile=true: asked for by --modes, not in the default run
LIVE_REFERENCE = {"trl", "midpo_dpo", "midpo_dpo_padded", "midpo_tdpo", "midpo_dpo_compiled"}  # 8N FLOPs/token, else 6N
AGREE = {"midpo_dpo": "trl", "midpo_dpo_padded": "trl", "midpo_dpo_cached": "trl_precompute",
         "midpo_dpo_compiled": "midpo_dpo"}   # the same loss
RATIOS = [("midpo_dpo", "trl"), ("midpo_dpo_cached", "trl_precompute"), ("midpo_tdpo", "trl"),
          ("midpo_dpo", "midpo_dpo_padded"), ("midpo_dpo_compiled", "midpo_dpo")]   # (mode, baseline)
DATASETS = {"builtin": ((16, 64), (16, 128), "uniform"), "wide": ((8, 256), (4, 512), "log-uniform")}
MODELS = {       # LlamaConfig on CPU (and --smoke), Qwen2Config at Qwen2.5-0.5B's sizes on CUDA
    "cpu": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=False),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False),
    "cuda": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}
DEFAULTS = {"cpu": dict(batch=4, warmup=1, steps=5), "cuda": dict(batch=8, warmup=3, steps=12),
            "smoke": dict(batch=2, warmup=1, steps=2)}
BETA, BETAS, EPS, MAX_GRAD_NORM = 0.1, (0.9, 0.999), 1e-8, 1.0
GPU_PEAK = 989e12                                                             # H100/H200 dense bf16 FLOP/s


# ------------------------------------------------------------------------------------ shared by every process

def rows(name: str, n: int, vocab: int, seed: int) -> list[dict]:
    """n text rows of random words; lengths in tokens as DATASETS says (the tokenizer maps one word to one token)."""
    (p_lo, p_hi), (c_lo, c_hi), shape = DATASETS[name]
    rng = random.Random(f"{name}-{seed}")
    completion = (lambda: rng.randint(c_lo, c_hi)) if shape == "uniform" else \
        (lambda: round(math.exp(rng.uniform(math.log(c_lo), math.log(c_hi)))))
    words = lambda k: " ".join(f"w{rng.randrange(vocab - 3)}" for _ in range(k))
    return [{"prompt": words(rng.randint(p_lo, p_hi)) + " ", "chosen": words(completion()),
             "rejected": words(completion())} for _ in range(n)]


def tokenizer(vocab: int):
    """`w<i>` -> token i; the last three ids are <pad>, <eos>, <unk>; no BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    ids = {f"w{i}": i for i in range(vocab - 3)} | {"<pad>": vocab - 3, "<eos>": vocab - 2, "<unk>": vocab - 1}
    tk = Tokenizer(models.WordLevel(vocab=ids, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def new_model(args, weights: Path | None = None):
    """The benchmark's model on args.device: seeded random init, or the saved initial weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config
    config = (Qwen2Config if args.size == "cuda" else LlamaConfig)(**MODELS[args.size], max_position_embeddings=2048)
    torch.manual_seed(args.seed)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    if weights is not None:
        model.load_state_dict(torch.load(weights, weights_only=True))
    return model.to(args.device)


def sync(args) -> None:
    if args.device == "cuda":
        torch.cuda.synchronize()


def rss_mb() -> float:
    """The process's resident memory now (MB)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb(args) -> float:
    if args.device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------- TRL's side

def dpo_trainer(args, work: Path, name: str, precompute: bool, callbacks=()):
    """TRL's DPOTrainer on the dataset's rows with the settings of the module docstring; its `losses` keeps each
    step's unrounded loss (the Trainer logs losses rounded to 4 digits)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    class Recorded(DPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.losses.append(loss.detach())
            return loss

    cuda, n = args.device == "cuda", args.batch * (args.warmup + args.steps)
    config = DPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=BETAS[0],
        adam_beta2=BETAS[1], adam_epsilon=EPS, max_grad_norm=MAX_GRAD_NORM, optim="adamw_torch_fused" if cuda
        else "adamw_torch", bf16=cuda, use_cpu=not cuda, beta=BETA, loss_type=["sigmoid"], max_length=None,
        precompute_ref_log_probs=precompute, train_sampling_strategy="sequential", gradient_checkpointing=False,
        disable_dropout=True, logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
        seed=args.seed)
    weights = work / "init.pt"
    trainer = Recorded(model=new_model(args, weights), ref_model=None if precompute else new_model(args, weights),
                       args=config, train_dataset=Dataset.from_list(rows(name, n, args.vocab, args.seed)),
                       processing_class=tokenizer(args.vocab), callbacks=list(callbacks))
    trainer.losses = []
    return trainer


def trl_pairs(trainer) -> list[list[list[int]]]:
    """[prompt ids, chosen ids, rejected ids] of TRL's tokenised rows, in the order its sampler deals them."""
    ds = trainer.train_dataset
    cols = ds.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])[:]
    return [[cols["prompt_ids"][i], cols["chosen_ids"][i], cols["rejected_ids"][i]]
            for i in trainer._get_train_sampler(ds)]                 # the sampler get_train_dataloader uses


def prepare(args, work: Path) -> None:
    """The initial weights (init.pt) and, per dataset, TRL's token ids in batch order (<dataset>.json)."""
    torch.save(new_model(args).state_dict(), work / "init.pt")
    for name in args.datasets:
        trainer = dpo_trainer(args, work, name, precompute=False)
        pad = trainer.processing_class.pad_token_id
        (work / f"{name}.json").write_text(json.dumps({"pad_id": pad, "pairs": trl_pairs(trainer)}))


def run_trl(args, work: Path, name: str, precompute: bool) -> dict:
    """TRL's training run, its steps timed by Trainer callbacks (see the module docstring), and its exact losses."""
    from transformers import TrainerCallback
    imported = rss_mb()
    begins, ends = [], []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()

        def on_step_begin(self, *a, **k):
            sync(args)
            begins.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            sync(args)
            ends.append(time.perf_counter())

    trainer = dpo_trainer(args, work, name, precompute, [Clock()])
    if trl_pairs(trainer) != json.loads((work / f"{name}.json").read_text())["pairs"]:
        raise RuntimeError(f"TRL tokenised {name} differently than in the preparing process")
    trainer.train()
    starts = [begins[0], *ends[:-1]]                                     # a step runs from the previous step's end
    return {"times": [e - s for s, e in zip(starts, ends)], "core_s": [e - b for b, e in zip(begins, ends)],
            "losses": [float(x) for x in trainer.losses], "import_mb": imported, "peak_mb": peak_mb(args),
            "n_params": sum(p.numel() for p in trainer.model.parameters())}


# --------------------------------------------------------------------------------------------- midpo's side

def packing(policy, pairs: list, pad: int):
    """(the pack kind midpo uses for this policy, None) or (None, why batches stay padded)."""
    from midpo_cli.data.tokenize import collate
    try:
        from midpo_cli.engine.pack import pack_kind
    except ImportError:
        return None, "packing is unavailable in this tree (no midpo_cli.engine.pack): padded"
    kind = pack_kind(policy)
    if kind is None:
        return None, "pack_kind gives None for this model: padded"
    try:
        collate(pairs[:1], pad, pack=kind)
    except TypeError as e:
        return None, f"packing is unavailable in this tree (collate(pack=...): {e}): padded"
    return kind, None


def run_midpo(args, work: Path, name: str, mode: str) -> dict:
    """midpo's steps, as its training loop runs them (recipe.py _backward, _clip, _apply), on TRL's batches."""
    from accelerate.utils import send_to_device
    from midpo_cli.data.tokenize import EncodedPair, collate
    from midpo_cli.engine import refcache
    from midpo_cli.engine.models import frozen
    from midpo_cli.engine.trainer import step_loss
    from midpo_cli.priors import build_prior
    imported = rss_mb()
    data = json.loads((work / f"{name}.json").read_text())
    pad, pairs = data["pad_id"], [EncodedPair(*p) for p in data["pairs"]]
    weights, cuda = work / "init.pt", args.device == "cuda"
    policy = new_model(args, weights).train()
    prior = build_prior({"name": "tdpo" if mode == "midpo_tdpo" else "dpo", "beta": BETA})
    if mode == "midpo_dpo_cached":                                       # before training, as TRL precomputes
        for p, v in zip(pairs, refcache.compute(policy, pairs, pad, args.device, batch_size=args.batch, chunk=0)):
            p.values[refcache.COLUMN] = v
    ref = None if mode == "midpo_dpo_cached" else frozen(new_model(args, weights))
    kind, note = (None, "padded") if mode == "midpo_dpo_padded" else packing(policy, pairs, pad)
    if mode == "midpo_dpo_compiled":                                     # as trainer.compile=true does
        from midpo_cli.engine.models import compile_blocks
        compile_blocks(policy, ref)
    batcher = partial(collate, pack=kind) if kind else collate
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=BETAS, eps=EPS, weight_decay=0.0, fused=cuda)
    models = {"reference": ref, "snapshot": ref}
    times, losses = [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for k in range(args.warmup + args.steps):
        sync(args)
        start = time.perf_counter()
        batch = send_to_device(batcher(pairs[k * args.batch:(k + 1) * args.batch], pad), args.device)
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=cuda):
            loss, _, _ = step_loss(batch, policy, prior, models, 0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(args)
        times.append(time.perf_counter() - start)
        losses.append(loss.detach())
    return {"times": times, "losses": [float(x) for x in losses], "import_mb": imported, "peak_mb": peak_mb(args),
            "n_params": sum(p.numel() for p in policy.parameters()), "pack": kind, "note": note}


# ------------------------------------------------------------------------------------------- the parent

def cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    names = [x.split(":", 1)[1].strip() for x in info.read_text().splitlines() if x.startswith("model name")] \
        if info.exists() else []
    return names[0] if names else platform.processor() or platform.machine()


def matmul_peak(threads: int) -> float:
    """This machine's fp32 FLOP/s: the best of a few 2048^3 matmuls (the CPU figures' MFU denominator)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best


def spawn(work: Path, mode: str, name: str = "") -> dict:
    """One mode (or the preparation) in its own process; its output is shown only when it fails."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, __file__, *sys.argv[1:], "--child", mode, "--dataset", name, "--work", str(work)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stdout[-3000:] + res.stderr[-6000:])
        raise SystemExit(f"mode {mode} {name} failed (exit {res.returncode}); its output is above")
    out = work / f"{mode}-{name}.json"
    return json.loads(out.read_text()) if out.exists() else {}


def figures(r: dict, mode: str, pairs: list, args, peak_flops: float) -> dict:
    """Median step, tokens/s and MFU of one mode over the timed steps (the warm-up steps are left out)."""
    b, w = args.batch, args.warmup
    tokens = [sum(2 * len(p) + len(c) + len(x) for p, c, x in pairs[k * b:(k + 1) * b]) for k in range(len(r["times"]))]
    tps = sum(tokens[w:]) / sum(r["times"][w:])
    flops = (8 if mode in LIVE_REFERENCE else 6) * r["n_params"]
    return {"step_s": statistics.median(r["times"][w:]), "tokens_per_s": tps, "mfu": tps * flops / peak_flops,
            "flops_per_token": flops, "first_s": r["times"][0]}       # the first step: a compiled mode compiles


def padding_share(pairs: list, b: int) -> float:
    """Share of a padded batch's token slots (2B x its longest prompt+completion) that are padding, all batches."""
    slots = real = 0
    for k in range(0, len(pairs), b):
        group = pairs[k:k + b]
        slots += 2 * len(group) * max(len(p) + max(len(c), len(x)) for p, c, x in group)
        real += sum(2 * len(p) + len(c) + len(x) for p, c, x in group)
    return (slots - real) / slots


def table(out: dict, args) -> str:
    mem = "peak MB" if args.device == "cuda" else "peak RSS MB"
    lines = [f"| dataset | mode | batches | median step s | first step s | tokens/s | {mem} | RSS after imports MB "
             "| MFU |", "|---|---|---|---|---|---|---|---|---|"]
    for name, d in out["datasets"].items():
        for mode, r in d["modes"].items():
            shape = "TRL padded" if mode.startswith("trl") else r["pack"] or "padded"
            lines.append(f"| {name} | {mode} | {shape} | {r['step_s']:.3f} | {r['first_s']:.2f} | "
                         f"{r['tokens_per_s']:,.0f} | "
                         f"{r['peak_mb']:,.0f} | {r['import_mb']:,.0f} | {r['mfu']:.1%} |")
    lines += ["", "| dataset | padding share | comparison | speed (baseline step / step) | memory (peak / baseline) |",
              "|---|---|---|---|---|"]
    for name, d in out["datasets"].items():
        for key, r in d["ratios"].items():
            lines.append(f"| {name} | {d['padding_share']:.0%} | {key} | {r['speed']:.2f}x | {r['memory']:.2f}x |")
    lines.append("")
    for name, d in out["datasets"].items():
        agree = ", ".join(f"{m} vs {AGREE[m]} {v:.1e}" for m, v in d["loss_agreement"].items())
        lines.append(f"loss agreement on {name} (max |loss difference| over {args.warmup + args.steps} steps, "
                     f"{'bf16' if args.device == 'cuda' else 'fp32'}): {agree or 'no pair of modes selected'}")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available (not with --smoke)")
    ap.add_argument("--datasets", help=f"comma-separated, of {', '.join(DATASETS)} (default: all; --smoke: builtin)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES + OPTIONAL)}")
    ap.add_argument("--batch", type=int, help="pairs per step (default: 4 on CPU, 8 on CUDA, 2 with --smoke)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (default: 1, 3 on CUDA)")
    ap.add_argument("--steps", type=int, help="timed steps per mode (default: 5, 12 on CUDA, 2 with --smoke)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads in every mode")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="2 layers, hidden 64, vocab 1000, batch 2, 1+2 steps")
    ap.add_argument("--out", type=Path, help="write every raw figure, the machine and the versions to this JSON file")
    for hidden in ("--child", "--dataset", "--work"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.device = args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    args.size = "smoke" if args.smoke else args.device
    args.vocab = MODELS[args.size]["vocab_size"]
    for key, value in DEFAULTS[args.size].items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    args.datasets = (args.datasets or ("builtin" if args.smoke else ",".join(DATASETS))).split(",")
    args.modes = args.modes.split(",")
    for given, known, what in ((args.datasets, DATASETS, "dataset"), (args.modes, MODES + OPTIONAL, "mode")):
        if set(given) - set(known):
            ap.error(f"unknown {what} {sorted(set(given) - set(known))}; choose from {', '.join(known)}")
    if min(args.batch, args.steps) < 1 or args.warmup < 0:
        ap.error(f"--batch and --steps must be at least 1 and --warmup at least 0, got {args.batch}, {args.steps}, "
                 f"{args.warmup}")
    return args


def child(args) -> None:
    """One subprocess's work: the preparation, or one mode on one dataset (its figures to <mode>-<dataset>.json)."""
    work = Path(args.work)
    if args.child == "prepare":
        return prepare(args, work)
    run = run_trl(args, work, args.dataset, args.child == "trl_precompute") if args.child.startswith("trl") \
        else run_midpo(args, work, args.dataset, args.child)
    (work / f"{args.child}-{args.dataset}.json").write_text(json.dumps(run))


def parent(args) -> None:
    """Every selected mode on every selected dataset, one subprocess each; the table, and the JSON with --out."""
    started, machine = time.perf_counter(), torch.cuda.get_device_name() if args.device == "cuda" else cpu_model()
    load = {"start": os.getloadavg()}
    print(f"machine: {machine}, {os.cpu_count()} cores, {args.threads} torch threads; load average at start "
          f"{_load(load['start'])} (the machine may be shared: other work slows every mode)", flush=True)
    peak_flops = GPU_PEAK if args.device == "cuda" else matmul_peak(args.threads)
    print(f"MFU against {peak_flops / 1e9:,.0f} GFLOP/s "
          f"({'bf16 dense' if args.device == 'cuda' else 'fp32 matmul, measured now'})", flush=True)
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                            text=True).stdout.strip()
    out = {"machine": machine, "cores": os.cpu_count(), "threads": args.threads, "peak_flops": peak_flops,
           "versions": {k: version(k) for k in ("torch", "transformers", "trl", "accelerate")}, "commit": commit,
           "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                    if k not in ("child", "dataset", "work")}, "datasets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        spawn(work, "prepare")
        for name in args.datasets:
            pairs = json.loads((work / f"{name}.json").read_text())["pairs"]
            d = out["datasets"][name] = {"padding_share": padding_share(pairs, args.batch), "modes": {}}
            for mode in args.modes:
                r = d["modes"][mode] = spawn(work, mode, name)
                r.update(figures(r, mode, pairs, args, peak_flops))
                print(f"{name} {mode}: {r['step_s']:.3f} s/step, {r['tokens_per_s']:,.0f} tokens/s"
                      + (f" ({r['note']})" if r.get("note") else ""), flush=True)
            m = d["modes"]
            d["ratios"] = {f"{a} vs {b}": {"speed": m[b]["step_s"] / m[a]["step_s"],
                                           "memory": m[a]["peak_mb"] / m[b]["peak_mb"]}
                           for a, b in RATIOS if a in m and b in m}
            d["loss_agreement"] = {a: max(abs(x - y) for x, y in zip(m[a]["losses"], m[b]["losses"]))
                                   for a, b in AGREE.items() if a in m and b in m}
    load["end"] = os.getloadavg()
    out.update(load_average=load, wall_s=time.perf_counter() - started)
    print("\n" + table(out, args))
    print(f"\nload average at end {_load(load['end'])}; wall {out['wall_s']:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))


def _load(avg) -> str:
    return " ".join(f"{x:.2f}" for x in avg)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
