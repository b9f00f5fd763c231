"""Config hygiene: every probe of an adversarial user fails in one line naming the key, with a suggestion,
exit code 1 and no traceback; and everything Hydra users rely on keeps working."""
import math
import types
from pathlib import Path

import pytest
from conftest import fails
from hydra import compose, initialize_config_module
from transformers import GPT2Config, LlamaConfig

import midpo_cli.priors  # noqa: F401
from midpo_cli.__main__ import config_path, main
from midpo_cli.config import ModelConfig, register_schemas
from midpo_cli.engine import models
from midpo_cli.engine.model_dir import BadModelDir
from midpo_cli.engine.models import check_lengths, check_source, context_length, load_model, load_tokenizer
from midpo_cli.recipe import check_config
from midpo_cli.overrides import BadOverride, check_overrides
from midpo_cli.priors import PRIORS, build_prior

PRIOR_OPTIONS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "prior").glob("*.yaml"))

DATA = Path(__file__).parent / "data" / "standard.jsonl"
register_schemas()


# ----- unknown keys and options: before Hydra runs, with + / ++ too --------------------------------------

@pytest.mark.parametrize("args, words", [
    (["+trainer.max_step=3"], ["unknown key 'trainer.max_step'", "Did you mean 'trainer.max_steps'",
                               "+ and ++ cannot add a key", "+experiment=<preset>"]),
    (["++trainer.max_step=3"], ["unknown key 'trainer.max_step'", "'trainer.max_steps'", "cannot add a key"]),
    (["trainer.max_stpes=3"], ["unknown key 'trainer.max_stpes'", "Did you mean 'trainer.max_steps'",
                               "Keys under trainer: max_steps, batch_size"]),
    (["optimiser.lr=1"], ["unknown key 'optimiser.lr'", "Did you mean 'optimizer.lr'?", "Top-level keys: seed"]),
    (["optimiser=adam"], ["unknown key 'optimiser'", "'optimizer'", "adamw, rmsprop, sgd"]),
    (["lr=1e-3"], ["unknown key 'lr'", "Did you mean 'model.lr' or 'optimizer.lr'?"]),
    (["prior=simpoo"], ["unknown option 'simpoo' for config group 'prior'", "Did you mean 'simpo'",
                        f"Valid choices: {', '.join(PRIOR_OPTIONS)}."]),
    (["model=smolm2-135m"], ["config group 'model'", "Did you mean 'smollm2-135m'", "Valid choices: hf, smollm2-135m, tiny"]),
    (["optimizer=adam"], ["config group 'optimizer'", "Did you mean 'adamw'", "Valid choices: adamw, rmsprop, sgd"]),
    (["+experiment=beta_frontir"], ["config group 'experiment'", "Did you mean 'beta_frontier'"]),
    (["--multirun", "prior=dpo,simpoo"], ["unknown option 'simpoo'", "'simpo'"]),
    (["--multirun", "prior=simpo,dpo", "+prior.gamma=1"], ["unknown key 'prior.gamma'", "with prior=dpo",
                                                           "Keys under prior with prior=dpo: name, beta"]),
    (["--multirun", "prior=glob(*)", "prior.gamma=1"], ["unknown key 'prior.gamma'", "Keys under prior with prior="]),
    (["trainer.max_steps.x=1"], ["unknown key 'trainer.max_steps.x'", "trainer.max_steps is a value"]),
    (["--multirun", "--cfg", "job", "seed=0,1"], ["--multirun and --cfg cannot be combined"]),
    (["~trainer.max_steps"], ["trainer.max_steps cannot be deleted", "set it instead (trainer.max_steps=<value>)"]),
    (["~dataset.path"], ["dataset.path cannot be deleted"]),
    (["trainer.max_steps=abc"], ["trainer.max_steps='abc' is not an integer"]),
    (["seed=1e30"], ["seed=1e+30 is not an integer"]),
    (["seed=null"], ["seed=null is not an integer"]),
    (["optimizer.lr=fast"], ["optimizer.lr='fast' is not a number"]),
    (["trainer.save_model=maybe"], ["trainer.save_model='maybe' is not true or false"]),
    (["--multirun", "trainer.batch_size=4,many"], ["trainer.batch_size='many' is not an integer"]),
    (["trainer.trackers=mlflow"], ["trainer.trackers takes a list, in brackets", "trainer.trackers=[mlflow]"]),
    (["trainer.trackers=mlflow,wandb"], ["trainer.trackers=[mlflow,wandb]"]),
    (["trainer.trackers=null"], ["trainer.trackers=null is not a list", "trainer.trackers=[] for none"]),
])
def test_unknown_train_overrides_fail_in_one_line(tmp_path, capsys, args, words):
    err = fails(capsys, ["train", *args, f"hydra.run.dir={tmp_path}/r", f"hydra.sweep.dir={tmp_path}/s"])
    for w in words:
        assert w in err, err
    assert not (tmp_path / "r").exists() and not (tmp_path / "s").exists()    # refused before Hydra ran


