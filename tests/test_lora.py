"""LoRA against Hugging Face PEFT (SPEC 2.1): same weights, same r/alpha/targets -> same logits."""

import copy

import pytest
import torch
from conftest import ARCHS, randomize_adapters, random_batch, tiny

import peft_ds
from peft_ds.architectures import ARCHITECTURES


def peft_copy(ours, reference, arch):
    """HF PEFT LoRA (r=8, alpha=16) on `reference` holding the adapter weights of `ours`."""
    from peft import LoraConfig, get_peft_model

    theirs = get_peft_model(
        reference, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(arch.lora_targets))
    )
    state = peft_ds.adapter_state_dict(ours)
    copied = 0
    with torch.no_grad():
        for key, value in state.items():
            path, pname = key.rsplit(".", 1)
            getattr(theirs.base_model.model.get_submodule(path), pname)["default"].weight.copy_(value)
            copied += 1
    assert copied == len(state) > 0
    return theirs


@pytest.mark.parametrize("name", ARCHS)
def test_lora_matches_hf_peft(name):
    base = tiny(name)
    reference = copy.deepcopy(base)
    plain = copy.deepcopy(base)
    arch = ARCHITECTURES[base.config.model_type]
    spec = peft_ds.PeftSpec(method="lora", r=8, alpha=16, dropout=0.0)
    ours = peft_ds.apply_peft(base, spec)
    randomize_adapters(ours)

    theirs = peft_copy(ours, reference, arch)

    ids, mask = random_batch(pad_left=[0, 3])
    ours.eval(), theirs.eval()
    a = ours(input_ids=ids, attention_mask=mask).logits
    b = theirs(input_ids=ids, attention_mask=mask).logits
    assert (a - b).abs().max().item() < 1e-5
    # and the adapters really change the output
    assert (a - plain(input_ids=ids, attention_mask=mask).logits).abs().max() > 1e-3


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16], ids=["fp32-adapter", "bf16-adapter"])
@pytest.mark.parametrize("name", ARCHS)
def test_bf16_backbone_equals_hf_peft_exactly(name, adapter_dtype):
    """A bf16 backbone with PEFT's fp32 adapter (or everything bf16, as DeepSpeed trains): LoRA-SIBO at
    lambda = 0 rounds as PEFT does, so the logits are equal bit for bit, not only close."""
    base = tiny(name, dtype=torch.bfloat16)
    reference = copy.deepcopy(base)
    spec = peft_ds.PeftSpec(method="lora", r=8, alpha=16, dropout=0.0, sibo_lambda=0.0)
    ours = peft_ds.apply_peft(base, spec)
    randomize_adapters(ours)
    theirs = peft_copy(ours, reference, ARCHITECTURES[base.config.model_type])
    if adapter_dtype == torch.bfloat16:
        ours.to(adapter_dtype), theirs.to(adapter_dtype)
    adapters = [p for n, p in ours.named_parameters() if "lora_" in n]
    assert adapters and all(p.dtype == adapter_dtype for p in adapters)
    assert all(p.dtype == adapter_dtype for n, p in theirs.named_parameters() if "lora_" in n)
    ids, mask = random_batch(pad_left=[0, 3])
    ours.eval(), theirs.eval()
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask).logits
        b = theirs(input_ids=ids, attention_mask=mask).logits
        with theirs.disable_adapter():
            plain = theirs(input_ids=ids, attention_mask=mask).logits
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    assert not torch.equal(a, plain)


@pytest.mark.parametrize("name", ARCHS)
def test_lora_init_is_identity_and_shapes(name):
    model = tiny(name)
    ids, _ = random_batch()
    before = model(input_ids=ids).logits
    peft_ds.apply_peft(model, peft_ds.PeftSpec(method="lora", r=4, alpha=8))
    after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    for key, value in peft_ds.adapter_state_dict(model).items():
        module = model.get_submodule(key.rsplit(".", 1)[0])
        if key.endswith("lora_A"):
            assert value.shape == (4, module.base_layer.in_features)
            assert value.abs().sum() > 0
        else:
            assert value.shape == (module.base_layer.out_features, 4)
            assert value.abs().sum() == 0
