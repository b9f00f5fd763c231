"""What a causal LM's head reads and how it forms logits, per architecture, checked against the model itself.

For a known architecture the engine never holds full [N, T, V] logits: the model runs with logits_to_keep=1,
a forward hook on its decoder (`get_decoder()`) captures what the CausalLM feeds its LM head, and the
logits are formed chunk-wise (engine/logps.py `Head`) with the architecture's `LogitMap` from TRANSFORMS,
each read from that CausalLM's forward in transformers. The model's own logits at the last position come
with the forward for free, so the first call per model compares the map against them. An architecture not
in TRANSFORMS, an LM head that is not a plain Linear (e.g. LoRA on lm_head), a forward that takes no
logits_to_keep (custom or remote code under a known model type), or a failed check: the
model's own full logits are used instead (correct, more memory), with a one-line notice per model type.
"""
from __future__ import annotations

import inspect
import logging
from typing import Callable
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn

from midpo_cli.engine.logps import Head, LogitMap, form_logits
from midpo_cli.engine.lora import AdapterOff

log = logging.getLogger("midpo")

# CausalLMs whose forward is `logits = self.lm_head(decoder_output)`, nothing more (transformers 5.23).
PLAIN = ("apertus", "arcee", "bitnet", "bloom", "codegen", "deepseek_v2", "deepseek_v3", "diffllama", "ernie4_5",
         "ernie4_5_moe", "exaone4", "falcon", "gemma", "glm", "glm4", "glm4_moe", "gpt2", "gpt_bigcode", "gpt_neo",
         "gpt_neox", "gpt_oss", "gptj", "helium", "hunyuan_v1_dense", "hunyuan_v1_moe", "internlm3", "jetmoe",
         "lfm2", "llama", "llama4_text", "ministral", "mistral", "mixtral", "mpt", "nemotron", "olmo", "olmo2",
         "olmo3", "olmoe", "opt", "persimmon", "phi", "phi3", "phimoe", "qwen2", "qwen2_moe", "qwen3", "qwen3_5_text",
         "qwen3_moe", "qwen3_next", "seed_oss", "smollm3", "stablelm", "starcoder2")


def _plain(model) -> LogitMap:
    return LogitMap()


def _final_softcap(model) -> LogitMap:          # logits = cap * tanh(lm_head(h) / cap) when cap is set
    return LogitMap(softcap=model.config.final_logit_softcapping or None)


def _logit_scale(model) -> LogitMap:            # logits = lm_head(h) * self.logit_scale
    return LogitMap(scale=float(model.logit_scale))


def _divide_logits(model) -> LogitMap:          # logits = lm_head(h) / config.logits_scaling
    return LogitMap(scale=1.0 / model.config.logits_scaling)


# model_type -> the map, read from each CausalLM's forward; every entry is checked against the model's own
# logits by tests/test_logps_arch.py (which also fails when an entry has no test model).
TRANSFORMS: dict[str, Callable[[nn.Module], LogitMap]] = {
    **dict.fromkeys(PLAIN, _plain),
    **dict.fromkeys(("gemma2", "gemma3_text", "gemma3n_text", "vaultgemma", "nanochat"), _final_softcap),
    "recurrent_gemma": lambda m: LogitMap(softcap=m.config.logits_soft_cap),
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe"), _logit_scale),
    **dict.fromkeys(("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoeshared",
                     "granitemoehybrid"), _divide_logits),
    "hyperclovax": lambda m: LogitMap(scale=float(m.config.logits_scaling)),  # multiplies, unlike Granite
    "minicpm3": lambda m: LogitMap(hidden_scale=1.0 / m.config.logits_scaling),  # divides h before the head
    "falcon_h1": lambda m: LogitMap(scale=float(m.model.lm_head_multiplier)),
}

_FORMS: WeakKeyDictionary = WeakKeyDictionary()   # transformers model -> (LogitMap or None = full logits, checked)
_NOTICED: set[str] = set()


def unwrap(model) -> nn.Module:
    """The transformers model under midpo's AdapterOff view, DDP/accelerate `.module`, torch.compile and peft."""
    from transformers import PreTrainedModel                               # here: importing midpo_cli.api stays light
    for _ in range(16):
        if isinstance(model, PreTrainedModel):
            return model
        if isinstance(model, AdapterOff):
            model = model.policy
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            break
    return model


def model_type(base) -> str:
    return str(getattr(getattr(base, "config", None), "model_type", type(base).__name__))


def _notice(base, why: str) -> None:
    kind = model_type(base)
    if kind not in _NOTICED:
        _NOTICED.add(kind)
        log.warning("midpo: %s; log-probs for '%s' use the model's own full logits (correct, more memory)", why, kind)


def _fall_back(base, why: str) -> None:
    _FORMS[base] = (None, True)
    _notice(base, why)


