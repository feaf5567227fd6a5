"""apply_peft: freezing, gradients, closed-form parameter counts, the adapter state dict, bad specs."""

import pytest
import torch
from conftest import ARCHS, randomize_adapters, random_batch, tiny

import peft_ds
from peft_ds import PeftDsError, PeftSpec


def closed_form_count(config, spec):
    L = config.num_hidden_layers
    if config.model_type == "llama":
        h, inter = config.hidden_size, config.intermediate_size
        kv = config.num_key_value_heads * (h // config.num_attention_heads)
        lora = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "up_proj": (h, inter), "down_proj": (inter, h)}
        adapter = {"gate_proj": h, "up_proj": h}
        mixture_adapter = {"down_proj": h}
    else:
        h = config.n_embd
        inter = config.n_inner or 4 * h
        lora = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "fc_in": (h, inter), "fc_out": (inter, h)}
        adapter = {"fc_out": h}
        mixture_adapter = {"fc_out": h}
    M = spec.num_experts
    if spec.method == "lora":
        per_layer = sum(spec.r * (i + o) for i, o in lora.values())
    elif spec.method == "adapter":
        per_layer = sum(2 * spec.bottleneck_size * d for d in adapter.values())
    elif spec.method == "adamix_lora":  # M experts of A, one shared B
        per_layer = sum(spec.r * (M * i + o) for i, o in lora.values())
    else:  # M experts of the down projection, one shared up projection
        per_layer = sum((M + 1) * spec.bottleneck_size * d for d in mixture_adapter.values())
    return L * per_layer + (L if spec.sibo_learnable else 0)


SPECS = {
    "lora": PeftSpec(method="lora", r=4, alpha=8),
    "lora-sibo": PeftSpec(method="lora", r=4, alpha=8, sibo_lambda=0.2),
    "lora-sibo-learnable": PeftSpec(method="lora", r=4, alpha=8, sibo_lambda=0.2, sibo_learnable=True),
    "adapter": PeftSpec(method="adapter", bottleneck_size=8),
    "adapter-sibo-learnable": PeftSpec(method="adapter", bottleneck_size=8, sibo_lambda=0.1, sibo_learnable=True),
    "adamix-lora-sibo": PeftSpec(method="adamix_lora", r=4, alpha=8, sibo_lambda=0.2),
    "adamix-adapter": PeftSpec(method="adamix_adapter", bottleneck_size=8, num_experts=3),
}


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("label", list(SPECS))
def test_gradients_only_on_adapters_and_counts(name, label):
    spec = SPECS[label]
    model = peft_ds.apply_peft(tiny(name), spec)
    randomize_adapters(model)
    model.train()
    ids, _ = random_batch()
    if spec.method.startswith("adamix"):  # each expert must be routed at least once to get a gradient
        from peft_ds.methods.adamix import consistency_loss

        for _ in range(12):
            consistency_loss(model, {"input_ids": ids, "labels": ids}, 1.0).backward()
    else:
        model(input_ids=ids, labels=ids).loss.backward()
    adapter_names = set(peft_ds.adapter_state_dict(model))
    for n, p in model.named_parameters():
        if n in adapter_names:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n
    report = peft_ds.trainable_report(model)
    expected = closed_form_count(model.config, spec)
    assert report["trainable"] == expected == sum(r["params"] for r in report["rows"])
    assert report["total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ARCHS)
def test_state_dict_round_trip_and_keys(name):
    spec = SPECS["lora-sibo-learnable"]
    a = peft_ds.apply_peft(tiny(name), spec)
    randomize_adapters(a)
    state = peft_ds.adapter_state_dict(a)
    prefix = "model.layers.0." if name == "tiny-llama" else "transformer.h.0."
    assert prefix + "sibo_theta" in state
    assert prefix + ("mlp.up_proj.lora_A" if name == "tiny-llama" else "mlp.fc_in.lora_A") in state
    b = peft_ds.apply_peft(tiny(name), spec)
    peft_ds.load_adapter_state_dict(b, state)
    ids, _ = random_batch()
    assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)
    with pytest.raises(PeftDsError, match="missing"):
        peft_ds.load_adapter_state_dict(b, {k: v for k, v in state.items() if "sibo" not in k})
    bad = dict(state)
    key = next(k for k in bad if k.endswith("lora_A"))
    bad[key] = torch.zeros(3, 3)
    with pytest.raises(PeftDsError, match="shape"):
        peft_ds.load_adapter_state_dict(b, bad)


