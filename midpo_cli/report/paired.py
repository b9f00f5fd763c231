"""`midpo report DIR report.baseline=NAME`: every other group against a baseline group, seed by seed.

Paired differences (group - baseline) of each outcome metric on the seeds both finished: n, mean, std, a
Student-t interval (mean -+ t_{n-1,(1+c)/2} s/sqrt(n)), a percentile bootstrap of the mean from
tables.BOOTSTRAP_FROM pairs on, and the seeds where the group did better. Outcomes: the task's declared metrics
with a direction, its headline and its frontier's two (e.g. true reward, win-rate, KL), and the J columns (J held
out with each group's own prior, J(pi, pi_ref) held out at one scale for every group, J on the training pairs).

Matched KL: a group whose runs span several betas (prior.beta: the prior's scale) has a frontier per seed, its
runs' (KL, reward) points (the task's Task.frontier) sorted by KL; its reward at a target KL is read off it by
linear interpolation between the two neighbouring points, never extrapolated (a target outside the seed's KL
range is "out of range"). The target: report.match_kl, else the baseline's own KL on that seed.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from midpo_cli.report import tables

WARN_BELOW = 5                                   # paired seeds: below this a t-interval gets a warning
SCALE = re.compile(r"[+~]*prior\.beta=")          # the override of the prior's scale (config prior.beta)
J = {"final/eval/loss": ("held-out J (own prior)", "min"),
     "final/eval/logratio/loss": ("held-out J(π, π_ref)", "min"),
     "final/train/loss": ("J on training pairs (own prior)", "min")}


class Unusable(ValueError):
    """A report.* option that does not fit the runs (a one-line message)."""


def split(group: str) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """(name, its scale override, its other varied overrides) of a group `name override ...` (tables._groups)."""
    name, *rest = group.split(" ")
    return name, tuple(o for o in rest if SCALE.match(o)), tuple(o for o in rest if not SCALE.match(o))


def family(group: str) -> str:
    """The group without its scale override: the runs of one frontier (`dpo prior.beta=0.1` -> `dpo`)."""
    name, _, others = split(group)
    return " ".join([name, *others])


def baseline_groups(df: pd.DataFrame, name: str) -> list[str]:
    """The groups `report.baseline=name` names: a whole group, or every group of a prior/arm name (one per beta
    or other swept value); Unusable listing the names when none."""
    groups = list(dict.fromkeys(df["group"]))
    if name in groups:
        return [name]
    hits = [g for g in groups if split(g)[0] == name or family(g) == name]
    if not hits:
        names = list(dict.fromkeys([split(g)[0] for g in groups] + [family(g) for g in groups] + groups))
        raise Unusable(f"report.baseline={name} names no group of this report; one of: {', '.join(names)}")
    return hits


def partner(group: str, base: list[str]) -> str | None:
    """The baseline group a group is paired with: the one at the same swept values (its other overrides, then
    its beta), or the only one; None when the baseline has several and none at the group's values."""
    _, scale, others = split(group)
    same = [b for b in base if split(b)[2] == others]
    for found in ([b for b in same if split(b)[1] == scale], same, base):
        if len(found) == 1:
            return found[0]
    return None


def outcomes(df: pd.DataFrame) -> dict[str, tuple[str, str | None]]:
    """{column: (label, max | min | None)} of the paired table: the task's headline, its metrics with a direction
    and its frontier's, then J; only those some finished run holds."""
    front = tables.frontier_of(df) or ()
    out = {c: (tables.label(m, what), m.direction) for c, (m, what) in tables.declared(df).items()
           if what == "policy" and (m.direction or m.headline or c in front)}
    out.update(J)
    ok = df[df["status"] == "ok"]
    return {c: v for c, v in out.items() if c in ok and pd.to_numeric(ok[c], errors="coerce").notna().any()}


