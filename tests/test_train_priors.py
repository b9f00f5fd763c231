"""Every registered prior trains end to end on the built-in task through the one engine."""
import json
import math
import subprocess
import sys

import pytest

from midpo_cli.__main__ import main
from midpo_cli.priors import PRIORS


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_prior_trains(name, tmp_path, fast):
    run = tmp_path / "run"
    main(["train", *fast, f"prior={name}", "trainer.max_steps=3", "trainer.save_model=false", f"hydra.run.dir={run}"])
    res = json.loads((run / "results.json").read_text())
    assert res["prior"] == name and math.isfinite(res["final"]["loss"])
    assert res["config"]["prior"]["name"] == name


def test_multirun_glob_runs_every_prior(tmp_path, fast):
    sweep = tmp_path / "sweep"
    r = subprocess.run([sys.executable, "-m", "midpo_cli", "train", "--multirun", "prior=glob(*)", *fast,
                        "trainer.max_steps=2", "trainer.save_model=false", f"hydra.sweep.dir={sweep}"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    done = {json.loads(p.read_text())["prior"] for p in sweep.glob("*/results.json")}
    assert done == set(PRIORS)


def test_hazardous_scale_warns(tmp_path, fast, capsys):
    main(["train", *fast, "prior=simpo", "prior.beta=0.1", "trainer.max_steps=1", "trainer.save_model=false",
          f"hydra.run.dir={tmp_path / 'run'}"])
    out = capsys.readouterr().out
    assert "SimPO with beta=0.1" in out
