"""Runs as an adversarial user drives them: two at once, driven to NaN, killed and restarted, resumed from
files someone else wrote, caches damaged on disk. Each ends in a clear one-line error or a counted skip,
never a traceback, non-finite values on disk or a silent wrong answer."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import kill_after_first_checkpoint
from midpo_cli.__main__ import main

MIDPO = [sys.executable, "-m", "midpo_cli", "train"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def strict_json(path: Path):
    """json.loads that refuses NaN/Infinity literals (what other tools' strict parsers do)."""
    def no_constants(name):
        raise ValueError(f"non-strict JSON constant {name} in {path}")
    text = path.read_text()
    return [json.loads(x, parse_constant=no_constants) for x in text.splitlines() if x.strip()] \
        if path.suffix == ".jsonl" else json.loads(text, parse_constant=no_constants)


def finite_safetensors(directory: Path) -> bool:
    from safetensors.torch import load_file
    return all(bool(torch.isfinite(t).all()) for f in directory.rglob("*.safetensors")
               for t in load_file(str(f)).values() if t.is_floating_point())


def test_two_runs_in_the_same_second_get_their_own_directories(tmp_path, fast):
    """Default time-stamped run directories: two runs started together never share one."""
    args = [*fast, "trainer.max_steps=2", "trainer.save_model=false"]
    procs = [subprocess.Popen([*MIDPO, *args, f"prior={p}"], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for p in ("dpo", "simpo")]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    runs = sorted(p.parent for p in tmp_path.glob("outputs/*/*/results.json"))
    assert len(runs) == 2
    for run in runs:                                                       # each directory is one consistent run
        res = strict_json(run / "results.json")
        cfg = (run / "config.yaml").read_text()
        assert f"name: {res['prior']}" in cfg
        steps = [m["step"] for m in strict_json(run / "metrics.jsonl")]
        assert steps == [1, 2]
    assert {strict_json(r / "results.json")["prior"] for r in runs} == {"dpo", "simpo"}


def test_concurrent_jobs_on_a_cold_cache_build_each_entry_once(tmp_path, fast):
    """Two jobs with the same task and seed on an empty cache (a parallel sweep's first wave): one trains the
    SFT reference, samples the pairs and computes the reference log-probs; the other waits and reads them."""
    cold = [a for a in fast if not a.startswith("cache_dir=")] + [f"cache_dir={tmp_path / 'cold'}",
                                                                   "dataset.task.sft_steps=20"]
    args = [*cold, "trainer.max_steps=1", "trainer.save_model=false", "trainer.ref_cache=true"]
    procs = [subprocess.Popen([*MIDPO, *args, f"prior={p}", f"hydra.run.dir={tmp_path / p}"], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for p in ("dpo", "simpo")]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outs]
    for built in ("SFT reference: training", "preference pairs: sampling", "reference log-probs: computing"):
        assert sum(built in o for o in outs) == 1, (built, outs)
    assert sum("cache hit" in o for o in outs) >= 1


def test_explicit_directory_in_use_is_refused(tmp_path, fast):
    """An explicit run directory held by a live run: the second run stops with one line, touching nothing."""
    from midpo_cli.engine import rundir
    run = tmp_path / "busy"
    held = rundir.claim(run, "x", "auto", "explicit")
    try:
        r = subprocess.run([*MIDPO, *fast, "trainer.max_steps=2", f"hydra.run.dir={run}"], env=ENV,
                           capture_output=True, text=True, timeout=300)
    finally:
        held.release()
    assert r.returncode == 1 and "in use" in r.stderr and "Traceback" not in r.stderr
    assert not (run / "results.json").exists() and not (run / "config.yaml").exists()


def non_finite_loss(monkeypatch, when, factor: float = float("nan")) -> None:
    """The engine's preference_loss with the loss of the n-th call (counted from 1) made non-finite where
    `when(n)` holds: the loss times `factor`, its logged value NaN (as a diverging run would)."""
    import midpo_cli.engine.trainer as trainer
    real, calls = trainer.preference_loss, {"n": 0}

    def patched(prior, view, yardstick=None, host=True):
        out = real(prior, view, yardstick, host)
        calls["n"] += 1
        if when(calls["n"]):
            out.loss = out.loss * factor
            out.metrics["loss"] = float("nan")
        return out
    monkeypatch.setattr(trainer, "preference_loss", patched)


def test_run_driven_to_nan_stops_and_writes_nothing_non_finite(tmp_path, fast, capsys, monkeypatch):
    """The loss turns NaN at step 4 (injected, as a diverging run would: a huge learning rate diverges on some
    CPUs within a few steps and not on others): the run stops naming the step and the last good checkpoint, and
    nothing non-finite is on disk."""
    non_finite_loss(monkeypatch, lambda n: n >= 4, float("inf"))          # the 4th training micro-batch on
    run = tmp_path / "nan"
    with pytest.raises(SystemExit) as e:
        main(["train", *fast, "trainer.max_steps=6", "trainer.save_every=1", f"hydra.run.dir={run}"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "non-finite values at step 4" in err and "Traceback" not in err
    assert f"last good checkpoint: {run / 'checkpoints' / 'step-3'}" in err
    assert not (run / "model").exists() and not (run / "results.json").exists()
    assert strict_json(run / "error.json")["status"] == "failed"
    assert [m["step"] for m in strict_json(run / "metrics.jsonl")] == [1, 2, 3]   # strict JSON lines
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1", "step-2", "step-3"]
    for ckpt in (run / "checkpoints").glob("step-*"):
        assert finite_safetensors(ckpt), f"{ckpt} holds non-finite weights"


def test_weights_gone_non_finite_are_never_checkpointed(tmp_path, fast, capsys, monkeypatch):
    """A finite loss but weights that became non-finite in the optimiser step (injected at step 2): the checkpoint
    of that step is refused and the run stops naming the last good one; no non-finite tensor is written."""
    steps = {"n": 0}
    original = torch.optim.AdamW.step

    def poisons(self, *a, **k):
        out = original(self, *a, **k)
        steps["n"] += 1
        if steps["n"] == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", poisons)
    run = tmp_path / "poisoned"
    with pytest.raises(SystemExit) as e:
        main(["train", *fast, "trainer.max_steps=4", "trainer.save_every=1", f"hydra.run.dir={run}"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err
    assert "not finite" in err and str(run / "checkpoints" / "step-1") in err, err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1"]
    assert finite_safetensors(run / "checkpoints" / "step-1") and not (run / "model").exists()


def test_skip_counts_non_finite_steps(tmp_path, fast, monkeypatch):
    """trainer.on_nonfinite=skip: a step whose loss is NaN changes nothing and is counted."""
    non_finite_loss(monkeypatch, lambda n: n == 2)                        # the second training micro-batch
    run = tmp_path / "skip"
    main(["train", *fast, "trainer.max_steps=3", "trainer.on_nonfinite=skip", "trainer.save_model=false",
          f"hydra.run.dir={run}"])
    res = strict_json(run / "results.json")
    assert res["skipped_steps"] == 1
    rows = strict_json(run / "metrics.jsonl")
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1] and rows[1]["loss"] is None


def test_skip_sees_a_non_finite_later_micro_batch(tmp_path, fast, monkeypatch):
    """grad_accum=2 and the second micro-batch's loss NaN, given as a host float while the first's metrics are
    still on the device: the step is skipped and counted, its row's loss is null."""
    non_finite_loss(monkeypatch, lambda n: n == 2)                        # step 1, its second micro-batch
    run = tmp_path / "skip2"
    main(["train", *fast, "trainer.max_steps=2", "trainer.grad_accum=2", "trainer.on_nonfinite=skip",
          "trainer.save_model=false", f"hydra.run.dir={run}"])
    rows = strict_json(run / "metrics.jsonl")
    assert [r["skipped_steps"] for r in rows] == [1, 1] and rows[0]["loss"] is None and rows[1]["loss"] > 0


@pytest.mark.slow
def test_resume_auto_same_command_same_directory(tmp_path, fast):
    """Killed after its first checkpoint, the identical command (resume=auto, the default) continues the run
    and ends where the uninterrupted run ends; the same directory with another prior is refused."""
    args = [*fast, "trainer.max_steps=30", "trainer.save_every=5", "trainer.save_model=false", "optimizer.lr=3e-4"]
    full = tmp_path / "full"
    main(["train", *args, f"hydra.run.dir={full}"])
    run = tmp_path / "job"
    kill_after_first_checkpoint(args, run)
    main(["train", *args, f"hydra.run.dir={run}"])
    a, b = strict_json(full / "results.json"), strict_json(run / "results.json")
    assert b["resumed_from"] and abs(a["final"]["loss"] - b["final"]["loss"]) <= 1e-6
    steps = [m["step"] for m in strict_json(run / "metrics.jsonl")]
    assert steps == list(range(1, 31))
    r = subprocess.run([*MIDPO, *args, "prior=simpo", f"hydra.run.dir={run}"], env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and "different config" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "prior.name: dpo -> simpo" in r.stderr


def test_finished_run_is_reused_not_retrained(tmp_path, fast, capsys):
    run = tmp_path / "done"
    args = [*fast, "trainer.max_steps=2", "trainer.save_model=false", f"hydra.run.dir={run}"]
    main(["train", *args])
    before = (run / "results.json").read_text()
    main(["train", *args])
    assert "reused" in capsys.readouterr().out
    assert (run / "results.json").read_text() == before and (run / "reused.json").exists()


def test_sigterm_writes_a_checkpoint_and_the_rerun_continues(tmp_path, fast):
    run = tmp_path / "term"
    args = [*fast, "trainer.max_steps=400", "trainer.save_model=false", "trainer.eval_every=0"]
    proc = subprocess.Popen([*MIDPO, *args, f"hydra.run.dir={run}"], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    ckpts = list(run.glob("checkpoints/step-*/manifest.json"))
    assert len(ckpts) == 1 and not (run / "results.json").exists()
    step = int(ckpts[0].parent.name.split("-")[1])
    assert 0 < step < 400


def _checkpointed_run(tmp_path, fast, name="ckpt"):
    run = tmp_path / name
    main(["train", *fast, "trainer.max_steps=4", "trainer.save_every=2", "trainer.save_model=false",
          f"hydra.run.dir={run}"])
    return run, run / "checkpoints" / "step-2"


def _rewrite_manifest(ckpt: Path):
    from midpo_cli.engine.checkpoint import file_hash
    files = [p for p in ckpt.rglob("*") if p.is_file() and p.name != "manifest.json"]
    (ckpt / "manifest.json").write_text(json.dumps({str(p.relative_to(ckpt)): [p.stat().st_size, file_hash(p)]
                                                    for p in files}))


class Planted:
    def __reduce__(self):
        return (os.system, (f"touch {MARK}",))


MARK = "/tmp/midpo-planted-pickle-ran"


@pytest.mark.parametrize("victim", ["optimizer.bin", "random_states_0.pkl", "scheduler.bin"])
def test_planted_pickle_in_a_checkpoint_is_refused_never_run(tmp_path, fast, capsys, victim):
    import pickle
    Path(MARK).unlink(missing_ok=True)
    run, ckpt = _checkpointed_run(tmp_path, fast)
    (ckpt / victim).write_bytes(pickle.dumps({"state": Planted()}))
    _rewrite_manifest(ckpt)                                                # a consistent but hostile checkpoint
    with pytest.raises(SystemExit) as e:
        main(["train", *fast, "trainer.max_steps=4", "trainer.save_model=false", f"trainer.resume={ckpt}",
              f"hydra.run.dir={tmp_path / 'resumed'}"])
    assert e.value.code == 1 and not Path(MARK).exists()
    err = capsys.readouterr().err
    assert "refused" in err and "Traceback" not in err


def test_truncated_checkpoint_names_the_file_and_the_previous_good_step(tmp_path, fast, capsys):
    run = tmp_path / "trunc"
    main(["train", *fast, "trainer.max_steps=6", "trainer.save_every=2", "trainer.save_model=false",
          f"hydra.run.dir={run}"])
    victim = run / "checkpoints" / "step-4" / "model.safetensors"
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(SystemExit):
        main(["train", *fast, "trainer.max_steps=6", "trainer.save_model=false",
              f"trainer.resume={run / 'checkpoints' / 'step-4'}", f"hydra.run.dir={tmp_path / 'r2'}"])
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "step-2" in err and "Traceback" not in err


def test_resume_auto_skips_a_damaged_latest_checkpoint(tmp_path, fast, capsys):
    """A requeued job whose newest checkpoint is damaged goes on from the one before it (with a warning
    naming the file) and ends where the uninterrupted run ends, instead of failing at every start."""
    args = [*fast, "trainer.max_steps=6", "trainer.save_every=2", "trainer.save_model=false"]
    run = tmp_path / "job"
    main(["train", *args, f"hydra.run.dir={run}"])
    full = strict_json(run / "results.json")["final"]["loss"]
    (run / "results.json").unlink()                                       # as if killed after step 4's checkpoint
    victim = run / "checkpoints" / "step-4" / "model.safetensors"
    victim.write_bytes(victim.read_bytes()[:100])
    capsys.readouterr()
    main(["train", *args, f"hydra.run.dir={run}"])
    res = strict_json(run / "results.json")
    assert res["resumed_from"].endswith("step-2") and abs(res["final"]["loss"] - full) <= 1e-6
    out = capsys.readouterr()
    assert "model.safetensors" in out.out + out.err and "damaged" in out.out + out.err


def test_damaged_reference_cache_entry_is_recomputed(tmp_path, fast, caplog):
    cache = tmp_path / "cache"
    args = [*[a for a in fast if not a.startswith("cache_dir")], f"cache_dir={cache}", "trainer.max_steps=2",
            "trainer.save_model=false"]
    main(["train", *args, f"hydra.run.dir={tmp_path / 'a'}"])
    (entry,) = (cache / "ref_logps").glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:-50])                           # truncated on disk
    main(["train", *args, f"hydra.run.dir={tmp_path / 'b'}"])
    res = strict_json(tmp_path / "b" / "results.json")
    assert res["ref_cache"]["hit"] is False
    assert strict_json(tmp_path / "a" / "results.json")["final"]["loss"] == res["final"]["loss"]
    main(["train", *args, f"hydra.run.dir={tmp_path / 'c'}"])              # repaired: a hit again
    assert strict_json(tmp_path / "c" / "results.json")["ref_cache"]["hit"] is True


LOCAL = ["dataset=local", "trainer.max_steps=2", "trainer.batch_size=4", "trainer.eval_every=0",
         "trainer.save_model=false", "prior=learned_adapter"]                 # a prior with its own state file


@pytest.fixture(scope="module")
def local_checkpoint(tmp_path_factory):
    """A step-1 checkpoint of a 2-step learned_adapter run on a local file, and the run's overrides."""
    root = tmp_path_factory.mktemp("forged")
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i}+1?", "chosen": f" {i + 1}.",
                                        "rejected": f" {i + 2}, I think."}) + "\n" for i in range(24)))
    args = [*LOCAL, f"dataset.path={data}", f"cache_dir={root / 'cache'}"]
    main(["train", *args, "trainer.save_every=1", f"hydra.run.dir={root / 'run'}"])
    return root / "run" / "checkpoints" / "step-1", args


