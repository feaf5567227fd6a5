"""End to end at the real widths (issue 15.2): one decoder layer of LLaMA-7B (LoRA-SIBO, Adapter-SIBO,
AdaMix-LoRA, AdaMix-adapter, BiLoRA darts), LLaMA-13B and GPT-J-6B (LoRA-SIBO), each method at its
default sizes, micro-batch 1, cutoff 128, fp32: 2 steps of `peft-ds train` on 1 and on 2 ZeRO-3 ranks
with the shipped ds_configs/zero3_cpu.json resolved for the width. At these widths the adapter
matrices exceed the persistence threshold (10 h) and are partitioned, where the tiny presets keep them
whole on every rank. The 2-rank run equals the 1-rank run; `peft-ds consolidate` equals DeepSpeed's own
reconstruction; `peft-ds evaluate` generates with the consolidated adapter on a preset base rebuilt at
the trained depth."""

import json
import os
import time

import pytest
import torch
from launch import adapter, losses, peft_ds, relative_difference, torchrun, write_config
from safetensors.torch import load_file

from peft_ds.cli import main
from peft_ds.evaluation import rows_path
from peft_ds.models import ASSETS, hidden_size_of

pytestmark = pytest.mark.slow

LORA_SIBO = {"method": "lora", "sibo_lambda": 0.1}
CASES = {  # name: (preset, method); r 32, bottleneck 256, 4 experts: the methods' defaults
    "llama7b-lora-sibo": ("llama-7b-shape", LORA_SIBO),
    "llama7b-adapter-sibo": ("llama-7b-shape", {"method": "adapter", "sibo_lambda": 0.1}),
    "llama7b-adamix-lora": ("llama-7b-shape", {"method": "adamix_lora"}),
    "llama7b-adamix-adapter": ("llama-7b-shape", {"method": "adamix_adapter"}),
    "llama7b-bilora-darts": ("llama-7b-shape", {"method": "bilora", "hypergradient": "darts"}),
    "llama13b-lora-sibo": ("llama-13b-shape", LORA_SIBO),
    "gptj6b-lora-sibo": ("gptj-6b-shape", LORA_SIBO),
}
TRAIN = dict(num_layers=1, cutoff_len=128, micro_batch_size=1, global_batch_size=2, max_steps=2)
# 2 ranks against 1 rank. Global batch 2: one micro-batch per rank, or two accumulated on one rank;
# either way the two micro-batch gradients are added once (a + b = b + a exactly in fp32), each
# example's forward is the same, and the loss is the same two-term sum. What is summed in another order
# is the gradient norm for clipping (per-partition sums of squares, then across ranks: ~1e-7 relative),
# to which Adam's m / sqrt(v) is insensitive. So 1e-6, ten times that; measured: equal bit for bit.
# BiLoRA darts keeps the same bar: its two perturbed passes' E-gradients are two-term sums as well
# (each accumulated from zero, then combined), and eps's norm is summed in float64, so the finite
# difference (g- - g+) / (2 eps) sees the same operands on both runs.
ADAPTER_TOL, LOSS_TOL = 1e-6, 1e-6
EVAL_SET, EVAL_DIR = "SVAMP", os.path.join(ASSETS, "eval")


