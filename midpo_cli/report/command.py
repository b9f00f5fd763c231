"""`midpo report DIR... [report.KEY=VALUE ...] [--out DIR]`: one table of run and sweep directories, by seed.

Finished, failed and incomplete (crashed) runs are all rows. Writes into --out (default: DIR/report/):
runs.csv/.parquet/.md (a row per run), summary.csv (per group: mean, std, 95% CI over seeds: t below 10 seeds,
bootstrap from 10), report.md (the pivot, how to read it, the figures) and the PNG figures; prints the pivot.
Options (Hydra-style, after the directories): report.baseline=NAME (a group, or a prior/arm name, of the
report's rows) adds the paired comparison of every other group against it (report/paired.py: paired.csv,
matched_kl.csv, a section of report.md, a printed table), report.confidence=0.95 the intervals' level,
report.match_kl=KL the KL at which each group's beta frontier is read (default: the baseline's KL per seed).
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

from midpo_cli import console
import pandas as pd

from midpo_cli.report import paired, tables

READING = """\
## Reading the columns

Each prior trains its own implied reward `a*log(pi/zeta)`: `own margin` and `own accuracy` are measured with
that reward, so they are in a different unit for every prior (SimPO's beta=2 length-normalised reward and
DPO's beta=0.1 log-ratio are not comparable). Compare priors on the prior-independent columns:

- `logratio margin`: (log pi - log pi_ref)(y_w) - (log pi - log pi_ref)(y_l) on held-out pairs (nats; no
  prior, no scale): how much training moved the policy towards chosen and away from rejected. Present when
  the run had a reference (from the reference log-prob cache).
- `logp margin`: log pi(y_w|x) - log pi(y_l|x) of the trained policy on held-out pairs (nats; no prior,
  no reference, no scale). It includes the reference's own starting margin.
{tasks}
Cells are `mean±std` over seeds (`tokens/s`: the mean); `summary.csv` has the {ci} of each mean
(`<metric>/ci_lo`, `/ci_hi`, and `/interval`: which kind; the bootstrap: 2000 resamples; with 3 seeds a
bootstrap would only span their min-max, too narrow), drawn as error bars in the figures. Failed and incomplete
runs count in `seeds ok` but not in the means.
"""
FIGURES = {"frontier.png": "The task's headline metric vs its cost (e.g. KL to the reference): the trade-off.",
           "curves.png": "Training curves.", "bars.png": "Accuracy, the task's outcomes and margin per prior, with "
                                                          "95% CIs of the mean.",
           "objective.png": "Final J on the training pairs and what it bought: held-out accuracy of the policy's "
                            "log-ratio, the task's trade-off metrics, and the prior's shift, with 95% CIs."}


OPTIONS = {"report.baseline": "a group (or prior/arm name) of the report's rows: every other group against it, "
                              "paired by seed",
           "report.confidence": "the level of every interval, in (0, 1) (default 0.95)",
           "report.match_kl": "the KL at which each group's beta frontier is read (default: the baseline's KL on "
                              "each seed)"}
OPTION = re.compile(r"[A-Za-z_][\w.]*=")               # key=value after the directories (not a directory)


def parse(argv: list[str]) -> argparse.Namespace:
    """The directories and --out (argparse), then the report.KEY=VALUE tokens among the positionals: `baseline`,
    `confidence`, `match_kl` set on the namespace; SystemExit(2) with one line for a wrong key or value."""
    p = argparse.ArgumentParser(prog="midpo report", description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", metavar="DIR | report.KEY=VALUE",
                   help="run or sweep directories (searched recursively), then options: " +
                        "; ".join(f"{k}=...: {v}" for k, v in OPTIONS.items()))
    p.add_argument("--out", type=Path, default=None, help="output directory (default: the first DIR's report/)")
    args = p.parse_intermixed_args(argv)
    given = {}
    dirs = []
    for token in args.dirs:
        if OPTION.match(token) and not Path(token).is_dir():
            key, _, value = token.partition("=")
            if key.lstrip("+~") not in OPTIONS:
                _fail(f"unknown option {key}; midpo report takes {', '.join(f'{k}=...' for k in OPTIONS)}")
            given[key.lstrip("+~")] = value
        else:
            dirs.append(Path(token))
    if not dirs:
        _fail("no directory given: midpo report DIR [DIR ...] [report.baseline=NAME ...]")
    args.dirs = dirs
    args.baseline = given.get("report.baseline") or None
    args.confidence = _number(given, "report.confidence", 0.95, lambda v: 0 < v < 1, "a level in (0, 1), e.g. 0.95")
    args.match_kl = _number(given, "report.match_kl", None, lambda v: v >= 0, "a KL >= 0 (nats), e.g. 0.5")
    return args


def _number(given: dict, key: str, default, ok, what: str):
    if key not in given:
        return default
    try:
        v = float(given[key])
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and ok(v)):
        _fail(f"{key}={given[key]}: give {what}")
    return v


def _fail(message: str):
    console.error(message)
    raise SystemExit(2)


def sweep_command(d: Path) -> str | None:
    """The `midpo train` line of a sweep directory, from the multirun.yaml Hydra leaves there: its overrides, then
    the sweeper params (a preset's) that no override replaced."""
    from omegaconf import OmegaConf
    try:
        h = OmegaConf.load(d / "multirun.yaml").hydra
        given = {o.split("=", 1)[0].lstrip("+~") for o in h.overrides.task}
        params = [f"{k}={v}" for k, v in (h.sweeper.params or {}).items() if k.lstrip("+~") not in given]
        return " ".join(["midpo train --multirun", *h.overrides.task, *params])    # the command line's win
    except Exception:                                                  # not a sweep directory, or another layout
        return None


def task_reading(df) -> str:
    """READING's lines on the task metrics of df's runs, from their declarations (label, unit, range)."""
    lines = [f"  - `{tables.label(m, what)}`: {m.scale or m.label}" + (
                 " minus the same seed's reference (paired: less seed noise)" if what == "gain" else "")
             for m, what in tables.declared(df).values() if what != "reference"]
    head = "- the task's own evaluation (the metrics it declares; e.g. of responses sampled on held-out prompts):"
    return "\n".join([head, *lines, ""]) if lines else ""


def write_markdown(out: Path, dirs: list[Path], df, agg, piv, figures: list[Path], level: float = 0.95,
                   extra: list[str] = ()) -> Path:
    status = df["status"].value_counts().to_dict()
    lines = ["# midpo report", "",
             f"Sources: {', '.join(f'`{d}`' for d in dirs)}. Runs: {len(df)} "
             f"({', '.join(f'{n} {s}' for s, n in status.items())}). Commit: `{df['git_commit'].iloc[0] or '-'}`.", ""]
    lines += [f"- `{d}`: `{cmd}`" for d in dirs if (cmd := sweep_command(d))]
    lines += ["", "## Per prior (mean±std over seeds)", "", tables.markdown(piv), ""]
    same = tables.same_as(agg)
    if same:
        lines += ["`a (= b)`: every outcome of a equals b's to 9 decimals, so their points coincide in the figures "
                  "(a prior that reduces exactly to another with its default settings): " +
                  ", ".join(f"{a} = {b}" for a, b in same.items()) + ".", ""]
    scalars = tables.prior_scalars(df)
    if scalars:
        own = tables.pivot(agg, {c: c.removeprefix("final/") for c in scalars})
        own = own[own.drop(columns=["group", "seeds ok"]).ne("").any(axis=1)]
        lines += ["## The learnable priors' own parameters at the end (mean±std over seeds)", "",
                  tables.markdown(own), ""]
    lines += [READING.format(tasks=task_reading(df), ci=tables.ci_words(level)), *extra]
    for f in figures:
        lines += [f"![{f.stem}]({f.name})", "", FIGURES.get(f.name, ""), ""]
    lines += ["## Runs", "", tables.markdown(df[tables.main_columns(df)]), "",
              "Every column: `runs.csv` / `runs.parquet`; aggregates with CIs: `summary.csv`.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    missing = [str(d) for d in args.dirs if not d.is_dir()]
    if missing:
        console.error(f"not a directory: {', '.join(missing)} (give run or sweep directories)")
        raise SystemExit(2)
    df = tables.collect(args.dirs)
    if df.empty:
        console.error(f"no runs under {', '.join(map(str, args.dirs))}: a run directory holds results.json, "
                      "error.json, config.yaml or metrics.jsonl")
        raise SystemExit(1)
    level = args.confidence
    try:                                                                     # a wrong name: before any file is written
        base = paired.baseline_groups(df, args.baseline) if args.baseline else None
    except paired.Unusable as e:
        _fail(str(e))
    out = args.out or args.dirs[0] / "report"
    tables.write_table(df, out, "runs")
    agg = tables.aggregate(df, level=level)
    agg.to_csv(out / "summary.csv", index=False)
    piv = tables.pivot(agg, tables.summary_columns(df))
    from midpo_cli.report import plots                                        # matplotlib only when reporting
    figures = plots.plot_all(df, agg, out, level)
    comparison, printed, notes = compare(df, base, level, args.match_kl, out)
    md = write_markdown(out, args.dirs, df, agg, piv, figures, level, comparison)
    tables.print_table(piv, f"midpo report: {len(df)} runs, mean±std over seeds")
    for frame, title in printed:
        tables.print_table(frame, title)
    for note in notes:
        console.line(note, "warning", "bold yellow")
    bad = df[df["status"] != "ok"]
    if not bad.empty:
        tables.print_table(tables.sweep_summary(bad), "runs that did not finish")
    written = [out / n for n in ("runs.csv", "summary.csv", "paired.csv", "matched_kl.csv") if (out / n).exists()]
    console.console.print(f"report: {md}\nfigures: {', '.join(str(f) for f in figures) or 'none'}\n"
                          f"tables: {', '.join(map(str, written))}", highlight=False, soft_wrap=True)


def compare(df, base: list[str] | None, level: float, match_kl: float | None, out: Path):
    """The paired comparison against `base` (report.baseline's groups) and the matched-KL reading: paired.csv and
    matched_kl.csv written (removed when not asked for: they would be a previous report's), report.md's lines,
    the tables to print (frame, title) and the warnings (a line each)."""
    for stale in ("paired.csv", "matched_kl.csv"):
        (out / stale).unlink(missing_ok=True)
    if base is None and match_kl is None:
        return [], [], []
    lines, printed = [], []
    rows = paired.compare(df, base, level) if base else pd.DataFrame()
    fam, seeds, at_kl, notes = paired.matched_kl(df, base, level, match_kl)
    rows = pd.concat([rows, at_kl], ignore_index=True)
    if base:
        lines += paired.explanation(base, level, not fam.empty)
    if not rows.empty:
        rows.to_csv(out / "paired.csv", index=False)
        view = paired.shown(rows, level)
        printed.append((view, f"paired by seed against {', '.join(base)}: difference = group - baseline"))
        lines += [tables.markdown(view), ""]
    if not fam.empty:
        seeds.to_csv(out / "matched_kl.csv", index=False)
        xy = tables.frontier_of(df)
        label = tables.declared(df)[xy[1]][0].label
        view = paired.shown_matched(fam, label)
        printed.append((view, f"{label} at matched KL, read off each group's own beta frontier (never extrapolated)"))
        if not base:
            lines += ["## At matched KL", "", paired.explanation([], level, True)[-2], ""]
        lines += ["Each group's reward at the target KL (per seed in `matched_kl.csv`):", "", tables.markdown(view), ""]
    notes = [*paired.warnings(rows), *notes]
    lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    return lines, printed, notes