def _state_file(text):
    def forge(ckpt):
        state = json.loads((ckpt / "trainer_state.json").read_text())
        (ckpt / "trainer_state.json").write_text(text.replace("HASH", state["config_hash"]))
        _rewrite_manifest(ckpt)
    return forge


def _pickled(name):
    def forge(ckpt):
        import pickle
        (ckpt / name).write_bytes(pickle.dumps({"state": Planted()}))
        _rewrite_manifest(ckpt)
    return forge


@pytest.mark.parametrize("forge, message", [
    (_pickled("model.safetensors"), "a file is not a plain tensor/state file, refused without running it"),
    (_pickled("prior.safetensors"), "prior.safetensors is not this prior's state"),
    (lambda c: (c / "manifest.json").write_text("{}"), "model.safetensors is not in manifest.json"),
    (lambda c: (c / "manifest.json").write_text("[1, 2]"), "manifest.json is missing or unreadable"),
    (lambda c: (c / "manifest.json").write_text('{"model.safetensors": 5}'), "manifest.json is missing or unreadable"),
    (_state_file('{"step": "one", "config_hash": "HASH"}'), "trainer_state.json is not a trainer state"),
    (_state_file('{"step": [1], "config_hash": "HASH"}'), "trainer_state.json is not a trainer state"),
    (_state_file("[1]"), "trainer_state.json is not a trainer state"),
    (_state_file('{"step": 1000000, "config_hash": "HASH"}'), "its step 1000000 is past trainer.max_steps=2"),
    (lambda c: (c / "trainer_state.json").write_text('{"step": 1}'), "trainer_state.json is truncated or changed"),
], ids=["pickle-as-safetensors", "pickle-as-prior", "empty-manifest", "manifest-list", "manifest-entry",
        "step-text", "step-list", "state-list", "step-past-end", "state-damaged"])
