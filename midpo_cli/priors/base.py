"""What a prior is: a function of a batch of pairs that returns log zeta per side, plus what it needs.

Shapes (defined once): B pairs, T completion positions, V vocabulary. Every per-token tensor is
[2, B, T] with index 0 = chosen (y_w) and 1 = rejected (y_l); padding positions hold 0 and mask 0.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor


@dataclass(frozen=True)
class Needs:
    """The inputs a prior reads. The engine computes exactly these, and never looks at a prior's name."""
    reference: bool = False        # per-token log pi_ref(y_t|s_t)                      -> PairView.ref_logps
    kl_ref_pi: bool = False        # per-position KL_t(pi_ref || pi), full vocabulary    -> PairView.kl_ref_pi
    kl_pi_ref: bool = False        # per-position KL_t(pi || pi_ref), full vocabulary    -> PairView.kl_pi_ref
    ref_activations: bool = False  # per-layer mean reference activation [2, B, T, L]   -> PairView.ref_activations
    ref_hidden: bool = False       # every layer's reference hidden states [2, B, T, L, H] -> PairView.ref_hidden
    snapshot: str | None = None    # frozen earlier policy ("reference" or a model path) -> PairView.snapshot_logps
    token_columns: tuple[str, ...] = ()  # per-token values given by the data            -> PairView.token_values
    tokens: bool = False           # the responses' token ids, and the vocabulary size   -> PairView.tokens, .vocab_size
    owned: tuple[str, ...] = ()    # models the prior owns (Prior.owned_models), by name -> PairView.owned_logps
    cross_prompts: int = 0         # K: each response also scored after up to K other prompts of its batch
    cross_model: str = ""          # ... by this model of Prior.owned_models()  -> PairView.cross_logps, cross_mask

    @property
    def reference_model(self) -> bool:
        """Whether any input requires running the reference model."""
        return self.reference or self.kl_ref_pi or self.kl_pi_ref or self.ref_activations or self.ref_hidden


@dataclass
class PairView:
    """A batch of preference pairs as a prior sees it."""
    logps: Tensor                          # [2, B, T] log pi(y_t|s_t), carries the policy's gradient
    mask: Tensor                           # [2, B, T] 1.0 on completion tokens
    ref_logps: Tensor | None = None        # [2, B, T]
    kl_ref_pi: Tensor | None = None        # [2, B, T]
    kl_pi_ref: Tensor | None = None        # [2, B, T]
    ref_activations: Tensor | None = None  # [2, B, T, L]
    ref_hidden: Tensor | None = None       # [2, B, T, L, H], H = the model's hidden size
    snapshot_logps: Tensor | None = None   # [2, B, T]
    tokens: Tensor | None = None           # [2, B, T] long: the response's token ids y_t, 0 on padding
    vocab_size: int | None = None          # V of the models' logits (with `tokens`: ids are < V)
    token_values: dict[str, Tensor] = dataclasses.field(default_factory=dict)  # name -> [2, B, T]
    owned_logps: dict[str, Tensor] = dataclasses.field(default_factory=dict)   # prior's own model name -> [2, B, T]
    cross_logps: Tensor | None = None      # [2, B, K] sequence log p(y | x'_k), x'_k the k-th other prompt, no grad
    cross_mask: Tensor | None = None       # [2, B, K] 1 where x'_k is usable for y (differs from y's prompt, y whole)
    packed: bool = False                   # the policy's forward ran padding-free (engine/pack.py); same values
    memo: dict = dataclasses.field(default_factory=dict, repr=False)  # a prior's values derived once per batch

    def seq(self, x: Tensor) -> Tensor:
        """Masked sum over completion positions: [2, B, T] -> [2, B]."""
        return (x * self.mask).sum(-1)

    @property
    def lengths(self) -> Tensor:
        """|y| per side [2, B]: completion tokens counted by the mask (EOS included)."""
        return self.mask.sum(-1)

    def require(self, field: str) -> Tensor:
        value = getattr(self, field)
        if value is None:
            raise ValueError(f"this prior needs PairView.{field}, which the batch does not carry; "
                             "declare it in the prior's needs() so the engine computes it")
        return value

    def owned(self, name: str) -> Tensor:
        """Per-token log-probs of a model the prior owns (Prior.owned_models), computed by the view builder."""
        if name not in self.owned_logps:
            raise ValueError(f"this prior reads its own model '{name}', which the batch does not carry; "
                             "return it from owned_models() so the engine runs it")
        return self.owned_logps[name]

    def column(self, name: str) -> Tensor:
        if name not in self.token_values:
            raise ValueError(f"this prior needs the per-token data column '{name}' (chosen_{name} / rejected_{name} "
                             f"in the dataset); columns present: {sorted(self.token_values) or 'none'}")
        return self.token_values[name]