@pytest.mark.parametrize("args, words", [
    (["atoll=1"], ["unknown key 'atoll'", "Did you mean 'atol'", "Top-level keys: seed, priors"]),
    (["+atoll=1"], ["unknown key 'atoll'", "'atol'", "cannot add a key"]),
    (["++trll=false"], ["unknown key 'trll'", "'trl'"]),
])
def test_unknown_verify_overrides_fail_in_one_line(tmp_path, capsys, args, words):
    err = fails(capsys, ["verify", *args, f"hydra.run.dir={tmp_path}/r"])
    for w in words:
        assert w in err, err


@pytest.mark.parametrize("command, args", [
    ("train", ["+experiment=beta_frontier"]),
    ("train", ["+experiment=all_priors", "prior.beta=0.2", "trainer.max_steps=3"]),
    ("train", ["+experiment=beta_frontier", "prior=simpo", "prior.beta=1.0,2.0"]),
    ("train", ["hydra.run.dir=x", "+hydra.job.env_set.A=1", "hydra/launcher=basic", "++hydra.job.name=y"]),
    ("train", ["--multirun", "seed=0,1", "prior=glob(*)", "prior.beta=0.1,0.2"]),
    ("train", ["--multirun", "prior=glob(sim*)", "prior.gamma=1", "seed=range(0,3)"]),
    ("train", ["--multirun", "prior=simpo,dpo", "prior.beta=0.5", "optimizer=adamw,sgd", "optimizer.lr=1e-3"]),
    ("train", ["--cfg", "job", "prior=simpo", "++prior.gamma=1"]),
    ("train", ["trainer={max_steps:2}", "trainer.trackers=[]", "model.lora.r=4", "dataset.task.kind=reverse"]),
    ("train", ["model=hf", "model.name_or_path=x", "model.trust_remote_code=true"]),
    ("train", ["--help"]),
    ("verify", ["priors=[dpo,simpo]", "atol=1e-9", "seed=1"]),
])
def test_valid_overrides_pass(command, args):
    check_overrides(command, args, config_path())


def test_experiment_preset_still_composes(capsys):
    main(["train", "--cfg", "job", "+experiment=beta_frontier", "prior=simpo"])
    out = capsys.readouterr().out
    assert "name: simpo" in out and "save_model: false" in out


def test_group_typo_without_a_dot_is_a_key_error():
    with pytest.raises(BadOverride, match="Did you mean 'prior'"):
        check_overrides("train", ["priro=simpo"], config_path())


# ----- value checks of the train config (midpo_cli/config.py::check) ---------------------------------------

def compose_train(overrides):
    with initialize_config_module(version_base="1.3", config_module="midpo_cli.conf"):
        return compose("train", overrides=overrides)