def per_seed(ok: pd.DataFrame, group: str, column: str) -> pd.Series:
    """A group's finished value of `column` per seed (the mean where several directories hold the same seed)."""
    g = ok[ok["group"] == group]
    return pd.to_numeric(g[column], errors="coerce").groupby(g["seed"]).mean().dropna()


def stats(d: pd.Series, level: float, direction: str | None) -> dict:
    """n, mean, std, the t-interval, the bootstrap (from BOOTSTRAP_FROM pairs) and wins of paired differences."""
    x = d.to_numpy(float)
    n = len(x)
    t_lo, t_hi = tables.t_interval(x, level)
    b_lo, b_hi = tables.bootstrap_ci(x, level) if n >= tables.BOOTSTRAP_FROM else (math.nan, math.nan)
    better = (x > 0) if direction == "max" else (x < 0) if direction == "min" else None
    return {"n": n, "seeds": " ".join(str(s) for s in d.index), "mean_diff": x.mean() if n else math.nan,
            "std": x.std(ddof=1) if n > 1 else math.nan, "t_lo": t_lo, "t_hi": t_hi,
            "bootstrap_lo": b_lo, "bootstrap_hi": b_hi, "wins": int(better.sum()) if better is not None else None}


def compare(df: pd.DataFrame, base: list[str], level: float) -> pd.DataFrame:
    """A row per (outcome, group other than the baseline's): the paired differences against its partner."""
    ok = df[(df["status"] == "ok") & df["seed"].notna()]
    rows = []
    metrics = outcomes(df)
    for column, (name, direction) in metrics.items():
        for g in dict.fromkeys(df["group"]):
            if g in base:
                continue
            b = partner(g, base)
            row = {"metric": column, "label": name, "direction": direction or "", "group": g, "baseline": b or ""}
            if b is None:
                if column == next(iter(metrics)):          # one row says so, not one per metric
                    rows.append({**row, "metric": "", "label": "(every metric)",
                                 **stats(pd.Series(dtype=float), level, direction),
                                 "note": "the baseline has several groups, none at this group's swept values"})
                continue
            x, y = per_seed(ok, g, column), per_seed(ok, b, column)
            if x.empty or y.empty:                         # a metric one of the two never logged: no row
                continue
            common = x.index.intersection(y.index)
            rows.append({**row, **stats(x[common] - y[common], level, direction), "note": ""})
    return pd.DataFrame(rows)


def interpolate(points: pd.DataFrame, target: float) -> float | None:
    """The reward at KL `target` on one seed's frontier (columns kl, reward: its betas' points): linear between
    the neighbouring points sorted by KL (points at the same KL: their mean); None outside the KL range."""
    p = points.groupby("kl")["reward"].mean().sort_index()
    if not (p.index[0] <= target <= p.index[-1]):
        return None
    return float(np.interp(target, p.index.to_numpy(float), p.to_numpy(float)))


