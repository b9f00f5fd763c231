"""Console output: rich logging, error lines, and the final results table."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

console = Console(stderr=False)
log = logging.getLogger("midpo")


def setup_logging(file: Path | None = None, main_process: bool = True) -> None:
    """Rich console logging (and `file`); the other processes of a multi-process run log errors only, so each
    message appears once."""
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
