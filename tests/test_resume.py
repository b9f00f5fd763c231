"""Checkpoint and resume: a run killed with SIGKILL after a checkpoint, resumed with trainer.resume=latest,
ends where the uninterrupted run ends."""
import json

import pytest

from conftest import kill_after_first_checkpoint
from midpo_cli.__main__ import main

STEPS = 60


def final_loss(run):
    return json.loads((run / "results.json").read_text())["final"]["loss"]


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, fast):
    args = [*fast, f"trainer.max_steps={STEPS}", "trainer.save_every=5", "trainer.save_model=false",
            "optimizer.lr=3e-4"]
    main(["train", *args, f"hydra.run.dir={tmp_path / 'outputs/a/full'}"])
    killed = tmp_path / "outputs" / "b" / "killed"
    kill_after_first_checkpoint(args, killed)
    step = max(int(p.parent.name.split("-")[1]) for p in killed.glob("checkpoints/step-*/trainer_state.json"))
    assert step < STEPS
    resumed = tmp_path / "outputs" / "b" / "resumed"
    main(["train", *args, "trainer.resume=latest", f"hydra.run.dir={resumed}"])
    res = json.loads((resumed / "results.json").read_text())
    assert res["resumed_from"].endswith(f"step-{step}") or "step-" in res["resumed_from"]
    assert abs(final_loss(resumed) - final_loss(tmp_path / "outputs/a/full")) < 1e-3
    steps = [json.loads(x)["step"] for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS


def test_resume_refuses_other_config(tmp_path, fast, capsys):
    run = tmp_path / "outputs" / "x" / "run"
    main(["train", *fast, "trainer.max_steps=4", "trainer.save_every=2", "trainer.save_model=false",
          f"hydra.run.dir={run}"])
    with pytest.raises(SystemExit):
        main(["train", *fast, "trainer.max_steps=4", "optimizer.lr=1e-3", f"trainer.resume={run}",
              f"hydra.run.dir={tmp_path / 'outputs/x/run2'}"])
    assert "different config (optimizer.lr: 5e-05 -> 0.001)" in capsys.readouterr().err   # names what differs
    with pytest.raises(SystemExit):                                       # the same directory: the same words
        main(["train", *fast, "trainer.max_steps=6", "trainer.save_every=2", "trainer.save_model=false",
              f"hydra.run.dir={run}"])
    assert "different config (trainer.max_steps: 4 -> 6)" in capsys.readouterr().err
