"""Data preparation at scale: how fast a run turns a large local jsonl file into tokenised pairs.

Generates an N-row jsonl in a temporary directory (prompts ~100-400 characters, completions ~200-800; mostly
standard rows, some conversational ones with and without a system message, a few implicit-prompt rows and a
few bad rows), then times the path `midpo train dataset=local` takes before any model work: `load_rows`
and `build_pairs` for the train and eval splits, with the config composed by Hydra as a run composes it.
Two tokenizers: the default model's (engine.models.byte_tokenizer) and a byte-level BPE trained here on the
generated text (offline, in code; it adds BOS like Llama's, and its chat template starts with BOS too).

Each (code tree, tokenizer) is measured in a fresh subprocess with PYTHONPATH=<tree>, so two trees (e.g. a
checkout of an older commit and this one) are compared on the same file in the same call; peak RSS is the
subprocess's own, CPU time counts the Rust tokenizer's threads too. The subprocesses also print a digest of
every pair's token ids, truncation, values and of the data reports: equal digests mean the two trees prepared
bit-identical data. On a shared machine, --repeat interleaves the runs and summarises the fastest of each.

    python benchmarks/data_prep.py                                   # this tree, 200,000 rows
    python benchmarks/data_prep.py --code-root /tmp/old --code-root . --repeat 2   # before / after, same file
    python benchmarks/data_prep.py --rows 20000 --profile             # cProfile's top functions as well
Results: docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------- the data

def _words(rng: random.Random, n: int = 4000) -> list[str]:
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in ("a", "e", "i", "o", "u", "ou", "ai", "er")]
    return ["".join(rng.choice(syllables) for _ in range(rng.choice((1, 1, 2, 2, 3)))) for _ in range(n)]


def _text(rng: random.Random, words: list[str], lo: int, hi: int) -> str:
    target, out, size = rng.randint(lo, hi), [], 0
    while size < target:
        w = rng.choice(words)
        out.append(w + (rng.choice((".", ",", "?")) if rng.random() < 0.08 else ""))
        size += len(out[-1]) + 1
    return " ".join(out)[:target].capitalize()


BAD = ['{"prompt": "cut off', '{"prompt": "q", "chosen": null, "rejected": "r"}',
       '{"prompt": "q", "chosen": "same", "rejected": "same"}', '{"question": "q", "chosen": "a", "rejected": "b"}']


def write_rows(path: Path, n: int, seed: int = 0) -> dict:
    """The jsonl file; returns how many rows of each kind it holds."""
    rng = random.Random(seed)
    words, kinds = _words(rng), {"standard": 0, "conversational": 0, "implicit prompt": 0, "bad": 0}
    with open(path, "w") as f:
        for i in range(n):
            r = rng.random()
            prompt, chosen, rejected = (_text(rng, words, 100, 400), _text(rng, words, 200, 800),
                                        _text(rng, words, 200, 800))
            if r < 0.005:
                kind, line = "bad", BAD[i % len(BAD)]
            elif r < 0.015:
                kind, line = "implicit prompt", json.dumps({"chosen": prompt + " " + chosen,
                                                            "rejected": prompt + " " + rejected})
            elif r < 0.115:
                msgs = [{"role": "user", "content": prompt}]
                if rng.random() < 0.3:
                    msgs.insert(0, {"role": "system", "content": _text(rng, words, 20, 80)})
                kind, line = "conversational", json.dumps({"prompt": msgs,
                                                           "chosen": [{"role": "assistant", "content": chosen}],
                                                           "rejected": [{"role": "assistant", "content": rejected}]})
            else:
                kind, line = "standard", json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            kinds[kind] += 1
            f.write(line + "\n")
    return kinds


def write_bpe(data: Path, out: Path, vocab_size: int = 8000, sample: int = 20000) -> None:
    """A byte-level BPE trained on the file's first `sample` lines, saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    with open(data) as f:
        lines = list(itertools.islice(f, sample))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(lines, trainer)
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
                         "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}")
    tok.save_pretrained(out)


# ------------------------------------------------------------------------------ one measurement (subprocess)

def _digest(pairs: list, reports: list) -> str:
    h = hashlib.sha256()
    for p in pairs:
        h.update(repr((p.prompt, p.chosen, p.rejected, p.truncated, sorted(p.values.items()))).encode())
    h.update(json.dumps(reports, sort_keys=True).encode())
    return h.hexdigest()[:16]


