"""Log-probs through the engine's LM-head path equal the model's own, per architecture, in value and gradient.

`completion_logps` (the engine's `model_logits` + `token_logps`) against log_softmax of the model's own full
logits, in fp32, at chunk sizes 1, 3 and 0 (automatic), on tiny random models built from configs (no
download). Weights are drawn larger than the default init so that logits reach the range where a scale or a
soft-cap matters: leaving out Granite's division by logits_scaling=8, Gemma2's cap or Cohere's scale moves
these log-probs by 0.3 nats per token on average, against a tolerance of 1e-5.
"""
import logging

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from midpo_cli.api import completion_logps
from midpo_cli.engine import head
from midpo_cli.engine.forward import model_logits
from midpo_cli.engine.logps import Head, token_kl

V = 96
SIZE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, tie_word_embeddings=False)
MOE = dict(num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
MLA = dict(num_key_value_heads=4, head_dim=None, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
           qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4, first_k_dense_replace=1, n_group=1, topk_group=1)
# model_type -> config overrides of SIZE (None: leave the key out): a tiny model of each head.TRANSFORMS entry,
# its logit map set where the default would make it a no-op (a scale of 1, no cap)
CONFIGS = {
    **{kind: {} for kind in head.PLAIN},
    "tied-llama": {"tie_word_embeddings": True},
    "falcon": {"head_dim": None}, "codegen": {"rotary_dim": 4}, "gptj": {"rotary_dim": 4},
    "deepseek_v2": {**MLA, **MOE}, "deepseek_v3": {**MLA, **MOE},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "num_layers": 2},
    **{kind: MOE for kind in ("ernie4_5_moe", "glm4_moe", "gpt_oss", "hunyuan_v1_moe", "jetmoe", "mixtral", "olmoe",
                              "phimoe", "qwen2_moe", "qwen3_moe", "qwen3_next")},
    **{kind: {"final_logit_softcapping": 3.0} for kind in ("gemma2", "gemma3_text", "vaultgemma", "nanochat")},
    "gemma3n_text": {"final_logit_softcapping": 3.0, "num_kv_shared_layers": 0, "hidden_size_per_layer_input": 8,
                     "laurel_rank": 4, "altup_num_inputs": 2},
    "recurrent_gemma": {"logits_soft_cap": 3.0, "lru_width": 32, "block_types": ["recurrent", "attention"],
                        "attention_window_size": 16},
    **{kind: {"logit_scale": 0.5} for kind in ("cohere", "cohere2")},
    "cohere2_moe": {"logit_scale": 0.5, **MOE},
    **{kind: {"logits_scaling": 8.0} for kind in ("granite", "granite_swa")},
    **{kind: {"logits_scaling": 8.0, **MOE} for kind in ("granitemoe", "granitemoe_swa", "granitemoeshared")},
    "granitemoehybrid": {"logits_scaling": 8.0, **MOE, "layer_types": ["attention", "attention"],
                         "shared_intermediate_size": 32, "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 8},
    "hyperclovax": {"logits_scaling": 4.0},
    "minicpm3": {**MLA, "dim_model_base": 8},                             # logits_scaling = 32 / 8
    "falcon_h1": {"lm_head_multiplier": 0.5, "mamba_d_ssm": 32, "mamba_n_heads": 4, "mamba_d_head": 8,
                  "mamba_d_state": 8, "mamba_chunk_size": 8},
}
# the required set and common families, run always; the rest of the registry is marked slow
FAST = ["llama", "tied-llama", "qwen2", "qwen3", "mistral", "phi3", "olmo2", "stablelm", "gpt_neox", "gpt2",
        "falcon", "gemma", "gemma2", "gemma3_text", "granite", "granitemoe", "cohere", "cohere2", "minicpm3"]
ARCHS = FAST + [pytest.param(kind, marks=pytest.mark.slow) for kind in CONFIGS if kind not in FAST]


def tiny(kind: str, **overrides):
    torch.manual_seed(0)
    given = {**SIZE, **CONFIGS[kind], **overrides}
    cfg = AutoConfig.for_model(kind.removeprefix("tied-"), **{k: v for k, v in given.items() if v is not None})
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.5)
    return model.eval()


def batch():
    """3 rows of 9 tokens; the last row padded after 7; labels -100 on a 3-token prompt and the padding."""
    ids = torch.randint(3, V, (3, 9), generator=torch.Generator().manual_seed(1))
    attention = torch.ones_like(ids)
    attention[2, 7:] = 0
    labels = ids.clone()
    labels[:, :3] = -100
    labels[2, 7:] = -100
    return ids, attention, labels