def consolidate(run_dir, out):
    """`peft-ds consolidate` of the run's last checkpoint, every AdaMix expert kept (the tensors as trained)."""
    assert main(["consolidate", str(run_dir), "--out", str(out), "--keep-experts", "--quiet"]) == 0
    return load_file(str(out / "adapter.safetensors"))


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """One case: trained on 1 rank, then on 2 (one after the other: a 13B-width layer and its embeddings
    are 2.6 GB in fp32), both consolidated; the 2-rank adapter evaluated on 2 examples."""
    name = request.param
    model, method = CASES[name]
    root = tmp_path_factory.mktemp(name)
    result = {"name": name, "model": model, "root": root, "seconds": {}}
    for world in (1, 2):
        run = root / f"w{world}"
        config = write_config(root / f"w{world}.yaml", run, model=model, method=method, **TRAIN)
        began = time.perf_counter()
        torchrun(world, [config])
        result["seconds"][f"train w{world}"] = time.perf_counter() - began
        result[world] = run
        result[f"consolidated {world}"] = consolidate(run, root / f"consolidated_w{world}")
    began = time.perf_counter()
    out = root / "eval.json"
    # its own process, as a user runs it: the base it builds leaves with it
    r = peft_ds("evaluate", "--base", model, "--adapter", str(root / "consolidated_w2"), "--dataset", EVAL_SET,
                "--data-dir", EVAL_DIR, "--limit", "2", "--num-beams", "1", "--max-new-tokens", "4", "--quiet",
                "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    result["seconds"]["evaluate"] = time.perf_counter() - began
    result["eval"] = json.loads(out.read_text())
    result["eval rows"] = [json.loads(line) for line in open(rows_path(str(out)))]
    print(f"\n{name}: " + ", ".join(f"{k} {v:.0f} s" for k, v in result["seconds"].items()))
    return result


def start_row(run_dir):
    """The step-0 row of metrics.jsonl: what the run found at its start."""
    with open(run_dir / "metrics.jsonl") as f:
        return json.loads(f.readline())


def test_adapter_matrices_are_partitioned(case):
    """The shipped config's "auto" settings resolved for the width, and every adapter matrix partitioned
    over the ranks (DeepSpeed's ds_persist, counted by train at its start), in both runs."""
    h = hidden_size_of(case["model"])
    for world in (1, 2):
        with open(case[world] / "ds_config.json") as f:
            zero = json.load(f)["zero_optimization"]
        assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"]) == (h * h, int(0.9 * h * h))
        assert zero["stage3_param_persistence_threshold"] == 10 * h
        placement = start_row(case[world])["zero3_placement"]
        assert placement["threshold"] == 10 * h  # what DeepSpeed applied
        state = case[f"consolidated {world}"]
        matrices = {k: v.numel() for k, v in state.items() if v.dim() == 2}
        assert matrices and min(matrices.values()) > 10 * h
        large = [v.numel() for v in state.values() if v.numel() > 10 * h]
        small = [v.numel() for v in state.values() if v.numel() <= 10 * h]  # vectors: BiLoRA's E, biases
        assert placement["adapter"]["partitioned"] == [len(large), sum(large)]
        assert placement["adapter"]["persisted"] == [len(small), sum(small)]
        # the backbone: every weight matrix partitioned, the norms persisted
        assert placement["backbone"]["partitioned"][1] > 100 * placement["backbone"]["persisted"][1]


def test_two_ranks_equal_one_rank(case):
    one, two = case["consolidated 1"], case["consolidated 2"]
    assert one.keys() == two.keys()
    worst = relative_difference(two, one)
    assert worst <= ADAPTER_TOL, f"adapters differ: relative difference {worst:.3g}"
    la, lb = losses(case[1]), losses(case[2])
    assert la.keys() == lb.keys() == {1, 2} and la[1] != la[2]
    assert all(abs(la[s] - lb[s]) <= LOSS_TOL * abs(la[s]) for s in la), (la, lb)
    print(f"\n{case['name']}: adapters {worst:.2g}, losses "
          f"{max(abs(la[s] - lb[s]) / abs(la[s]) for s in la):.2g} (relative)")


def test_consolidate_equals_deepspeed(case):
    """Bit for bit: DeepSpeed's zero_to_fp32 reconstruction of the same checkpoint, and train's own
    export of the live fp32 masters."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    for world in (1, 2):
        ours = case[f"consolidated {world}"]
        theirs = get_fp32_state_dict_from_zero_checkpoint(str(case[world] / "checkpoints"), tag="step2",
                                                          exclude_frozen_parameters=True)
        live = adapter(case[world])
        assert set(ours) == set(theirs) == set(live)
        for name, value in ours.items():
            assert torch.equal(value, theirs[name].contiguous()) and torch.equal(value, live[name]), name


def test_evaluate_generates_with_the_trained_adapter(case):
    report, rows = case["eval"], case["eval rows"]
    assert report["adapter"].endswith("consolidated_w2") and report["world_size"] == 1
    assert report["accuracy"][EVAL_SET]["examples"] == 2
    assert [row["id"] for row in rows] == [0, 1] and all(isinstance(row["output"], str) for row in rows)