def matched_kl(df: pd.DataFrame, base: list[str] | None, level: float, match_kl: float | None):
    """(per family, per seed, paired rows, notes): each group's reward read off its own beta frontier at the
    target KL (match_kl, else the baseline's KL on the same seed) and, with a baseline, the paired differences
    on the seeds in range. Empty frames and a note where the task declares no frontier or no target exists."""
    xy = tables.frontier_of(df)
    empty = pd.DataFrame(), pd.DataFrame(), pd.DataFrame()
    if xy is None or not all(c in df for c in xy):
        return (*empty, ["matched KL: the runs' task declares no frontier (Task.frontier), so there is no KL to match"])
    (kl, reward), metrics = xy, tables.declared(df)
    ok = df[(df["status"] == "ok") & df["seed"].notna()].copy()
    ok["family"] = [family(g) for g in ok["group"]]
    ok = ok.assign(kl=pd.to_numeric(ok[kl], errors="coerce"), reward=pd.to_numeric(ok[reward], errors="coerce"))
    ok = ok.dropna(subset=["kl", "reward"])
    betas = {f: sorted(set(pd.to_numeric(g["beta"], errors="coerce").dropna())) if "beta" in g else []
             for f, g in ok.groupby("family", sort=False)}
    spans = {f: len(b) > 1 or ok.loc[ok["family"] == f, "group"].nunique() > 1 for f, b in betas.items()}
    base_families = list(dict.fromkeys(family(b) for b in base or []))

    def base_group(f: str) -> str | None:
        """The baseline group whose own KL is f's target: the one at f's other swept values, or the only one; with
        report.match_kl, any group of a baseline that is one frontier (its family is read at that KL)."""
        same = [b for b in base if split(b)[2] == split(f)[2]]
        one_family = lambda gs: len({family(b) for b in gs}) == 1
        if same and (len(same) == 1 or match_kl is not None and one_family(same)):
            return same[0]
        return base[0] if len(base) == 1 or match_kl is not None and one_family(base) else None

    if match_kl is None and base is not None:
        values = [split(b)[2] for b in base]                # the baseline's groups per value of the other keys
        if any(values.count(v) > 1 for v in values):
            return (*empty, [f"matched KL: the baseline {', '.join(base_families)} spans several betas "
                             f"({', '.join(base)}), so it has no single KL per seed; give report.match_kl=<KL> to "
                             "read every frontier at that KL, or name one of its groups as report.baseline"])
    if match_kl is None and base is None:
        return (*empty, [])

    def frontier(f: str, seed) -> pd.DataFrame:
        return ok[(ok["family"] == f) & (ok["seed"] == seed)][["kl", "reward"]]

    seeds_rows, fam_rows, paired_rows = [], [], []
    for f in dict.fromkeys(ok["family"]):
        bg = base_group(f) if base else None
        bf = family(bg) if bg is not None else None        # its family: its frontier, when it spans betas
        is_base = f in base_families
        for seed in sorted(ok.loc[ok["family"] == f, "seed"].unique()):
            row = {"group": f, "seed": int(seed), "baseline": "" if is_base else bf or "", "target_kl": match_kl}
            pts = frontier(f, seed)
            row.update({"kl_min": pts["kl"].min(), "kl_max": pts["kl"].max(), "points": len(pts)})
            b_reward = math.nan
            if bf is not None:                             # the baseline's reward at the target, and the target
                bp = frontier(bf, seed)
                if match_kl is None:                       # the baseline group's own KL (it has one beta)
                    bp = ok[(ok["group"] == bg) & (ok["seed"] == seed)][["kl", "reward"]]
                    row["target_kl"] = bp["kl"].mean() if len(bp) else math.nan
                    b_reward = bp["reward"].mean() if len(bp) else math.nan
                elif spans.get(bf):
                    b_reward = interpolate(bp, match_kl) if len(bp) else None
                    b_reward = math.nan if b_reward is None else b_reward
            target = row["target_kl"]
            if is_base and match_kl is None:
                value, cell = b_reward, "the baseline's own point"
            elif target is None or not np.isfinite(target):
                value, cell = math.nan, "no baseline run on this seed"
            elif not spans.get(f):
                value, cell = math.nan, "single beta: no frontier"
            elif pts["kl"].nunique() < 2:
                value, cell = math.nan, "one KL on this seed: no frontier"
            else:
                found = interpolate(pts, target)
                value, cell = (math.nan, "out of range") if found is None else (found, "in range")
            seeds_rows.append({**row, "reward_at_target": value, "baseline_reward": b_reward, "status": cell})
        s = pd.DataFrame([r for r in seeds_rows if r["group"] == f])
        inside = s[s["status"].isin(["in range", "the baseline's own point"])]
        fam_rows.append({"group": f, "baseline": "" if is_base else bf or "", "is_baseline": is_base,
                         "betas": " ".join(f"{b:g}" for b in betas[f]),
                         "target": f"KL = {match_kl:g}" if match_kl is not None else "the baseline's KL per seed",
                         "seeds": len(s), "in_range": len(inside),
                         "out_of_range": int((s["status"] == "out of range").sum()),
                         "frontier": bool(spans.get(f)), "reward_mean": inside["reward_at_target"].mean(),
                         "reward_std": inside["reward_at_target"].std(ddof=1) if len(inside) > 1 else math.nan,
                         "per_seed": _per_seed(s) if spans.get(f) or is_base and match_kl is None else ""})
        if base is None or is_base or not spans.get(f):
            continue
        d = inside.set_index("seed")["reward_at_target"] - inside.set_index("seed")["baseline_reward"]
        m = metrics[reward][0]
        note = "" if bf is not None else "the baseline has several groups, none at this group's swept values"
        if match_kl is not None and bf is not None and not spans.get(bf):
            note = (f"the baseline {bf} has a single beta: no reward at KL = {match_kl:g} to subtract "
                    "(omit report.match_kl to match its own KL)")
        paired_rows.append({"metric": f"{reward}@kl", "label": f"{m.label} at matched KL",
                            "direction": m.direction or "", "group": f, "baseline": bf or "",
                            **stats(d.dropna(), level, m.direction), "note": note})
    notes = []
    out = sum(r["out_of_range"] for r in fam_rows)
    if out:
        notes.append(f"matched KL: {out} seed(s) with the target KL outside their group's KL range are 'out of range' "
                     "(never extrapolated) and left out of the paired differences")
    return pd.DataFrame(fam_rows), pd.DataFrame(seeds_rows), pd.DataFrame(paired_rows), notes


