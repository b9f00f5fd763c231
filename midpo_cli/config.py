"""Typed schemas for every config group (Hydra ConfigStore), so bad input fails before any model loads.

Each YAML under conf/ names its schema in its defaults list (e.g. `/schema/model@_here_`); a wrong
type, an unknown key or an unknown group option is then a Hydra error naming the key (and, on the command
line, a one-line error with a did-you-mean: midpo_cli/overrides.py). Settings with a fixed set of values
are `Choice` enums (checked at compose time); `recipe.check_config` adds the value checks a type cannot express
(ranges, finiteness), run by `midpo train` before anything loads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class Choice(str, Enum):
    """A setting with a fixed set of values: checked when Hydra composes the config (a wrong value fails there,
    naming the valid ones); compares and prints as its plain string."""

    def __str__(self) -> str:
        return self.value


def choice(name: str, values: str) -> type[Choice]:
    return Choice(name, {v: v for v in values.split()})


Source = choice("Source", "tiny hf smollm2")
DType = choice("DType", "float32 bfloat16 float16")
Precision = choice("Precision", "fp32 bf16 fp16")
Schedule = choice("Schedule", "constant linear cosine")
OnNonFinite = choice("OnNonFinite", "stop skip")
Truncation = choice("Truncation", "keep_end drop")
OnBadRows = choice("OnBadRows", "drop error")


@dataclass
class LoraSettings:
    r: int = 0                            # LoRA rank; 0 = full fine-tuning
    alpha: int = 16                       # LoRA scaling numerator (lora_alpha)
    dropout: float = 0.0                  # dropout on the LoRA path
    target_modules: Optional[list] = None # module names; None = all linear layers


@dataclass
class ModelConfig:
    source: Source = Source.tiny          # tiny | hf | smollm2
    name_or_path: Optional[str] = None    # hub id or local directory (source=hf)
    gguf_file: Optional[str] = None       # GGUF file inside name_or_path, if any
    dtype: DType = DType.float32          # float32 | bfloat16 | float16: weights' dtype when loaded
    attn_implementation: Optional[str] = None   # eager | sdpa | flash_attention_2; None = library default
    gradient_checkpointing: bool = False  # trade compute for activation memory
    trust_remote_code: bool = False       # run Python code shipped with a hub model (only for repos you trust)
    lr: float = 5e-5                      # this model's learning rate: the optimizer's default (optimizer.lr= wins)
    hidden_size: int = 128                # tiny only: width
    num_layers: int = 2                   # tiny only: transformer blocks
    num_heads: int = 4                    # tiny only: attention heads
    intermediate_size: int = 256          # tiny only: MLP width
    max_position_embeddings: int = 1024   # tiny only: context length (>= dataset.max_length)
    lora: LoraSettings = field(default_factory=LoraSettings)  # LoRA adapters (reference = adapters off)


@dataclass
class DatasetConfig:
    source: str = MISSING                 # the task (midpo_cli/tasks/), set by conf/dataset/<name>.yaml
    path: Optional[str] = None            # local file (jsonl/json/parquet/csv) or hub dataset id
    split: str = "train"                  # split to train on
    eval_split: Optional[str] = None      # split to evaluate on; None = carve eval_fraction from train
    eval_fraction: float = 0.1            # held-out fraction when no eval_split is given
    max_rows: Optional[int] = None        # use at most this many training rows
    max_length: int = 512                 # prompt + completion tokens; longer pairs are truncated
    max_prompt_length: int = 256          # prompt tokens kept (its end is kept)
    truncation: Truncation = Truncation.keep_end   # keep_end: cut the prompt's start and both completions alike | drop
    prompt_column: str = "prompt"         # the data's column holding the prompt
    chosen_column: str = "chosen"         # ... the preferred response
    rejected_column: str = "rejected"     # ... the dispreferred response
    on_bad_rows: OnBadRows = OnBadRows.drop  # drop: skip rows that cannot train, counted per reason with FILE:LINE in data_report.json | error: stop at the first
    allow_empty_completions: bool = False # an empty chosen/rejected is a real answer (generated data), not a bad row
    max_bad_fraction: float = 0.1         # even under drop, fail when more than this fraction of rows is bad (a systematic problem, not noise)
    task: Any = None                      # the task's own settings, typed by schema/task/<source> (if it has any)


@dataclass
class TrainerConfig:
    max_steps: int = 150                  # optimiser steps
    batch_size: int = 16                  # pairs per micro-batch
    grad_accum: int = 1                   # micro-batches per optimiser step
    eval_every: int = 50                  # held-out preference metrics every N steps (0 = only at the end)
    save_every: int = 0                   # checkpoint every N steps (0 = only the final model)
    resume: Optional[str] = "auto"        # auto | latest | never | restart | a checkpoint or run directory path
    on_nonfinite: OnNonFinite = OnNonFinite.stop   # stop | skip: a non-finite loss or gradient stops the run, or skips the step
    precision: Precision = Precision.fp32  # fp32 | bf16 | fp16 (mixed precision through accelerate)
    max_grad_norm: float = 1.0            # gradient clipping (0 = off)
    warmup_steps: int = 0                 # linear learning-rate warm-up
    lr_schedule: Schedule = Schedule.constant   # constant | linear | cosine (after warm-up)
    log_every: int = 5                    # metrics.jsonl line every N steps
    kl_chunk: int = 0                     # rows per chunk for per-token log-probs / full-vocab KL; 0 = auto (~512 MB fp32)
    eval_batch_size: int = 32             # pairs per evaluation micro-batch
    eval_train: bool = False              # at the end, also score every training pair (train/* metrics: the final J)
    save_model: bool = True               # save the final policy with save_pretrained
    ref_cache: bool = True                # precompute reference log-probs once, on disk, shared by runs
    packing: bool = True                  # padding-free batches, each prompt once (engine/pack.py); false: padded
    displacement_nats: float = 1.0        # warn once when chosen and rejected log-probs both fall this far (0 = off)
    compile: bool = False                 # torch.compile each decoder block (docs/benchmarks.md: when it pays)
    trackers: list = field(default_factory=list)  # any of tensorboard, mlflow, wandb, trackio (engine/trackers.py)
    tracking_uri: Optional[str] = None    # MLflow: http://host:port or file:/folder; None = MLFLOW_TRACKING_URI
    sample_table: int = 4                 # held-out prompts sampled per evaluation for the trackers (0 = off)
    objective: str = "eval/rewards/accuracies"  # the run's score for a sweeper (report/objective.py: keys, directions)


@dataclass
class OptimizerConfig:
    _target_: str = MISSING               # torch optimiser class
    _partial_: bool = True                # built later with the model's parameters
    lr: float = 1e-4                      # learning rate
    weight_decay: float = 0.0             # decoupled weight decay


@dataclass
class AdamWConfig(OptimizerConfig):
    _target_: str = "torch.optim.AdamW"
    betas: list = field(default_factory=lambda: [0.9, 0.999])  # Adam moment decay rates
    eps: float = 1e-8                     # numerical floor
    fused: Optional[bool] = None          # one fused kernel per step; null = on where the device has it (CUDA)


@dataclass
class RMSpropConfig(OptimizerConfig):
    _target_: str = "torch.optim.RMSprop"
    alpha: float = 0.99                   # squared-gradient decay
    eps: float = 1e-8                     # numerical floor
    momentum: float = 0.0                 # momentum factor


@dataclass
class SGDConfig(OptimizerConfig):
    _target_: str = "torch.optim.SGD"
    momentum: float = 0.9                 # momentum factor
    nesterov: bool = False                # Nesterov momentum


@dataclass
class TrainRoot:
    seed: int = 0                         # seeds python, numpy and torch (and the built-in task)
    cache_dir: str = "outputs/cache"      # SFT reference, pairs and reference log-prob caches
    model: ModelConfig = MISSING
    dataset: DatasetConfig = MISSING
    prior: Any = MISSING                  # typed by the chosen prior's own schema (schema/prior/<name>)
    optimizer: Any = MISSING              # typed by schema/optimizer/<name>
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


@dataclass
class VerifyRoot:
    seed: int = 0                         # seed of the random probe batches
    priors: list = field(default_factory=list)   # priors to verify; [] = every registered prior
    real_model: bool = True               # also check on a real forward batch of the tiny model
    smollm2: bool = True                  # ... and of SmolLM2 when the package is installed
    trl: bool = True                      # cross-check DPO / SimPO against TRL when installed
    atol: float = 1e-10                   # float64 tolerance (value and gradient)


AT_LEAST_ONE = ("trainer.max_steps", "trainer.batch_size", "trainer.grad_accum", "trainer.eval_batch_size",
                "trainer.log_every", "dataset.max_length", "dataset.max_prompt_length")
NON_NEGATIVE = ("trainer.eval_every", "trainer.save_every", "trainer.warmup_steps", "trainer.kl_chunk",
                "trainer.max_grad_norm", "optimizer.weight_decay", "trainer.sample_table", "trainer.displacement_nats")
POSITIVE = ("optimizer.lr",)              # lr=0 would train a no-op without a word
BELOW_ONE = ("dataset.eval_fraction",)    # a fraction in [0, 1)


def register_schemas() -> None:
    """Every typed schema and every arm (midpo_cli/sweeps/arms.py) in Hydra's ConfigStore."""
    import midpo_cli.priors  # noqa: F401  (each prior stores its schema: schema/prior/<name>)
    import midpo_cli.tasks  # noqa: F401   (each task stores its settings' schema: schema/task/<name>)
    from midpo_cli.sweeps.arms import register_arms

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainRoot)
    cs.store(name="verify_schema", node=VerifyRoot)
    cs.store(group="schema", name="model", node=ModelConfig)
    cs.store(group="schema", name="dataset", node=DatasetConfig)
    for name, node in {"adamw": AdamWConfig, "rmsprop": RMSpropConfig, "sgd": SGDConfig}.items():
        cs.store(group="schema/optimizer", name=name, node=node)
    register_arms()                                     # config group `arm`: every prior's arms