def frozen_copy(policy) -> torch.nn.Module:
    """A frozen copy of the policy (through a DDP wrapper) for a prior to own: eval mode, no gradient, a registered
    submodule once assigned (so it is moved, checkpointed and saved with the prior)."""
    return copy.deepcopy(getattr(policy, "module", policy)).eval().requires_grad_(False)


@torch.no_grad()
def mix_toward(model: torch.nn.Module, policy, mixup: float, owner: str) -> None:
    """model <- mixup*policy + (1-mixup)*model, parameter by parameter (named_parameters lists a tied weight once);
    mixup = 1 leaves an exact copy of the policy's weights. TR-DPO's soft/hard update (TRL's sync_ref_model)."""
    source = dict(getattr(policy, "module", policy).named_parameters())
    targets = dict(model.named_parameters())
    if source.keys() != targets.keys():
        raise ValueError(f"{owner}: the policy's parameters are not those of the copy it updates ({len(source)} vs "
                         f"{len(targets)} names; a policy sharded after attach, e.g. by FSDP, cannot be mixed in)")
    for name, p in targets.items():
        p.mul_(1 - mixup).add_(source[name].detach().to(p.dtype), alpha=mixup)


@dataclass(frozen=True)
class Reduction:
    """A declared special case, checked by `midpo verify` in value and gradient (both forms of both sides):
    this prior with `settings` (and per-token data `columns` held at a constant) equals the prior `equals`.
    `other_view` names how the other side reads the same batch: "" (as is) or "length_averaged_reference_free"
    (log-probs divided by |y|, zero reference log-probs: SimPO's gamma = 0 case)."""
    settings: dict                                 # this prior's options, e.g. {"alpha": 0.0}
    equals: dict                                   # {"name": other prior, **its options}
    columns: dict = dataclasses.field(default_factory=dict)   # data column -> constant on completion tokens
    other_view: str = ""
    note: str = ""                                 # shown in verify's table

    @property
    def text(self) -> str:
        other = self.equals["name"]
        opts = ", ".join(f"{k}={v}" for k, v in self.equals.items() if k != "name")
        return f"== {other}" + (f" ({opts})" if opts else "") + (f" {self.note}" if self.note else "")


@dataclass(frozen=True)
class Arm:
    """One arm of a sweep over priors (+experiment=learnable_priors): the prior with `settings` over its defaults
    (conf/prior/<name>.yaml), as Hydra config `arm=<prior>-<suffix>` (midpo_cli/sweeps/arms.py)."""
    settings: dict                                 # this prior's options, e.g. {"update": "joint", "anchor": 0.0}
    text: str                                      # one line: what the arm runs


