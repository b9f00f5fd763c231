"""learned_marginal (docs/learnable_priors.md): log zeta = (1-w) log pi_ref(y|x) + w log m(y), m the batch marginal of
a lagged policy copy (the paper's Lemma 1), w ramped in from 0 (exact DPO)."""
import pytest
import torch
from hydra import compose, initialize_config_module
from safetensors.torch import load_file, save_file

from midpo_cli.config import register_schemas
from midpo_cli.data.tokenize import Rules, collate, encode_pair
from midpo_cli.engine.cross import Layout, other_prompt_logps, recombined, rows_of
from midpo_cli.engine.forward import pair_view
from midpo_cli.engine.logps import token_logps
from midpo_cli.engine.models import byte_tokenizer
from midpo_cli.loss import mi_dpo_loss, preference_loss
from midpo_cli.priors import PairView, build_prior
from midpo_cli.verify import checks
from midpo_cli.verify.batches import tiny_engine_setup

NAME = "learned_marginal"
register_schemas()


def attached(**options):
    policy, reference, batch = tiny_engine_setup(0)
    prior = build_prior({"name": NAME, **options})
    prior.attach(policy, reference)
    prior.to(torch.float64)
    return prior, policy, reference, batch


def losses(prior, policy, reference, batch):
    return preference_loss(prior, pair_view(batch, policy, prior, reference=reference))


# ----- step 0 == DPO ------------------------------------------------------------------------------------------

def test_starts_as_exact_dpo_and_leaves_it_as_w_grows():
    rows = checks.Rows()
    checks.initialisation(rows, [NAME], 0, 1e-10)
    default = [r for r in rows if r["option"] == "default"]
    assert len(default) == 1 and default[0]["passed"], default
    prior, policy, reference, batch = attached()
    dpo = build_prior({"name": "dpo", "beta": prior.a})
    with torch.no_grad():
        for w in policy.parameters():
            w.add_(0.05 * torch.randn_like(w))
    a, b = losses(prior, policy, reference, batch), losses(dpo, policy, reference, batch)
    assert a.loss.item() == b.loss.item() and a.metrics["prior/weight"] == 0.0
    prior.on_step(25, policy)                                              # w = 0.5: the marginal now counts
    assert abs(losses(prior, policy, reference, batch).loss.item() - b.loss.item()) > 1e-6


# ----- the engine's recombination -----------------------------------------------------------------------------

def test_recombination_builds_what_the_pipeline_builds_for_other_prompts():
    """Row (side, i) of shift k is the pair the data pipeline builds from (prompt of pair i+k, response of pair i), in
    token ids (a response its own pair already cut: those tokens, under the same length rule); it is usable only when
    that prompt is not its own and the response fits whole."""
    tok = byte_tokenizer()
    rules = Rules(max_length=40, max_prompt_length=24)
    data = [("Copy: abc\n", "abc", "abd"), ("A much longer prompt here:\n", "a fairly long reply", "no"),
            ("Copy: abc\n", "xyz", "xy"), ("Hi\n", "hello, this reply is long", "hey there")]     # pairs 0 and 2 share a prompt
    encode = lambda p, c, r: encode_pair(tok, {"prompt": p, "chosen": c, "rejected": r}, 40, 24)
    batch = collate([encode(*d) for d in data], tok.pad_token_id)
    rows = rows_of(batch)
    B = len(data)
    cut_seen = same_seen = 0
    for shift in range(1, B):
        b, usable = recombined(rows, shift, Layout(rules, tok.pad_token_id))
        for side in (0, 1):
            for i in range(B):
                j = (i + shift) % B
                want = encode(data[j][0], data[i][1 + side], data[i][1 + side])
                own = encode(*data[i])
                y = (own.chosen, own.rejected)[side]                       # the response as its own pair holds it
                n = int(b["attention_mask"][side * B + i].sum())
                got = b["input_ids"][side * B + i, :n].tolist()
                if "completion" not in own.truncated:                      # whole: what the pipeline builds
                    assert got == want.prompt + want.chosen, (shift, side, i)
                    whole = "completion" not in want.truncated
                else:                                                      # already cut: those tokens, by the rule
                    budget = 40 - len(want.prompt)
                    assert got == want.prompt + y[:budget], (shift, side, i)
                    whole = len(y) <= budget
                completion = b["mask"][side * B + i].nonzero().flatten()
                assert completion[0] == len(want.prompt) - 1 and completion[-1] == n - 2
                same = data[j][0] == data[i][0]
                assert bool(usable[side, i]) == (whole and not same), (shift, side, i)
                cut_seen += not whole
                same_seen += same
    assert cut_seen and same_seen                                          # both exclusions were exercised


def test_cross_logps_are_the_snapshots_logprobs_of_the_recombined_sequences():
    prior, policy, reference, batch = attached(prompts=2)
    view = pair_view(batch, policy, prior, reference=reference)
    B = batch["input_ids"].shape[0] // 2
    assert view.cross_logps.shape == (2, B, 2) and bool(view.cross_mask.all())
    rows = rows_of(batch)
    i, side, k = 1, 1, 2
    ids = rows[(i + k) % B][0] + rows[side * B + i][1]
    with torch.no_grad():
        logits = prior.snapshot(input_ids=torch.tensor([ids])).logits[:, :-1]
    lp = token_logps(logits, torch.tensor([ids[1:]]))[0, len(rows[(i + k) % B][0]) - 1:].sum()
    assert abs(float(lp) - float(view.cross_logps[side, i, k - 1])) < 1e-9
    assert view.cross_logps.grad_fn is None


