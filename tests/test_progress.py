"""Progress bars (console.progress): drawn on a terminal with done/total, by the long phases of a run (pair
preparation, verify, a sweep's jobs); nothing drawn when the output is not a terminal, so CI logs stay readable."""
import io
import json
import logging
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from rich.console import Console

from midpo_cli import console

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "standard.jsonl"
BAR = re.compile(r"[━╸╺]+ +\d+/(\d+|\?)")                 # a bar and its count (tables draw ━ too, never a count)


@pytest.fixture
def screen(monkeypatch):
    """The console as a terminal of 120 columns writing into a buffer, every advance drawn; returns the buffer."""
    out = io.StringIO()
    monkeypatch.setattr(console, "console", Console(file=out, force_terminal=True, width=120))
    monkeypatch.setattr(console, "REDRAW_S", 0.0)
    monkeypatch.setattr(console, "_main_process", True)
    return out


def counts(text: str, label: str) -> list[str]:
    """The distinct done/total counts drawn for the bar `label`, in order."""
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    seen = []
    for m in re.finditer(re.escape(label) + r" +[━╸╺]+ +(\d+/(?:\d+|\?))", plain):
        if not seen or seen[-1] != m.group(1):
            seen.append(m.group(1))
    return seen


def test_off_a_terminal_nothing_is_drawn_and_a_long_phase_leaves_one_log_line(monkeypatch):
    out, lines = io.StringIO(), []
    monkeypatch.setattr(console, "console", Console(file=out, force_terminal=False))
    monkeypatch.setattr(console, "_main_process", True)
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    console.log.addHandler(handler)
    level = console.log.level
    console.log.setLevel(logging.INFO)
    try:
        with console.progress("quick", 3, "rows") as bar:
            bar.advance(3)
        monkeypatch.setattr(console, "SUMMARY_S", 0.0)
        with console.progress("long", 1000, "rows") as bar:
            for _ in range(1000):
                bar.advance()
    finally:
        console.log.removeHandler(handler)
        console.log.setLevel(level)
    assert out.getvalue() == ""
    assert len(lines) == 1 and re.fullmatch(r"long: 1,000/1,000 rows in \d+\.\d s", lines[0]), lines


def test_on_a_terminal_the_bar_shows_done_of_total_and_its_text(screen):
    with console.progress("phase", 3, "steps") as bar:
        for i in range(3):
            bar.info = f"loss {i}"
            bar.advance()
    text = screen.getvalue()
    assert counts(text, "phase") == ["0/3", "1/3", "2/3", "3/3"] and "steps" in text and "loss 2" in text


def test_a_phase_inside_another_shows_below_it_and_another_process_draws_nothing(screen, monkeypatch):
    with console.progress("outer", 2, "jobs") as outer:
        with console.progress("inner", 5, "rows") as inner:
            inner.advance(5)
        outer.advance()
    assert counts(screen.getvalue(), "inner")[-1] == "5/5" and counts(screen.getvalue(), "outer")[-1] == "1/2"
    monkeypatch.setattr(console, "_main_process", False)
    screen.truncate(0)
    with console.progress("elsewhere", 2) as bar:
        bar.advance(2)
    assert "elsewhere" not in screen.getvalue()


def test_pair_preparation_of_a_file_advances_while_it_works(screen, tmp_path, monkeypatch):
    """3,000 rows: the file's reading bar counts its lines, the tokenising bar draws a count per chunk of rows
    (the reading bar draws at the usual rate here: a redraw per line would make the test slow)."""
    from midpo_cli.config import DatasetConfig
    from midpo_cli.data.prepare import build_pairs
    from midpo_cli.data.sources import load_rows
    from midpo_cli.engine.models import byte_tokenizer

    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    (tmp_path / "big.jsonl").write_text("".join(json.dumps(rows[i % len(rows)]) + "\n" for i in range(3000)))
    cfg = OmegaConf.structured(DatasetConfig(source="local", path=str(tmp_path / "big.jsonl"), eval_fraction=0.0))
    monkeypatch.setattr(console, "REDRAW_S", 0.1)
    train, _ = load_rows(cfg)
    monkeypatch.setattr(console, "REDRAW_S", 0.0)
    pairs, _ = build_pairs(train, byte_tokenizer(), cfg, (), "train", chunk=256)
    assert len(pairs) == 3000
    read, made = counts(screen.getvalue(), "reading big.jsonl"), counts(screen.getvalue(), "train pairs")
    assert read[0] == "0/3000" and read[-1] == "3000/3000", read
    assert made[:3] == ["0/3000", "256/3000", "512/3000"] and made[-1] == "3000/3000", made


def test_verify_counts_its_check_groups(screen, tmp_path):
    from midpo_cli.__main__ import main
    main(["verify", "priors=[dpo]", "real_model=false", "trl=false", f"hydra.run.dir={tmp_path}"])
    seen = counts(screen.getvalue(), "verify")
    assert seen[0] == "0/8" and seen[-1] == "8/8" and len(seen) == 9, seen


def test_a_sweep_counts_the_jobs_returned_in_its_process(screen):
    from hydra import compose, initialize_config_module
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import open_dict, read_write

    from midpo_cli.config import register_schemas
    from midpo_cli.report import sweep_callback

    register_schemas()
    with initialize_config_module(version_base="1.3", config_module="midpo_cli.conf"):
        cfg = compose("train", return_hydra_config=True)
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.overrides.task = ["seed=0,1", "prior=dpo,simpo"]           # what `--multirun` hands the sweep
    sweep_callback.start_jobs_bar(cfg)
    try:
        for status in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.COMPLETED):
            sweep_callback.SweepTable().on_job_end(cfg, JobReturn(status=status))
    finally:
        sweep_callback.end_jobs_bar()
    assert counts(screen.getvalue(), "sweep") == ["0/4", "1/4", "2/4", "3/4"]
    assert "1 failed" in screen.getvalue()


def test_a_run_whose_output_is_not_a_terminal_prints_no_bar(tmp_path):
    r = subprocess.run([sys.executable, "-m", "midpo_cli", "train", "dataset=local", f"dataset.path={DATA}",
                        "trainer.max_steps=2", "trainer.batch_size=4", "trainer.eval_every=0",
                        "trainer.save_model=false", f"cache_dir={tmp_path / 'cache'}",
                        f"hydra.run.dir={tmp_path / 'r'}"],
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "\r" not in out and not BAR.search(out), out[-3000:]
    assert "midpo train: prior=dpo" in r.stdout                            # the results table still prints
