"""What a run reads, fingerprinted: a finished run is reused, and an unfinished one resumed, only while its
inputs are the ones it was trained on.

Two kinds of fingerprint, both kept in the run directory's run.json:

    files    every input file the run reads, by path: the task's data files (`Task.inputs`), a local model
             directory's weights, config and tokenizer files, a GGUF file. Each is {size, mtime_ns, xxh3};
             size and modification time are the cheap first test, and only a file whose size or time moved is
             hashed again (a `touch` alone changes nothing). Known before the run directory is claimed.
    derived  what the run computed from its inputs before training: the token ids of every pair (and their
             per-token values) and the reference weights (e.g. a task's SFT reference, rebuilt in a new cache).
             Known after set-up; checked before a resume writes anything.

A file's hash is remembered under cache_dir (`fingerprints/`, keyed by path, size, time and inode), so the jobs of
a sweep over one large model hash its weights once.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CHUNK = 1 << 22
# The files of a model directory that a load reads (weights, config, tokenizer, remote code); README.md,
# training_args.bin and other bystanders are left out, so editing them refuses nothing.
MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
               "pytorch_model*.bin", "pytorch_model.bin.index.json", "tokenizer*", "vocab*", "merges.txt",
               "special_tokens_map.json", "added_tokens.json", "chat_template*", "*.model", "*.tiktoken", "*.py")


class InputsChanged(ValueError):
    """A run's inputs are not the ones the run in its directory was trained on."""


def file_hash(path: Path) -> str:
    import xxhash
    h = xxhash.xxh3_128()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _memo_path(memo: Path | None, path: Path) -> Path | None:
    return None if memo is None else memo / f"{hashlib.sha256(str(path).encode()).hexdigest()[:24]}.json"


def fingerprint(path: Path, memo: Path | None = None) -> dict:
    """{path, size, mtime_ns, xxh3} of one file; the hash comes from `memo` when size, time and inode agree."""
    st = path.stat()
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    entry = _memo_path(memo, path)
    try:
        known = json.loads(entry.read_text()) if entry is not None else None
    except (OSError, ValueError):
        known = None
    if isinstance(known, dict) and all(known.get(k) == v for k, v in stamp.items()) and known.get("xxh3"):
        digest = known["xxh3"]
    else:
        digest = file_hash(path)
        if entry is not None:
            try:
                entry.parent.mkdir(parents=True, exist_ok=True)
                tmp = entry.with_name(f".{entry.name}.{os.getpid()}")
                tmp.write_text(json.dumps({**stamp, "xxh3": digest}))
                os.replace(tmp, entry)
            except OSError:                                                # a memo is an optimisation only
                pass
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "xxh3": digest}


def model_files(directory: Path) -> list[Path]:
    """The files of a saved model directory that loading it reads (MODEL_FILES), sorted."""
    found = {p for pattern in MODEL_FILES for p in directory.glob(pattern) if p.is_file()}
    return sorted(found)


def files_of(labelled: list[tuple[str, Path]], memo: Path | None = None) -> dict[str, dict]:
    """{label: fingerprint} for (label, path) pairs; a directory stands for its model files (label/name)."""
    out = {}
    for label, path in labelled:
        path = Path(path).expanduser().resolve()
        if path.is_dir():
            for f in model_files(path):
                out[f"{label}/{f.name}"] = fingerprint(f, memo)
        elif path.is_file():
            out[label] = fingerprint(path, memo)
    return out


def changed(old: dict | None, new: dict, limit: int = 3) -> str:
    """What differs between two {label: fingerprint} maps, as `label FILE (xxh3 a… -> b…)`; '' when nothing. The
    hashes decide (`fingerprint` re-hashes only a file whose size, time or inode moved: the cheap first test)."""
    if not isinstance(old, dict):
        return ""
    out = []
    for label in sorted(old.keys() | new.keys()):
        a, b = old.get(label), new.get(label)
        if not isinstance(a, dict) or not isinstance(b, dict):
            gone = "removed" if b is None else "new"
            out.append(f"{label} {(a or b or {}).get('path', '')} ({gone} since the run started)")
        elif a.get("xxh3") != b.get("xxh3"):
            out.append(f"{label} {b['path']} (xxh3 {str(a.get('xxh3'))[:12]}… -> {b['xxh3'][:12]}…, "
                       f"{a.get('size')} -> {b['size']} bytes)")
    shown = "; ".join(out[:limit])
    return shown + (f"; and {len(out) - limit} more" if len(out) > limit else "")


def pairs_digest(pairs: list) -> str:
    """xxh3 of the token ids (and per-token values) of every pair, in order: what training reads of the data."""
    from array import array

    import xxhash
    h = xxhash.xxh3_128()
    for p in pairs:
        seqs = [p.prompt, p.chosen, p.rejected]
        h.update(array("q", [len(s) for s in seqs]).tobytes())
        for s in seqs:
            h.update(array("q", s).tobytes())
        for name in sorted(p.values):
            h.update(name.encode())
            for side in p.values[name]:
                h.update(array("q", [len(side)]).tobytes() + array("d", side).tobytes())
    return h.hexdigest()


def weights_digest(model) -> str:
    """xxh3 of a model's weights (names and bytes), LoRA adapters excluded: the reference it stands for."""
    import torch
    import xxhash
    h = xxhash.xxh3_128()
    for name, t in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


DERIVED = {"pairs": "the tokenised training and evaluation pairs (token ids)",
           "reference": "the reference weights (the model the run starts from, e.g. the task's SFT reference)"}


def derived_changed(old: dict | None, new: dict) -> str:
    """Which derived fingerprint differs, in words ('' when none or nothing was recorded)."""
    if not isinstance(old, dict):
        return ""
    return "; ".join(f"{DERIVED.get(k, k)} (xxh3 {str(old[k])[:12]}… -> {new[k][:12]}…)"
                     for k in sorted(new) if k in old and old[k] != new[k])


def model_inputs(model_cfg) -> list[tuple[str, Path]]:
    """The local files a model config loads: a saved directory (model=hf), its GGUF file, SmolLM2's GGUF. A hub id
    has no local file to fingerprint (its revision is the hub's); the tiny model is built from the config."""
    from midpo_cli.engine.models import local_path, smollm2_gguf

    if str(model_cfg.source) == "smollm2":
        try:
            folder, file = smollm2_gguf()
        except ValueError:                                                 # not installed: set-up says so later
            return []
        return [("model (SmolLM2 GGUF)", Path(folder) / file)]
    if str(model_cfg.source) != "hf" or not model_cfg.name_or_path:
        return []
    path = local_path(str(model_cfg.name_or_path))
    if path is None:
        return []
    if model_cfg.gguf_file:
        return [("model.gguf_file", path / model_cfg.gguf_file)]
    return [("model.name_or_path", path)]


def run_inputs(task, model_cfg, prior, memo: Path) -> dict[str, dict]:
    """Fingerprints of every file a run reads: the task's data files, the model, a prior's own files and snapshot
    model (hashes memoised under `memo`)."""
    labelled = [*task.inputs(), *model_inputs(model_cfg), *prior.input_files()]
    snapshot = prior.needs().snapshot
    if snapshot and snapshot != "reference" and Path(snapshot).expanduser().exists():
        labelled.append(("prior.snapshot", Path(snapshot)))
    return files_of(labelled, memo)
