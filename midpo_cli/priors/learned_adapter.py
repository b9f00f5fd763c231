"""learned_adapter (P1, our design: docs/learnable_priors.md): the reference plus a low-rank adapter, learned."""
import copy
import itertools
from typing import Optional

import torch
from torch import Tensor

from midpo_cli.priors import Needs, PairView, register_prior
from midpo_cli.priors.learnable import LearnablePrior


def shared_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree whose parameters and buffers are the original's tensors (no memory for weights)."""
    tensors = itertools.chain(module.parameters(), module.buffers())
    return copy.deepcopy(module, memo={id(t): t for t in tensors})


def reference_module(policy, reference) -> torch.nn.Module:
    """A module computing pi_ref that a new adapter can be added to, sharing the frozen weights: the reference model
    itself (full fine-tuning), or the LoRA policy's base with its own adapters removed (model.lora.r > 0)."""
    if isinstance(reference, torch.nn.Module):
        return shared_copy(reference)
    inner = getattr(policy, "module", policy)                                    # AdapterOff over a peft policy
    if not hasattr(inner, "unload"):
        raise ValueError("learned_adapter needs the reference model (a frozen copy, or a LoRA policy's base)")
    return shared_copy(inner).unload()                                           # the copy's LoRA layers removed


@register_prior("learned_adapter")
class LearnedAdapter(LearnablePrior):
    """Prior:    log zeta(y|x) = sum_t log softmax(l^ref_t + Delta_phi(s_t))(y_t): the reference model with a LoRA
              adapter of its own (peft; B = 0 at start, so zeta = pi_ref exactly), same on both sides; a = beta.
              Normalised per token: no partition loophole; its capacity is set by `rank`.
    Original: -logsigmoid(beta*[(log pi - log zeta)_w - (...)_l]) with log zeta the adapter model's log-probs.
    The adapter model shares the reference's frozen weights (no second copy in memory); checkpoints and the saved
    prior hold only the adapter's weights (prior/adapter/ is also a peft adapter directory).
    Cost: one more forward per batch, with a backward into the adapter (comparable to the policy's).
    """
    rank: int = 4                # LoRA rank r of the prior's adapter (its capacity)
    lora_alpha: float = 8.0      # LoRA scaling numerator (scale = lora_alpha / rank)
    lr: float = 0.001            # the adapter's learning rate (LoRA weights, not scalars)
    target_modules: Optional[list[str]] = None   # peft module names the adapter wraps; None = every linear layer

    loss_knobs = ("anchor",)

    def __post_init__(self):
        super().__post_init__()
        self.adapter = None

    def validate(self) -> None:
        super().validate()
        if self.rank < 1:
            raise ValueError(f"prior.rank={self.rank} must be >= 1")

    def needs(self) -> Needs:
        return Needs(reference=True, owned=("adapter",))

    def attach(self, policy, reference) -> None:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as e:
            raise ValueError("prior=learned_adapter needs peft: `pip install peft` "
                             "(or `pip install midpo[lora]`)") from e
        base = reference_module(policy, reference).eval()
        targets = list(self.target_modules) if self.target_modules else "all-linear"
        conf = LoraConfig(r=self.rank, lora_alpha=self.lora_alpha, lora_dropout=0.0, target_modules=targets,
                          init_lora_weights=True)                                # B = 0: zeta = pi_ref at step 0
        try:
            self.adapter = get_peft_model(base, conf)
        except ValueError as e:                              # e.g. Mamba: some linear layers take no adapter
            raise ValueError(f"prior=learned_adapter: {e} (the option is prior.target_modules=[...])") from None

    def owned_models(self) -> dict:
        if self.adapter is None:
            raise RuntimeError("learned_adapter: attach(policy, reference) has not built the adapter yet")
        return {"adapter": self.adapter}

    def derived_state(self) -> set[str]:
        return {name for name, p in self.named_parameters(remove_duplicate=False) if not p.requires_grad} | \
            {name for name, _ in self.named_buffers(remove_duplicate=False) if name.startswith("adapter.")}

    def log_zeta(self, v: PairView) -> Tensor:
        return v.seq(v.owned("adapter"))

    def written_log_zeta(self, v: PairView) -> Tensor:
        return (v.owned_logps["adapter"] * v.mask).sum(-1)

    def save(self, directory) -> None:
        from pathlib import Path
        super().save(directory)
        if self.adapter is not None:
            self.adapter.save_pretrained(str(Path(directory) / "adapter"))

    def scalars(self) -> dict:
        if self.adapter is None:
            return super().scalars()
        b = [p.detach().float().pow(2).sum() for n, p in self.adapter.named_parameters() if "lora_B" in n]
        return {**super().scalars(), **({"prior/adapter_norm": torch.stack(b).sum().sqrt()} if b else {})}
