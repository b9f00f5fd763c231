"""`midpo verify`: every registered prior, plugged into the one MI-DPO loss, reproduces its variant's
original (authors') loss in value AND gradient, in float64 (docs/priors.md, "What midpo verify checks").

Checks, for every prior in the registry (or cfg.priors) and every entry of its `options`:
  equivalence   on random ragged logits, on a real tiny-model forward, on SmolLM2 when installed (and the gradient
                w.r.t. the prior's own parameters where it names them: SparsePO's learned-mask heads)
  initialisation  a prior with parameters or models of its own starts as it declares (initial_equivalent: DPO,
                or TDPO1 for SparsePO's learned masks; engine's pair_view, tiny model)
  packing       a packed batch (engine/pack.py: no padding, the prompt computed once) gives the padded batch's loss
                and gradients (engine's pair_view, tiny model)
  invariants    stop-gradients that must matter, x-only invariance, reductions, prior-gradient sign
  knobs         every knob() changes the loss or its gradient (no silently ignored option)
  TRL           DPO, dpo_norm (sigmoid_norm), lddpo (ld_alpha) and trdpo (ref_model = its moving reference) vs
                trl's DPOTrainer loss; trdpo's reference updates vs trl's SyncRefModelCallback; SimPO vs trl's CPO
                simpo loss (cpo_alpha=0)
Writes verify.csv / verify.json in the run directory; exits 1 if any check fails.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from midpo_cli import console
from midpo_cli.loss import mi_dpo_logits, mi_dpo_loss, preference_loss
from midpo_cli.priors import PRIORS, PairView, Prior, build_prior, prior_class
from midpo_cli.verify.batches import Probe, random_probe, view

DIFFERS = 1e-8      # a change smaller than this counts as "no change" (knobs, stop-gradients, y-shifts)


def unified(prior: Prior, v: PairView) -> torch.Tensor:
    """J_MI-DPO with the prior's log zeta, batch mean: the engine's own loss function."""
    return preference_loss(prior, v).loss


def original(prior: Prior, v: PairView) -> torch.Tensor:
    return prior.original_loss(v).mean()


def _grads(loss: torch.Tensor, params: list) -> list:
    gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)]


def gaps(f, g, params) -> tuple[float, float]:
    """(|value difference|, max |gradient difference|) of two scalar losses w.r.t. params."""
    a, b = f(), g()
    grad = max(float((x - y).abs().max()) for x, y in zip(_grads(a, params), _grads(b, params)))
    return abs((a - b).item()), grad


def checked_prior(cfg: dict) -> Prior:
    """A prior as verify compares it: built, in evaluation mode (no training-time noise such as SparsePO's mask
    dropout: both forms, and each check's two sides, must read the same masks)."""
    return build_prior(cfg).eval()


def option_text(opt: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in opt.items()) or "default"


def settings(names) -> list[tuple[str, dict, Prior]]:
    """(name, option overrides, built prior) for every prior and every entry of its `options`."""
    return [(n, opt, checked_prior({"name": n, **opt})) for n in names for opt in prior_class(n).options]


class Rows(list):
    """Result rows; `check` runs one measurement and records it (an exception is a failed row). `bar`: the
    progress bar whose text counts the rows, in the group of checks running (`group`)."""
    bar: console.Bar | None = None
    group = ""

    def record(self, row: dict) -> None:
        self.append(row)
        if self.bar is not None:
            self.bar.info = f"{self.group}: {len(self)} checks"

    def check(self, prior, option, name, fn, bound=None, differs=False):
        bound = DIFFERS if differs else bound
        row = {"prior": prior, "option": option, "check": name, "max_abs_error": math.nan,
               "tolerance": f"{'>' if differs else '<='} {bound:.0e}", "passed": False, "note": ""}
        try:
            err = fn()
            err = float(err.detach() if torch.is_tensor(err) else err)
            row.update(max_abs_error=err, passed=(err > bound) if differs else (err <= bound))
        except Exception as e:   # a missing need, a shape bug... is a failed check, not a crash
            row["note"] = f"{type(e).__name__}: {e}"
        self.record(row)

    def skip(self, prior, option, name, reason):
        self.record({"prior": prior, "option": option, "check": name, "max_abs_error": math.nan,
                     "tolerance": "", "passed": None, "note": f"skipped ({reason})"})


# ----- (i)/(ii) equivalence -----------------------------------------------------------------------

def equivalence(rows: Rows, p: Probe, names, atol: float) -> None:
    """Value and gradient w.r.t. the policy; for a prior that names its parameters (Prior.gradient_check, e.g.
    SparsePO's learned masks) also the gradient w.r.t. them, which must be the same from both forms and non-zero."""
    for name, opt, prior in settings(names):
        v = lambda: view(p, prior.needs())
        rows.check(name, option_text(opt), f"MI-DPO == original (value, grad): {p.label}",
                   lambda: max(gaps(lambda: unified(prior, v()), lambda: original(prior, v()), p.params)), atol)
        what = prior.gradient_check()
        if what:
            own = lambda: (unified(prior, v()), prior.trainable())[1]        # parameters built on first read
            rows.check(name, option_text(opt), f"{what} gradient: MI-DPO == original: {p.label}",
                       lambda: gaps(lambda: unified(prior, v()), lambda: original(prior, v()), own())[1], atol)
            rows.check(name, option_text(opt), f"{what} gradient: non-zero for every parameter: {p.label}",
                       lambda: min(float(g.abs().max()) for g in _grads(unified(prior, v()), own())), differs=True)


# ----- (iii) invariants (docs/priors.md, "What midpo verify checks") -----------------------------

def generic(rows: Rows, p: Probe, names, atol: float) -> None:
    """x-only shifts of log zeta cancel, y-dependent ones do not; dJ/dlog zeta_w,l = +/- a*sigmoid(-h)."""
    shift = torch.linspace(-3.0, 5.0, p.full["mask"].shape[1], dtype=torch.float64)   # [B], depends on x only
    for name, opt, prior in settings(names):
        o, v = option_text(opt), lambda: view(p, prior.needs())

        def shifted(extra):
            return lambda: mi_dpo_loss(v().seq(v().logps), prior.log_prior(v()) + extra(v()), prior.a).mean()
        rows.check(name, o, "x-only shift of log zeta: J, grad unchanged",
                   lambda: max(gaps(lambda: unified(prior, v()), shifted(lambda w: shift[None]), p.params)), atol)
        rows.check(name, o, "y-dependent shift of log zeta changes J",
                   lambda: gaps(lambda: unified(prior, v()), shifted(lambda w: 0.1 * w.lengths), p.params)[0],
                   differs=True)

        def sign():
            w = v()
            seq, logz = w.seq(w.logps).detach(), prior.log_prior(w).detach().requires_grad_()
            (g,) = torch.autograd.grad(mi_dpo_loss(seq, logz, prior.a).sum(), logz)
            s = prior.a * torch.sigmoid(-mi_dpo_logits(seq, logz, prior.a))
            return (g - torch.stack([s, -s])).abs().max()
        rows.check(name, o, "dJ/dlog zeta_w,l = +a*sig(-h), -a*sig(-h)", sign, atol)


def stop_gradients(rows: Rows, p: Probe, names, atol: float) -> None:
    """Each declared stop-gradient variant (docs/priors.md; e.g. TDPO2 without its sg, SimPO with zeta detached)
    keeps the value and must change the gradient, so the equivalence check really sees gradients through the prior."""
    for name, opt, prior in settings(names):
        for what, variant in prior.stop_gradient_variants().items():
            v = lambda: view(p, prior.needs())
            f = lambda: mi_dpo_loss(v().seq(v().logps), variant(v()), prior.a).mean()
            g = lambda: original(prior, v())
            rows.check(name, option_text(opt), f"{what}: value matches", lambda: gaps(f, g, p.params)[0], atol)
            rows.check(name, option_text(opt), f"{what}: gradient differs", lambda: gaps(f, g, p.params)[1],
                       differs=True)


OTHER_VIEWS = {   # how the other side of a declared reduction reads the probe (Reduction.other_view)
    "length_averaged_reference_free": lambda v: PairView(logps=v.logps / v.lengths[..., None], mask=v.mask,
                                                         ref_logps=torch.zeros_like(v.logps)),
}


def reductions(rows: Rows, p: Probe, names, atol: float) -> None:
    """Every prior's declared reductions (Prior.reductions): both forms of the special case equal both forms of
    the simpler prior, in value and gradient."""
    for name in names:
        for red in prior_class(name).reductions:
            def fn(red=red):
                pa, pb = checked_prior({"name": name, **red.settings}), checked_prior(red.equals)
                cols = {c: value * torch.ones_like(p.mask) for c, value in red.columns.items()}
                va = lambda: view(p, pa.needs(), columns=cols)
                vb = lambda: OTHER_VIEWS[red.other_view](view(p, pb.needs())) if red.other_view else view(p, pb.needs())
                return max(max(gaps(lambda: f(pa, va()), lambda: g(pb, vb()), p.params))
                           for f in (unified, original) for g in (unified, original))
            rows.check(name, option_text(red.settings) + "".join(f", {c}={v}" for c, v in red.columns.items()),
                       f"reduction: {red.text}", fn, atol)


def initialisation(rows: Rows, names, seed: int, atol: float) -> None:
    """Every prior with parameters or models of its own (Prior.learnable, Needs.owned: e.g. TR-DPO's moving
    reference) starts as the prior its `initial_equivalent()` names (exact DPO for the learned_* priors and trdpo,
    TDPO1 for SparsePO's learned masks): attached as the engine attaches it (policy = reference) and run through the
    engine's own pair_view on a float64 tiny model, its J + penalty and their gradient w.r.t. the policy equal that
    prior's; then, the policy moved off the reference with the prior still at its initialisation (no on_step yet),
    J and the gradient of J + penalty w.r.t. the policy still equal its."""
    from midpo_cli.engine.forward import pair_view
    from midpo_cli.verify.batches import tiny_engine_setup

    for name, opt, built in settings(names):
        if not (built.learnable or built.needs().owned):
            continue

        def gap(opt=opt, name=name):
            policy, reference, batch = tiny_engine_setup(seed)
            prior = checked_prior({"name": name, **opt})
            prior.attach(policy, reference)
            prior.to(torch.float64)
            start = checked_prior(prior.initial_equivalent())
            params, worst = list(policy.parameters()), 0.0
            for moved in (False, True):
                if moved:
                    with torch.no_grad():
                        for w in params:
                            w.add_(0.05 * torch.randn_like(w))
                a = preference_loss(prior, pair_view(batch, policy, prior, reference=reference))
                b = preference_loss(start, pair_view(batch, policy, start, reference=reference))
                value = (a.loss - b.loss) if moved else (a.total - b.total)
                grads = zip(_grads(a.total, params), _grads(b.total, params))
                worst = max(worst, abs(float(value.detach())), *(float((x - y).abs().max()) for x, y in grads))
            return worst
        start = built.initial_equivalent()
        if not start:
            rows.skip(name, option_text(opt), "at initialisation", "this setting does not start as a registered prior "
                      "(initial_equivalent() names none)")
            continue
        rows.check(name, option_text(opt), f"at initialisation == {start['name']} (value, grad w.r.t. the policy): "
                   "tiny model, engine's pair_view", gap, atol)


# Llama's RMSNorm runs in float32 even in a float64 model: where a packed batch computes a prompt once for both
# completions, their gradients meet in float32 (the padded batch sums them in float64), ~1e-7 relative.
PACKED_RTOL = 1e-6
PACKED = "packed batch"     # the rows' check name: their error is a rounding bound, kept out of max_equality_error


def packing(rows: Rows, names, seed: int) -> None:
    """Every prior, each setting, through the engine's pair_view on the tiny model: a packed batch (tree layout, the
    prompt computed once; flat layout) gives the loss and the gradient w.r.t. the policy and the prior's own
    parameters of the padded batch (relative to the largest gradient; engine/pack.py)."""
    from midpo_cli.engine.forward import pair_view
    from midpo_cli.verify.batches import tiny_engine_batch

    def run(name, opt, kind):
        prior = checked_prior({"name": name, **opt})
        policy, reference, batch = tiny_engine_batch(seed, kind, prior.needs().token_columns)
        prior.attach(policy, reference)
        prior.to(torch.float64)
        torch.manual_seed(seed + 2)
        with torch.no_grad():                                              # a learnable prior off its start
            for w in prior.trainable():
                w.add_(0.1 * torch.randn_like(w))
        view = pair_view(batch, policy, prior, reference=reference, snapshot=reference)
        if kind and not view.packed:
            raise AssertionError(f"the {kind} batch ran padded")
        total = preference_loss(prior, view).total
        return total, _grads(total, [*policy.parameters(), *prior.trainable()])

    for name, opt, _ in settings(names):
        def gap(name=name, opt=opt):
            value, grads = run(name, opt, None)
            scale = max(1.0, max(float(g.abs().max()) for g in grads))
            worst = 0.0
            for kind in ("tree", "flat"):
                v, gs = run(name, opt, kind)
                worst = max(worst, abs(float((v - value).detach())), *(float((a - b).abs().max()) / scale
                                                            for a, b in zip(gs, grads)))
            return worst
        rows.check(name, option_text(opt), f"{PACKED} (tree, flat) == padded (value, grad w.r.t. the policy and "
                   "the prior, relative): tiny model, engine's pair_view", gap, PACKED_RTOL)


# ----- (iv) knobs, (v) TRL -------------------------------------------------------------------------

def knobs(rows: Rows, p: Probe, names) -> None:
    """Perturbing each knob (x*1.37 + 0.05) must change J + penalty or its gradient."""
    for name, opt, prior in settings(names):
        for knob in prior.knobs():
            pert = checked_prior({"name": name, **opt, knob: getattr(prior, knob) * 1.37 + 0.05})
            loss = lambda q: lambda: preference_loss(q, view(p, q.needs())).total
            rows.check(name, option_text(opt), f"knob {knob} changes loss or grad",
                       lambda: max(gaps(loss(prior), loss(pert), p.params)), differs=True)


def sync_gap(opt: dict, seed: int, steps: int = 7) -> float:
    """trdpo's moving reference against TRL's ref_model under TRL's own SyncRefModelCallback, both starting from the
    same tiny model, the policy moved at random before each step's update: the largest weight difference over steps
    1..`steps`. inf if no update moved TRL's reference (a row that cannot pass idle)."""
    import copy

    from midpo_cli.verify.batches import tiny_engine_setup, trl_sync_step

    policy, reference, _ = tiny_engine_setup(seed)
    prior = build_prior({"name": "trdpo", **opt})
    prior.attach(policy, reference)
    theirs, start = copy.deepcopy(reference), copy.deepcopy(reference)
    g, worst = torch.Generator().manual_seed(seed), 0.0
    for step in range(1, steps + 1):
        with torch.no_grad():                                                # an optimiser step, at random
            for w in policy.parameters():
                w.add_(0.05 * torch.randn(w.shape, generator=g, dtype=w.dtype))
        prior.on_step(step, policy)
        trl_sync_step(policy, theirs, step, prior.sync_every, prior.mixup)
        ours = dict(prior.moving_reference.named_parameters())
        worst = max(worst, *(float((ours[k] - w).abs().max()) for k, w in theirs.named_parameters()))
    moved = max(float((a - b).abs().max()) for a, b in zip(theirs.parameters(), start.parameters()))
    return worst if moved > 0 else math.inf


def trl_checks(rows: Rows, p: Probe, names, atol: float, seed: int = 0) -> None:
    from midpo_cli.verify.batches import trl_dpo_loss, trl_simpo_loss
    if "dpo" in names:
        d = checked_prior({"name": "dpo"})
        rows.check("dpo", "default", "== trl DPOTrainer._compute_loss, sigmoid (value, grad)",
                   lambda: max(gaps(lambda: unified(d, view(p, d.needs())), lambda: trl_dpo_loss(p, d.beta),
                                    p.params)), atol)
    for name, opt, kw in (("dpo_norm", {}, {"loss_type": "sigmoid_norm"}), ("lddpo", {"ld_alpha": 0.3}, {"ld_alpha": 0.3})):
        if name in names:
            prior = checked_prior({"name": name, **opt})
            what = ", ".join(f"{k}={v}" for k, v in kw.items())
            rows.check(name, ", ".join(f"{k}={v}" for k, v in opt.items()) or "default",
                       f"== trl DPOTrainer._compute_loss, {what} (value, grad)",
                       lambda prior=prior, kw=kw: max(gaps(lambda: unified(prior, view(p, prior.needs())),
                                                           lambda: trl_dpo_loss(p, prior.beta, **kw), p.params)), atol)
    if "trdpo" in names:
        t = build_prior({"name": "trdpo"})
        rows.check("trdpo", "default", "== trl DPOTrainer._compute_loss, sigmoid, ref_model = the moving reference "
                   "(value, grad)", lambda: max(gaps(lambda: unified(t, view(p, t.needs())),
                                                     lambda: trl_dpo_loss(p, t.beta, reference="snapshot_logps"),
                                                     p.params)), atol)
        for opt in ({"sync_every": 2, "mixup": 0.6}, {"sync_every": 3, "mixup": 1.0}):
            rows.check("trdpo", option_text(opt), "on_step == trl SyncRefModelCallback.on_step_end, steps 1-7 "
                       "(weights): tiny model", lambda opt=opt: sync_gap(opt, seed), atol)
    if "simpo" in names:
        s = checked_prior({"name": "simpo", "beta": 2.0, "gamma": 0.5, "gamma_convention": "absolute"})
        rows.check("simpo", "gamma_convention=absolute, gamma=0.5",
                   "== trl CPOTrainer simpo, cpo_alpha=0 (value, grad)",
                   lambda: max(gaps(lambda: unified(s, view(p, s.needs())), lambda: trl_simpo_loss(p, 2.0, 0.5),
                                    p.params)), atol)


# ----- the command ---------------------------------------------------------------------------------

def collect(cfg: DictConfig) -> Rows:
    """All checks, as rows, one group after another (a bar counts the groups, and the checks in its text). The
    prior list defaults to the whole registry."""
    names = list(cfg.priors) or sorted(PRIORS)
    torch.manual_seed(cfg.seed)
    rows, atol = Rows(), float(cfg.atol)
    probe = random_probe(cfg.seed)
    groups = [("equivalence", lambda: equivalence(rows, probe, names, atol)),
              ("tiny model", lambda: tiny_model_checks(rows, cfg, names, atol)),
              ("SmolLM2", lambda: smollm2_checks(rows, cfg, names, atol)),
              ("stop-gradients", lambda: stop_gradients(rows, probe, names, atol)),
              ("reductions", lambda: reductions(rows, probe, names, atol)),
              ("invariants", lambda: generic(rows, probe, names, atol)),
              ("knobs", lambda: knobs(rows, probe, names)),
              ("TRL", lambda: trl_cross_checks(rows, cfg, probe, names, atol))]
    with console.progress("verify", len(groups), "check groups") as bar:
        rows.bar = bar
        for what, run_group in groups:
            rows.group = what
            run_group()
            bar.advance()
    return rows


def tiny_model_checks(rows: Rows, cfg: DictConfig, names, atol: float) -> None:
    if not cfg.real_model:
        rows.skip("*", "", "tiny model forward", "real_model=false")
        return
    from midpo_cli.verify.batches import tiny_probe
    equivalence(rows, tiny_probe(cfg.seed), names, atol)
    initialisation(rows, names, cfg.seed, atol)
    packing(rows, names, cfg.seed)


def smollm2_checks(rows: Rows, cfg: DictConfig, names, atol: float) -> None:
    smol = "SmolLM2-135M forward"
    if not (cfg.real_model and cfg.smollm2):
        rows.skip("*", "", smol, "smollm2=false: set smollm2=true to add it (~40 s)" if cfg.real_model
                  else "real_model=false")
        return
    from midpo_cli.engine.models import NotInstalled, smollm2_gguf
    from midpo_cli.verify.batches import smollm2_probe
    try:
        smollm2_gguf()
    except NotInstalled as e:
        rows.skip("*", "", smol, f"not installed: {e}")
    else:
        equivalence(rows, smollm2_probe(cfg.seed), names, atol)


def trl_cross_checks(rows: Rows, cfg: DictConfig, probe: Probe, names, atol: float) -> None:
    if not cfg.trl:
        rows.skip("*", "", "TRL cross-checks", "trl=false")
        return
    try:
        import trl  # noqa: F401
    except ImportError:
        rows.skip("*", "", "TRL cross-checks", "trl not installed: pip install 'midpo[trl]'")
    else:
        trl_checks(rows, probe, names, atol, cfg.seed)


def summary(rows: Rows, seconds: float) -> dict:
    failed = [r for r in rows if r["passed"] is False]
    skipped = [r for r in rows if r["passed"] is None]
    measured = [r for r in rows if r["tolerance"].startswith("<=") and not math.isnan(r["max_abs_error"])]
    errs = [r["max_abs_error"] for r in measured if not r["check"].startswith(PACKED)]
    packed = [r["max_abs_error"] for r in measured if r["check"].startswith(PACKED)]
    return {"checks": len(rows), "failed": len(failed), "skipped": len(skipped),
            "max_equality_error": max(errs, default=0.0), "max_packed_error": max(packed, default=0.0),
            "wall_time_s": round(seconds, 2)}


def show(rows: Rows, s: dict) -> None:
    from rich.table import Table
    t = Table(title="midpo verify: every prior in MI-DPO form vs its variant's original loss (float64)")
    for col, just in (("prior", "left"), ("option", "left"), ("check", "left"), ("max abs error", "right"),
                      ("tolerance", "right"), ("pass", "left")):
        t.add_column(col, justify=just, no_wrap=col != "check")
    t.add_column("note", overflow="fold")
    for r in rows:
        ok = {True: "[green]pass[/]", False: "[bold red]FAIL[/]", None: "[yellow]skip[/]"}[r["passed"]]
        err = "" if math.isnan(r["max_abs_error"]) else f"{r['max_abs_error']:.2e}"
        t.add_row(r["prior"], r["option"], r["check"], err, r["tolerance"], ok, r["note"])
    from rich.console import Console
    out = console.console if console.console.is_terminal else Console(width=200)   # files/pipes: no wrapping
    out.print(t)
    line = (f"{s['checks']} checks, " + ("all passed" if not s["failed"] else f"{s['failed']} FAILED")
            + (f", {s['skipped']} skipped" if s["skipped"] else "")
            + f"; max equality error {s['max_equality_error']:.1e}; packed == padded within "
            f"{s['max_packed_error']:.1e} (relative); {s['wall_time_s']:.1f} s")
    out.print(("[green]" if not s["failed"] else "[bold red]") + line, highlight=False)


def write(rows: Rows, s: dict, cfg: DictConfig, out: Path) -> None:
    import pandas as pd
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "verify.csv", index=False)
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
    (out / "verify.json").write_text(json.dumps({"summary": s, "config": OmegaConf.to_container(cfg), "rows": clean},
                                                    indent=2))


def run(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    t0 = time.time()
    console.setup_logging()
    try:
        for name in cfg.priors:
            prior_class(name)
    except KeyError as e:                                                 # a typo in priors=[...]
        console.error(f"priors={list(cfg.priors)}: {e.args[0]}")
        raise SystemExit(1)
    rows = collect(cfg)
    s = summary(rows, time.time() - t0)
    out = Path(HydraConfig.get().runtime.output_dir)
    write(rows, s, cfg, out)
    show(rows, s)
    console.console.print(f"wrote {out / 'verify.csv'} and verify.json", highlight=False)
    if s["failed"]:
        raise SystemExit(1)
