"""Console output: rich logging, error lines, progress bars, and the final results table."""
from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=False)
log = logging.getLogger("midpo")
_main_process = os.environ.get("RANK", "0") == "0"   # only it draws progress; setup_logging says which it is


def setup_logging(file: Path | None = None, main_process: bool = True) -> None:
    """Rich console logging (and `file`); the other processes of a multi-process run log errors only, so each
    message appears once (and only the main process draws progress bars)."""
    global _main_process
    _main_process = main_process
    log.setLevel(logging.INFO if main_process else logging.ERROR)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
    log.addHandler(RichHandler(console=console, show_path=False, show_time=False, markup=False))
    if file is not None:
        fh = LogFile(file)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(fh)
    for noisy in ("transformers", "accelerate", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


class LogFile(logging.FileHandler):
    """train.log. A failed write (a full disk, a file-size limit) is one warning, once, and the log goes on on
    the console only (logging would print '--- Logging error ---' and a traceback at every message)."""
    failed = False

    def emit(self, record):
        if not self.failed:
            super().emit(record)

    def handleError(self, record):
        if self.failed:
            return
        from midpo_cli.engine.files import reason
        self.failed = True
        line(f"could not write {self.baseFilename}: {reason(sys.exc_info()[1])}; the log goes on on the console "
             "only", "warning", "bold yellow")


def line(message: str, label: str, style: str) -> None:
    """One line on stderr, never wrapped (it may hold a path or a command to copy), markup in it kept as text."""
    Console(stderr=True, soft_wrap=True).print(f"[{style}]{label}:[/] {escape(message)}", highlight=False)


def error(message: str) -> None:
    line(message, "error", "bold red")


def stopped(message: str) -> None:
    """Where a stopped run stands (console and train.log)."""
    line(message, "stopped", "bold yellow")
    for h in log.handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(log.makeRecord(log.name, logging.WARNING, __file__, 0, f"stopped: {message}", None, None))


REDRAW_S = 0.1            # advance() redraws at most this often: cheap enough to call once per row
SUMMARY_S = 2.0           # off a terminal, a phase that took at least this long leaves one log line
_bars: Progress | None = None                    # the bars on screen; a phase inside another adds its bar below


class Bar:
    """One phase's progress: `advance(n)` as work is done, `info` a short text shown after the count (e.g. the
    training loss). Both redraw at most every REDRAW_S. Off a terminal, or on another process, it only counts."""

    def __init__(self, label: str, total: int | None, unit: str, done: int, bars: Progress | None):
        self.label, self.total, self.unit, self.done, self._info = label, total, unit, done, ""
        self.bars, self.started, self.drawn = bars, time.perf_counter(), 0.0
        self.task = None if bars is None else bars.add_task(escape(label), total=total, completed=done,
                                                            unit=unit, info="")

    @property
    def info(self) -> str:
        return self._info

    @info.setter
    def info(self, text: str) -> None:
        self._info = text
        self.advance(0)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.bars is not None and time.perf_counter() - self.drawn >= REDRAW_S:
            self.draw()

    def draw(self) -> None:
        self.bars.update(self.task, completed=self.done, info=escape(self._info))
        self.bars.refresh()
        self.drawn = time.perf_counter()

    def summary(self) -> str:
        total = "" if self.total is None else f"/{self.total:,}"
        return f"{self.label}: {self.done:,}{total} {self.unit} in {time.perf_counter() - self.started:.1f} s"


@contextmanager
def progress(label: str, total: int | None, unit: str = "", done: int = 0) -> Iterator[Bar]:
    """A rich bar for one phase of `total` units (None: not known; `done`: already done, e.g. a resumed run),
    drawn only when stdout is a terminal and only by the main process. Off a terminal nothing is drawn per step
    and a phase of at least SUMMARY_S seconds leaves one log line (its count and time), so CI logs stay readable.
    A phase inside another (a sweep's job, an evaluation during training) shows its bar below the outer one
    while it runs."""
    global _bars
    outer = _bars
    if _main_process and console.is_terminal and not console.is_dumb_terminal and outer is None:
        _bars = Progress(TextColumn("[bold]{task.description}[/]"), BarColumn(), MofNCompleteColumn(),
                         TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                         console=console)
        _bars.start()
    bar = Bar(label, total, unit, done, _bars)
    try:
        yield bar
    finally:
        if bar.bars is not None:
            bar.draw()
            if outer is None:
                _bars.stop()                                               # the finished bar stays on screen
                _bars = None
            else:
                outer.remove_task(bar.task)
    if bar.bars is None and _main_process and time.perf_counter() - bar.started >= SUMMARY_S:
        log.info("%s", bar.summary())


def final_table(results: dict) -> None:
    for table in final_tables(results):
        console.print(table)


def final_tables(results: dict) -> list[Table]:
    """The run's final tables: its metrics, the task's evaluation (if any), a pipeline's trainings (if any). The
    console prints them; a saved model's card holds them as markdown (report/card.py)."""
    final = results.get("final", {})
    t = Table(title=f"midpo train: prior={results.get('prior')} seed={results.get('seed')}")
    t.add_column("metric"); t.add_column("value", justify="right")
    for k in ("loss", "rewards/accuracies", "rewards/margins", "eval/loss", "eval/rewards/accuracies"):
        if isinstance(final.get(k), (int, float)):
            t.add_row(k, f"{final[k]:.4f}")
    t.add_row("tokens/s", f"{results.get('tokens_per_s', 0):,.0f}")
    if results.get("batches"):
        t.add_row("batches", batches_cell(results["batches"]))
    t.add_row("peak memory (MB)", f"{results.get('peak_memory_mb', 0):,.0f}")
    t.add_row("wall time (s)", f"{results.get('wall_time_s', 0):.1f}")
    tables = [t]
    if results.get("eval"):
        tables.append(eval_table(results))
    if results.get("pipeline"):
        tables.append(pipeline_table(results["pipeline"]))
    return tables


LAYOUTS = {"tree": "packed, prompt once (tree mask)", "flat": "packed (variable-length)", "off": "padded"}


def batches_cell(b: dict) -> str:
    """How the training batches ran (engine/pack.py), e.g. 'packed, prompt once (tree mask) via sdpa: 100% of
    batches; padding avoided 41% of a padded batch's slots'."""
    layout = LAYOUTS.get(b.get("packing"), str(b.get("packing")))
    if b.get("packing") == "off":
        return (f"padded (trainer.packing=false) via {b.get('attention')}; padding "
                f"{b.get('padding_share', 0):.0%} of slots")
    return (f"{layout} via {b.get('attention')}: {b.get('packed_share', 0):.0%} of batches; padded batches would "
            f"hold {b.get('padding_share', 0):.0%} padding")


def pipeline_table(pipeline: dict) -> Table:
    """A run of several trainings (midpo_cli/pipelines): a column per training, a row per quantity its pipeline
    recorded (the first quantity names the columns)."""
    rows = pipeline.get("rows") or []
    keys = list(dict.fromkeys(k for r in rows for k in r))
    t = Table(title=pipeline.get("title", "trainings"))
    show = lambda v: "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
    t.add_column(keys[0] if keys else "")
    for r in rows:
        t.add_column(show(r.get(keys[0])), justify="right")
    for k in keys[1:]:
        if any(r.get(k) is not None for r in rows):                       # a quantity no training has: no row
            t.add_row(k, *(show(r.get(k)) for r in rows))
    return t


def eval_table(results: dict) -> Table:
    """The task's evaluation: a row per metric its task declares (label, policy, reference or the value of no
    change, unit), in the order declared."""
    from midpo_cli.tasks import metrics_of, source_of

    ev = results["eval"]
    e = Table(title=results.get("eval_title", "held-out evaluation (sampled)"))
    for name, justify in (("", "left"), ("policy", "right"), ("reference", "right"), ("unit", "left")):
        e.add_column(name, justify=justify)
    for m in metrics_of(source_of(results.get("config"))):
        if isinstance(ev.get(m.key), (int, float)):
            ref = ev.get(m.reference) if m.reference else m.baseline
            e.add_row(m.label, f"{ev[m.key]:.3f}", "" if ref is None else f"{ref:.3f}", m.unit)
    return e