BAD = [
    (dict(method="prefix"), "unknown method"),
    (dict(method="lora", sibo_lambda=1.0), "sibo_lambda must be in"),
    (dict(method="lora", sibo_lambda=-0.1), "sibo_lambda must be in"),
    (dict(method="lora", r=0), "r must be a positive integer"),
    (dict(method="lora", r=-3), "r must be a positive integer"),
    (dict(method="lora", target_modules=["qkv_proj"]), "target module.*qkv_proj.*not found"),
    (dict(method="lora", sibo_lambda=0.1, sibo_sites=["down_proj"]), "input size .* not the hidden size"),
    (dict(method="lora", sibo_lambda=0.1, sibo_sites=["nonexistent"]), "SIBO site 'nonexistent' not found"),
    (dict(method="lora", sibo_learnable=True), "sibo_learnable needs"),
    (dict(method="adapter", non_linearity="swish2"), "unknown non_linearity"),
]


@pytest.mark.parametrize("fields,message", BAD, ids=[m for _, m in BAD])
def test_bad_specs_fail_at_apply_peft(fields, message):
    model = tiny("tiny-llama")
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(PeftDsError, match=message):
        peft_ds.apply_peft(model, PeftSpec(**fields))
    # nothing was changed
    assert all(p.requires_grad for p in model.parameters())
    assert {n for n, _ in model.named_parameters()} == set(before)


def test_gptj_lora_site_fc_out_rejected():
    with pytest.raises(PeftDsError, match="input size 512, not the hidden size 128"):
        peft_ds.apply_peft(tiny("tiny-gptj"), PeftSpec(method="lora", sibo_lambda=0.1, sibo_sites=["fc_out"]))


def test_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(PeftDsError, match="unsupported architecture 'gpt2'"):
        peft_ds.apply_peft(model, PeftSpec())


def test_apply_twice_fails():
    model = peft_ds.apply_peft(tiny("tiny-llama"), PeftSpec(r=4))
    with pytest.raises(PeftDsError, match="already has adapters"):
        peft_ds.apply_peft(model, PeftSpec(r=4))


def test_default_targets_and_sites_follow_spec():
    llama = peft_ds.apply_peft(tiny("tiny-llama"), PeftSpec(method="lora", sibo_lambda=0.1))
    wrapped = {n.split(".")[-1] for n, m in llama.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"}
    sites = {n.split(".")[-1] for n, m in llama.named_modules() if getattr(m, "_initial_residual", None) is not None
             and hasattr(m, "lora_A")}
    assert sites == {"up_proj"}
    adapter = peft_ds.apply_peft(tiny("tiny-llama"), PeftSpec(method="adapter", sibo_lambda=0.1))
    sites = {n.split(".")[-1] for n, m in adapter.named_modules() if getattr(m, "_initial_residual", None) is not None
             and hasattr(m, "adapter_down")}
    assert sites == {"gate_proj", "up_proj"}
    gptj = peft_ds.apply_peft(tiny("tiny-gptj"), PeftSpec(method="adapter", sibo_lambda=0.1))
    assert {n.split(".")[-1] for n, m in gptj.named_modules() if hasattr(m, "adapter_down")} == {"fc_out"}
    assert gptj.transformer.h[0].mlp.fc_out.output_side
