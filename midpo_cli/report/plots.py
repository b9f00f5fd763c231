"""`midpo report`'s figures (matplotlib, Agg backend: no display needed), each a PNG with units and a legend.

frontier.png  the task's trade-off (Task.frontier, e.g. its reward vs KL to the reference), per group: seeds and
              their mean (tasks that declare one)
curves.png    training curves per group, mean over seeds with the min-max band
bars.png      held-out accuracy, the task's outcomes (its metrics with a direction) and log-likelihood margin per
              group, 95% CIs (t-interval below 10 seeds, percentile bootstrap from 10; tables.interval)
objective.png runs with trainer.eval_train: final J on the training pairs and what it bought (held-out accuracy of the
              policy's log-ratio, the task's trade-off metrics) beside the prior's shift, per group (learnable priors)

Task metrics are drawn with the labels, units and ranges their task declares (Task.metrics); a dashed line marks
a metric's value of no change (its declared baseline, else its reference's mean).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from midpo_cli.report.tables import ci_words, declared, display_names, frontier_of, metrics_of, same_as  # noqa: E402
from midpo_cli.tasks import Metric  # noqa: E402

DPI = 100
MARKERS = "osD^vP*Xph<>"
CURVES = (("loss", "training loss [nats]: each prior's own objective"),
          ("rewards/accuracies", "reward accuracy (own reward) [fraction]"),
          ("logps/margin", "log π(y_w|x) − log π(y_l|x) [nats]\nprior-independent"),
          ("rewards/margins", "own reward margin a·log(π/ζ)\n[prior-specific units]"))
ACCURACY = ("final/eval/rewards/accuracies", "held-out accuracy of\nthe prior's own reward [fraction]")
MARGIN = ("final/eval/logps/margin", "held-out log π(y_w) − log π(y_l)\n[nats, prior-independent]")
OBJECTIVE = (("final/train/loss", "final J on all training pairs\n[nats; each group's own prior]"),
             ("final/eval/logratio/accuracies", "held-out accuracy of\nlog π/π_ref (prior-free) [fraction]"))
SHIFT = ("final/eval/prior/shift", "held-out prior shift [nats]\n(log ζ − log π_ref)_w − (...)_l")


def axis(m: Metric) -> str:
    """A declared metric's axis label, its bracket on a line of its own."""
    return m.axis.replace(" [", "\n[", 1)


def no_change(df: pd.DataFrame, metrics: dict[str, tuple[Metric, str]]) -> dict[str, float]:
    """{column: the value of no change}: a metric's declared baseline, else the mean of its reference's value
    over the finished runs."""
    out = {}
    for c, (m, what) in metrics.items():
        if what != "policy":
            continue
        if m.baseline is not None:
            out[c] = m.baseline
        elif m.reference and f"{c}_ref" in df:
            v = pd.to_numeric(df.loc[df["status"] == "ok", f"{c}_ref"], errors="coerce").mean()
            if np.isfinite(v):
                out[c] = float(v)
    return out


def _title(groups) -> str:
    return "prior + overrides" if any(" " in g for g in groups) else "prior"


def merged(agg: pd.DataFrame) -> dict[str, str]:
    """{group: legend label} without groups whose results coincide with an earlier one (named in its label)."""
    same = same_as(agg)
    return {g: " = ".join([g, *(d for d, o in same.items() if o == g)]) for g in agg["group"] if g not in same}


def colors(groups) -> dict:
    cmap = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    return {g: cmap(i % cmap.N) for i, g in enumerate(groups)}


def _save(fig, path: Path) -> Path:
    """PNG with a 256-colour palette: a third of the bytes, no visible change for line and bar plots."""
    from PIL import Image

    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    Image.open(path).convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)
    return path


def _err(agg: pd.DataFrame, m: str) -> np.ndarray:
    """Asymmetric error bars [2, n] from the summary's CI (0 where a group has a single seed)."""
    mean = agg[f"{m}/mean"].to_numpy(float)
    lo, hi = agg[f"{m}/ci_lo"].to_numpy(float), agg[f"{m}/ci_hi"].to_numpy(float)
    return np.nan_to_num(np.stack([mean - lo, hi - mean]), nan=0.0).clip(min=0)


