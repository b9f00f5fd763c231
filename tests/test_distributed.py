"""Two processes through torchrun on CPU (gloo): each rank trains on its own shard of every batch.

A 2-process run with trainer.batch_size=4 must follow the 1-process run with trainer.batch_size=8 step for
step (the same 8 pairs per step, gradients averaged over the ranks), write one run directory, and record
its world size."""
import json
import os
import subprocess
import sys

import pytest

STEPS = 4


def losses(run):
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_equal_one_with_the_global_batch(tmp_path, fast):
    args = [*[a for a in fast if not a.startswith("trainer.batch_size")], f"trainer.max_steps={STEPS}",
            "trainer.save_model=false", "trainer.eval_every=2", "optimizer.lr=3e-4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    one = tmp_path / "one"
    r = subprocess.run([sys.executable, "-m", "midpo_cli", "train", *args, "trainer.batch_size=8",
                        f"hydra.run.dir={one}"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    two = tmp_path / "two"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "midpo_cli", "train", *args, "trainer.batch_size=4", f"hydra.run.dir={two}"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "WARNING" not in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]   # e.g. rank 1 on its objective
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == STEPS
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    res = json.loads((two / "results.json").read_text())
    assert res["world_size"] == 2 and json.loads((one / "results.json").read_text())["world_size"] == 1
    one_eval = json.loads((one / "metrics.jsonl").read_text().splitlines()[-1])["eval/loss"]
    assert abs(res["final"]["eval/loss"] - one_eval) < 1e-4
    assert res["final"]["tokens"] == json.loads((one / "metrics.jsonl").read_text().splitlines()[-1])["tokens"]
    siblings = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert sorted(p.name for p in siblings) == ["one", "two"]                  # one run directory per run


@pytest.mark.slow
def test_two_processes_fail_alike_on_bad_data(tmp_path):
    """Bad data under torchrun: every rank stops with the same one-line verdict (not a follow-on error), the data
    report and the warnings appear once (the other ranks log errors only), and no rank hangs."""
    data = tmp_path / "bad.jsonl"
    data.write_text("".join('{"prompt": "p%d", "chosen": "c"}\n' % i for i in range(12)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "midpo_cli", "train", "dataset=local", f"dataset.path={data}", "trainer.batch_size=2",
                        "trainer.max_steps=2", f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"],
                       env=env, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all(e.startswith("error: TooManyBadRows") for e in errors), out[-3000:]
    assert out.count("data report") == 1 and out.count("WARNING") <= 1, out[-3000:]


@pytest.mark.slow
def test_two_processes_are_refused_alike_and_the_folder_is_untouched(tmp_path):
    """The main process refuses a folder that is not a midpo run: the other rank gets its verdict (no hang in a
    collective that the main process never reaches), the refusal is printed once, nothing is written."""
    from pathlib import Path
    folder = tmp_path / "theirs"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    data = Path(__file__).parent / "data" / "standard.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "midpo_cli", "train", "dataset=local", f"dataset.path={data}", "trainer.max_steps=2",
                        f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={folder}"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert r.stderr.count("not a midpo run directory") == 1, r.stderr[-3000:]
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