def own_logps(model, ids, attention, labels):
    """The reference: log_softmax of the model's own full logits, logits at t predicting token t+1."""
    logps = model(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1].float().log_softmax(-1)
    targets = labels[:, 1:]
    gathered = logps.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(targets != -100, gathered, torch.zeros(()))


def grads(model, value):
    params = [p for p in model.parameters() if p.requires_grad]
    return [torch.zeros_like(p) if g is None else g
            for p, g in zip(params, torch.autograd.grad(value, params, allow_unused=True))]


class Expected:
    """Values [N, T] and the gradient of a weighted sum of them w.r.t. every model parameter."""

    def __init__(self, model, values, weights):
        self.values, self.weights = values.detach(), weights
        self.grads = grads(model, (values * weights).sum())

    def check(self, model, values, tol=1e-5):
        assert (values - self.values).abs().max().item() < tol
        for a, b in zip(grads(model, (values * self.weights).sum()), self.grads):
            assert (a - b).abs().max().item() < tol * (1 + b.abs().max().item())


@pytest.fixture(autouse=True)
def fresh_notices(monkeypatch):
    monkeypatch.setattr(head, "_NOTICED", set())


def test_every_registered_architecture_has_a_test_model():
    assert set(head.TRANSFORMS) <= set(CONFIGS)


@pytest.mark.parametrize("kind", ARCHS)
def test_completion_logps_match_the_models_own_logits(kind):
    model = tiny(kind)
    ids, attention, labels = batch()
    src, _ = model_logits(model, {"input_ids": ids, "attention_mask": attention})
    assert isinstance(src, Head)                                           # the chunked path, not the fallback
    theirs = own_logps(model, ids, attention, labels)                      # [3, 8]
    expected = Expected(model, theirs, torch.rand(theirs.shape, generator=torch.Generator().manual_seed(2)))
    for chunk in (1, 3, 0):
        expected.check(model, completion_logps(model, ids, attention, labels, chunk))
    assert head._FORMS[model] == (head.TRANSFORMS[model.config.model_type](model), True)   # checked once


@pytest.mark.parametrize("kind", ["granite", "gemma2", "cohere", "minicpm3"])
def test_token_kl_matches_full_logits(kind):
    p, q = tiny(kind), tiny(kind)
    with torch.no_grad():
        for w in q.parameters():
            w.add_(0.1 * torch.randn_like(w))
    ids, attention, labels = batch()
    b = {"input_ids": ids, "attention_mask": attention}
    full = lambda m: m(**b, use_cache=False).logits[:, :-1].float().log_softmax(-1)
    lp, lq = full(p), full(q)
    theirs = (lp.exp() * (lp - lq.detach())).sum(-1)                      # KL_t(p || q) [3, 8]
    expected = Expected(p, theirs, torch.rand(theirs.shape, generator=torch.Generator().manual_seed(3)))
    for chunk in (1, 3, 0):
        with torch.no_grad():
            q_src, _ = model_logits(q, b)
        p_src, _ = model_logits(p, b)
        assert isinstance(p_src, Head) and isinstance(q_src, Head)
        expected.check(p, token_kl(p_src, q_src, chunk))


def test_unknown_architecture_falls_back_to_full_logits_with_one_notice(monkeypatch, caplog):
    monkeypatch.delitem(head.TRANSFORMS, "granite")
    ids, attention, labels = batch()
    with caplog.at_level(logging.WARNING, logger="midpo"):
        for _ in range(2):
            model = tiny("granite")
            src, _ = model_logits(model, {"input_ids": ids, "attention_mask": attention})
            assert not isinstance(src, Head)                               # the model's own logits [3, 8, V]
            theirs = own_logps(model, ids, attention, labels)
            mine = completion_logps(model, ids, attention, labels, 3)
            Expected(model, theirs, torch.ones_like(theirs)).check(model, mine)
    notices = [r for r in caplog.records if "granite" in r.getMessage()]
    assert len(notices) == 1 and "not in midpo_cli/engine/head.py TRANSFORMS" in notices[0].getMessage()


def test_a_wrong_logit_map_is_caught_by_the_self_check(monkeypatch, caplog):
    monkeypatch.setitem(head.TRANSFORMS, "granite", head._plain)           # forgets the division by 8
    model = tiny("granite")
    ids, attention, labels = batch()
    with caplog.at_level(logging.WARNING, logger="midpo"):
        mine = completion_logps(model, ids, attention, labels)
        completion_logps(model, ids, attention, labels)
    assert (mine - own_logps(model, ids, attention, labels)).abs().max() < 1e-5
    assert head._FORMS[model] == (None, True)
    assert len([r for r in caplog.records if "misses the model's own" in r.getMessage()]) == 1


