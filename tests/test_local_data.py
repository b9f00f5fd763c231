"""Local files in TRL's format (jsonl, csv, parquet) train end to end; bad files fail with a clear message."""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from midpo_cli.__main__ import main

DATA = Path(__file__).parent / "data" / "standard.jsonl"
TINY = ["trainer.max_steps=3", "trainer.batch_size=4", "trainer.eval_every=0", "trainer.save_model=false"]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_local_file_trains(tmp_path, fmt):
    path = tmp_path / f"prefs.{fmt}"
    df = pd.DataFrame([json.loads(line) for line in DATA.read_text().splitlines()])  # read_json made " 27." 27.0
    {"jsonl": lambda: path.write_text(DATA.read_text()), "csv": lambda: df.to_csv(path, index=False),
     "parquet": lambda: df.to_parquet(path)}[fmt]()
    run = tmp_path / "run"
    main(["train", "dataset=local", f"dataset.path={path}", *TINY, f"hydra.run.dir={run}"])
    res = json.loads((run / "results.json").read_text())
    assert res["data"]["train_pairs"] == 36 and res["data"]["eval_pairs"] == 4
    assert "eval" not in res                      # no true reward outside the built-in task


def test_missing_file_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "midpo_cli", "train", "dataset=local", "dataset.path=nope.jsonl",
                        f"hydra.run.dir={tmp_path}/r"], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "nope.jsonl" in r.stderr


def test_missing_columns_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "good": "a", "bad": "b"}) + "\n")
    r = subprocess.run([sys.executable, "-m", "midpo_cli", "train", "dataset=local", f"dataset.path={bad}",
                        f"hydra.run.dir={tmp_path}/r"], capture_output=True, text=True)
    assert r.returncode == 1 and "missing column" in r.stderr and "prompt" in r.stderr


@pytest.mark.parametrize("prior", ["simpo", "tdpo", "sparsepo", "dice"])
def test_priors_on_local_data(tmp_path, prior):
    """Priors that need a live reference (KL, activations), none, or a snapshot, on a user's file."""
    run = tmp_path / "run"
    main(["train", "dataset=local", f"dataset.path={DATA}", f"prior={prior}", *TINY, f"hydra.run.dir={run}",
          f"cache_dir={tmp_path / 'cache'}"])
    res = json.loads((run / "results.json").read_text())
    assert res["final"]["loss"] > 0
