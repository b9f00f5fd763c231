"""trdpo (TR-DPO, arXiv:2404.09656): DPO against a reference that moves toward the policy every sync_every steps,
ref <- mixup*policy + (1-mixup)*ref. The moving reference is the prior's own frozen copy of the policy: equal to the
reference until the first update (DPO exactly), never read from the reference cache, checkpointed with the run."""
import json

import pytest
import torch

from midpo_cli.__main__ import main
from midpo_cli.engine.forward import pair_view
from midpo_cli.loss import preference_loss
from midpo_cli.priors import PRIORS, build_prior
from midpo_cli.priors.trdpo import TRDPO
from midpo_cli.verify import checks
from midpo_cli.verify.batches import tiny_engine_setup


def attached(**opts):
    """(prior, policy, reference, batch): trdpo attached as the engine attaches it, on the float64 tiny model; the
    batch carries a cached reference column (trainer.ref_cache) that is not the moving reference's."""
    policy, reference, batch = tiny_engine_setup(0)
    batch["values"]["ref_logps"] = torch.full(batch["mask"].shape, -3.0, dtype=torch.float64) * batch["mask"]
    prior = build_prior({"name": "trdpo", **opts})
    prior.attach(policy, reference)
    return prior, policy, reference, batch


def optimiser_step(policy, scale=0.05):
    with torch.no_grad():
        for w in policy.parameters():
            w.add_(scale * torch.randn_like(w))


def weights(model) -> dict:
    return {k: w.detach().clone() for k, w in model.named_parameters()}