def test_forged_or_damaged_checkpoint_is_one_line_never_run(tmp_path, local_checkpoint, capsys, forge, message):
    """A checkpoint someone else wrote or damaged: a consistent manifest over a pickle, a manifest that
    lists nothing or is not one, a trainer state that is not one. Each is refused in one line naming the
    file (no traceback, nothing run, nothing trained), never resumed from."""
    import shutil
    src, args = local_checkpoint
    ckpt = tmp_path / "checkpoints" / "step-1"
    shutil.copytree(src, ckpt)
    Path(MARK).unlink(missing_ok=True)
    forge(ckpt)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["train", *args, f"trainer.resume={ckpt}", f"hydra.run.dir={tmp_path / 'resumed'}"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and not Path(MARK).exists()
    assert message in err and err.startswith("error: ") and "Traceback" not in err, err
    assert not (tmp_path / "resumed" / "results.json").exists()


def test_a_cached_json_entry_that_parses_but_is_not_one_is_rebuilt(tmp_path, caplog):
    """Valid JSON of the wrong shape (an emptied or hand-edited entry) is damaged like a truncated one:
    removed with a warning and rebuilt, not a KeyError in every later run."""
    from midpo_cli.engine.cache import read_json_entry
    path = tmp_path / "pairs-x.json"
    for text in ("[]", "{}", '{"pairs": []}', "{ half"):
        path.write_text(text)
        assert read_json_entry(path, "pairs", ("pairs", "eval_strings")) is None and not path.exists()
    assert caplog.text.count("is damaged: building it again") == 4
    path.write_text('{"pairs": [], "eval_strings": []}')
    assert read_json_entry(path, "pairs", ("pairs", "eval_strings")) == {"pairs": [], "eval_strings": []}


def test_a_stop_signal_at_the_last_step_finishes_the_run(tmp_path, fast, monkeypatch):
    """SIGTERM/SIGUSR2 arriving during the last step: nothing is left to continue, so the run evaluates and
    saves as usual (it used to exit with no checkpoint and no results, and the requeue redid everything)."""
    from midpo_cli import recipe

    enter = recipe.Signals.__enter__

    def signalled(self):                                                   # the signal is already pending
        enter(self)
        self.got = signal.SIGTERM
        return self

    monkeypatch.setattr(recipe.Signals, "__enter__", signalled)
    run = tmp_path / "run"
    main(["train", *fast, "trainer.max_steps=1", "trainer.save_model=false", f"hydra.run.dir={run}"])
    assert strict_json(run / "results.json")["final"]["step"] == 1
