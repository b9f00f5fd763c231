"""Learnable priors (docs/learnable_priors.md): learned_adapter (P1), learned_tilt (P2), learned_mix (P3),
learned_poe (P4).

Each starts as exact DPO; update=joint moves the prior along the gradient of J, update=tracking keeps J's gradient
out of it and fits it label-free; the anchor pulls it back; the engine gives it its own optimiser, schedule,
clipping, checkpoint state and a saved copy beside the policy; the collapse signature raises a warning."""
import json
import math
from pathlib import Path

import pytest
import torch

from midpo_cli.__main__ import main
from midpo_cli.api import loss_from_logits, prior as make_prior
from midpo_cli.loss import mi_dpo_loss, preference_loss
from midpo_cli.priors import PRIORS, Needs, build_prior
from midpo_cli.verify import checks
from midpo_cli.verify.batches import random_probe, tiny_engine_setup, view

LEARNED = ["learned_adapter", "learned_tilt", "learned_mix", "learned_poe"]
RULES = ["joint", "tracking"]
ALL = [(n, u) for n in LEARNED for u in RULES]


def move_off_init(prior):
    """Put the prior's parameters away from their initialisation (zeta != pi_ref)."""
    with torch.no_grad():
        for p in prior.trainable():
            p.add_(0.3 + 0.1 * torch.randn_like(p))


def test_learnable_priors_registered_and_marked():
    assert set(LEARNED) <= set(PRIORS)
    assert all(PRIORS[n].learnable for n in LEARNED) and not PRIORS["dpo"].learnable


# ----- step 0 == DPO --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, update", ALL)
def test_starts_as_exact_dpo(name, update):
    """Attached as the engine attaches it (policy = reference), through the engine's pair_view: J + penalty and the
    policy gradient equal DPO's, also once the policy has moved (prior still at init). verify's own row."""
    rows = checks.Rows()
    checks.initialisation(rows, [name], 0, 1e-10)
    mine = [r for r in rows if r["option"] == f"update={update}"]
    assert len(mine) == 1 and mine[0]["passed"], mine


def test_initialisation_check_can_fail(monkeypatch):
    """A prior that is not at DPO when attached (raw phi != 0) fails the row."""
    from midpo_cli.priors.learned_tilt import LearnedTilt
    original = LearnedTilt.attach

    def off(self, policy, reference):
        original(self, policy, reference)
        move_off_init(self)
    monkeypatch.setattr(LearnedTilt, "attach", off)
    rows = checks.Rows()
    checks.initialisation(rows, ["learned_tilt"], 0, 1e-10)
    assert rows and not any(r["passed"] for r in rows)


# ----- update rules ----------------------------------------------------------------------------------------

def _probe_and_prior(name, update, **opts):
    """A random probe and a prior attached to it: for learned_adapter the adapter's output is a leaf tensor of logits
    (its parameters); the prior is moved off its initialisation."""
    p = random_probe(0)
    prior = build_prior({"name": name, "update": update, "anchor": 0.5, **opts})
    owned = {n: p.sources["snapshot"].clone().requires_grad_() for n in prior.needs().owned}
    preference_loss(prior, view(p, prior.needs(), owned=owned))          # parameters built on first read (learned_poe)
    move_off_init(prior)
    leaves = [*prior.trainable(), *owned.values()] if name == "learned_adapter" else prior.trainable()
    return p, prior, owned, leaves


def _grad(loss, leaves):
    gs = torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, leaves)]


@pytest.mark.parametrize("name", LEARNED)
def test_tracking_keeps_j_out_of_the_prior_and_the_penalty_out_of_the_policy(name):
    p, prior, owned, leaves = _probe_and_prior(name, "tracking")
    out = preference_loss(prior, view(p, prior.needs(), owned=owned))
    assert all(float(g.abs().max()) == 0 for g in _grad(out.loss, leaves))               # J does not reach phi
    assert any(float(g.abs().max()) > 1e-6 for g in _grad(out.penalty, leaves))          # the fit does
    assert all(float(g.abs().max()) == 0 for g in _grad(out.penalty, p.params))          # ... and never the policy
    v = view(p, prior.needs(), owned=owned)
    fixed = mi_dpo_loss(v.seq(v.logps), prior.log_zeta(v).detach(), prior.a).mean()    # J with zeta held fixed
    (a,), (b,) = _grad(out.total, p.params), _grad(fixed, p.params)
    assert float((a - b).abs().max()) <= 1e-12


