"""The CUDA path: bf16 equality with the references on the GPU, SIBO with SDPA attention and the KV
cache, `peft-ds train` under ZeRO-3 with NCCL for every method (gradient checkpointing off and on), and
the consolidation of a GPU checkpoint. Marked `gpu`; skipped without CUDA. bench/gpu_check.sh runs them
on a GPU machine (`pytest -m gpu tests/test_gpu.py`)."""

import copy
import os

import pytest
import torch
import yaml
from conftest import ARCHS, randomize_adapters, random_batch, tiny
from launch import adapter, losses, peft_ds, torchrun, write_config
from test_lora import peft_copy
from test_sibo import reference_model

import peft_ds as lib
from peft_ds.architectures import ARCHITECTURES

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bench/gpu_check.sh on a GPU)")]
CUDA = torch.device("cuda")


def _cuda_batch(**kwargs):
    ids, mask = random_batch(**kwargs)
    return ids.to(CUDA), mask.to(CUDA)


@pytest.mark.parametrize("name", ARCHS)
def test_bf16_lora_sibo_at_lambda_0_equals_hf_peft_on_cuda(name):
    base = tiny(name, dtype=torch.bfloat16).to(CUDA)
    reference = copy.deepcopy(base)
    ours = lib.apply_peft(base, lib.PeftSpec(method="lora", r=8, alpha=16, dropout=0.0, sibo_lambda=0.0))
    randomize_adapters(ours)
    theirs = peft_copy(ours, reference, ARCHITECTURES[base.config.model_type]).to(CUDA)
    ids, mask = _cuda_batch(pad_left=[0, 3])
    ours.eval(), theirs.eval()
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask).logits
        b = theirs(input_ids=ids, attention_mask=mask).logits
    assert a.device.type == "cuda" and a.dtype == torch.bfloat16 and torch.equal(a, b)


@pytest.mark.parametrize("name", ARCHS)
def test_bf16_adapter_sibo_at_lambda_0_equals_the_reference_adapter_on_cuda(name):
    plain = tiny(name)
    arch = ARCHITECTURES[plain.config.model_type]
    spec = lib.PeftSpec(method="adapter", bottleneck_size=8, sibo_lambda=0.0)
    model = lib.apply_peft(copy.deepcopy(plain), spec)
    randomize_adapters(model)
    reference = reference_model(plain, arch, spec, lib.adapter_state_dict(model))
    model, reference = (m.to(CUDA, torch.bfloat16).eval() for m in (model, reference))
    ids, mask = _cuda_batch(pad_left=[0, 4])
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits.float()
        expected = reference(input_ids=ids, attention_mask=mask).logits.float()
    # the same bf16 operations in the same order on the same kernels: equal up to bf16 rounding at most
    assert (ours - expected).abs().max().item() <= 2 ** -7 * expected.abs().max().item()


@pytest.mark.parametrize("name", ARCHS)
def test_sibo_with_sdpa_and_kv_cache_generation_on_cuda(name):
    """SDPA (the default attention on CUDA) gives eager's logits; cached generation equals uncached."""
    spec = lib.PeftSpec(method="lora", r=4, alpha=8, dropout=0.0, sibo_lambda=0.3)
    eager = lib.apply_peft(tiny(name, attn_implementation="eager"), spec)
    randomize_adapters(eager, std=0.2)
    sdpa = lib.apply_peft(tiny(name, attn_implementation="sdpa"), spec)
    lib.load_adapter_state_dict(sdpa, lib.adapter_state_dict(eager))
    eager, sdpa = eager.to(CUDA).eval(), sdpa.to(CUDA).eval()
    ids, mask = _cuda_batch(batch=3, seq=9, pad_left=[0, 2, 4])
    with torch.no_grad():
        a = sdpa(input_ids=ids, attention_mask=mask).logits
        b = eager(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (a - b)[real].abs().max().item() < 1e-4
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    cached = sdpa.generate(ids, use_cache=True, **kwargs)
    assert cached.shape == (3, 17) and torch.equal(cached, sdpa.generate(ids, use_cache=False, **kwargs))


METHODS = {
    "lora-sibo": {"method": "lora", "r": 4, "alpha": 8, "sibo_lambda": 0.2},
    "adapter-sibo": {"method": "adapter", "bottleneck_size": 8, "sibo_lambda": 0.2},
    "adamix-lora": {"method": "adamix_lora", "r": 4, "alpha": 8},
    "adamix-adapter": {"method": "adamix_adapter", "bottleneck_size": 8},
    "bilora": {"method": "bilora", "r": 4, "alpha": 8, "hypergradient": "darts"},
}
RUNS = [(m, gc) for m in METHODS for gc in (False, True)]


def _config(root, method, checkpointing):
    out = root / f"{method}-gc{int(checkpointing)}"
    path = write_config(root / f"{out.name}.yaml", out, method=METHODS[method], deepspeed="zero3_bf16.json",
                        max_steps=2, micro_batch_size=2, global_batch_size=4, gradient_checkpointing=checkpointing)
    with open(path) as f:
        config = yaml.safe_load(f)
    config["model"]["dtype"] = "bf16"
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path, out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every method, GC off and on: 2 steps each, world size 1 on the GPU (NCCL), one after another in one
    launch (the imports and CUDA's start paid once: tests/multi_train.py)."""
    root = tmp_path_factory.mktemp("gpu_runs")
    configs = {key: _config(root, *key) for key in RUNS}
    result = torchrun(1, [path for path, _ in configs.values()])
    assert result.stdout.count("backend nccl") == len(RUNS), result.stdout[-3000:]
    return {key: (result, out) for key, (_, out) in configs.items()}


@pytest.mark.parametrize("key", RUNS, ids=lambda k: f"{k[0]}-gc{int(k[1])}")
def test_train_zero3_nccl_bf16(runs, key):
    result, out = runs[key]
    steps = losses(out)
    assert sorted(steps) == [1, 2] and all(torch.isfinite(torch.tensor(v)) for v in steps.values())
    with open(os.path.join(out, "ds_config.json")) as f:
        ds = yaml.safe_load(f)
    assert ds["bf16"]["enabled"] is True and ds["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize("method", ["lora-sibo", "adamix-lora"])
def test_gpu_checkpoint_consolidates_like_deepspeed(runs, method, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    result, out = runs[(method, False)]
    r = peft_ds("consolidate", str(out), "--out", str(tmp_path / "native"), "--keep-experts", "--quiet")
    assert r.returncode == 0, r.stderr
    ours = load_file(str(tmp_path / "native" / "adapter.safetensors"))
    theirs = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag="step2",
                                                      exclude_frozen_parameters=True)
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k].contiguous()) for k in ours)
    live = adapter(out)
    assert all(torch.equal(ours[k], live[k]) for k in ours)