@pytest.mark.parametrize("override, words", [
    ("optimizer.lr=0", ["optimizer.lr=0.0", "> 0", "unchanged"]),
    ("optimizer.lr=-1e-4", ["optimizer.lr=-0.0001", "> 0"]),
    ("optimizer.lr=nan", ["optimizer.lr=nan", "finite"]),
    ("optimizer.lr=inf", ["optimizer.lr=inf", "finite"]),
    ("optimizer.weight_decay=-0.1", ["optimizer.weight_decay=-0.1", ">= 0"]),
    ("trainer.max_steps=0", ["trainer.max_steps=0", ">= 1"]),
    ("trainer.batch_size=0", ["trainer.batch_size=0", ">= 1"]),
    ("trainer.grad_accum=-1", ["trainer.grad_accum=-1", ">= 1"]),
    ("trainer.log_every=0", ["trainer.log_every=0", ">= 1"]),
    ("trainer.max_grad_norm=inf", ["trainer.max_grad_norm=inf", "finite"]),
    ("dataset.eval_fraction=1.0", ["dataset.eval_fraction=1.0", "[0, 1)"]),
    ("dataset.max_rows=0", ["dataset.max_rows=0", ">= 1"]),                  # was: every row, without a word
    ("dataset.max_rows=-1", ["dataset.max_rows=-1", ">= 1"]),                # was: every row but the last
    ("seed=-1", ["seed=-1", "2**32 - 1"]),                                    # was numpy's message, no key
    ("seed=4294967296", ["seed=4294967296", "2**32 - 1"]),
    ("model.name_or_path=./my-model", ["model.name_or_path=./my-model", "model=hf only", "add model=hf"]),  # was ignored
    ("model.gguf_file=m.gguf", ["model.gguf_file=m.gguf", "model=hf only"]),
    ("dataset.max_length=5000", ["dataset.max_length=5000", "context length 1024"]),   # was: after the built-in SFT
])
def test_check_rejects_bad_values(override, words):
    with pytest.raises(ValueError) as e:
        check_config(compose_train([override]))
    for w in words:
        assert w in str(e.value), str(e.value)


def test_check_accepts_every_shipped_config():
    for overrides in ([], ["optimizer=sgd"], ["optimizer=rmsprop"], ["dataset=local", "dataset.path=x.jsonl"],
                      ["+experiment=all_priors"], ["model=smollm2-135m"]):
        check_config(compose_train(overrides))


def test_train_checks_values_before_training(tmp_path, capsys):
    err = fails(capsys, ["train", "optimizer.lr=0", f"hydra.run.dir={tmp_path}/r"])
    assert "optimizer.lr=0.0 must be a finite number > 0" in err
    assert not (tmp_path / "r").exists()                                  # not even the empty directory
    for bad in ("nan", "-1"):                                             # a NaN threshold would never warn
        err = fails(capsys, ["train", f"trainer.displacement_nats={bad}", f"hydra.run.dir={tmp_path}/r"])
        assert f"trainer.displacement_nats={float(bad)} must be a finite number >= 0" in err
    err = fails(capsys, ["train", "dataset.task.kind=revers", f"hydra.run.dir={tmp_path}/r"])  # the task's own
    assert "Did you mean 'reverse'?" in err and not (tmp_path / "r").exists()


# ----- prior hyperparameters must be finite (Prior.check_scale) --------------------------------------------

@pytest.mark.parametrize("name", sorted(PRIORS))
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_every_float_hyperparameter_of_every_prior_must_be_finite(name, bad):
    floats = [k for k, v in PRIORS[name]().hyperparameters().items() if isinstance(v, float)]
    assert "beta" in floats
    for key in floats:
        with pytest.raises(ValueError, match=f"prior.{key}={bad} must be a finite number"):
            build_prior({"name": name, key: bad})


def test_prior_nan_fails_the_cli(tmp_path, capsys):
    err = fails(capsys, ["train", "prior.beta=nan", f"hydra.run.dir={tmp_path}/r"])
    assert "prior.beta=nan must be a finite number" in err


# ----- dataset.max_length against the model's context length -----------------------------------------------

def model_with(config):
    return types.SimpleNamespace(config=config)