def gap(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_hard_sync_copies_the_policy_at_the_sync_step_and_not_before():
    """mixup=1, sync_every=3: after steps 1 and 2 the moving reference is still the reference (weights and log-probs);
    after step 3 its weights are the policy's exactly, and so are its log-probs in the view the engine builds, with a
    cached reference column present (the moving reference is run, never served from the cache)."""
    prior, policy, reference, batch = attached(sync_every=3, mixup=1.0)
    start = weights(reference)
    torch.manual_seed(0)
    for step in (1, 2, 3):
        optimiser_step(policy)
        prior.on_step(step, policy)
        v = pair_view(batch, policy, prior)
        moving, own = v.owned("moving_reference"), v.logps.detach()
        if step < 3:
            assert gap(weights(prior.moving_reference), start) == 0
            assert (moving - own).abs().max() > 1e-3                         # the policy has moved away from it
        else:
            assert gap(weights(prior.moving_reference), weights(policy)) == 0
            assert (moving - own).abs().max() == 0


def test_soft_update_is_the_convex_combination():
    """mixup=0.25, sync_every=2: ref_2 = 0.25 theta_2 + 0.75 ref_0, ref_4 = 0.25 theta_4 + 0.75 ref_2; steps 1 and 3
    leave it alone."""
    prior, policy, reference, _ = attached(sync_every=2, mixup=0.25)
    expected = weights(reference)
    torch.manual_seed(1)
    for step in (1, 2, 3, 4):
        optimiser_step(policy)
        prior.on_step(step, policy)
        if step % 2 == 0:
            theta = weights(policy)
            expected = {k: 0.25 * theta[k] + 0.75 * expected[k] for k in expected}
        assert gap(weights(prior.moving_reference), expected) <= 1e-15, step


def test_step_one_loss_and_gradient_equal_dpo():
    """Before any update the moving reference is the reference: J and its policy gradient are DPO's, also once the
    policy has moved (the copy does not move with it); verify's own initialisation row agrees."""
    prior, policy, reference, batch = attached()
    dpo = build_prior({"name": "dpo"})
    params = list(policy.parameters())
    for moved in (False, True):
        if moved:
            optimiser_step(policy)
        a = preference_loss(prior, pair_view(batch, policy, prior)).loss
        b = preference_loss(dpo, pair_view({**batch, "values": {}}, policy, dpo, reference=reference)).loss
        assert a.item() == b.item()
        ga, gb = torch.autograd.grad(a, params), torch.autograd.grad(b, params)
        assert max(float((x - y).abs().max()) for x, y in zip(ga, gb)) == 0
    rows = checks.Rows()
    checks.initialisation(rows, ["trdpo"], 0, 1e-10)
    assert len(rows) == 1 and rows[0]["passed"], rows


def test_trl_sync_row_fails_for_an_update_off_trl_s_schedule(monkeypatch):
    """verify's row against TRL's SyncRefModelCallback passes as shipped and fails for an update one step late."""
    assert checks.sync_gap({"sync_every": 2, "mixup": 0.6}, 0) == 0
    shipped = TRDPO.on_step
    monkeypatch.setattr(TRDPO, "on_step", lambda self, step, policy: step > 1 and shipped(self, step - 1, policy))
    assert checks.sync_gap({"sync_every": 2, "mixup": 0.6}, 0) > 1e-6


@pytest.mark.parametrize("key, value, words", [("sync_every", 0, "prior.sync_every=0 must be an integer >= 1"),
                                               ("mixup", 0.0, "prior.mixup=0.0 must be in (0, 1]"),
                                               ("mixup", 1.5, "prior.mixup=1.5 must be in (0, 1]")])
def test_bad_options_are_one_line(key, value, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "prior=trdpo", f"prior.{key}={value}", f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and words in err and "\n" not in err and "Traceback" not in err, err
    assert not PRIORS["trdpo"].learnable                                     # state, but nothing trained by J


# ----- end to end ---------------------------------------------------------------------------------------------

def rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def final(run):
    return json.loads((run / "results.json").read_text())


def test_trains_as_dpo_until_the_first_update_and_resumes_exactly(tmp_path, fast, monkeypatch):
    """sync_every=2: steps 1-2 log DPO's loss exactly, step 3 on differ. A run resumed from its step-3 checkpoint (one
    update in: the moving reference is no longer the reference) ends at the uninterrupted run's loss and saved
    moving reference; resumed without the prior's checkpointed state, it does not."""
    from safetensors.torch import load_file
    args = [*fast, "trainer.max_steps=6", "trainer.save_every=3", "trainer.save_model=false"]
    main(["train", *args, "prior=dpo", f"hydra.run.dir={tmp_path / 'dpo'}"])
    trdpo = [*args, "prior=trdpo", "prior.sync_every=2", "prior.mixup=0.6"]
    main(["train", *trdpo, f"hydra.run.dir={tmp_path / 'full'}"])
    dpo, full = rows(tmp_path / "dpo"), rows(tmp_path / "full")
    assert [r["loss"] for r in full[:2]] == [r["loss"] for r in dpo[:2]]
    assert all(abs(a["loss"] - b["loss"]) > 1e-6 for a, b in zip(full[2:], dpo[2:]))

    ckpt = tmp_path / "full" / "checkpoints" / "step-3"
    assert any(k.startswith("moving_reference.") for k in load_file(str(ckpt / "prior.safetensors")))
    main(["train", *trdpo, f"trainer.resume={ckpt}", f"hydra.run.dir={tmp_path / 'resumed'}"])
    res = final(tmp_path / "resumed")
    assert res["resumed_from"] == str(ckpt) and [r["step"] for r in rows(tmp_path / "resumed")] == list(range(1, 7))
    assert abs(res["final"]["loss"] - final(tmp_path / "full")["final"]["loss"]) <= 1e-6
    saved = [load_file(str(tmp_path / d / "prior" / "prior.safetensors")) for d in ("full", "resumed")]
    assert saved[0].keys() == saved[1].keys() and max(float((saved[0][k] - saved[1][k]).abs().max())
                                                      for k in saved[0]) <= 1e-6

    monkeypatch.setattr(TRDPO, "load_state_dict", lambda self, state, strict=True: None)   # state not restored
    main(["train", *trdpo, f"trainer.resume={ckpt}", f"hydra.run.dir={tmp_path / 'forgot'}"])
    assert abs(final(tmp_path / "forgot")["final"]["loss"] - final(tmp_path / "full")["final"]["loss"]) > 1e-6