def frontier(df: pd.DataFrame, agg: pd.DataFrame, path: Path, xy: tuple[str, str], metrics: dict,
             base: dict[str, float], col: dict, level: float = 0.95) -> Path:
    """`xy`: the (x, y) columns; `metrics`: column -> (Metric, what); `base`: column -> value of no change (the
    reference policy's point, where both are known); `col`: group -> colour."""
    (x, y), ok = xy, df[df["status"] == "ok"]
    mx, my = metrics[x][0], metrics[y][0]
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    if x in base and y in base:
        ax.scatter([base[x]], [base[y]], marker="*", s=260, color="black", zorder=4, label="reference π_ref")
    xerr, yerr, names = _err(agg, x), _err(agg, y), merged(agg)
    for i, g in enumerate(agg["group"]):
        if g not in names:                                             # coincides with an earlier group: named there
            continue
        runs = ok[ok["group"] == g]
        ax.scatter(runs[x], runs[y], color=col[g], alpha=0.35, s=28)
        ax.errorbar(agg[f"{x}/mean"].iloc[i], agg[f"{y}/mean"].iloc[i], xerr=xerr[:, i:i + 1],
                    yerr=yerr[:, i:i + 1], fmt=MARKERS[i % len(MARKERS)], ms=10, mfc="none", mew=2, capsize=3,
                    color=col[g], label=names[g])
    ax.set_xlabel(mx.axis)
    ax.set_ylabel(my.axis)
    ax.set_title(f"{my.label} vs {mx.label}, held-out prompts\n"
                 f"large marker: mean over seeds ± {ci_words(level)}; faint: single seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, title=_title(agg["group"]))
    return _save(fig, path)


def curves(df: pd.DataFrame, path: Path, names: dict, col: dict) -> Path | None:
    """Per group in `names` (group: legend label): the mean over its runs at each logged step, min-max band."""
    runs = df[(df["status"] != "failed") & df["group"].isin(names)]
    per_group = {}
    for g, r in zip(runs["group"], runs["run"]):
        frame = pd.DataFrame(metrics_of(Path(r)))
        if not frame.empty and "step" in frame:
            per_group.setdefault(g, []).append(frame)
    if not per_group:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), sharex=True)
    for ax, (m, label) in zip(axes.flat, CURVES):
        for g, frames_g in per_group.items():
            d = pd.concat(frames_g)
            if m not in d:
                continue
            s = d.dropna(subset=[m]).groupby("step")[m].agg(["mean", "min", "max"])
            ax.plot(s.index, s["mean"], color=col[g], label=names[g], lw=1.4)
            ax.fill_between(s.index, s["min"], s["max"], color=col[g], alpha=0.15, lw=0)
        ax.set_ylabel(label, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("optimiser step")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, title=_title(per_group))
    fig.suptitle("Training curves (training batches): mean over seeds, band = min-max", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def bars(agg: pd.DataFrame, path: Path, base: dict[str, float], col: dict, which, level: float = 0.95) -> Path | None:
    """Horizontal bars per group, one panel per (column, label) of `which` present; `base` (column -> value of no
    change) drawn as a dashed line."""
    panels = [(m, label) for m, label in which if f"{m}/mean" in agg]
    if not panels:
        return None
    y = np.arange(len(agg))[::-1]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels) + 1.5, 0.42 * len(agg) + 1.8), sharey=True)
    for ax, (m, label) in zip(np.atleast_1d(axes), panels):
        ax.barh(y, agg[f"{m}/mean"], xerr=_err(agg, m), color=[col[g] for g in agg["group"]], capsize=3, height=0.7)
        if m in base:
            ax.axvline(base[m], color="black", lw=0.8, ls="--")
        ax.set_xlabel(label, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    first = np.atleast_1d(axes)[0]
    first.set_yticks(y, display_names(agg), fontsize=9)
    fig.suptitle(f"Per prior: mean over seeds, error bars = {ci_words(level)};\n"
                 "dashed: no change (the reference policy's value)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_all(df: pd.DataFrame, agg: pd.DataFrame, out: Path, level: float = 0.95) -> list[Path]:
    """Every figure the runs allow (the frontier needs a task that declares one); the PNGs written."""
    out.mkdir(parents=True, exist_ok=True)
    names, col = merged(agg), colors(agg["group"])                     # curves: crashed runs' partial ones too
    agg = agg[agg["n_ok"] > 0].reset_index(drop=True)                 # groups with no finished run: no marks
    metrics = declared(df)
    base, xy = no_change(df, metrics), frontier_of(df)
    xy = xy if xy and all(f"{c}/mean" in agg for c in xy) else None
    outcomes = [(c, axis(m)) for c, (m, what) in metrics.items() if what == "policy" and m.direction]
    trade = [(c, axis(metrics[c][0])) for c in reversed(xy)] if xy else []
    made = [frontier(df, agg, out / "frontier.png", xy, metrics, base, col, level) if xy else None,
            curves(df, out / "curves.png", names, col),
            bars(agg, out / "bars.png", base, col, [ACCURACY, *outcomes, MARGIN], level),
            bars(agg, out / "objective.png", base, col, [*OBJECTIVE, *trade, SHIFT], level)
            if "final/train/loss/mean" in agg else None]
    return [p for p in made if p is not None]