@pytest.mark.parametrize("name", LEARNED)
def test_joint_sends_j_into_the_prior_with_the_spec_sign(name):
    """dJ/dlog zeta_w = +a*sigma(-h) (docs/priors.md): a gradient step on phi lowers the prior's margin (prior/shift)."""
    mid_gate = {"gate_init": 0.0} if name == "learned_mix" else {}    # lam = 1/2: at 0.998 a step moves it ~1e-6
    p, prior, owned, leaves = _probe_and_prior(name, "joint", anchor=0.0, **mid_gate)
    v = view(p, prior.needs(), owned=owned)
    assert any(float(g.abs().max()) > 1e-6 for g in _grad(preference_loss(prior, v).loss, leaves))
    before = preference_loss(prior, v).metrics["prior/margin"]
    opt = torch.optim.SGD(leaves, lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        preference_loss(prior, view(p, prior.needs(), owned=owned)).total.backward()
        opt.step()
    assert preference_loss(prior, view(p, prior.needs(), owned=owned)).metrics["prior/margin"] < before


def test_tilt_learns_length_and_the_anchor_pulls_it_back():
    """On pairs whose winners are the longer responses, joint learned_tilt raises phi_1 (it explains the length away,
    docs/learnable_priors.md, P2); the same steps with a strong anchor keep phi_1 much smaller; the anchor alone pulls a moved phi back."""
    p = random_probe(0)

    def run(anchor):
        prior = build_prior({"name": "learned_tilt", "anchor": anchor, "bound_len": 2.0})
        opt = torch.optim.Adam(prior.trainable(), lr=0.05)
        for _ in range(30):
            opt.zero_grad()
            v = view(p, prior.needs())
            v.mask, v.logps, v.ref_logps = _winners_longer(v)
            preference_loss(prior, v).total.backward()
            opt.step()
        return float(prior.phi()[0].detach())
    free, anchored = run(0.0), run(50.0)
    assert free > 0.05 and abs(anchored) < abs(free) / 3
    prior = build_prior({"name": "learned_tilt", "anchor": 1.0})
    with torch.no_grad():
        prior.raw.fill_(1.0)
    g = _grad(prior.penalty(view(p, prior.needs())), [prior.raw])[0]
    assert (g > 0).all()                                                  # descent moves raw back towards 0


def _winners_longer(v):
    """Swap sides of the pairs whose rejected response is longer, so every winner is the longer one."""
    swap = (v.lengths[1] > v.lengths[0])                                  # [B]
    def sw(x):
        x = x.clone()
        x[:, swap] = x.flip(0)[:, swap]
        return x
    return sw(v.mask), sw(v.logps), sw(v.ref_logps)


# ----- learned_poe: the reference times a prompt-free expert on the response ---------------------------------

def _poe_moved(update="joint"):
    """learned_poe on a random probe (V = 11), its token weights and length term moved off 0."""
    p = random_probe(0)
    prior = build_prior({"name": "learned_poe", "update": update})
    preference_loss(prior, view(p, prior.needs()))                          # u sized by the view's vocabulary
    torch.manual_seed(0)
    move_off_init(prior)
    return p, prior


@pytest.mark.parametrize("update", RULES)
def test_poe_moved_off_init_equals_its_original_loss(update):
    """With phi_len and u away from 0, J in MI-DPO form equals the written-out PoE loss in value and policy gradient,
    and (update=joint) in the gradient into (phi_len, u), which is not 0; verify's rows on the moved prior pass."""
    p, prior = _poe_moved(update)
    assert prior.u.shape == (11,) and float(prior.u.detach().abs().min()) > 0 and float(prior.phi_len.detach()) != 0
    mi = lambda: checks.unified(prior, view(p, prior.needs()))
    orig = lambda: checks.original(prior, view(p, prior.needs()))
    assert max(checks.gaps(mi, orig, p.params)) < 1e-12
    dpo = checks.unified(build_prior({"name": "dpo"}), view(p, Needs(reference=True)))
    assert abs(float(mi().detach() - dpo.detach())) > 1e-3                  # the moved prior is not DPO's
    if update == "joint":
        assert checks.gaps(mi, orig, prior.trainable())[1] < 1e-12
        assert all(float(g.abs().max()) > 1e-6 for g in _grad(mi(), prior.trainable()))


def test_poe_bag_is_prompt_free_and_its_offset_is_the_length_term():
    """A constant that depends on the prompt only, added to log zeta (log Z(x)), leaves J and its gradients unchanged;
    a constant c added to every token weight is not such a constant (it adds c*|y|): it equals phi_len + c."""
    p, prior = _poe_moved()
    v = view(p, prior.needs())
    seq, z = v.seq(v.logps), prior.log_zeta(v)
    c = torch.linspace(-2.0, 3.0, z.shape[1], dtype=z.dtype)                # [B], x only: same on both sides
    a, b = mi_dpo_loss(seq, z, prior.a).mean(), mi_dpo_loss(seq, z + c, prior.a).mean()
    assert abs(float((a - b).detach())) < 1e-12
    ga, gb = _grad(a, [*p.params, *prior.trainable()]), _grad(b, [*p.params, *prior.trainable()])
    assert max(float((x - y).abs().max()) for x, y in zip(ga, gb)) < 1e-12
    with torch.no_grad():
        prior.u.add_(0.7)
    shifted = float(checks.unified(prior, view(p, prior.needs())))
    assert abs(shifted - float(a)) > 1e-4                                  # c*|y| does not cancel (lengths differ)
    with torch.no_grad():
        prior.u.sub_(0.7)
        prior.phi_len.add_(0.7)
    assert abs(float(checks.unified(prior, view(p, prior.needs()))) - shifted) < 1e-9   # phi_len: float32


def test_tokens_need_gives_the_response_ids_and_the_vocabulary():
    """Needs.tokens: build_view hands the labels on completion positions (0 on padding) and V; undeclared, none."""
    from midpo_cli.engine.views import build_view
    p = random_probe(0)
    v = build_view(Needs(tokens=True), p.labels, p.mask, p.sources["policy"])
    assert v.tokens.dtype == torch.long and v.tokens.shape == v.mask.shape and v.vocab_size == 11
    assert torch.equal(v.tokens, (p.labels * (p.mask > 0)).view(2, 4, -1))
    assert torch.equal(v.tokens[v.mask == 0], torch.zeros_like(v.tokens[v.mask == 0]))
    bare = build_view(Needs(), p.labels, p.mask, p.sources["policy"])
    assert bare.tokens is None and bare.vocab_size is None
    with pytest.raises(ValueError, match="PairView.tokens"):
        bare.require("tokens")


def test_poe_attach_sizes_its_weights_by_the_model_and_its_state_round_trips():
    """attach builds u over the model's vocabulary (before the optimisers exist: the prior's optimiser gets it);
    state_dict holds phi_len and u, and loads back exactly."""
    from midpo_cli.recipe import prior_optimizer
    from omegaconf import OmegaConf
    policy, reference, _ = tiny_engine_setup(0)
    prior = build_prior({"name": "learned_poe"})
    assert [n for n, _ in prior.named_parameters()] == ["phi_len"]
    prior.attach(policy, reference)
    assert prior.u.shape == (policy.get_output_embeddings().weight.shape[0],) and not prior.u.any()
    opt = prior_optimizer(OmegaConf.create({"_target_": "torch.optim.AdamW", "_partial_": True}), prior)
    assert {id(x) for g in opt.param_groups for x in g["params"]} == {id(prior.u), id(prior.phi_len)}
    state = prior.state_dict()
    assert set(state) == {"dual", "phi_len", "u"}                     # dual: anchor_mode=constraint's multiplier
    moved = {k: v + torch.rand_like(v) for k, v in state.items()}
    fresh = build_prior({"name": "learned_poe"})
    fresh.attach(policy, reference)
    fresh.load_state_dict(moved)
    assert all(torch.equal(fresh.state_dict()[k], moved[k]) for k in moved)
    assert set(fresh.scalars()) == {"prior/phi_len", "prior/token_weight_norm"}
    with pytest.raises(ValueError, match="vocabulary"):
        fresh.weights(view(random_probe(0), fresh.needs(), vocab_size=10**6))


def test_poe_python_api_starts_as_dpo_and_learns_its_token_weights():
    B, T, V = 2, 6, 50
    torch.manual_seed(0)
    logits = torch.randn(2, B, T, V, requires_grad=True)
    labels, mask, ref = torch.randint(V, (2, B, T)), torch.ones(2, B, T), torch.randn(2, B, T, V)
    mask[1, 0, 4:] = 0
    p = make_prior("learned_poe")
    loss, metrics = loss_from_logits(p, logits, labels, mask, ref_logits=ref)
    dpo, _ = loss_from_logits(make_prior("dpo"), logits, labels, mask, ref_logits=ref)
    assert abs(loss.item() - dpo.item()) < 1e-6 and p.u.shape == (V,)
    (g_poe,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (g_dpo,) = torch.autograd.grad(dpo, logits)
    assert torch.allclose(g_poe, g_dpo, atol=1e-7)
    loss.backward()
    assert p.u.grad is not None and p.u.grad.abs().max() > 0 and "prior/token_weight_norm" in metrics


# ----- schedule, state, monitor (units) ----------------------------------------------------------------------

def test_alternating_schedule_steps_one_side_at_a_time():
    prior = build_prior({"name": "learned_tilt", "schedule": "alternating", "policy_steps": 2, "prior_steps": 1})
    assert [prior.updates(s) for s in range(1, 7)] == [(True, False), (True, False), (False, True)] * 2
    assert build_prior({"name": "learned_tilt"}).updates(5) == (True, True)


def test_adapter_state_holds_only_the_adapter_and_round_trips():
    policy, reference, _ = tiny_engine_setup(0)
    prior = build_prior({"name": "learned_adapter"})
    prior.attach(policy, reference)
    state = prior.state_dict()
    assert state and all("lora_" in k for k in state if k != "dual")      # the base is the reference's: not saved
    assert sum(v.numel() for v in state.values()) < sum(p.numel() for p in reference.parameters()) / 10
    assert all(a is b for a, b in zip(prior.adapter.get_base_model().model.embed_tokens.parameters(),
                                      reference.model.embed_tokens.parameters()))   # shared, not copied
    moved = {k: v + 1 for k, v in state.items()}
    prior.load_state_dict(moved)
    assert all(torch.equal(prior.state_dict()[k], moved[k]) for k in moved)
    with pytest.raises(ValueError, match="same prior options"):
        prior.load_state_dict({"bogus": torch.zeros(1)})


def test_mix_state_holds_gate_and_snapshot_once():
    policy, reference, _ = tiny_engine_setup(0)
    prior = build_prior({"name": "learned_mix", "sync_every": 2, "mixup": 1.0})
    prior.attach(policy, reference)
    state = prior.state_dict()
    assert "bias" in state and any(k.startswith("snapshot.") for k in state)
    from safetensors.torch import save
    save({k: v.contiguous() for k, v in state.items()})                   # tied weights saved once: no error
    with torch.no_grad():
        for w in policy.parameters():
            w.add_(1.0)
    prior.on_step(1, policy)
    assert torch.equal(prior.snapshot.model.norm.weight, reference.model.norm.weight)   # not a sync step
    prior.on_step(2, policy)
    assert torch.equal(prior.snapshot.model.norm.weight, policy.model.norm.weight)      # hard copy (mixup=1)


def test_collapse_monitor_fires_once_and_names_the_fix():
    prior = build_prior({"name": "learned_tilt", "anchor": 0.0})
    assert prior.monitor({"step": 5, "prior/shift": -0.5, "logratio/margins": 0.0}) == []      # not far yet
    assert prior.monitor({"step": 5, "prior/shift": -3.0, "logratio/margins": 5.0}) == []      # the policy leads
    (w,) = prior.monitor({"step": 10, "prior/shift": -3.0, "logratio/margins": 0.4})
    assert "collapse" in w and "prior.anchor" in w and "prior.lr" in w and "prior.update=tracking" in w
    assert prior.monitor({"step": 15, "prior/shift": -4.0, "logratio/margins": 0.4}) == []     # once


def test_collapse_monitor_ignores_non_finite_rows():
    """A skipped non-finite step (trainer.on_nonfinite=skip) logs NaN: no 'fell nan nats' collapse warning."""
    prior = build_prior({"name": "learned_adapter"})
    assert prior.monitor({"step": 2, "prior/shift": float("nan"), "logratio/margins": 1.9}) == []
    assert prior.monitor({"step": 3, "prior/shift": -3.0, "logratio/margins": float("nan")}) == []
    assert prior.monitor({"step": 4, "prior/shift": -float("inf"), "logratio/margins": 0.1}) == []
    (w,) = prior.monitor({"step": 5, "prior/shift": -3.0, "logratio/margins": 0.4})             # still fires
    assert "nan" not in w


def test_options_are_checked():
    with pytest.raises(ValueError, match="prior_steps"):
        build_prior({"name": "learned_tilt", "prior_steps": 0})
    with pytest.raises(ValueError, match="not one of"):
        build_prior({"name": "learned_mix", "update": "both"})
    assert any("anchor=0" in w for w in build_prior({"name": "learned_tilt", "anchor": 0.0}).warnings())


def test_update_marginal_was_renamed_to_tracking(capsys, tmp_path):
    """The rule's old name is refused in one line naming the new one: by build_prior (the Python API, a value from a
    YAML) and on the command line, before anything loads."""
    with pytest.raises(ValueError, match=r"^prior.update=marginal was renamed: use prior.update=tracking \("):
        build_prior({"name": "learned_tilt", "update": "marginal"})
    with pytest.raises(SystemExit):
        main(["train", "prior=learned_tilt", "prior.update=marginal", "trainer.max_steps=1",
              f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "prior.update=marginal was renamed: use prior.update=tracking" in err, err
    assert not (tmp_path / "run").exists()


def test_python_api_takes_a_learnable_prior():
    B, T, V = 2, 6, 50
    torch.manual_seed(0)
    logits = torch.randn(2, B, T, V, requires_grad=True)
    labels, mask, ref = torch.randint(V, (2, B, T)), torch.ones(2, B, T), torch.randn(2, B, T, V)
    p = make_prior("learned_tilt", anchor=0.1)
    loss, metrics = loss_from_logits(p, logits, labels, mask, ref_logits=ref)
    dpo, _ = loss_from_logits(make_prior("dpo"), logits, labels, mask, ref_logits=ref)
    assert abs(loss.item() - dpo.item()) < 1e-6 and "prior/margin" in metrics       # starts as DPO
    loss.backward()
    assert logits.grad is not None and p.raw.grad is not None and "prior/phi_len" in metrics


# ----- end to end ------------------------------------------------------------------------------------------

def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", LEARNED)
def test_trains_logs_and_saves_beside_the_policy(name, tmp_path, fast):
    run = tmp_path / "run"
    main(["train", *fast, f"prior={name}", "trainer.max_steps=3", "trainer.eval_train=true", f"hydra.run.dir={run}"])
    res = json.loads((run / "results.json").read_text())
    rows = _rows(run)
    assert all("prior/margin" in r and "logratio/margins" in r and "prior/shift" in r for r in rows)
    assert "prior/grad_norm" in rows[-1] and math.isfinite(res["final"]["train/loss"])
    assert any(k.startswith("prior/") and k not in ("prior/margin", "prior/shift", "prior/grad_norm")
               for k in rows[-1])                                          # the prior's own scalars
    assert abs(rows[0]["prior/shift"]) < 1e-3                              # starts at the reference (DPO)
    assert (run / "model" / "config.json").exists()
    assert (run / "prior" / "prior.safetensors").exists() and json.loads((run / "prior" / "prior.json").read_text())[
        "name"] == name
    if name == "learned_adapter":
        assert (run / "prior" / "adapter" / "adapter_config.json").exists()


def test_adapter_wraps_the_modules_it_is_given(tmp_path, fast):
    """prior.target_modules (architectures whose linear layers do not all take an adapter, e.g. Mamba's): only those
    modules get the prior's adapter, and the list is saved with the prior as plain JSON."""
    run = tmp_path / "run"
    main(["train", *fast, "prior=learned_adapter", "prior.target_modules=[q_proj,v_proj]", "trainer.max_steps=2",
          "trainer.save_model=false", f"hydra.run.dir={run}"])
    saved = json.loads((run / "prior" / "prior.json").read_text())
    assert saved["target_modules"] == ["q_proj", "v_proj"]
    adapter = json.loads((run / "prior" / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]


def test_alternating_run_steps_only_the_scheduled_side(tmp_path, fast, monkeypatch):
    """policy_steps=1, prior_steps=1: the policy's weights change at odd steps only, the prior's at even steps."""
    from midpo_cli.priors.learned_tilt import LearnedTilt
    seen = []

    def record(self, step, policy):
        total = float(sum(p.detach().double().sum() for p in policy.parameters()))
        seen.append((step, total, self.raw.detach().clone()))
    monkeypatch.setattr(LearnedTilt, "on_step", record)
    main(["train", *fast, "prior=learned_tilt", "prior.schedule=alternating", "trainer.max_steps=4",
          "trainer.save_model=false", "prior.lr=0.1", f"hydra.run.dir={tmp_path / 'run'}"])
    sums, raws = [s for _, s, _ in seen], [r for *_, r in seen]
    assert [step for step, *_ in seen] == [1, 2, 3, 4]
    assert sums[1] == sums[0] and sums[3] == sums[2] and sums[2] != sums[1]          # policy: steps 1 and 3
    assert torch.equal(raws[0], torch.zeros(2)) and not torch.equal(raws[1], raws[0])  # prior: steps 2 and 4
    assert torch.equal(raws[2], raws[1]) and not torch.equal(raws[3], raws[2])


def test_prior_optimiser_uses_its_own_lr_and_clipping(tmp_path, fast, monkeypatch):
    """The prior's optimiser is the optimizer config (plain SGD here) with prior.lr, and its gradient is clipped at
    prior.max_grad_norm: each step moves phi by lr * max_grad_norm (torch adds 1e-6 to the norm: 1% here)."""
    from midpo_cli.priors.learned_tilt import LearnedTilt
    raws = [torch.zeros(2)]
    monkeypatch.setattr(LearnedTilt, "on_step", lambda self, step, policy: raws.append(self.raw.detach().clone()))
    run = tmp_path / "run"
    main(["train", *fast, "prior=learned_tilt", "optimizer=sgd", "optimizer.momentum=0.0", "prior.lr=2.0",
          "prior.max_grad_norm=0.0001", "prior.anchor=0.0", "trainer.max_steps=3", "trainer.save_model=false",
          f"hydra.run.dir={run}"])
    moves = [float(torch.linalg.vector_norm(b - a)) for a, b in zip(raws, raws[1:])]
    assert len(moves) == 3 and all(m == pytest.approx(2.0 * 0.0001, rel=1e-2) for m in moves), moves
    assert all(r["prior/grad_norm"] > 0.0002 for r in _rows(run))                   # clipped from above


def test_unanchored_joint_on_a_length_biased_task_warns_of_collapse(tmp_path, fast):
    """A length-biased annotator, learned_tilt trained on J alone with a fast prior: the prior explains the labels
    by length (prior/shift falls) before the policy moves, and the run says so and what to change."""
    run = tmp_path / "run"
    main(["train", *fast, "dataset.task.length_bias=0.05", "prior=learned_tilt", "prior.anchor=0.0",
          "prior.lr=0.5", "prior.bound_len=3.0", "trainer.max_steps=8", "trainer.save_model=false",
          f"hydra.run.dir={run}"])
    res = json.loads((run / "results.json").read_text())
    texts = [w["warning"] for w in res["warnings"]]
    assert len(texts) == 1 and "collapse signature" in texts[0] and "prior.anchor" in texts[0]
    assert min(r["prior/shift"] for r in _rows(run)) < -1.0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["learned_adapter", "learned_mix", "learned_poe"])
def test_kill_and_resume_ends_at_the_uninterrupted_loss(name, tmp_path, fast):
    """SIGKILL after a checkpoint, then the same command in the same directory (trainer.resume=auto): the prior's
    parameters, its optimiser and schedule (and learned_mix's snapshot) are restored: the final loss matches, and
    so does the saved prior (a resume that skipped the prior's state moves learned_mix's loss by only ~1e-6)."""
    from conftest import kill_after_first_checkpoint
    extra = {"learned_mix": "prior.sync_every=3", "learned_adapter": "prior.rank=2", "learned_poe": "prior.lr=0.05"}
    args = [*fast, f"prior={name}", "trainer.max_steps=16", "trainer.save_every=5", "trainer.save_model=false",
            "optimizer.lr=3e-4", extra[name]]
    full = tmp_path / "full"
    main(["train", *args, f"hydra.run.dir={full}"])
    run = tmp_path / "job"
    kill_after_first_checkpoint(args, run)
    main(["train", *args, f"hydra.run.dir={run}"])
    a, b = (json.loads((d / "results.json").read_text()) for d in (full, run))
    assert b["resumed_from"] and abs(a["final"]["loss"] - b["final"]["loss"]) <= 1e-3
    assert [r["step"] for r in _rows(run)] == list(range(1, 17))
    from safetensors.torch import load_file
    saved = [load_file(str(d / "prior" / "prior.safetensors")) for d in (full, run)]   # the learned prior itself
    assert saved[0].keys() == saved[1].keys()
    assert max(float((saved[0][k] - saved[1][k]).abs().max()) for k in saved[0]) <= 1e-6


@pytest.mark.slow
def test_two_processes_average_the_prior_gradient(tmp_path, fast):
    """torchrun, 2 CPU ranks x 4 pairs == 1 rank x 8 pairs: the prior's gradient is all-reduced (it is not
    DDP-wrapped), so its parameters and the loss follow the 1-process run step for step."""
    import os
    import subprocess
    import sys
    args = [*[a for a in fast if not a.startswith("trainer.batch_size")], "prior=learned_tilt", "prior.lr=0.2",
            "prior.anchor=0.0", "trainer.max_steps=4", "trainer.save_model=false", "optimizer.lr=3e-4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    r = subprocess.run([sys.executable, "-m", "midpo_cli", "train", *args, "trainer.batch_size=8",
                        f"hydra.run.dir={one}"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "midpo_cli", "train", *args, "trainer.batch_size=4", f"hydra.run.dir={two}"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _rows(one), _rows(two)
    assert len(a) == len(b) == 4
    for key in ("loss", "prior/phi_len", "prior/phi_loglen", "prior/margin"):
        assert max(abs(x[key] - y[key]) for x, y in zip(a, b)) < 1e-4, key
    assert abs(a[-1]["prior/phi_len"]) > 1e-3                               # the prior did move


def test_a_prior_driven_to_nan_names_prior_lr(tmp_path, capsys):
    """A learnable prior's own optimiser can blow up too: the non-finite stop names prior.lr beside optimizer.lr."""
    data = Path(__file__).parent / "data" / "standard.jsonl"
    with pytest.raises(SystemExit):
        main(["train", "dataset=local", f"dataset.path={data}", "prior=learned_adapter", "prior.lr=1e30",
              "trainer.max_steps=4", f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert "non-finite values at step" in err and "Lower optimizer.lr or prior.lr" in err, err


def test_frozen_tilt_starts_and_stays_rdpo():
    """update=frozen: the prior never steps and has no penalty; learned_tilt with init_len = 0.2 is R-DPO with
    alpha = 0.2*beta from step 0 (verify's initialisation row)."""
    prior = build_prior({"name": "learned_tilt", "update": "frozen", "init_len": 0.2})
    assert prior.updates(1) == (True, False) and float(prior.scalars()["prior/phi_len"]) == pytest.approx(0.2)
    p = random_probe(0)
    out = preference_loss(prior, view(p, prior.needs()))
    assert float(out.penalty) == 0 and all(g is None for g in torch.autograd.grad(
        out.total, prior.trainable(), allow_unused=True))
    rows = checks.Rows()
    checks.initialisation(rows, ["learned_tilt"], 0, 1e-10)
    mine = [r for r in rows if "init_len=0.2" in r["option"]]
    assert mine and all(r["passed"] and "== rdpo" in r["check"] for r in mine), mine


def test_constraint_anchor_multiplier_ascends_on_the_excess_and_stays_non_negative():
    """anchor_mode=constraint: penalty = lam * (A - eps); after a step lam <- max(0, lam + dual_lr * (A - eps))."""
    prior = build_prior({"name": "learned_tilt", "anchor_mode": "constraint", "anchor_eps": 0.0, "dual_lr": 2.0})
    move_off_init(prior)
    p = random_probe(0)
    v = view(p, prior.needs())
    drift = float(((prior.log_zeta(v) - v.seq(v.ref_logps)) ** 2 / v.lengths).mean())      # A
    assert drift > 0 and float(preference_loss(prior, v).penalty) == 0                     # lam starts at 0
    prior.on_step(1, None)
    assert float(prior.dual) == pytest.approx(2.0 * drift) and prior.scalars()["prior/dual"] == float(prior.dual)
    assert float(preference_loss(prior, v).penalty) == pytest.approx(2.0 * drift * drift, rel=1e-5)
    prior.anchor_eps = 100.0                                                               # satisfied: lam falls to 0
    preference_loss(prior, v)
    prior.on_step(2, None)
    assert float(prior.dual) == 0.0
    prior.eval()                                                                           # evaluation moves nothing
    prior.anchor_eps = 0.0
    preference_loss(prior, v)
    prior.on_step(3, None)
    assert float(prior.dual) == 0.0
