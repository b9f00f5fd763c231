"""Local model directories (`model=hf model.name_or_path=DIR`): a broken one fails in one line that names the
directory, the file and what to do, never in a library traceback.

`check` runs before the run directory is claimed and reads only what is cheap: config.json and the
tokenizer's settings files (small JSON), file sizes, the first bytes of a GGUF, each .safetensors header (8 bytes
and its JSON), both ends of tokenizer.json and of a zip checkpoint. So a good directory loads as fast as
before. `explain` runs only after from_pretrained has failed: it reads what `check` skipped (every JSON
file in full, a GGUF through its reader) to name the damaged file, or else passes on the library's first
line. `check_shapes` turns transformers' loading report into the line for weights that do not fit config.json.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path


class BadModelDir(ValueError):
    """A local model directory that cannot be loaded; the message names it, the file and what to do."""


# the weights transformers looks for in a local directory, in its order (modeling_utils._get_resolved_checkpoint_files)
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# the vocabulary files of transformers' tokenizers (their vocab_files_names): any one set makes a tokenizer
VOCABULARIES = (("tokenizer.json",), ("tokenizer.model",), ("tiktoken.model",), ("tekken.json",),
                ("vocab.json", "merges.txt"), ("vocab.txt",), ("spiece.model",), ("sentencepiece.bpe.model",),
                ("sentencepiece.model",), ("spm.model",))
# the tokenizer's settings files: small, so `check` parses them whole
TOKENIZER_SETTINGS = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
# JSON files a load reads; `explain` parses each in full to find a damaged one
JSON_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json",
              "special_tokens_map.json", "added_tokens.json", "vocab.json", "chat_template.json",
              "model.safetensors.index.json", "pytorch_model.bin.index.json")
MAX_HEADER = 100_000_000              # safetensors refuses a longer header: longer means "not safetensors"
RESAVE = "copy it again from where it came from, or save the model again with save_pretrained"
RESAVE_TOKENIZER = "copy it again, or save the tokenizer again with save_pretrained"


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), with the next line when the
    first only announces it ("Validation error for field 'vocab_size':")."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def key_of(model_cfg) -> str:
    return f"model.name_or_path={model_cfg.name_or_path}"


def check(folder: Path, model_cfg) -> None:
    """Everything cheap to check in an existing directory before loading it: config.json, the weights (or the
    GGUF of model.gguf_file) and the tokenizer files. FileNotFoundError for a missing file, BadModelDir for one
    that is there but unusable; each names the directory (model.name_or_path=...) and the file."""
    key = key_of(model_cfg)
    if model_cfg.gguf_file:                                  # config and tokenizer come from the GGUF itself
        file = folder / model_cfg.gguf_file
        if not file.is_file():
            found = sorted(p.name for p in folder.glob("*.gguf"))
            raise FileNotFoundError(f"model.gguf_file={model_cfg.gguf_file}: no such file in {folder} "
                                    f"(.gguf files there: {', '.join(found) or 'none'})")
        _fail_if(_opened(folder, model_cfg.gguf_file, key, _gguf_problem), key, f"model.gguf_file={model_cfg.gguf_file}",
                 "copy or download it again")
        return
    if not (folder / "config.json").is_file():
        adapter = " (it holds a LoRA adapter, adapter_config.json: merge it into its base model with peft's " \
                  "merge_and_unload and save_pretrained the result)" if (folder / "adapter_config.json").is_file() else ""
        raise FileNotFoundError(f"{key}: {folder} has no config.json, so it is not a saved transformers model{adapter}; "
                                "point at the directory save_pretrained wrote (or give model.gguf_file)")
    conf = _config(folder, key, bool(model_cfg.trust_remote_code))
    _weights(folder, conf, key)
    _tokenizer(folder, key)


def _fail_if(problem: str | None, key: str, name: str, fix: str) -> None:
    if problem:
        raise BadModelDir(f"{key}: {name} {problem}; {fix}")


def _opened(folder: Path, name: str, key: str, inspect):
    """inspect(path) with a file that cannot be opened or read (permissions, ...) as one line naming it."""
    try:
        return inspect(folder / name)
    except OSError as e:
        raise BadModelDir(f"{key}: cannot read {name} in {folder}: {e.strerror or first_line(e)}; make it readable "
                          "(e.g. chmod a+r) or point at a copy you can read") from None


def _json(folder: Path, name: str, key: str, fix: str = RESAVE):
    """The parsed JSON file `name`; BadModelDir naming it (and where it breaks) when it is not JSON."""
    raw = _opened(folder, name, key, Path.read_bytes)
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}, column {e.colno}: {e.msg}" if raw.strip() else "the file is empty"
    except ValueError as e:                            # UnicodeDecodeError: binary, not text
        where = first_line(e)
    raise BadModelDir(f"{key}: {name} is not valid JSON ({where}); {fix}")


def _object(value, key: str, name: str, fix: str = RESAVE) -> dict:
    if not isinstance(value, dict):
        raise BadModelDir(f"{key}: {name} holds a JSON {type(value).__name__}, not an object of settings; {fix}")
    return value


def _config(folder: Path, key: str, trust: bool) -> dict:
    """config.json: a JSON object naming an architecture this transformers knows, or custom code (auto_map)
    that model.trust_remote_code allows."""
    from transformers import CONFIG_MAPPING, __version__

    conf = _object(_json(folder, "config.json", key), key, "config.json")
    kind, auto = conf.get("model_type"), conf.get("auto_map")
    known = isinstance(kind, str) and kind in CONFIG_MAPPING
    if isinstance(auto, dict) and "AutoConfig" in auto and not known:      # transformers then needs the shipped code
        if not trust:
            raise BadModelDir(f"{key}: config.json's architecture ({kind or auto['AutoConfig']}) is custom code shipped "
                              "in the directory (auto_map); set model.trust_remote_code=true, but only for code you trust")
        for ref in (auto["AutoConfig"], auto.get("AutoModelForCausalLM") or auto["AutoConfig"]):
            if not isinstance(ref, str) or "--" in ref:                # `repo--module.Class`: code from another repo
                continue
            module = f"{ref.rsplit('.', 1)[0]}.py"
            if not (folder / module).is_file():
                raise FileNotFoundError(f"{key}: config.json's auto_map names {ref}, but {module} is not in {folder}; "
                                        "copy the model's .py files along with its weights")
        return conf
    if not isinstance(kind, str) or not kind:
        raise BadModelDir(f"{key}: config.json has no \"model_type\", so transformers cannot tell the architecture; "
                          "add it (e.g. \"model_type\": \"llama\") or save the model again with save_pretrained")
    if not known:
        raise BadModelDir(f"{key}: config.json's model_type \"{kind}\" is not an architecture transformers {__version__} "
                          "knows, and config.json has no auto_map (custom code); check the name, or upgrade transformers "
                          "if the model is newer")
    return conf


def _weights(folder: Path, conf: dict, key: str) -> None:
    """The weights file transformers would load (config.json's transformers_weights, else the first of WEIGHTS)
    and, for an index, every shard it names: present, readable, and whole by their headers."""
    named = conf.get("transformers_weights")
    if isinstance(named, str):
        if not (folder / named).is_file():
            raise FileNotFoundError(f"{key}: config.json's transformers_weights names {named}, which is not in "
                                    f"{folder}; {RESAVE}")
        name = named
    else:
        name = next((n for n in WEIGHTS if (folder / n).is_file()), None)
    if name is None:
        raise FileNotFoundError(f"{key}: no weights in {folder}: looked for model.safetensors, "
                                "model.safetensors.index.json and its shards, pytorch_model.bin, "
                                f"pytorch_model.bin.index.json{_weights_hint(folder)}; save the model there with "
                                "save_pretrained")
    if not name.endswith(".index.json"):
        _fail_if(_opened(folder, name, key, _weights_problem), key, name, RESAVE)
        return
    shards = _object(_json(folder, name, key), key, name).get("weight_map")
    if not isinstance(shards, dict) or not all(isinstance(s, str) for s in shards.values()):
        raise BadModelDir(f"{key}: {name} has no \"weight_map\" (tensor name -> shard file), so the shards cannot "
                          f"be found; {RESAVE}")
    for shard in sorted(set(shards.values())):
        if not (folder / shard).is_file():
            raise FileNotFoundError(f"{key}: {name} names the shard {shard}, which is not in {folder}; copy every "
                                    "shard the index names, or save the model again with save_pretrained")
        _fail_if(_opened(folder, shard, key, _weights_problem), key, f"{shard} (a shard {name} names)", RESAVE)


def _weights_hint(folder: Path) -> str:
    """What the directory holds instead, when that says what was meant."""
    if (folder / "adapter_config.json").is_file():
        return " (it holds a LoRA adapter: merge it into its base model with peft's merge_and_unload first)"
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    if ggufs:
        return f" (it holds {ggufs[0]}: give model.gguf_file={ggufs[0]})"
    others = [p.name for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth") for p in sorted(folder.glob(pattern))
              if p.name != "training_args.bin"]                          # the Trainer's settings, not weights
    return f" (it holds {', '.join(others[:3])}: transformers reads only the names above)" if others else ""


def _weights_problem(file: Path) -> str | None:
    return _safetensors_problem(file) if file.suffix == ".safetensors" else _torch_problem(file)


def _looks_like(first: bytes) -> str:
    """What a file is, judged by its first bytes."""
    if first.startswith(b"PK\x03\x04"):
        return "a zip archive, as torch.save writes (a PyTorch checkpoint is named pytorch_model.bin)"
    if first[:1] == b"\x80":
        return "a Python pickle (torch.save's older format; a PyTorch checkpoint is named pytorch_model.bin)"
    if first.startswith(b"version "):
        return "a Git LFS pointer, not the file itself (run `git lfs pull` where it was cloned)"
    if first.startswith(b"GGUF"):
        return "a GGUF file (give it as model.gguf_file)"
    if first and all(32 <= b < 127 or b in b"\t\r\n" for b in first):
        return f"text ({first.decode()!r}...)"
    return f"unknown bytes ({first!r})"


def _safetensors_problem(file: Path) -> str | None:
    """What is wrong with a .safetensors file by its header alone (an 8-byte little-endian length, then that
    many bytes of JSON whose data_offsets must cover the rest of the file exactly), or None."""
    size = file.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    with file.open("rb") as f:
        first = f.read(8)
        if len(first) < 8:
            return f"is truncated: {size} bytes, not even the 8 that give the header's length"
        length = int.from_bytes(first, "little")
        if length > MAX_HEADER:
            return f"is not a safetensors file: it is {_looks_like(first)}"
        if 8 + length > size:
            return f"is truncated: its header alone should be {length} bytes, the file has {size}"
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except ValueError as e:
        return f"has a damaged header (not JSON: {first_line(e)})"
    try:
        end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
        end = 8 + length + int(end)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        return "has a damaged header (an entry without data_offsets)"
    if end > size:
        return f"is truncated: its header describes {end} bytes, the file has {size}"
    if end < size:
        return f"is damaged: it has {size - end} bytes more than its header describes"
    return None


def _torch_problem(file: Path) -> str | None:
    """What is wrong with a torch.save checkpoint by its ends: a zip must end in its central directory; an
    old-format pickle (first byte 0x80) cannot be checked without loading it."""
    size = file.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    with file.open("rb") as f:
        first = f.read(8)
    if first.startswith(b"PK\x03\x04"):
        return None if zipfile.is_zipfile(file) else "is truncated or damaged: a zip archive (torch.save) " \
                                                     "without the directory that ends one"
    return None if first[:1] == b"\x80" else f"is not a PyTorch checkpoint: it is {_looks_like(first)}"


def _gguf_problem(file: Path) -> str | None:
    """What is wrong with a GGUF by its 24-byte header (magic, version 2 or 3, tensor and metadata counts)."""
    size = file.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    with file.open("rb") as f:
        head = f.read(24)
    if not head.startswith(b"GGUF"):
        return f"is not a GGUF file: it is {_looks_like(head[:8])}"
    if len(head) < 24:
        return f"is truncated: {size} bytes, less than a GGUF header"
    order = "little" if int.from_bytes(head[4:8], "little") in (2, 3) else "big"   # GGUF may be big-endian
    version = int.from_bytes(head[4:8], order)
    tensors, entries = int.from_bytes(head[8:16], order), int.from_bytes(head[16:24], order)
    if version not in (2, 3) or tensors + entries > size:                 # each takes at least a byte
        return "has a damaged header (version or counts out of range)"
    return None


def _tokenizer(folder: Path, key: str) -> None:
    """The settings files (when there) JSON objects; tokenizer.json (when there) a JSON object by its ends;
    some vocabulary file present, unless a custom tokenizer (auto_map) names its own files."""
    settings = {name: _object(_json(folder, name, key, RESAVE_TOKENIZER), key, name, RESAVE_TOKENIZER)
                for name in TOKENIZER_SETTINGS if (folder / name).is_file()}
    conf = settings.get("tokenizer_config.json", {})
    if (folder / "tokenizer.json").is_file() and not _opened(folder, "tokenizer.json", key, _json_ends_whole):
        _object(_json(folder, "tokenizer.json", key, RESAVE_TOKENIZER), key, "tokenizer.json", RESAVE_TOKENIZER)
    if "auto_map" in conf or any(all((folder / n).is_file() for n in group) for group in VOCABULARIES):
        return
    looked = ", ".join(" + ".join(group) for group in VOCABULARIES)
    raise FileNotFoundError(f"{key}: {folder} holds no tokenizer: looked for {looked}; save one there with "
                            f"AutoTokenizer.from_pretrained(<the model it came from>).save_pretrained('{folder}')")


def _json_ends_whole(file: Path) -> bool:
    """Whether a JSON object file starts with '{' and ends with '}' (a cut-short file does not), reading 64
    bytes at each end; the full parse is left to the error path."""
    with file.open("rb") as f:
        start = f.read(64).lstrip()
        f.seek(max(0, file.stat().st_size - 64))
        end = f.read().rstrip()
    return start[:1] == b"{" and end[-1:] == b"}"


def explain(folder: Path, model_cfg, what: str, exc: BaseException) -> Exception:
    """The one-line error for a from_pretrained of `what` (model, tokenizer) from a local directory that raised
    `exc`: the damaged file when one is found, else the library's first line with the directory."""
    key = key_of(model_cfg)
    if model_cfg.gguf_file:
        damaged = "; the gguf reader cannot read it either, so it is damaged or cut short: copy or download it again" \
            if _gguf_unreadable(folder / model_cfg.gguf_file) else ""
        return BadModelDir(f"{key}: could not load the {what} from model.gguf_file={model_cfg.gguf_file} "
                           f"({type(exc).__name__}: {first_line(exc)}){damaged}")
    for name in JSON_FILES:
        if (folder / name).is_file():
            try:
                _json(folder, name, key, RESAVE_TOKENIZER if "token" in name else RESAVE)
            except BadModelDir as found:
                return found
    names = ["config.json", *TOKENIZER_SETTINGS, *(n for group in VOCABULARIES for n in group)] \
        if what == "tokenizer" else ["config.json", *WEIGHTS]          # AutoTokenizer reads config.json too
    read = ", ".join(n for n in names if (folder / n).is_file())
    return BadModelDir(f"{key}: could not load the {what} from {folder} ({read}): {type(exc).__name__}: "
                       f"{first_line(exc)}")


def _gguf_unreadable(file: Path) -> bool:
    """Whether the gguf package fails to read `file` (a cut-short or damaged GGUF); False without the package."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return False
    try:
        GGUFReader(file)
    except Exception:                                                  # the reader fails in many ways on a bad file
        return True
    return False


def check_shapes(model_cfg, info: dict) -> None:
    """Weights whose shapes do not fit config.json, or tensors of the model the weights do not hold (they would be
    left at random values: renamed tensors, another architecture's checkpoint), from from_pretrained's loading
    info: one line with the first."""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        extra = sorted(info.get("unexpected_keys") or ())
        seen = f"; the weights hold {len(extra)} tensors the model does not use (e.g. {extra[0]})" if extra else ""
        raise BadModelDir(f"{key_of(model_cfg)}: the weights lack {len(missing)} tensors of the model config.json describes "
                          f"(e.g. {missing[0]}), which would start from random values{seen}; the weights and "
                          "config.json come from different models or tensor names: save them together with "
                          "save_pretrained")
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        name, saved, wanted = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise BadModelDir(f"{key_of(model_cfg)}: the weights do not fit config.json: {name} is {list(saved)} in the weights "
                          f"but {list(wanted)} in the model config.json describes{more}; the weights and config.json "
                          "come from different models: save them together with save_pretrained")