def test_a_batch_of_one_pair_falls_back_to_the_reference_and_training_refuses_it():
    prior, policy, reference, batch = attached(ramp_steps=0)
    one = {k: (v[[0, 4]] if k != "values" else v) for k, v in batch.items()}  # pair 0: its chosen and rejected rows
    values, usable = other_prompt_logps(prior.snapshot, one, 8, None)
    assert values.shape == usable.shape == (2, 1, 0)
    view = pair_view(one, policy, prior, reference=reference)
    assert torch.equal(prior.log_prior(view), view.seq(view.ref_logps))
    from midpo_cli.recipe import Recipe
    with initialize_config_module(version_base="1.3", config_module="midpo_cli.conf"):
        cfg = compose("train", overrides=[f"prior={NAME}", "trainer.batch_size=1"])
    with pytest.raises(ValueError, match="trainer.batch_size=1: .* set trainer.batch_size >= 2"):
        Recipe(cfg)


# ----- schedule and state -------------------------------------------------------------------------------------

def test_ramp_and_refresh_schedule():
    prior, policy, _, _ = attached(ramp_steps=50, weight=0.8, refresh_every=20, mixup=0.5)
    snap0 = {k: v.clone() for k, v in prior.snapshot.state_dict().items()}
    with torch.no_grad():
        for w in policy.parameters():
            w.add_(1.0)
    ws = []
    for step in range(1, 81):
        prior.on_step(step, policy)
        ws.append(prior.w)
        if step == 19:                                                     # no refresh yet
            assert all(torch.equal(v, snap0[k]) for k, v in prior.snapshot.state_dict().items())
        if step == 20:                                                     # snap <- 0.5 policy + 0.5 snap
            pol = dict(policy.named_parameters())
            for k, v in prior.snapshot.named_parameters():
                assert torch.allclose(v, 0.5 * pol[k] + 0.5 * snap0[k], atol=1e-12)
    assert ws[24] == pytest.approx(0.4) and ws[49] == pytest.approx(0.8) and ws[79] == pytest.approx(0.8)
    assert ws == sorted(ws)
    hard = attached(refresh_every=3)[0]
    hard.on_step(3, policy)                                                # mixup = 1: an exact copy
    pol = dict(policy.named_parameters())
    assert all(torch.equal(v, pol[k]) for k, v in hard.snapshot.named_parameters())


def test_state_restores_snapshot_and_ramp_exactly(tmp_path):
    """What a checkpoint keeps (Prior.state_dict, safetensors): a fresh prior attached to the initial policy, loaded
    from it, has the same w and the same snapshot, bit for bit, so a resumed run goes on as the uninterrupted one."""
    prior, policy, _, _ = attached(refresh_every=7)
    with torch.no_grad():
        for w in policy.parameters():
            w.add_(0.1 * torch.randn_like(w))
    for step in range(1, 15):
        prior.on_step(step, policy)
    save_file({k: v.contiguous() for k, v in prior.state_dict().items()}, str(tmp_path / "prior.safetensors"))
    again = attached(refresh_every=7)[0]
    assert again.w == 0.0
    again.load_state_dict(load_file(str(tmp_path / "prior.safetensors")))
    assert again.w == prior.w == pytest.approx(14 / 50) and int(again.steps_done) == 14
    mine = dict(prior.snapshot.state_dict())
    assert all(torch.equal(v, mine[k]) for k, v in again.snapshot.state_dict().items())


# ----- what cancels ------------------------------------------------------------------------------------------

def test_x_only_normaliser_cancels():
    """The normalised geometric interpolation pi_ref^(1-w) m^w / Z(x) (here Z over the pair's two responses) and any
    x-only shift give the same J and policy gradient as log zeta itself; a y-dependent shift does not."""
    torch.manual_seed(0)
    B, T, K = 5, 6, 3
    logps = (-torch.rand(2, B, T, dtype=torch.float64)).requires_grad_()
    mask = torch.ones(2, B, T, dtype=torch.float64)
    v = PairView(logps=logps, mask=mask, ref_logps=-torch.rand(2, B, T, dtype=torch.float64),
                 cross_logps=-5 * torch.rand(2, B, K, dtype=torch.float64), cross_mask=torch.ones(2, B, K))
    prior = build_prior({"name": NAME, "ramp_steps": 0, "weight": 0.7})
    z = prior.log_prior(v)
    normalised = z - torch.logsumexp(z, 0, keepdim=True)                  # - log Z(x), Z(x) = sum over {y_w, y_l}
    shifted = z + torch.randn(B, dtype=torch.float64)[None]
    seq = v.seq(logps)
    base = mi_dpo_loss(seq, z, prior.a).mean()
    (g,) = torch.autograd.grad(base, logps, retain_graph=True)
    for other in (normalised, shifted):
        loss = mi_dpo_loss(seq, other, prior.a).mean()
        (h,) = torch.autograd.grad(loss, logps, retain_graph=True)
        assert abs(loss.item() - base.item()) < 1e-12 and (g - h).abs().max() < 1e-12
    y_shift = z + torch.tensor([0.3, 0.0], dtype=torch.float64)[:, None]
    assert abs(mi_dpo_loss(seq, y_shift, prior.a).mean().item() - base.item()) > 1e-6


def test_options_are_checked():
    for bad, word in (({"prompts": 0}, "prior.prompts"), ({"weight": -0.1}, "prior.weight"),
                      ({"refresh_every": 0}, "prior.refresh_every"), ({"mixup": 0.0}, "prior.mixup")):
        with pytest.raises(ValueError, match=word):
            build_prior({"name": NAME, **bad})
    assert any("does not start as DPO" in w for w in build_prior({"name": NAME, "ramp_steps": 0}).warnings())
