"""`midpo report DIR... [--out DIR]`: one result table from run and sweep directories, seeds aggregated.

Finished, failed and incomplete (crashed) runs are all rows. Writes into --out (default: DIR/report/):
runs.csv/.parquet/.md (a row per run), summary.csv (per group: mean, std, 95% CI over seeds: t below 10 seeds,
bootstrap from 10),
report.md (the pivot, how to read it, the figures) and the PNG figures; prints the pivot.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from midpo_cli import console
from midpo_cli.report import tables

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


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="midpo report", description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", type=Path, help="run or sweep directories (searched recursively)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: the first DIR's report/)")
    return p.parse_args(argv)


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
    out = args.out or args.dirs[0] / "report"
    tables.write_table(df, out, "runs")
    agg = tables.aggregate(df)
    agg.to_csv(out / "summary.csv", index=False)
    piv = tables.pivot(agg, tables.summary_columns(df))
    from midpo_cli.report import plots                                        # matplotlib only when reporting
    figures = plots.plot_all(df, agg, out)
    md = write_markdown(out, args.dirs, df, agg, piv, figures)
    tables.print_table(piv, f"midpo report: {len(df)} runs, mean±std over seeds")
    bad = df[df["status"] != "ok"]
    if not bad.empty:
        tables.print_table(tables.sweep_summary(bad), "runs that did not finish")
    console.console.print(f"report: {md}\nfigures: {', '.join(str(f) for f in figures) or 'none'}\n"
                          f"tables: {out / 'runs.csv'}, {out / 'summary.csv'}", highlight=False, soft_wrap=True)
