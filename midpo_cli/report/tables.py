"""Result rows and tables: one row per run directory, the sweep table, and the aggregate over seeds.

A run directory is one holding results.json (status "ok"), error.json ("failed": a sweep job that raised)
or only job.json / config.yaml / metrics.jsonl ("incomplete": crashed, killed or still running); a job that a
sweep's multirun.yaml lists but that never started is a row too ("not started"). Hidden folders (submitit's
.submitit/, the GPU locks .gpus/) are not searched. `reused`: the run was skipped because its directory
already held the finished results (reused.json newer than results.json). Rows are flat: `final/*` are
the last logged metrics, `best/*` the best over metrics.jsonl, `task/*` the metrics the run's task declares
(Task.metrics, looked up by its dataset.source: report/objective.py's task_columns).
Prior-independent columns sit next to each prior's own reward, so priors can be compared fairly:
`*/logps/margin` = log pi(y_w|x) - log pi(y_l|x) of the policy (no prior, no reference, no scale) beside
`*/rewards/margins` = a*log(pi/zeta) of the prior that was trained (a different unit for every prior).
"""
from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from midpo_cli.console import console, line as console_line
from midpo_cli.engine.rundir import IGNORED
from midpo_cli.priors.learnable import COLLAPSE
from midpo_cli.report.objective import declared_metrics, task_columns, task_value
from midpo_cli.tasks import TASKS, Metric, source_of

MARKERS = ("results.json", "error.json", "config.yaml", "metrics.jsonl", "job.json", "run.json")
FINAL = ("loss", "rewards/accuracies", "rewards/margins", "logps/margin", "logratio/margins",
         "eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/logps/margin", "eval/logratio/margins",
         "eval/logratio/accuracies", "eval/logratio/loss", "prior/margin", "prior/shift", "eval/prior/shift",
         "train/loss")
BEST = {"loss": min, "rewards/accuracies": max, "eval/loss": min, "eval/rewards/accuracies": max}
# The aggregate's metrics: the fair ones first (the task's declared metrics, then these), each prior's own, cost.
SUMMARY = ("final/eval/logratio/margins", "final/eval/logratio/accuracies", "final/eval/logratio/loss",
           "final/eval/logps/margin",
           "final/eval/rewards/margins", "final/eval/rewards/accuracies", "final/eval/loss", "final/train/loss",
           "final/eval/prior/shift", "tokens_per_s", "wall_time_s")
COST = ("tokens_per_s", "wall_time_s")
OBJECTIVE = ("final/train/loss", "final/eval/logratio/accuracies", "final/eval/prior/shift")   # pivot columns of runs
                                                                  # with trainer.eval_train (learnable priors)
LABELS = {"final/eval/logps/margin": "logp margin",
          "final/eval/logratio/margins": "logratio margin", "final/eval/logratio/accuracies": "logratio accuracy",
          "final/train/loss": "J (train pairs)", "final/eval/prior/shift": "prior shift",
          "final/eval/rewards/margins": "own margin", "final/eval/rewards/accuracies": "own accuracy",
          "final/eval/loss": "held-out J (own prior)", "final/eval/logratio/loss": "held-out J(π, π_ref)",
          "tokens_per_s": "tokens/s", "wall_time_s": "wall s"}

MAIN = ("job", "status", "reused", "prior", "seed", "overrides", "final/eval/rewards/accuracies",   # the markdown's columns
        "final/eval/rewards/margins", "final/eval/logratio/margins", "final/eval/logps/margin", "task/",
        "tokens_per_s", "peak_memory_mb", "wall_time_s", "ref_cache_hit", "warnings", "error")   # task/: its metrics


def declared(df: pd.DataFrame) -> dict[str, tuple[Metric, str]]:
    """{`task/...` column: (metric, policy | reference | gain)} of the tasks of df's runs, in the order they
    declare them (a column two tasks declare: the first one's; objective.declared_metrics)."""
    out = {}
    for source in dict.fromkeys(t if isinstance(t, str) else None for t in df["task"]) if "task" in df else ():
        for c, v in task_columns(declared_metrics(source)).items():
            out.setdefault(c, v)
    return out