def test_bfloat16_passes_the_self_check():
    model = tiny("granite").to(torch.bfloat16)
    ids, attention, labels = batch()
    src, _ = model_logits(model, {"input_ids": ids, "attention_mask": attention})
    assert isinstance(src, Head) and head._FORMS[model][1]
    with torch.no_grad():
        mine = completion_logps(model, ids, attention, labels)
        theirs = own_logps(model, ids, attention, labels)
    assert (mine - theirs).abs().max() < 0.1                               # bf16 rounding, not 0.2 nats/token


def test_training_mode_with_gradient_checkpointing():
    model = tiny("granite").train()
    model.gradient_checkpointing_enable()
    ids, attention, labels = batch()
    theirs = own_logps(model, ids, attention, labels)
    Expected(model, theirs, torch.ones_like(theirs)).check(model, completion_logps(model, ids, attention, labels, 3))
    assert head._FORMS[model][0] is not None


def test_hidden_states_still_come_with_the_chunked_path():
    model = tiny("granite")
    ids, attention, _ = batch()
    src, out = model_logits(model, {"input_ids": ids, "attention_mask": attention}, hidden=True)
    assert isinstance(src, Head) and len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert out.hidden_states[0].shape == (3, 9, 32)


class Wrapped(torch.nn.Module):
    """A DDP/accelerate-style wrapper: the model under `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **kwargs):
        return self.module(**kwargs)


def test_wrapped_and_lora_models_take_the_chunked_path():
    peft = pytest.importorskip("peft")
    from midpo_cli.engine.lora import AdapterOff
    base = tiny("granite")
    ids, attention, labels = batch()
    plain = own_logps(base, ids, attention, labels).detach()
    policy = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, w in policy.named_parameters():
            if "lora_B" in name:
                w.normal_(0, 0.3)                                          # adapters that change the output
    b = {"input_ids": ids, "attention_mask": attention}
    for model in (policy, Wrapped(policy), AdapterOff(policy), AdapterOff(Wrapped(policy))):
        assert isinstance(model_logits(model, b)[0], Head)
    theirs = own_logps(policy, ids, attention, labels)
    assert (theirs - plain).abs().max() > 1e-2
    Expected(policy, theirs, torch.ones_like(theirs)).check(policy, completion_logps(Wrapped(policy), ids, attention,
                                                                                     labels, 3))
    off = completion_logps(AdapterOff(policy), ids, attention, labels)
    assert (off - plain).abs().max() < 1e-5                                # the reference: adapters off


def test_lora_on_the_lm_head_falls_back(caplog):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    ids, attention, labels = batch()
    with caplog.at_level(logging.WARNING, logger="midpo"):
        src, _ = model_logits(model, {"input_ids": ids, "attention_mask": attention})
    assert not isinstance(src, Head) and any("not a plain Linear" in r.getMessage() for r in caplog.records)
    theirs = own_logps(model, ids, attention, labels)
    assert (completion_logps(model, ids, attention, labels) - theirs).abs().max() < 1e-5


def test_labels_must_have_the_input_shape():
    model = tiny("llama")
    ids, attention, labels = batch()
    with pytest.raises(ValueError, match="a copy of input_ids"):
        completion_logps(model, ids, attention, labels[:, 1:])


def test_a_forward_without_logits_to_keep_falls_back(caplog):
    """Custom or remote code under a known model type whose forward has no `logits_to_keep` (older Phi-3 or
    DeepSeek-V3 repo code): the model's own logits, with a notice, instead of a TypeError."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    class RemoteStyle(type(tiny("llama"))):
        def forward(self, input_ids=None, attention_mask=None, use_cache=None, output_hidden_states=None):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache,
                             output_hidden_states=output_hidden_states)
            return CausalLMOutputWithPast(logits=self.lm_head(out.last_hidden_state), hidden_states=out.hidden_states)

    model = tiny("llama")
    model.__class__ = RemoteStyle
    ids, attention, labels = batch()
    with caplog.at_level(logging.WARNING, logger="midpo"):
        src, _ = model_logits(model, {"input_ids": ids, "attention_mask": attention})
    assert not isinstance(src, Head) and any("takes no logits_to_keep" in r.getMessage() for r in caplog.records)
    theirs = own_logps(model, ids, attention, labels)
    Expected(model, theirs, torch.ones_like(theirs)).check(model, completion_logps(model, ids, attention, labels, 3))