class Prior(torch.nn.Module):
    """Base class. A subclass is also a dataclass holding its hyperparameters (the YAML's keys).

    Subclasses implement `log_prior` (MI-DPO form) and `original_loss` (the authors' form, written
    independently, used by `midpo verify`), and may override `needs`, `scale`, `penalty`, `warnings`.

    A prior may own models and trainable parameters (a learnable prior has parameters; TR-DPO's moving
    reference is a model with none). The engine then calls `attach` once the policy and reference exist, runs
    every module of `owned_models()` on each batch (their per-token log-probs are PairView.owned_logps), gives
    `parameters()` that require grad their own optimiser (learning rate `lr`, clipping `max_grad_norm`), steps
    policy and prior as `updates(step)` says, calls `on_step` after each optimiser step, logs `scalars()`, and
    saves `state_dict()` in checkpoints and beside the final policy. A fixed prior owns nothing: none of this runs.
    """
    name: ClassVar[str] = ""
    options: ClassVar[tuple[dict, ...]] = ({},)  # convention settings `midpo verify` checks, each a dict of overrides
    reductions: ClassVar[tuple[Reduction, ...]] = ()   # declared special cases (e.g. "alpha = 0 is DPO")
    typical_beta: ClassVar[tuple[float, float]] = (0.005, 1.0)   # beta outside this range earns a warning
    arms: ClassVar[dict[str, Arm]] = {}   # name suffix -> arm, for sweeps over arms (a fixed prior is also one arm:
                                          # itself with its defaults; a learnable prior is only the arms it declares)
    policy_copy: ClassVar[str | None] = None   # a frozen copy of the policy the prior owns: its attribute and owned-model
                                               # name (built by attach, moved by refresh_copy), e.g. TR-DPO's reference
    renamed: ClassVar[dict[str, dict[str, tuple[str, str]]]] = {}   # option -> {old value: (new value, why)}: a
                                          # renamed value is refused in one line naming the new one

    def __post_init__(self):
        torch.nn.Module.__init__(self)
        if self.policy_copy:
            setattr(self, self.policy_copy, None)            # a registered submodule once `attach` builds it

    @property
    def a(self) -> float:
        """The MI-DPO scale a (DPO's beta)."""
        return float(self.beta)

    def needs(self) -> Needs:
        return Needs()

    def log_prior(self, v: PairView) -> Tensor:       # [2, B]
        raise NotImplementedError

    def original_loss(self, v: PairView) -> Tensor:   # [B]
        raise NotImplementedError

    def penalty(self, v: PairView) -> Tensor:
        """A regulariser on the prior's own parameters, added outside the sigmoid (SparsePO's L1)."""
        return v.logps.new_zeros(())

    def validate(self) -> None:
        """Raise ValueError naming the options when settings are inconsistent with each other (single options
        with a fixed set of values are `Literal[...]` fields, checked when the config is composed)."""

    def stop_gradient_variants(self) -> dict:
        """{description: log_prior variant} with a stop-gradient added or removed (e.g. TDPO2 without its
        sg on the winner). `midpo verify` checks that each keeps the value and changes the gradient, so its
        equivalence check provably sees gradients flowing through the prior."""
        return {}

    def check_scale(self) -> None:
        """Every float hyperparameter is finite (nan/inf would poison the loss silently); beta > 0."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"prior.{f.name}={value} must be a finite number ({self.name})")
        if getattr(self, "beta", 1.0) <= 0:
            raise ValueError(f"prior.beta={self.beta} must be > 0 (it is the scale a of the MI-DPO loss)")

    def knobs(self) -> tuple[str, ...]:
        """Hyperparameters that must change the loss or its gradient under the current settings
        (verify's knob check). Default: every float field."""
        return tuple(f.name for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), float))

    def warnings(self) -> list[str]:
        """Known hazards of this prior's settings, printed before training."""
        lo, hi = self.typical_beta
        beta = getattr(self, "beta", None)
        if beta is not None and not lo <= beta <= hi:
            return [f"{self.name} with beta={beta}: outside the range its authors use ({lo}-{hi}); "
                    "a scale meant for another variant is a common mistake (SimPO uses 2-10, DPO 0.01-0.5)."]
        return []

    def hyperparameters(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def input_files(self) -> list:
        """[(label, path)] of files or model directories the prior reads besides the task's and the model's (e.g.
        models it loads), fingerprinted with the run's inputs so that a finished run is reused only while they hold."""
        return []

    def pipeline(self):
        """A run of this prior that is several trainings (midpo_cli/pipelines: e.g. DICE's rounds) returns the
        Pipeline that composes them; None (the default) is one training."""
        return None

    # ----- priors that own models or learn (all no-ops for a fixed prior) ---------------------------

    # Owns trainable parameters (possibly built in `attach`). On the class (read by the arms of sweeps and the learned_*
    # naming): every setting of the prior learns. A prior whose settings decide (SparsePO, masks=learned) sets it per
    # instance in __post_init__; the engine and `midpo verify` read the instance.
    learnable: ClassVar[bool] = False
    lr: ClassVar[float | None] = None             # learning rate of the prior's own optimiser
    max_grad_norm: ClassVar[float] = 0.0          # gradient clipping of the prior's parameters (0 = off)

    def attach(self, policy, reference) -> None:
        """Build what the prior owns (adapters, snapshots) once the policy and the reference model exist; by
        default its `policy_copy`, a frozen copy of the policy."""
        if self.policy_copy:
            setattr(self, self.policy_copy, frozen_copy(policy))

    def owned_models(self) -> dict[str, torch.nn.Module]:
        """Models whose per-token log-probs of each batch the prior reads (PairView.owned(name)); the engine runs
        those named in `needs().owned` (verify's probes stand in other logits for them, by the same names). By
        default its `policy_copy`, under that name."""
        if not self.policy_copy:
            return {}
        model = getattr(self, self.policy_copy)
        if model is None:
            raise RuntimeError(f"{self.name}: attach(policy, reference) has not built its {self.policy_copy} yet")
        return {self.policy_copy: model}

    def refresh_copy(self, step: int, every: int, mixup: float, policy) -> None:
        """After optimiser step `step`: every `every`-th, policy_copy <- mixup*policy + (1-mixup)*policy_copy."""
        model = getattr(self, self.policy_copy)
        if model is not None and step % every == 0:
            mix_toward(model, policy, mixup, self.name)

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self) -> list[dict]:
        """`trainable()` as the parameter groups of the prior's optimiser; a group may carry its own optimiser settings
        (SparsePO's mask weights their weight_decay)."""
        return [{"params": self.trainable()}]

    def initial_equivalent(self) -> dict:
        """The prior this one equals once attached, before its first step (`midpo verify` checks it): DPO by default."""
        return {"name": "dpo", "beta": self.a}

    def gradient_check(self) -> str:
        """A name for the prior's parameters when `midpo verify` should check that the MI-DPO form and the original
        form give them the same, non-zero gradient on its probes (e.g. "learned-mask"); "" for no such check (fixed
        priors, and learnable ones whose gradient the probes do not reach or that cut J's gradient by design)."""
        return ""

    def updates(self, step: int) -> tuple[bool, bool]:
        """(policy, prior): which of the two take an optimiser step at this (1-based) step."""
        return True, True

    def on_step(self, step: int, policy) -> None:
        """After each optimiser step (e.g. refresh a lagged snapshot of the policy)."""

    def scalars(self) -> dict:
        """The prior's scalar parameters for the metrics, named `prior/<name>`: floats, or 0-d tensors left on the
        device (a training step reads them with its other metrics, in one transfer)."""
        return {}

    def monitor(self, row: dict) -> list[str]:
        """Warnings from the logged metrics (one metrics.jsonl row at a time), e.g. a learnable prior's
        collapse signature; the engine prints each and lists them in results.json."""
        return []

    # ----- state: checkpoints and the saved prior keep what attach cannot rebuild ---------------------

    def derived_state(self) -> set[str]:
        """state_dict names that `attach` rebuilds (e.g. base weights shared with the reference): not saved."""
        return set()

    def state_dict(self, *args, **kwargs):
        """The module's state less `derived_state()`, each tied weight once (a copied model with tied input and
        output embeddings holds one tensor under two names; safetensors refuses to write it twice)."""
        full = super().state_dict(*args, **kwargs)
        skip, seen, out = self.derived_state(), set(), type(full)()
        for key, value in full.items():
            ident = (value.data_ptr(), value.dtype, tuple(value.shape))
            if key in skip or ident in seen:                  # rebuilt by attach, or a tied weight saved once
                continue
            seen.add(ident)
            out[key] = value
        return out

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):
        """Load what `state_dict` saved; with `strict`, a missing saved key or an unknown key is a one-line
        ValueError (names left out on purpose, derived or tied, are not missing)."""
        result = super().load_state_dict(state, strict=False, assign=assign)
        if strict:
            kept = set(self.state_dict())
            missing = [k for k in result.missing_keys if k in kept]
            if missing or result.unexpected_keys:
                raise ValueError(f"prior '{self.name}': saved state does not fit this prior's settings "
                                 f"(missing {missing[:5]}, unexpected {list(result.unexpected_keys)[:5]}); "
                                 "resume with the same prior options")
        return result

    def save(self, directory) -> None:
        """The prior's state beside the policy (a learned prior's parameters, a moving reference): prior.safetensors
        (state_dict) and prior.json (settings)."""
        import json
        from pathlib import Path

        from safetensors.torch import save_file
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(out / "prior.safetensors"))
        (out / "prior.json").write_text(json.dumps({"name": self.name, **self.hyperparameters()}, indent=2))

    def forward(self, v: PairView) -> Tensor:
        return self.log_prior(v)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={val!r}" for k, val in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"

    __hash__ = object.__hash__   # keep nn.Module hashable although subclasses are dataclasses