def frontier_of(df: pd.DataFrame) -> tuple[str, str] | None:
    """(x, y) columns of the first task of df's runs that declares a trade-off (Task.frontier, e.g. KL and reward)."""
    for source in dict.fromkeys(df["task"].dropna()) if "task" in df else ():
        cls = TASKS.get(source)
        if cls is not None and cls.frontier:
            return f"task/{cls.frontier[0]}", f"task/{cls.frontier[1]}"
    return None


def label(m: Metric, what: str) -> str:
    """A task column's name in tables: the metric's label (its reference's value, the headline's gain)."""
    return {"policy": m.label, "reference": f"{m.label} (ref)", "gain": f"{m.label} gain"}[what]


def main_columns(df: pd.DataFrame) -> list[str]:
    """MAIN's columns that df has, `task/` replaced by the policy's value of each declared task metric that holds
    a value."""
    values = [c for c, (_, what) in declared(df).items() if what == "policy" and c in df and df[c].notna().any()]
    return [c for m in MAIN for c in (values if m == "task/" else [m]) if c in df]


def find_runs(root: Path) -> list[Path]:
    """Run directories at or under root (a run's own subfolders, e.g. model/, are not searched)."""
    if any((root / m).exists() for m in MARKERS):
        return [root]
    subs = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: _natural(p.name))
    return [run for p in subs for run in find_runs(p)]


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def metrics_of(run_dir: Path) -> list[dict]:
    """metrics.jsonl as a list of rows; a torn last line (a crash mid-write) is skipped."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    for m in lines:                                    # the prior-independent margin, from what is logged
        for pre in ("", "eval/"):
            if f"{pre}logps/chosen" in m and f"{pre}logps/rejected" in m:
                m[f"{pre}logps/margin"] = m[f"{pre}logps/chosen"] - m[f"{pre}logps/rejected"]
    return lines


def _from_overrides(overrides: list[str], key: str) -> str | None:
    for o in overrides:
        k, _, v = o.lstrip("+~").partition("=")
        if k == key:
            return v
    return None


def reused(run_dir: Path) -> bool:
    """The run was not retrained: its directory already held these finished results (reused.json, written
    when a run is skipped, is newer than results.json)."""
    mark, results = run_dir / "reused.json", run_dir / "results.json"
    return mark.exists() and results.exists() and mark.stat().st_mtime >= results.stat().st_mtime


def job_name(run_dir: Path, root: Path) -> str:
    """The run's path inside the sweep directory (either may be relative: launchers and Hydra mix the two)."""
    run, top = Path(run_dir).resolve(), Path(root).resolve()
    if run == top:
        return run.name
    return str(run.relative_to(top)) if run.is_relative_to(top) else str(run)


def read_run(run_dir: Path, root: Path, commit: str = "", status: str | None = None,
             overrides: list[str] | None = None) -> dict:
    """One row of the sweep table for one run directory (`status`/`overrides`: for a job never started)."""
    results, error, job = _json(run_dir / "results.json"), _json(run_dir / "error.json"), _json(run_dir / "job.json")
    config = results["config"] if results else _yaml(run_dir / "config.yaml")
    overrides = overrides or overrides_of(run_dir)
    status = status or ("failed" if error else "ok" if results else "incomplete")   # error.json: the latest attempt
    prior, source = (config or {}).get("prior", {}), source_of(config)
    row = {"job": job_name(run_dir, root), "run": str(run_dir),
           "status": status, "reused": reused(run_dir) and status == "ok", "starts": (job or {}).get("starts"),
           "error": (error or {}).get("error", ""), "overrides": " ".join(overrides),
           "prior": prior.get("name") or _from_overrides(overrides, "prior") or "",
           "prior_params": " ".join(f"{k}={v}" for k, v in prior.items() if k != "name"),
           "beta": prior.get("beta") if isinstance(prior.get("beta"), (int, float)) else None,   # the scale
           "seed": (config or {}).get("seed", _from_overrides(overrides, "seed")),
           "task": source or _from_overrides(overrides, "dataset.source") or _from_overrides(overrides, "dataset")}
    lines = metrics_of(run_dir)
    final = {}
    for m in lines:                                    # the engine's `final` is this same running merge
        final.update(m)
    row["steps"] = final.get("step")
    row.update({f"final/{k}": final.get(k) for k in FINAL})
    row.update({f"final/{k}": v for k, v in final.items() if k.startswith("prior/") and k not in FINAL})  # its scalars
    for k, better in BEST.items():
        values = [m[k] for m in lines if isinstance(m.get(k), (int, float)) and math.isfinite(m[k])]
        row[f"best/{k}"] = better(values) if values else None
    ev = (results or {}).get("eval") or {}             # gain: paired with the same seed's reference, less noise
    row.update({c: task_value(ev, m, what) for c, (m, what) in task_columns(declared_metrics(row["task"])).items()})
    r = results or {}
    row.update({"tokens_per_s": r.get("tokens_per_s"), "peak_memory_mb": r.get("peak_memory_mb"),
                "train_wall_s": r.get("train_wall_s"), "wall_time_s": r.get("wall_time_s"),
                "ref_cache_hit": (r.get("ref_cache") or {}).get("hit"), "git_commit": commit,
                "warnings": len(r.get("warnings") or []) if results else None,
                "collapsed": any(COLLAPSE in str(w) for w in r.get("warnings") or []) if results else None})
    return row