def _per_seed(s: pd.DataFrame) -> str:
    """`seed: reward` of each seed of a group's matched-KL rows, or `seed: why not` (e.g. out of range)."""
    return ", ".join(f"{r.seed}: {r.reward_at_target:.3f}" if np.isfinite(r.reward_at_target)
                     else f"{r.seed}: {r.status}" for r in s.itertuples())


def _num(v: float, sign: bool = False) -> str:
    if v is None or not np.isfinite(v):
        return ""
    return f"{v:+.4f}" if sign else f"{v:.4f}"


def shown(paired: pd.DataFrame, level: float) -> pd.DataFrame:
    """The paired table as printed and in report.md: every interval labelled with its kind."""
    pct = f"{level * 100:g}%"
    rows = []
    for r in paired.itertuples(index=False):
        n = int(r.n)
        rows.append({"metric": r.label, "group": r.group, "vs": r.baseline, "n": n,
                     "mean diff": _num(getattr(r, "mean_diff", math.nan), True),
                     "std": _num(getattr(r, "std", math.nan)),
                     f"{pct} t-interval": f"t [{_num(r.t_lo, True)}, {_num(r.t_hi, True)}]"
                     if n > 1 else "n < 2: none",
                     f"{pct} bootstrap (n ≥ {tables.BOOTSTRAP_FROM})":
                         f"bootstrap [{_num(r.bootstrap_lo, True)}, {_num(r.bootstrap_hi, True)}]"
                         if n >= tables.BOOTSTRAP_FROM else "",
                     "better": "" if pd.isna(getattr(r, "wins", None)) or not r.direction or not n
                     else f"{int(r.wins)}/{n} ({'higher' if r.direction == 'max' else 'lower'})",
                     "note": r.note})
    return pd.DataFrame(rows)