def _form(base) -> tuple[LogitMap | None, bool]:
    """(the architecture's logit map, or None for full logits; whether it was checked against the model)."""
    if base in _FORMS:
        return _FORMS[base]
    from transformers import PreTrainedModel
    rule = TRANSFORMS.get(model_type(base))
    head = base.get_output_embeddings() if isinstance(base, PreTrainedModel) else None
    if rule is None:
        _fall_back(base, f"model type '{model_type(base)}' is not in midpo_cli/engine/head.py TRANSFORMS (adding "
                         "its logit map there saves the memory)")
    elif type(head) is not nn.Linear:
        _fall_back(base, f"the LM head is a {type(head).__name__}, not a plain Linear (LoRA on lm_head?)")
    elif not _keeps_logits(base):
        _fall_back(base, f"{type(base).__name__}.forward takes no logits_to_keep (custom or remote code?)")
    else:
        _FORMS[base] = (rule(base), False)
    return _FORMS[base]


def _keeps_logits(base) -> bool:
    """Whether the CausalLM's forward takes `logits_to_keep` (custom or remote code under a known model type may
    not: a TypeError otherwise)."""
    try:
        params = inspect.signature(base.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "logits_to_keep" or p.kind is p.VAR_KEYWORD for p in params)


def _tolerance(*dtypes) -> float:
    """Relative tolerance of the self-check: loose enough for the lowest precision in play, tight enough to
    catch a missing scale or cap (both change logits by far more)."""
    eps = max(torch.finfo(d).eps for d in dtypes if d.is_floating_point)
    return max(1e-4, 8 * eps)


@torch.no_grad()
def _matches(base, form: LogitMap, head: nn.Linear, states: Tensor, logits: Tensor) -> bool:
    """The map applied to the captured last-position input reproduces the model's own last logits."""
    mine = form_logits(states[:, -1:], head.weight, head.bias, form)                  # [N, 1, V]
    theirs = logits[:, -1:].float()
    dtypes = [states.dtype, head.weight.dtype, logits.dtype]
    if torch.is_autocast_enabled(states.device.type):
        dtypes.append(torch.get_autocast_dtype(states.device.type))
    err, tol = (mine - theirs).abs().max().item(), _tolerance(*dtypes) * (1 + theirs.abs().max().item())
    if mine.shape == theirs.shape and err <= tol:
        return True
    _fall_back(base, f"the logit map for '{model_type(base)}' misses the model's own last-position logits "
                     f"(max difference {err:.3g} > {tol:.3g})")
    return False


def _decoder(base) -> nn.Module | None:
    """The module whose output the CausalLM feeds its LM head (LlamaModel, GPT2Model, ...): get_decoder(),
    or the body under `model` where get_decoder() gives the CausalLM itself (Llama4ForCausalLM)."""
    try:
        found = [base.get_decoder()]
    except (AttributeError, NotImplementedError, ValueError):
        found = []
    found.append(getattr(base, "model", None))
    return next((m for m in found if isinstance(m, nn.Module) and m is not base), None)


INPUTS = ("input_ids", "attention_mask", "position_ids")     # what a forward takes from a batch (or packed layout)


def _full(model, inputs: dict, hidden: bool, shift: bool):
    out = model(**inputs, use_cache=False, output_hidden_states=hidden)
    return (out.logits[:, :-1] if shift else out.logits), out                         # [N, S-1 (or S), V]


def logits_source(model, batch: dict, hidden: bool = False, shift: bool = True):
    """(logits source: Head over [N, S, H] or logits [N, S, V], the model's output) from the batch's input_ids,
    attention_mask (2-D, or a 4-D packed mask) and position_ids when given; `shift`: drop the last position
    (aligned with the padded batch's labels)."""
    inputs = {k: batch[k] for k in INPUTS if k in batch}
    base = unwrap(model)
    form, checked = _form(base)
    if form is None:
        return _full(model, inputs, hidden, shift)
    head, decoder = base.get_output_embeddings(), _decoder(base)
    if decoder is None:
        _fall_back(base, "its decoder cannot be found (get_decoder())")
        return _full(model, inputs, hidden, shift)
    seen: list[Tensor] = []
    hook = decoder.register_forward_hook(
        lambda module, args, output: seen.append(output if torch.is_tensor(output) else output[0]))
    try:
        out = model(**inputs, use_cache=False, output_hidden_states=hidden, logits_to_keep=1)
    finally:
        hook.remove()
    states = seen[0] if len(seen) == 1 else None                                      # [N, S, H]
    if states is None or states.shape[:2] != inputs["input_ids"].shape:
        _fall_back(base, "the decoder's output is not what the LM head reads (no single full-length capture)")
        return _full(model, inputs, hidden, shift)
    if not checked:
        if not _matches(base, form, head, states, out.logits):
            return _full(model, inputs, hidden, shift)
        _FORMS[base] = (form, True)
    return Head(states[:, :-1] if shift else states, head.weight, head.bias, form), out
