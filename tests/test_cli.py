"""The CLI end to end: in-process and as a subprocess, errors, multirun, run directories."""
import json
import subprocess
import sys

import pytest

from midpo_cli.__main__ import main

MIDPO = [sys.executable, "-m", "midpo_cli"]


def run_cli(args, cwd=None):
    return subprocess.run(MIDPO + args, capture_output=True, text=True, cwd=cwd, timeout=600)


def test_help_lists_commands(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert "train" in out and "verify" in out


def test_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["nonsense"])
    assert e.value.code == 2
    assert "unknown command" in capsys.readouterr().err


def test_train_in_process_writes_run_artifacts(tmp_path, fast):
    run = tmp_path / "run"
    main(["train", *fast, "trainer.max_steps=4", f"hydra.run.dir={run}"])
    res = json.loads((run / "results.json").read_text())
    assert res["prior"] == "dpo" and "loss" in res["final"]
    for key in ("true_reward/policy", "true_reward/reference", "win_rate", "kl/policy_ref", "length/policy"):
        assert key in res["eval"]
    assert res["tokens_per_s"] > 0 and res["peak_memory_mb"] > 0 and res["wall_time_s"] > 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected"):
        assert name in lines[-1]
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    assert (run / "model" / "model.safetensors").exists() and model.num_parameters() > 0


def test_existing_run_dir_is_never_overwritten(tmp_path, fast, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text('{"keep": true}')
    with pytest.raises(SystemExit) as e:
        main(["train", *fast, "trainer.max_steps=2", f"hydra.run.dir={run}"])
    assert e.value.code == 1
    assert json.loads((run / "results.json").read_text()) == {"keep": True}
    assert "not a midpo run directory" in capsys.readouterr().err


@pytest.mark.parametrize("override, words", [
    ("prior=nonexistent", ["unknown option 'nonexistent' for config group 'prior'", "Valid choices: dice, dpo,", "simpo"]),
    ("optimizer.lr=abc", ["optimizer.lr", "abc"]),
    ("trainer.nope=1", ["unknown key 'trainer.nope'", "Keys under trainer: max_steps,"]),
    ("model=huge", ["unknown option 'huge' for config group 'model'", "Valid choices: hf, smollm2-135m, tiny"]),
    ("+trainer.max_step=3", ["unknown key 'trainer.max_step'", "Did you mean 'trainer.max_steps'", "+experiment="]),
])
def test_bad_input_fails_cleanly(tmp_path, override, words):
    r = run_cli(["train", override, f"hydra.run.dir={tmp_path}/r"])
    out = r.stdout + r.stderr
    assert r.returncode == 1
    assert "Traceback" not in out
    for w in words:
        assert w in out, out
    assert not (tmp_path / "r" / "results.json").exists()


def test_prior_option_errors_name_the_key(tmp_path, fast):
    r = run_cli(["train", *fast, "prior=simpo", "prior.gamma_convention=weird", f"hydra.run.dir={tmp_path}/r"])
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "gamma_convention" in r.stderr and "ratio" in r.stderr


def test_subprocess_train_and_multirun(tmp_path, fast):
    r = run_cli(["train", *fast, "trainer.max_steps=2", f"hydra.run.dir={tmp_path}/single"])
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "single" / "results.json").exists()
    r = run_cli(["train", "--multirun", *fast, "seed=0,1", "trainer.max_steps=3", f"hydra.sweep.dir={tmp_path}/sweep"])
    assert r.returncode == 0, r.stderr
    seeds = sorted(json.loads((tmp_path / "sweep" / str(i) / "results.json").read_text())["seed"] for i in (0, 1))
    assert seeds == [0, 1]


def test_cfg_job_prints_config_without_training(tmp_path):
    r = run_cli(["train", "--cfg", "job", "prior=simpo"])
    assert r.returncode == 0 and "gamma_convention" in r.stdout and "max_steps" in r.stdout