def test_context_length_reads_the_declared_limit():
    assert context_length(model_with(LlamaConfig(max_position_embeddings=256))) == (256, "max_position_embeddings")
    assert context_length(model_with(GPT2Config(n_positions=64)))[0] == 64            # learned positions
    scaled = LlamaConfig(max_position_embeddings=256, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert context_length(model_with(scaled)) is None                                # rescaled rotary: no single limit
    assert context_length(model_with(types.SimpleNamespace())) is None               # nothing declared


def test_check_lengths():
    model = model_with(LlamaConfig(max_position_embeddings=256))
    check_lengths(types.SimpleNamespace(max_length=256), model)
    with pytest.raises(ValueError, match=r"dataset.max_length=300 exceeds the model's context length 256 "
                                         r"\(config.max_position_embeddings\).*dataset.max_length<=256"):
        check_lengths(types.SimpleNamespace(max_length=300), model)


def test_too_long_max_length_fails_before_training(tmp_path, capsys):
    run = tmp_path / "r"
    err = fails(capsys, ["train", "dataset=local", f"dataset.path={DATA}", "model.max_position_embeddings=256",
                         "dataset.max_length=300", "trainer.max_steps=2", f"hydra.run.dir={run}"])
    assert "dataset.max_length=300 exceeds the model's context length 256" in err
    assert not (run / "metrics.jsonl").exists() and not (run / "data_report.json").exists()


# ----- model paths and remote code ---------------------------------------------------------------------------

def hf(name, **kw):
    return ModelConfig(source="hf", name_or_path=str(name), dtype="float32", **kw)


@pytest.mark.parametrize("name", ["/nonexistent/model", "./no-such-dir", "../no-such-dir", "~/no-such-midpo-dir",
                                  "here/no-such-dir", "a/b/c"])
def test_missing_local_model_path_is_one_line(name, tmp_path, monkeypatch):
    (tmp_path / "here").mkdir()                                        # `here/x`: its first part exists locally
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"model.name_or_path={name}: no such directory"):
        check_source(hf(name))


def test_model_directory_without_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        check_source(hf(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"model.gguf_file=m.gguf: no such file .*none"):
        check_source(hf(tmp_path, gguf_file="m.gguf"))
    (tmp_path / "config.json").write_text("{}")                        # the rest: tests/test_model_dirs.py
    with pytest.raises(BadModelDir, match="config.json has no \"model_type\""):
        check_source(hf(tmp_path))


def test_hub_ids_are_left_to_the_hub():
    check_source(hf("HuggingFaceTB/SmolLM2-135M-Instruct"))          # looks like a hub id: no local check
    check_source(hf("gpt2"))
    with pytest.raises(FileNotFoundError, match="model.name_or_path=midpo-test/no-such-repo: could not load it"):
        load_tokenizer(hf("midpo-test/no-such-repo"))                  # offline in tests: one line, no hub traceback


def test_missing_model_path_fails_the_cli(tmp_path, capsys):
    err = fails(capsys, ["train", "model=hf", "model.name_or_path=/nonexistent", f"hydra.run.dir={tmp_path}/r"])
    assert "FileNotFoundError: model.name_or_path=/nonexistent: no such directory" in err


def test_trust_remote_code_is_off_by_default_and_passed_to_every_load(tmp_path, monkeypatch):
    for name in ("tiny", "hf", "smollm2-135m"):
        assert compose_train([f"model={name}", "model.name_or_path=x"]).model.trust_remote_code is False
    seen = []
    import transformers

    def record(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        raise OSError("stop here")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", record)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", record)
    monkeypatch.setattr(models, "check_source", lambda cfg: None)     # only what reaches from_pretrained, here
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "m.gguf").write_text("")
    for trust in (False, True):
        for cfg in (hf(tmp_path, trust_remote_code=trust), hf(tmp_path, gguf_file="m.gguf", trust_remote_code=trust)):
            for load in (lambda: load_tokenizer(cfg), lambda: load_model(cfg, None)):
                with pytest.raises(BadModelDir, match="stop here"):
                    load()
        with pytest.raises(OSError):
            load_model(hf(tmp_path, trust_remote_code=trust), None, path=str(tmp_path))
    assert seen == [False] * 5 + [True] * 5


@pytest.mark.parametrize("dataset", ["builtin", "local", "hub"])
def test_every_shipped_dataset_fits_the_tiny_model(dataset):
    cfg = compose_train([f"dataset={dataset}", "dataset.path=x"] if dataset != "builtin" else [])
    assert cfg.dataset.max_length <= cfg.model.max_position_embeddings


