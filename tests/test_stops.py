"""Every stop is clean: Ctrl-C (once, twice, during training or before it) and writes that fail (a file-size
limit, a full disk) each end in one line naming what is safe on disk and how to continue, never a traceback,
and leave nothing half-written under a name a reader would take as complete.

The file-size limit (RLIMIT_FSIZE, set in the child only) is 1 MiB: the tiny model's weights (1.4 MB), and so
a checkpoint, the final model and an SFT cache entry, do not fit; logs and small JSON files (a few kB) do."""
import json
import logging
import os
import resource
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST, kill_after_first_checkpoint
from midpo_cli.__main__ import main
from midpo_cli.engine import files
from midpo_cli.engine.checkpoint import latest

MIDPO = [sys.executable, "-m", "midpo_cli", "train"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
LIMIT = 1 << 20                                                            # bytes a file may reach


def midpo(args, run, limit: int = 0):
    """`midpo train *args hydra.run.dir=run` to its end, files limited to `limit` bytes: (exit code, stderr)."""
    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    p = subprocess.run([*MIDPO, *args, f"hydra.run.dir={run}"], env=ENV, capture_output=True, text=True,
                       timeout=600, preexec_fn=limited if limit else None)
    return p.returncode, p.stderr


def start(args, run):
    return subprocess.Popen([*MIDPO, *args, f"hydra.run.dir={run}"], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_for(proc, path: Path, text: str = "") -> None:
    """Until `path` holds `text` (any text when empty): the moment to send a signal."""
    deadline = time.time() + 300
    while not path.exists() or text not in path.read_text() or not path.read_text().strip():
        assert time.time() < deadline and proc.poll() is None, "the run ended before the signal"
        time.sleep(0.05)


def one_line(err: str, label: str) -> str:
    """The run's one message (label: error/stopped), after checking there is no traceback and no other."""
    assert "Traceback" not in err and "Logging error" not in err, err[-3000:]
    lines = [x for x in err.splitlines() if x.startswith(f"{label}:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def only_complete_checkpoints(run: Path) -> list[Path]:
    from midpo_cli.engine.checkpoint import damage
    found = sorted((run / "checkpoints").glob("*")) if (run / "checkpoints").exists() else []
    assert all(p.name.startswith("step-") and damage(p) is None for p in found), found
    return found


@pytest.fixture(scope="module")
def warm(cache_dir, tmp_path_factory):
    """FAST overrides with the session cache filled (SFT reference, pairs, reference log-probs), no limit."""
    fast = [*FAST, f"cache_dir={cache_dir}"]
    main(["train", *fast, "trainer.max_steps=1", "trainer.save_model=false",
          f"hydra.run.dir={tmp_path_factory.mktemp('warm')}"])
    return fast


def test_ctrl_c_checkpoints_and_names_the_command_that_continues(tmp_path, warm):
    run = tmp_path / "int"
    proc = start([*warm, "trainer.max_steps=150", "trainer.save_model=false"], run)
    wait_for(proc, run / "metrics.jsonl")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    line = one_line(err, "stopped")
    (ckpt,) = only_complete_checkpoints(run)
    assert f"checkpoint {ckpt} written" in line and not (run / "results.json").exists()
    command = shlex.split(line.split("the command that continues the run: ", 1)[1])
    assert command[:2] == ["midpo", "train"] and command[-1] == f"hydra.run.dir={run.resolve()}"
    p = subprocess.run([*MIDPO, *command[2:]], env=ENV, capture_output=True, text=True, timeout=600,
                       cwd=tmp_path)                                       # elsewhere: the directory is named
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["resumed_from"] == str(ckpt) and results["final"]["step"] == 150


def test_a_second_ctrl_c_stops_at_once(tmp_path, warm):
    run = tmp_path / "twice"
    proc = start([*warm, "trainer.max_steps=150", "trainer.save_model=false", "trainer.save_every=1"], run)
    wait_for(proc, run / "metrics.jsonl")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    line = one_line(err, "stopped")
    found = only_complete_checkpoints(run)
    assert ("last good checkpoint" in line) == bool(found) and not (run / "results.json").exists()


@pytest.mark.parametrize("phase", ["SFT reference: training",
                                   pytest.param("preference pairs: sampling", marks=pytest.mark.slow)])
def test_ctrl_c_before_training_leaves_no_half_written_cache_entry(tmp_path, fast, phase):
    """A cold cache (SFT, then sampling pairs from it): Ctrl-C while an entry is being built."""
    from midpo_cli.engine.cache import readable_model
    cache, run = tmp_path / "cache", tmp_path / "cold"
    slow = ["dataset.task.sft_steps=2000"] if phase.startswith("SFT") else ["dataset.task.train_prompts=4000"]
    proc = start([*fast, *slow, f"cache_dir={cache}", "trainer.max_steps=2"], run)
    wait_for(proc, run / "train.log", phase)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "no checkpoint was written" in one_line(err, "stopped")
    entries = [p for p in cache.iterdir() if p.name != ".locks"]
    assert not [p for p in entries if p.name.startswith(".")], entries     # no temporary entry left behind
    assert all(readable_model(p) for p in entries if p.name.startswith("sft-"))
    assert not [p for p in entries if p.name.startswith("pairs-")]


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_written_is_one_line_and_leaves_none(tmp_path, warm):
    run = tmp_path / "full"
    args = [*warm, "trainer.max_steps=40", "trainer.save_every=2", "trainer.save_model=false"]
    code, err = midpo(args, run, LIMIT)
    assert code == 1
    line = one_line(err, "error")
    assert f"could not write checkpoint {run / 'checkpoints' / 'step-2'}: File too large (EFBIG)" in line
    assert "no checkpoint was written" in line and not only_complete_checkpoints(run)
    kill_after_first_checkpoint(args, run)                                 # now a good one, written without limit
    good = latest(run)
    code, err = midpo(args, run, LIMIT)                                    # resumes from it, fails at the next
    assert code == 1
    line = one_line(err, "error")
    assert "could not write checkpoint" in line and "(EFBIG)" in line and f"last good checkpoint: {good}" in line
    assert only_complete_checkpoints(run)[-1] == good and not (run / "results.json").exists()


def test_a_final_model_that_cannot_be_written_leaves_no_model(tmp_path, warm):
    run = tmp_path / "model"
    code, err = midpo([*warm, "trainer.max_steps=2"], run, LIMIT)
    assert code == 1
    line = one_line(err, "error")
    assert f"could not write the final model {run / 'model'}: File too large (EFBIG)" in line
    assert not (run / "model").exists() and not list(run.glob(".model*")) and not (run / "results.json").exists()
    assert json.loads((run / "error.json").read_text())["status"] == "failed"


def test_results_that_cannot_be_written_leave_no_results(tmp_path, warm):
    """4 KiB: run.json, config.yaml, the data report, metrics and the log fit; results.json (5 kB) does not."""
    run = tmp_path / "results"
    code, err = midpo([*warm, "trainer.max_steps=2", "trainer.save_model=false"], run, 4096)
    assert code == 1
    assert f"could not write {run / 'results.json'}: File too large (EFBIG)" in one_line(err, "error")
    assert not list(run.glob("*results*")) and (run / "error.json").exists()


def test_a_cache_entry_that_cannot_be_written_is_one_line(tmp_path, fast):
    cache = tmp_path / "cache"
    code, err = midpo([*fast, f"cache_dir={cache}", "trainer.max_steps=2"], tmp_path / "run", LIMIT)
    assert code == 1
    line = one_line(err, "error")
    assert "could not write cache entry" in line and "sft-" in line and "(EFBIG)" in line
    assert [p.name for p in cache.iterdir()] == [".locks"]


def test_atomic_writes_leave_nothing_when_they_fail(tmp_path):
    """results.json and the other run files (files.write_text) and model/ or prior/ (published_dir)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))
    try:
        with pytest.raises(files.WriteFailed, match=r"results.json: File too large \(EFBIG\)"):
            files.write_json(tmp_path / "results.json", {"x": "y" * 2000})
        with pytest.raises(files.WriteFailed, match=r"could not write the final model .*model: File too large"):
            with files.published_dir(tmp_path / "model", "the final model") as tmp:
                tmp.mkdir()
                (tmp / "weights").write_bytes(b"0" * 2000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert list(tmp_path.iterdir()) == []


def test_a_log_file_that_cannot_be_written_is_one_warning(capsys):
    from midpo_cli.console import LogFile
    log = logging.getLogger("midpo-test-full")
    handler = LogFile("/dev/full")                                         # every write: No space left on device
    log.addHandler(handler)
    try:
        for i in range(3):
            log.warning("message %d", i)
    finally:
        log.removeHandler(handler)
    err = capsys.readouterr().err
    assert "Logging error" not in err and "Traceback" not in err
    assert err.count("could not write /dev/full: No space left on device (ENOSPC)") == 1, err



def test_a_metrics_row_that_cannot_be_written_is_one_error():
    from midpo_cli.engine.trainer import append_row
    metrics = open("/dev/full", "a")                                       # every write: No space left on device
    with pytest.raises(files.WriteFailed, match=r"could not write /dev/full: No space left on device \(ENOSPC\)"):
        append_row(metrics, {"step": 1, "loss": 0.5})


def test_a_ctrl_c_held_down_still_ends_in_one_line(tmp_path, warm):
    """Ctrl-C repeated every few milliseconds until the process ends: the first stops the run, the second stops it
    at once, the rest land while it unwinds and shuts down; none may print a traceback from an exit hook."""
    run = tmp_path / "held"
    proc = start([*warm, "trainer.max_steps=150", "trainer.save_model=false", "trainer.save_every=1"], run)
    wait_for(proc, run / "metrics.jsonl")
    while proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.003)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    one_line(err, "stopped")
    only_complete_checkpoints(run)