def _yaml(path: Path) -> dict | None:
    if not path.exists():
        return None
    from omegaconf import OmegaConf
    try:
        return OmegaConf.to_container(OmegaConf.load(path))
    except Exception:                                  # a half-written file from a crash
        return None


def git_commit() -> str:
    """HEAD of the current directory's repository, or "" outside one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def overrides_of(run_dir: Path) -> list[str]:
    """The overrides a run directory's job ran with (results.json, error.json or job.json)."""
    for name in ("job.json", "results.json", "error.json"):             # job.json: the job that last claimed it
        found = (_json(run_dir / name) or {}).get("overrides")
        if isinstance(found, list):
            return [str(o) for o in found]
    return []


# Overrides that do not change what a run computes (engine/rundir.py IGNORED): not part of a job's identity.
BYSTANDERS = re.compile(rf"[+~]*(trainer\.({'|'.join(IGNORED)})=|cache_dir=|hydra[./])")


def job_key(overrides: list[str]) -> tuple[str, ...]:
    """What identifies a sweep job: its overrides that change the run, in any order (its directory may be a
    fresh slot `<n>-1`, and a rerun may add trainer.resume=restart)."""
    return tuple(sorted(o for o in overrides if not BYSTANDERS.match(o)))


def collect(dirs: list[Path]) -> pd.DataFrame:
    """The table: a row per run directory found under each of dirs, in directory order, then a row per job that
    a sweep of the directory listed (multirun.yaml, .sweeps/*.yaml) but no directory holds ("not started")."""
    commit = git_commit()
    rows = []
    for d in map(Path, dirs):                          # job names: relative to the dir, or to its parent if many
        root = d.parent if len(dirs) > 1 else d
        runs = find_runs(d)
        rows += [read_run(run, root, commit) for run in runs]
        started = {job_key(overrides_of(run)) for run in runs}
        for name, job in expected_jobs(d) or []:
            if job_key(job) not in started:
                started.add(job_key(job))
                rows.append(read_run(d / name, root, commit, "not started", job))
    df = pd.DataFrame(rows)
    if not df.empty:
        df["seed"] = pd.to_numeric(df["seed"], errors="coerce").astype("Int64")
        df.insert(3, "group", _groups(df))
        unknown = sorted({t for t in df["task"].dropna() if t not in TASKS})
        if unknown:
            console_line(f"runs of dataset.source={', '.join(unknown)}: no such task is registered here (a plug-in "
                         "folder not named in MIDPO_PLUGINS?), so their task metrics are left out", "warning",
                         "bold yellow")
    return df


SWEEPS = ".sweeps"                                     # each sweep started in a directory: its own record


def expected_jobs(sweep_dir: Path) -> list[tuple[str, list[str]]] | None:
    """(job directory name, overrides) of every job of the basic-sweeper sweeps started in `sweep_dir`: each
    invocation's own record (.sweeps/*.yaml, written when it starts) and Hydra's multirun.yaml (the latest
    one's); None when there is none, or only other sweepers or job directory layouts."""
    from omegaconf import OmegaConf

    jobs, known = [], False
    for record in [sweep_dir / "multirun.yaml", *sorted((sweep_dir / SWEEPS).glob("*.yaml"))]:
        try:
            found = jobs_of(OmegaConf.load(record).hydra)
        except Exception:                              # unreadable, or not a sweep record
            found = None
        if found is not None:                          # a job of several sweeps: collect() lists it once
            known = True
            jobs += found
    return jobs if known else None


