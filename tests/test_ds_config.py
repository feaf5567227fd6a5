"""DeepSpeed config resolution: no "auto" survives, hidden-size formulas (SPEC 3), precision, batch."""

import glob
import json
import os

import pytest

from peft_ds import PeftDsError
from peft_ds import ds_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("hidden,reduce,prefetch,persist", [(4096, 16777216, 15099494, 40960),
                                                            (5120, 26214400, 23592960, 51200)])
def test_auto_formulas(hidden, reduce, prefetch, persist):
    raw = ds_config.load(os.path.join(ROOT, "ds_configs", "zero3_bf16.json"))
    ds = ds_config.resolve(raw, hidden_size=hidden, micro_batch_size=4, accumulation=2, world_size=16, dtype="bf16")
    zero = ds["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (reduce, prefetch, persist)
    assert ds["train_batch_size"] == 128 and ds["gradient_accumulation_steps"] == 2
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert '"auto"' not in json.dumps(ds)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "ds_configs", "*.json"))))
def test_every_shipped_config_resolves(path):
    raw = ds_config.load(path)
    dtype = ds_config.model_dtype(raw, "auto")
    ds = ds_config.resolve(raw, hidden_size=128, micro_batch_size=2, accumulation=1, world_size=2, dtype=dtype)
    assert '"auto"' not in json.dumps(ds)
    assert ds.get("zero_optimization", {}).get("stage3_gather_16bit_weights_on_model_save", False) is False


def test_model_dtype_overrides_precision():
    raw = ds_config.load(os.path.join(ROOT, "ds_configs", "zero3_bf16.json"))
    assert ds_config.model_dtype(raw, "auto") == "bf16"
    ds = ds_config.resolve(raw, hidden_size=64, micro_batch_size=1, accumulation=1, world_size=1, dtype="fp32")
    assert ds["bf16"]["enabled"] is False


def test_unresolvable_auto_and_bad_files(tmp_path):
    with pytest.raises(PeftDsError, match="optimizer.params.lr is \"auto\""):
        ds_config.resolve({"optimizer": {"params": {"lr": "auto"}}}, hidden_size=8, micro_batch_size=1,
                          accumulation=1, world_size=1, dtype="fp32")
    with pytest.raises(PeftDsError, match="does not exist"):
        ds_config.load(str(tmp_path / "none.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(PeftDsError, match="not valid JSON"):
        ds_config.load(str(tmp_path / "bad.json"))


def test_offloaded_optimizer_state_is_stepped_by_torchs_adamw(tmp_path):
    """With offload_optimizer, DeepSpeed refuses a client optimizer unless zero_force_ds_cpu_optimizer is
    false: resolve sets it (a user's own offload config too); an explicit true is refused before any work."""
    raw = ds_config.load(os.path.join(ROOT, "ds_configs", "zero3_offload.json"))
    del raw["zero_force_ds_cpu_optimizer"]  # as in a user's own copy
    ds = ds_config.resolve(raw, hidden_size=64, micro_batch_size=1, accumulation=1, world_size=2, dtype="bf16")
    assert ds["zero_force_ds_cpu_optimizer"] is False
    plain = ds_config.resolve(ds_config.load(os.path.join(ROOT, "ds_configs", "zero3_bf16.json")), hidden_size=64,
                              micro_batch_size=1, accumulation=1, world_size=2, dtype="bf16")
    assert "zero_force_ds_cpu_optimizer" not in plain
    path = tmp_path / "forced.json"
    path.write_text(json.dumps({**raw, "zero_force_ds_cpu_optimizer": True}))
    with pytest.raises(PeftDsError, match="zero_force_ds_cpu_optimizer true asks for DeepSpeed's CPU Adam"):
        ds_config.load(str(path))