def shown_matched(fam: pd.DataFrame, label: str) -> pd.DataFrame:
    """The matched-KL table as printed: a row per group (its beta frontier), the reward at the target KL."""
    rows = []
    for r in fam.itertuples(index=False):
        if not r.frontier and not (r.is_baseline and r.in_range):
            cell = "single beta: no frontier"
        elif r.in_range == 0:
            cell = "out of range" if r.out_of_range else "none"
        else:
            cell = f"{r.reward_mean:.4f}" + (f"±{r.reward_std:.4f}" if np.isfinite(r.reward_std) else "")
        rows.append({"group": r.group + (" (baseline)" if r.is_baseline else ""), "betas": r.betas,
                     "target": r.target, f"{label} at target": cell, "in range": f"{r.in_range}/{r.seeds}",
                     "out of range": f"{r.out_of_range} of {r.seeds} seeds", "per seed": r.per_seed})
    return pd.DataFrame(rows)


def warnings(paired: pd.DataFrame) -> list[str]:
    """One line per small n: the t-interval's caveat."""
    out = []
    if paired.empty:
        return out
    small = paired[(paired["n"] > 1) & (paired["n"] < WARN_BELOW)]
    for n, g in small.groupby("n"):
        out.append(f"n = {n} paired seeds ({', '.join(dict.fromkeys(g['group']))}): the t-interval is wide and assumes "
                   "normal differences")
    none = paired[(paired["n"] < 2) & (paired["note"] == "")]
    if not none.empty:
        out.append(f"fewer than 2 paired seeds ({', '.join(dict.fromkeys(none['group']))}): no interval")
    for r in paired[paired["note"] != ""].drop_duplicates(["group", "note"]).itertuples():
        out.append(f"{r.group}: {r.note}")
    return out


def explanation(base: list[str], level: float, has_matched: bool) -> list[str]:
    """report.md's words on the paired table, column by column."""
    pct = f"{level * 100:g}%"
    lines = [
        f"## Paired comparison against `{', '.join(base)}`", "",
        "Each row: one group against the baseline group named in `vs` (the one at the same values of the other "
        "swept keys, e.g. the same `prior.beta`, where the baseline has several), **paired by seed**: for every seed "
        "both finished, the difference group - baseline of the metric; the statistics are over these differences, "
        "so seed-to-seed noise shared by both (the same pairs, the same reference) cancels.", "",
        "- `n`: the number of paired seeds (a seed only one of the two finished is left out).",
        "- `mean diff`, `std`: the mean and the standard deviation (n - 1 in the denominator) of the differences; "
        "positive: the group is higher.",
        f"- `{pct} t-interval`: Student's t interval of the mean difference, mean ± t(n-1, {(1 + level) / 2:g}) "
        "· std / √n. It assumes the differences are roughly normal; with few seeds it is wide, and below "
        f"{WARN_BELOW} seeds the report warns. An interval that excludes 0 is a difference at that level.",
        f"- `{pct} bootstrap`: the percentile bootstrap of the mean difference (2000 resamples of the n differences), "
        f"only from n = {tables.BOOTSTRAP_FROM}: with fewer seeds it is narrower than the truth (3 seeds: "
        "their min-max).",
        "- `better`: on how many of the n seeds the group beat the baseline (higher or lower, as the metric's "
        "direction says; KL and length have none).",
        "- the J columns: `held-out J (own prior)` is each group's own objective on held-out pairs, in its own "
        "prior's units (compare it only between groups of one prior and scale); `held-out J(π, π_ref)` is J with "
        "the reference as the prior (DPO's form) at one common scale for every group, comparable across priors; "
        "`J on training pairs (own prior)`: the final J on all training pairs.", ""]
    if has_matched:
        lines += [
            "### At matched KL", "",
            "A group whose runs span several betas has, on each seed, a reward-KL frontier: its runs' points sorted "
            "by KL. Its reward at the target KL (`report.match_kl`, else the baseline's own KL on the same seed) is "
            "read off by linear interpolation between the two neighbouring points. A target outside the seed's KL "
            "range is `out of range` (never extrapolated, never clamped) and that seed is left out of the paired "
            "difference; a group with a single beta has no frontier. Its paired row (metric `... at matched KL`) "
            "is the interpolated reward minus the baseline's on the seeds in range.", ""]
    return lines
