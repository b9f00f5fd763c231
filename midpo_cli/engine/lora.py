"""LoRA through peft: the policy trains adapters; the reference is the same weights with adapters off.

One model copy in memory: `AdapterOff(policy)` runs the policy's own forward inside peft's
`disable_adapter()` context, so pi_ref is exactly the base model (TRL and torchtune do the same).
"""
from __future__ import annotations

import torch


def add_lora(model, lora):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ValueError("model.lora.r > 0 needs peft: `pip install peft` (or `pip install midpo[lora]`)") from e
    targets = list(lora.target_modules) if lora.target_modules else "all-linear"
    conf = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                      task_type="CAUSAL_LM")
    return get_peft_model(model, conf)


def _peft(model):
    return getattr(model, "module", model)                                 # through DDP wrappers


class AdapterOff:
    """The reference policy pi_ref as a view of a LoRA policy: same weights, adapters disabled, no grad."""

    def __init__(self, policy):
        self.policy = policy

    def __call__(self, *args, **kwargs):
        with torch.no_grad(), _peft(self.policy).disable_adapter():
            return self.policy(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with torch.no_grad(), _peft(self.policy).disable_adapter():
            return _peft(self.policy).generate(*args, **kwargs)

    def get_output_embeddings(self):
        return _peft(self.policy).get_output_embeddings()

    def __getattr__(self, name):                                           # config, training, eval(), train() ...
        return getattr(self.policy, name)


def merged_for_saving(policy):
    """A plain transformers model with the adapters merged in (reloadable without peft)."""
    return _peft(policy).merge_and_unload()


def save_adapter(policy, directory, base: str | None, main: bool = True, state_dict=None) -> None:
    """The trained adapters alone, in peft's format (adapter_config.json naming `base` as the model they go on,
    adapter_model.safetensors): `PeftModel.from_pretrained(base_model, directory)` loads them. Every process of a
    multi-process save calls it (with the gathered `state_dict`); only the `main` one writes. Before any merge."""
    model = _peft(policy)
    if base is not None:
        for conf in model.peft_config.values():
            conf.base_model_name_or_path = base
    model.save_pretrained(directory, safe_serialization=True, is_main_process=main, state_dict=state_dict)