def jobs_of(h) -> list[tuple[str, list[str]]] | None:
    """(job directory name, overrides) of every job of a basic-sweeper sweep, from its `hydra` config node; None
    for another sweeper or job directory layout, or a sweep it cannot replay (glob)."""
    from omegaconf import OmegaConf

    from midpo_cli.sweeps.expand import basic_jobs

    try:
        if not str(h.sweeper._target_).endswith("BasicSweeper") or \
                OmegaConf.to_container(h.sweep)["subdir"] != "${hydra.job.num}":
            return None
        params = [f"{k}={v}" for k, v in (h.sweeper.get("params") or {}).items()]
        jobs = basic_jobs([*params, *h.overrides.task])
    except Exception:                                  # a sweep it cannot replay (glob)
        return None
    return [(str(i), list(job)) for i, job in enumerate(jobs)]


def own_rows(df: pd.DataFrame, jobs: list[tuple[str, list[str]]] | None) -> pd.DataFrame:
    """The rows of `df` that are jobs of one sweep (`jobs`, from jobs_of); all of them when the sweep's jobs are
    not known (another sweeper, a glob)."""
    if jobs is None:
        return df
    keys = {job_key(j) for _, j in jobs}
    return df[[job_key(o.split()) in keys for o in df["overrides"]]]


def _groups(df: pd.DataFrame) -> list[str]:
    """What a row is a seed of: its prior (or its `arm`, config group `arm`: a prior with settings) plus the overrides that
    differ between rows, seed excluded."""
    keep = [[o for o in s.split() if not re.match(r"[+~]?(seed|prior|arm)=", o) and not BYSTANDERS.match(o)]
            for s in df["overrides"]]
    known = [set(k) for k, s in zip(keep, df["overrides"]) if s]         # incomplete runs have no overrides
    common = set.intersection(*known) if known else set()
    names = [_from_overrides(s.split(), "arm") or p or "?" for p, s in zip(df["prior"], df["overrides"])]
    return [" ".join([n, *[o for o in k if o not in common]]) for n, k in zip(names, keep)]


def write_table(df: pd.DataFrame, out: Path, stem: str) -> list[Path]:
    """<stem>.csv and .parquet (every column) and <stem>.md (the main ones) in out."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.csv", out / f"{stem}.parquet", out / f"{stem}.md"]
    df.to_csv(paths[0], index=False)
    df.to_parquet(paths[1], index=False)
    paths[2].write_text(markdown(df[main_columns(df)]) +
                        f"\n\nAll {df.shape[1]} columns: {stem}.csv / {stem}.parquet.\n")
    return paths


def _cell(v) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, (float, np.floating)):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.1f}" if abs(v) >= 100 else f"{v:.3f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown(df: pd.DataFrame) -> str:
    """A GitHub markdown table (pandas' to_markdown needs the optional `tabulate`)."""
    head = "| " + " | ".join(map(str, df.columns)) + " |\n|" + "---|" * df.shape[1]
    body = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, *body])