def measure(data: str, tokenizer: str, profile: bool) -> dict:
    """Runs inside the subprocess: the preparation path of a run, timed."""
    import logging
    import resource

    from hydra import compose, initialize_config_dir, initialize_config_module

    from midpo_cli.__main__ import _register, config_path
    from midpo_cli.data.prepare import build_pairs
    from midpo_cli.data.sources import load_rows
    from midpo_cli.engine.models import byte_tokenizer

    logging.getLogger("midpo").setLevel(logging.ERROR)                    # the mixed-format warning
    _register()
    where = config_path()                                                  # pkg://... for the installed tree
    init = initialize_config_module(where.removeprefix("pkg://"), version_base="1.3") if where.startswith("pkg://") \
        else initialize_config_dir(config_dir=where, version_base="1.3")
    with init:
        cfg = compose("train", overrides=["dataset=local", f"dataset.path={data}"])
    if tokenizer == "byte":
        tok = byte_tokenizer()
    else:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(tokenizer)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    prof = None
    if profile:
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    t0 = time.perf_counter()
    train, evals = load_rows(cfg.dataset)
    t1 = time.perf_counter()
    train_pairs, train_report = build_pairs(train, tok, cfg.dataset, (), "train")
    eval_pairs, eval_report = build_pairs(evals, tok, cfg.dataset, (), "eval")
    t2 = time.perf_counter()
    if prof is not None:
        prof.disable()
    used = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime   # all threads (the Rust tokenizer's too)
    out = {"rows": len(train) + len(evals), "load_s": t1 - t0, "build_s": t2 - t1, "total_s": t2 - t0, "cpu_s": cpu_s,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_mb": rss_before,
           "kept": len(train_pairs) + len(eval_pairs), "digest": _digest(train_pairs + eval_pairs,
                                                                         [train_report, eval_report])}
    if prof is not None:
        import io
        import pstats
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        out["profile"] = buf.getvalue()
    return out


def run_one(root: Path, data: Path, tokenizer: str, profile: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, __file__, "--worker", str(data), "--worker-tokenizer", tokenizer] + ["--profile"] * profile
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=root)
    if res.returncode != 0:
        raise SystemExit(f"{root} / {tokenizer}: the measurement failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _line(name: str, root: str, r: dict) -> str:
    return (f"{name:<9} {root[-32:]:<32} {r['rows'] / r['total_s']:>8.0f} {r['total_s'] * 1e5 / r['rows']:>7.1f} "
            f"{r['load_s']:>7.1f} {r['build_s']:>8.1f} {r['cpu_s']:>6.1f} {r['peak_rss_mb']:>11.0f}  {r['digest']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=200_000, help="rows in the generated file")
    ap.add_argument("--code-root", action="append", type=Path, help="a midpo source tree to measure (repeatable; "
                    "default: this one)")
    ap.add_argument("--tokenizer", choices=("byte", "bpe", "both"), default="both")
    ap.add_argument("--repeat", type=int, default=1, help="measure each (tree, tokenizer) this many times, "
                    "interleaved, and summarise the fastest (on a shared machine the others wait for CPU)")
    ap.add_argument("--profile", action="store_true", help="print cProfile's top 25 functions per measurement")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-tokenizer", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, args.worker_tokenizer, args.profile)))
        return
    roots = [r.resolve() for r in args.code_root or [HERE]]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "prefs.jsonl"
        t = time.perf_counter()
        kinds = write_rows(data, args.rows)
        print(f"{data}: {args.rows} rows ({', '.join(f'{k} {v}' for k, v in kinds.items())}), "
              f"{data.stat().st_size / 2**20:.0f} MiB, written in {time.perf_counter() - t:.0f} s", flush=True)
        tokenizers = {}
        if args.tokenizer in ("byte", "both"):
            tokenizers["byte"] = "byte"
        if args.tokenizer in ("bpe", "both"):
            write_bpe(data, Path(tmp) / "bpe")
            tokenizers["bpe"] = str(Path(tmp) / "bpe")
        header = (f"{'tokenizer':<9} {'code root':<32} {'rows/s':>8} {'s/100k':>7} {'load s':>7} {'build s':>8} "
                  f"{'CPU s':>6} {'peak RSS MB':>11}  digest")
        print(header, flush=True)
        runs = {}
        for _ in range(args.repeat):
            for name, tok in tokenizers.items():
                for root in roots:
                    r = run_one(root, data, tok, args.profile)
                    runs.setdefault((name, root), []).append(r)
                    print(_line(name, str(root), r), flush=True)
                    if args.profile:
                        print(r["profile"], flush=True)
        if args.repeat > 1 or len(roots) > 1:
            print(f"\nfastest of {args.repeat}, speed-up against the first code root:\n{header}  speed-up")
            for name in tokenizers:
                first = min(r["total_s"] for r in runs[name, roots[0]])
                for root in roots:
                    best = min(runs[name, root], key=lambda r: r["total_s"])
                    print(f"{_line(name, str(root), best)}  {first / best['total_s']:.2f}x")


if __name__ == "__main__":
    main()