@pytest.mark.parametrize("override, words", [
    ("trainer.precision=fp8", ["trainer.precision='fp8'", "fp32, bf16, fp16"]),
    ("trainer.lr_schedule=exp", ["trainer.lr_schedule='exp'", "constant, linear, cosine"]),
    ("dataset.truncation=cut", ["dataset.truncation='cut'", "keep_end, drop"]),
    ("model.dtype=float8", ["model.dtype='float8'", "float32, bfloat16, float16"]),
    ("trainer.on_nonfinite=ignore", ["trainer.on_nonfinite='ignore'", "stop, skip"]),
    ("prior=hdpo prior.form=fixd", ["prior.form='fixd'", "fixed, policy", "Did you mean 'fixed'"]),
    ("prior=tdpo prior.variant=1,3", ["prior.variant='3'", "1, 2"]),
])
def test_settings_with_fixed_values_fail_in_one_line(override, words, capsys):
    """Typed enums: a wrong value fails before Hydra composes, in one line naming the valid values."""
    from midpo_cli.__main__ import main
    with pytest.raises(SystemExit) as e:
        main(["train", *override.split()])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    with pytest.raises(Exception):                                        # and Hydra's compose refuses it too
        compose_train(override.split()[-1:] if "prior" not in override else override.split())


def test_configs_come_from_the_running_copy_of_midpo(monkeypatch, tmp_path):
    """A source tree run (PYTHONPATH) in an environment where another checkout is installed editable: the
    YAMLs beside this midpo_cli, not that checkout's (where a new conf/prior/<name>.yaml would not exist)."""
    import importlib.machinery
    import importlib.util

    import midpo_cli.__main__ as entry
    ours = Path(entry.__file__).resolve().parent.parent / "conf"
    assert config_path() in ("pkg://midpo_cli.conf", str(ours))

    def spec_at(folder):
        spec = importlib.machinery.ModuleSpec("midpo_cli.conf", None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        return lambda name, *a: spec if name == "midpo_cli.conf" else None

    monkeypatch.setattr(importlib.util, "find_spec", spec_at(tmp_path / "other-checkout" / "conf"))
    assert config_path() == str(ours)
    monkeypatch.setattr(importlib.util, "find_spec", spec_at(ours))
    assert config_path() == "pkg://midpo_cli.conf"


@pytest.mark.parametrize("plugin, words", [
    ("from midpo_cli.priors import register_prior\nfrom midpo_cli.priors.dpo import DPO\n\n\n"
     "@register_prior('dpo')\nclass Again(DPO):\n    pass\n", ["zz_plugin.py:5", "registered twice", "pick another name"]),
    ("x = (\n", ["zz_plugin.py:1", "SyntaxError"]),
    ("import a_package_that_is_not_installed\n", ["zz_plugin.py:1", "ModuleNotFoundError"]),
])
def test_a_broken_plugin_is_one_line_naming_its_file(tmp_path, plugin, words):
    """A prior plug-in that registers a taken name, does not parse or misses a package: the command stops in one
    line naming the plug-in's file and line, not a traceback through the registry."""
    import os
    import shutil
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "midpo_cli", tmp_path / "midpo_cli", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(root / "conf", tmp_path / "conf")
    (tmp_path / "midpo_cli" / "priors" / "zz_plugin.py").write_text(plugin)
    r = subprocess.run([sys.executable, "-m", "midpo_cli", "train", "trainer.max_steps=1"], cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and all(w in r.stderr for w in words), r.stderr


def test_a_file_where_a_directory_belongs_is_one_line(tmp_path, capsys):
    """hydra.run.dir / cache_dir naming a file (or a path under one): one line, never Hydra's or the cache's
    traceback."""
    f = tmp_path / "taken.txt"
    f.write_text("x")
    for run_dir in (f, f / "sub" / "run"):
        err = fails(capsys, ["train", "dataset=local", f"dataset.path={DATA}", f"hydra.run.dir={run_dir}"])
        assert f"{f} is a file, not a directory" in err
    err = fails(capsys, ["train", "dataset=local", f"dataset.path={DATA}", "trainer.max_steps=1",
                         "trainer.batch_size=2", f"cache_dir={f}", f"hydra.run.dir={tmp_path / 'r'}"])
    assert err.startswith("error: NotADirectoryError") and str(f) in err