def bootstrap_ci(x: np.ndarray, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean over seeds; (nan, nan) below two values."""
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return math.nan, math.nan
    means = np.random.default_rng(seed).choice(x, (resamples, len(x))).mean(axis=1)
    return float(np.quantile(means, (1 - level) / 2)), float(np.quantile(means, (1 + level) / 2))


BOOTSTRAP_FROM = 10        # seeds: a percentile bootstrap of the mean from here on; below, the t-interval


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with `df` (an integer >= 1) degrees of freedom: scipy's where it is installed,
    else from the exact finite series of P(|T| <= x) for integer df, solved by bisection."""
    try:
        from scipy.stats import t
    except ImportError:
        return _t_quantile(p, df)
    return float(t.ppf(p, df))


def _t_within(x: float, df: int) -> float:
    """P(|T| <= x) for Student's t with integer df >= 1 (theta = atan(x/sqrt(df)); the series in cos^2 theta)."""
    theta = math.atan(x / math.sqrt(df))
    s, c, c2 = math.sin(theta), math.cos(theta), math.cos(theta) ** 2
    term, total = 1.0, 1.0
    if df % 2:                                         # odd: (2/pi)(theta + sin cos (1 + 2/3 c^2 + 2*4/(3*5) c^4 ...))
        for k in range(1, (df - 1) // 2):
            term *= c2 * 2 * k / (2 * k + 1)
            total += term
        return 2 / math.pi * (theta + (s * c * total if df > 1 else 0.0))
    for k in range(1, df // 2):                        # even: sin (1 + 1/2 c^2 + 1*3/(2*4) c^4 ...)
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return s * total


def _t_quantile(p: float, df: int) -> float:
    if p == 0.5:
        return 0.0
    within, lo, hi = abs(2 * p - 1), 0.0, 1.0
    while _t_within(hi, df) < within:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_within(mid, df) < within else (lo, mid)
    return math.copysign((lo + hi) / 2, p - 0.5)


def t_interval(x: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean: mean -+ t_{n-1,(1+level)/2} * s / sqrt(n); (nan, nan) below two values."""
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return math.nan, math.nan
    half = t_quantile((1 + level) / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean() - half), float(x.mean() + half)


def interval(x: np.ndarray, level: float = 0.95) -> tuple[float, float, str]:
    """(lo, hi, kind) of the mean over seeds: the t-interval below BOOTSTRAP_FROM values (a bootstrap of 3 seeds
    is only their min-max), the percentile bootstrap from there on; kind "" below two values."""
    x = np.asarray(x, dtype=float)
    n = int(np.isfinite(x).sum())
    if n < 2:
        return math.nan, math.nan, ""
    if n < BOOTSTRAP_FROM:
        return (*t_interval(x, level), "t")
    return (*bootstrap_ci(x, level), "bootstrap")


def ci_words(level: float) -> str:
    """What the summary's intervals are, for titles and notes."""
    return (f"{level * 100:g}% CI (t-interval below {BOOTSTRAP_FROM} seeds, percentile bootstrap from "
            f"{BOOTSTRAP_FROM})")


def summary_columns(df: pd.DataFrame) -> dict[str, str]:
    """{column: label} of the aggregate's metrics: the declared task metrics of df's runs (each policy value,
    the headline's gain), then SUMMARY."""
    own = {c: label(m, what) for c, (m, what) in declared(df).items() if what != "reference"}
    return {**own, **{m: LABELS[m] for m in SUMMARY}}


def prior_scalars(df: pd.DataFrame) -> list[str]:
    """The final values of the learnable priors' own scalars (e.g. final/prior/phi_len): summary.csv, not the pivot."""
    return [c for c in df.columns if c.startswith("final/prior/") and c not in {f"final/{k}" for k in FINAL}]


def aggregate(df: pd.DataFrame, metrics=None, level: float = 0.95) -> pd.DataFrame:
    """A row per group (prior + varied overrides): n, n_ok, and <metric>/mean, /std, /ci_lo, /ci_hi, /interval
    of each of `metrics` (default: summary_columns and prior_scalars); the interval at `level`, its kind (`interval`): t below
    BOOTSTRAP_FROM seeds, bootstrap from there on."""
    metrics = [*summary_columns(df), *prior_scalars(df)] if metrics is None else metrics
    out = []
    for group, g in df.groupby("group", sort=False):
        ok = g[g["status"] == "ok"]
        row = {"group": group, "prior": g["prior"].iloc[0], "n": len(g), "n_ok": len(ok)}
        if "collapsed" in ok and ok["collapsed"].fillna(False).astype(bool).any():
            row["collapsed"] = int(ok["collapsed"].fillna(False).astype(bool).sum())   # runs with the collapse warning
        for m in metrics:
            x = pd.to_numeric(ok[m], errors="coerce").dropna().to_numpy() if m in ok else np.array([])
            lo, hi, kind = interval(x, level)
            if m.endswith("_gain"):                                     # seeds where the policy beat the reference
                row[f"{m}/above"] = int((x > 0).sum())
            row.update({f"{m}/mean": x.mean() if len(x) else math.nan,
                        f"{m}/std": x.std(ddof=1) if len(x) > 1 else math.nan, f"{m}/ci_lo": lo, f"{m}/ci_hi": hi,
                        f"{m}/interval": kind})
        out.append(row)
    agg = pd.DataFrame(out)
    empty = [c for c in agg.columns if c.endswith("/mean") and agg[c].isna().all()]
    return agg.drop(columns=[c for m in empty for c in agg.columns if c.startswith(m[:-len("/mean")] + "/")])


def same_as(agg: pd.DataFrame) -> dict[str, str]:
    """{group: an earlier group} where every outcome mean is identical (e.g. a prior that reduces to DPO
    with its default settings), so tables and legends can say so instead of hiding one under the other."""
    cols = [c for c in agg.columns if c.endswith("/mean") and c[:-len("/mean")] not in COST]
    seen, out = {}, {}
    for g, *values in agg[["group", *cols]].itertuples(index=False):
        key = tuple(round(v, 9) for v in values)
        if all(math.isnan(v) for v in key):
            continue
        if key in seen:
            out[g] = seen[key]
        seen.setdefault(key, g)
    return out


def display_names(agg: pd.DataFrame) -> list[str]:
    """Each group's display name: `tisdpo (= dpo)` when its results equal an earlier group's."""
    same = same_as(agg)
    return [f"{g} (= {same[g]})" if g in same else g for g in agg["group"]]


def pivot(agg: pd.DataFrame, labels: dict[str, str]) -> pd.DataFrame:
    """The report's pivot: a row per group, `mean±std` over seeds per outcome of `labels` (summary_columns),
    mean tokens/s."""
    out = pd.DataFrame({"group": display_names(agg), "seeds ok": [f"{a}/{b}" for a, b in zip(agg.n_ok, agg.n)]})
    if "collapsed" in agg:
        out["collapse warned"] = [f"{int(c) if c == c else 0}/{n}" for c, n in zip(agg["collapsed"], agg.n_ok)]
    objective = "final/train/loss/mean" in agg
    for m, name in labels.items():
        if m in OBJECTIVE and not objective:
            continue
        if f"{m}/mean" in agg and m not in ("final/eval/loss", "wall_time_s"):
            std = agg[f"{m}/std"] if m not in COST else [math.nan] * len(agg)
            out[name] = [_pm(a, s) for a, s in zip(agg[f"{m}/mean"], std)]
            if f"{m}/above" in agg:
                out[f"{name}: seeds > 0"] = [f"{a}/{n}" for a, n in zip(agg[f"{m}/above"], agg.n_ok)]
    return out


def _pm(mean: float, std: float) -> str:
    if math.isnan(mean):
        return ""
    fmt = (lambda v: f"{v:,.0f}") if abs(mean) >= 1000 else (lambda v: f"{v:.3f}")
    return fmt(mean) if math.isnan(std) else f"{fmt(mean)}±{fmt(std)}"


def print_table(df: pd.DataFrame, title: str) -> None:
    """A rich rendering of a (small) frame; 200 columns wide when the output is not a terminal (logs, CI)."""
    t = Table(title=title)
    for c in df.columns:
        t.add_column(str(c), overflow="fold")
    for row in df.itertuples(index=False):
        t.add_row(*(_cell(v) for v in row))
    (console if console.is_terminal else Console(width=200)).print(t)


def sweep_summary(df: pd.DataFrame) -> pd.DataFrame:
    """The rows printed at the end of a sweep: the main columns that hold any value, errors shortened."""
    cols = {"job": "job", "status": "status", "reused": "reused", "group": "group", "seed": "seed",
            "final/eval/rewards/accuracies": "own accuracy", "final/eval/logratio/margins": "logratio margin",
            **{c: m.label for c, (m, what) in declared(df).items() if what == "policy"},
            "wall_time_s": "wall s", "error": "error"}
    shown = [c for c in cols if c in df and df[c].notna().any() and (df[c] != "").any() and
             (c != "reused" or df[c].any())]
    view = df[shown].rename(columns=cols)
    if "error" in view:
        view = view.assign(error=[e if len(e) <= 80 else e[:77] + "..." for e in view["error"]])
    return view
