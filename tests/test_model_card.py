"""A saved model others can load: model/ is a Hugging Face model directory with its card (README.md, front matter the
Hub reads), and a LoRA run also saves adapter/ (peft) with the same card, giving the merged model's logits."""
import json

import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.repocard import metadata_load

from conftest import FAST
from midpo_cli.__main__ import main
from midpo_cli.report.card import model_card


def train(root, cache_dir, name, *extra):
    run = root / name
    main(["train", *FAST, f"cache_dir={cache_dir}", "trainer.max_steps=2", *extra, f"hydra.run.dir={run}"])
    return run


@pytest.fixture(scope="module")
def simpo(tmp_path_factory, cache_dir):
    """A full fine-tune with a prior that has settings (one given on the command line)."""
    return train(tmp_path_factory.mktemp("card"), cache_dir, "simpo", "prior=simpo", "prior.gamma=0.5")


@pytest.fixture(scope="module")
def lora(tmp_path_factory, cache_dir):
    return train(tmp_path_factory.mktemp("card"), cache_dir, "lora", "model.lora.r=4", "trainer.ref_cache=false")


def test_a_saved_model_loads_and_its_card_names_the_prior_its_settings_and_the_final_loss(simpo):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(simpo / "model")
    assert model.num_parameters() > 0
    card = simpo / "model" / "README.md"
    meta = metadata_load(card)
    assert {"midpo", "simpo", "dpo", "preference-optimization"} <= set(meta["tags"])
    assert meta["library_name"] == "transformers"
    assert "license" not in meta                                   # left to the user, and the body says so
    assert "base_model" not in meta and "datasets" not in meta     # model=tiny, the built-in task: no Hub ids
    assert ModelCard.load(card).data.tags == meta["tags"]
    body = ModelCard.load(card).text
    results = json.loads((simpo / "results.json").read_text())
    assert "prior: `simpo` (settings: beta=2.0, gamma=0.5, gamma_convention=ratio)" in body
    assert "| loss " in body and f"{results['final']['loss']:.4f}" in body   # the final table, as markdown
    assert "true reward" in body                                    # the task's evaluation table
    assert "prior.gamma=0.5" in body and "license is left to you" in body
    assert "built from its config" in body and "the task `builtin`" in body


def test_a_lora_run_saves_an_adapter_that_peft_loads_with_the_merged_models_logits(lora):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    base = json.loads((lora / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert "sft-" in base                                          # the task's reference directory, loadable offline
    adapter = AutoPeftModelForCausalLM.from_pretrained(lora / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(lora / "model").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids = torch.tensor([[1, 10, 20, 30, 40, 50]])
    with torch.no_grad():
        a, m = adapter(input_ids=ids).logits, merged(input_ids=ids).logits
        with adapter.disable_adapter():                            # the trained adapter changes the output
            plain = adapter(input_ids=ids).logits
    assert torch.allclose(a, m, atol=1e-5), (a - m).abs().max()
    assert not torch.allclose(a, plain, atol=1e-7)
    meta = metadata_load(lora / "adapter" / "README.md")
    assert meta["library_name"] == "peft" and {"midpo", "dpo", "lora"} <= set(meta["tags"])
    assert "license" not in meta
    assert metadata_load(lora / "model" / "README.md")["library_name"] == "transformers"
    assert "PeftModel.from_pretrained(base" in (lora / "adapter" / "README.md").read_text()


def test_front_matter_names_hub_ids_only(simpo, tmp_path):
    """base_model and datasets are Hub links: a hub model or dataset is named there, a local directory or file only
    in the body (a Hub link to it would lead nowhere); SmolLM2's GGUF names the Hub model it holds."""
    results = json.loads((simpo / "results.json").read_text())
    prior = {"name": "dpo", "beta": 0.1}

    def meta(model, dataset):
        config = {**results["config"], "model": {**results["config"]["model"], **model},
                  "dataset": {**results["config"]["dataset"], **dataset}}
        text = model_card({**results, "config": config}, prior)
        (tmp_path / "README.md").write_text(text)
        return metadata_load(tmp_path / "README.md"), text

    hub, _ = meta({"source": "hf", "name_or_path": "org/base"},
                  {"source": "hub", "path": "org/prefs", "split": "train"})
    assert hub["base_model"] == "org/base" and hub["datasets"] == ["org/prefs"] and "license" not in hub
    local, text = meta({"source": "hf", "name_or_path": str(tmp_path)},
                       {"source": "local", "path": "/data/prefs.jsonl"})
    assert "base_model" not in local and "datasets" not in local
    assert f"`{tmp_path.name}`" in text and "`prefs.jsonl`" in text
    assert meta({"source": "smollm2"}, {})[0]["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
