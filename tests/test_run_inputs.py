"""Runs keyed by what they read (issue 16): a finished run is reused, and a killed one resumed, only while its data
files, model directory and reference are the ones it was trained on; a folder that is not a midpo run is never
written into; `trainer.resume=restart` starts over and moves the old run aside."""
import json
import os
from pathlib import Path

import pytest

from midpo_cli.__main__ import main

DATA = Path(__file__).parent / "data" / "standard.jsonl"
TINY = ["trainer.max_steps=2", "trainer.batch_size=4", "trainer.eval_every=0", "trainer.save_model=false",
        "trainer.log_every=1"]


def local(tmp_path) -> list[str]:
    data = tmp_path / "prefs.jsonl"
    if not data.exists():
        data.write_text(DATA.read_text())
    return ["dataset=local", f"dataset.path={data}", *TINY, f"cache_dir={tmp_path / 'cache'}"]


def refused(capsys, args, run) -> str:
    """`midpo train *args` in `run`, in this process: exit 1 and one error line (returned), no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["train", *args, f"hydra.run.dir={run}"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def killed_after_checkpoint(args, run) -> None:
    """A run stopped after its checkpoint at step 2 of 4, as a kill leaves it (no results.json)."""
    main(["train", *args, "trainer.max_steps=4", "trainer.save_every=2", f"hydra.run.dir={run}"])
    (run / "results.json").unlink()
    assert (run / "checkpoints" / "step-2" / "manifest.json").exists()


def snapshot(directory: Path) -> dict:
    """Every file under a directory with its bytes and modification time: what 'untouched' means."""
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def edit(path: Path) -> None:
    """Change a data file in place, same size (the cheap size test alone would not see it)."""
    text = path.read_text()
    path.write_text(text.replace("a", "e", 1))
    assert path.read_text() != text and len(path.read_text()) == len(text)


def test_edited_data_file_is_not_reused_and_the_error_names_it(tmp_path, capsys):
    args, run = local(tmp_path), tmp_path / "run"
    main(["train", *args, f"hydra.run.dir={run}"])
    before = snapshot(run)
    edit(tmp_path / "prefs.jsonl")
    err = refused(capsys, args, run)
    assert f"dataset.path {tmp_path / 'prefs.jsonl'}" in err and "xxh3" in err
    assert "trainer.resume=restart" in err and "new hydra.run.dir" in err
    after = snapshot(run)
    assert {k: v for k, v in after.items() if k != ".midpo.lock"} == \
        {k: v for k, v in before.items() if k != ".midpo.lock"}                 # nothing written but the lock


def test_a_touched_but_unchanged_file_is_still_the_same_input(tmp_path, capsys):
    """Size and time are only the cheap first test: a `touch` (or a copy back) changes nothing."""
    args, run = local(tmp_path), tmp_path / "run"
    main(["train", *args, f"hydra.run.dir={run}"])
    os.utime(tmp_path / "prefs.jsonl", ns=(1, 1))
    capsys.readouterr()
    main(["train", *args, f"hydra.run.dir={run}"])
    assert "results are reused" in capsys.readouterr().out


def test_model_directory_overwritten_with_new_weights_is_not_reused(tmp_path, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    from midpo_cli.engine.models import byte_tokenizer, tiny_model
    from omegaconf import OmegaConf
    model_dir = tmp_path / "model"
    tok = byte_tokenizer()
    torch.manual_seed(0)
    tiny_model(OmegaConf.create({"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64,
                                 "max_position_embeddings": 512, "dtype": "float32"}), tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    args = [*local(tmp_path), "model=hf", f"model.name_or_path={model_dir}", "dataset.max_length=256",
            "dataset.max_prompt_length=128"]
    run = tmp_path / "run"
    main(["train", *args, f"hydra.run.dir={run}"])
    weights = load_file(str(model_dir / "model.safetensors"))
    save_file({k: v + 0.01 for k, v in weights.items()}, str(model_dir / "model.safetensors"),
              metadata={"format": "pt"})
    err = refused(capsys, args, run)
    assert f"model.name_or_path/model.safetensors {model_dir / 'model.safetensors'}" in err, err


def test_edited_data_file_is_not_resumed_and_restart_moves_the_old_run_aside(tmp_path, capsys):
    """Stopped after a checkpoint, the data edited in place: the rerun refuses to continue on a mix of old and new
    data; trainer.resume=restart moves the old run to replaced/<time>/ (never deleted) and trains it anew."""
    args, run = local(tmp_path), tmp_path / "job"
    killed_after_checkpoint(args, run)
    old = snapshot(run)
    edit(tmp_path / "prefs.jsonl")
    err = refused(capsys, [*args, "trainer.max_steps=4", "trainer.save_every=2"], run)
    assert "checkpointed run" in err and "prefs.jsonl" in err and not (run / "results.json").exists()
    main(["train", *args, "trainer.max_steps=4", "trainer.save_every=2", "trainer.resume=restart",
          f"hydra.run.dir={run}"])
    (moved,) = (run / "replaced").iterdir()
    assert {k: v[0] for k, v in snapshot(moved).items()} == \
        {k: v[0] for k, v in old.items() if k != ".midpo.lock"}                   # all of it, unchanged
    res = json.loads((run / "results.json").read_text())
    assert res["resumed_from"] is None and [m["step"] for m in map(json.loads, (run / "metrics.jsonl").open())] \
        == [1, 2, 3, 4]


def test_resume_refuses_a_reference_that_changed_under_the_same_config(tmp_path, fast, capsys):
    """What set-up derives from the inputs is checked too: the task's SFT reference rebuilt differently (here: a
    copied cache whose reference weights were altered) is a different reference, named as such."""
    import shutil

    from safetensors.torch import load_file, save_file
    args, run = [*fast, "trainer.save_model=false"], tmp_path / "job"
    killed_after_checkpoint(args, run)
    cache = Path(next(a for a in fast if a.startswith("cache_dir=")).split("=", 1)[1])
    other = tmp_path / "other-cache"
    shutil.copytree(cache, other)
    for weights in other.glob("sft-*/model.safetensors"):
        t = load_file(str(weights))
        save_file({k: v * 1.001 for k, v in t.items()}, str(weights), metadata={"format": "pt"})
    moved = [*[a for a in args if not a.startswith("cache_dir=")], f"cache_dir={other}"]
    err = refused(capsys, [*moved, "trainer.max_steps=4", "trainer.save_every=2"], run)
    assert "reference weights" in err and not (run / "results.json").exists()


def test_resume_from_a_checkpoint_of_other_data_is_refused(tmp_path, capsys):
    args = [*local(tmp_path), "trainer.max_steps=4", "trainer.save_every=2"]
    first = tmp_path / "first"
    main(["train", *args, f"hydra.run.dir={first}"])
    edit(tmp_path / "prefs.jsonl")
    err = refused(capsys, [*args, f"trainer.resume={first / 'checkpoints' / 'step-2'}"], tmp_path / "second")
    assert "trained on other inputs" in err and "prefs.jsonl" in err


@pytest.mark.parametrize("contents", [["model/", "data_report.json"], ["notes.txt"], [".git/"]])
def test_a_folder_that_is_not_a_midpo_run_is_refused_untouched(tmp_path, capsys, contents):
    folder = tmp_path / "theirs"
    for name in contents:
        if name.endswith("/"):
            (folder / name).mkdir(parents=True)
            (folder / name / "weights.bin").write_bytes(b"someone's")
        else:
            folder.mkdir(exist_ok=True)
            (folder / name).write_text("someone's")
    before = snapshot(folder)
    names = sorted(p.name for p in folder.iterdir())
    err = refused(capsys, local(tmp_path), folder)
    assert "not a midpo run directory" in err and contents[0].rstrip("/") in err
    assert snapshot(folder) == before and sorted(p.name for p in folder.iterdir()) == names   # not even a lock


def test_an_empty_existing_folder_is_a_new_run(tmp_path):
    (tmp_path / "empty").mkdir()
    main(["train", *local(tmp_path), f"hydra.run.dir={tmp_path / 'empty'}"])
    assert (tmp_path / "empty" / "results.json").exists() and (tmp_path / "empty" / "run.json").exists()


def test_restart_never_deletes_and_keeps_earlier_replaced_runs(tmp_path, capsys):
    args, run = local(tmp_path), tmp_path / "run"
    for _ in range(3):
        main(["train", *args, "trainer.resume=restart", f"hydra.run.dir={run}"])
    replaced = sorted((run / "replaced").iterdir())
    assert len(replaced) == 2 and all((d / "results.json").exists() for d in replaced)
    assert not (replaced[0] / "replaced").exists()                              # moved aside, not nested
