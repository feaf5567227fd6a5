"""`peft-ds plan` (peft_ds/plan.py): verdicts on real-width presets, the JSON, agreement with DeepSpeed's
estimator, the activation trace against real execution, bad input, and (slow) the prediction against the
measured per-rank peak of real `peft-ds train` steps (tests/memory_train.py)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from launch import ROOT, free_port, peft_ds
from peft_ds import plan as planner
from peft_ds.cli import main
from peft_ds.config import load_config
from peft_ds.injection import apply_peft
from peft_ds.models import build_preset
from peft_ds.spec import PeftSpec

FLAGSHIP = os.path.join(ROOT, "configs", "llama13b_lora_sibo.yaml")
LLAMA13B = ["--set", "model.name_or_path=llama-13b-shape"]


def test_flagship_fits_on_two_nodes_of_a100_40gb():
    r = peft_ds("plan", FLAGSHIP, *LLAMA13B, "--nodes", "2", "--gpus-per-node", "8", "--gpu-memory", "40",
                "--require-fit")
    assert r.returncode == 0, r.stderr
    assert "llama-13b-shape (40 layers), lora + SIBO, bf16" in r.stdout
    assert "fits in 40 GiB" in r.stdout and "16 rank(s)" in r.stdout


def test_a_run_that_cannot_fit_is_refused_with_one_line():
    # the whole 13B backbone on one rank, no gradient checkpointing, micro-batch 16
    r = peft_ds("plan", FLAGSHIP, *LLAMA13B, "--world-size", "1", "--gpu-memory", "40", "--require-fit",
                "--set", "train.micro_batch_size=16", "--set", "train.gradient_checkpointing=false")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peft-ds: error: ") and "does not fit" in lines[0], r.stderr
    assert "does NOT fit in 40 GiB" in r.stdout


def _flagship(world=16, per_node=8, **sets):
    config = load_config(FLAGSHIP, ["model.name_or_path=llama-13b-shape"] + [f"{k}={v}" for k, v in sets.items()])
    return config, world, per_node


def test_json_gives_every_term_by_name(capsys):
    assert main(["plan", FLAGSHIP, *LLAMA13B, "--nodes", "2", "--gpus-per-node", "8", "--gpu-memory", "40",
                 "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    terms = planner.MODEL_STATE_TERMS + planner.BUFFER_TERMS + planner.ACTIVATION_TERMS
    assert tuple(p["gpu_bytes"]) == terms
    assert p["total"] == sum(p["gpu_bytes"].values()) + p["cuda_context_nccl"]
    assert p["non_cuda_total"] == p["total"] - p["cuda_context_nccl"]
    assert p["fits"] is True and p["gpu_memory"] == 40 * 2**30 and p["world_size"] == 16
    assert p["backend"] == "nccl" and p["gpu_bytes"]["allgather_staging"] == 0  # NCCL gathers in place
    assert p["parameters"]["persistence_threshold"] == 10 * 5120  # "auto": 10 x hidden
    # LoRA r=32 on q, k, v, up, down of 40 layers: every matrix is above the threshold, so partitioned
    per_layer = 3 * 32 * (5120 + 5120) + 2 * 32 * (5120 + 13824)
    assert p["parameters"]["adapter"] == 40 * per_layer
    o = p["with_offload"]
    assert o["offload"] is True and o["gpu_bytes"]["backbone_partition"] == 0
    assert o["host_bytes_per_node"] == 8 * o["host_bytes_per_rank"] > 0
    assert o["host_terms"]["backbone_partition"] == p["gpu_bytes"]["backbone_partition"]


def test_largest_micro_batch_is_the_edge_of_fitting():
    config, world, per_node = _flagship(**{"train.gradient_checkpointing": "false"})
    largest = planner.plan(config, world, per_node, 40)["largest_micro_batch"]
    assert 1 <= largest < planner.MAX_MICRO_BATCH
    config.train.micro_batch_size, config.train.global_batch_size = largest, largest * world
    assert planner.plan(config, world, per_node, 40)["fits"]
    config.train.micro_batch_size, config.train.global_batch_size = largest + 1, (largest + 1) * world
    assert not planner.plan(config, world, per_node, 40)["fits"]


def test_gradient_checkpointing_keeps_one_input_per_layer():
    config, world, per_node = _flagship()
    on = planner.plan(config, world, per_node)
    off = on["activations_other_mode"]
    assert on["gpu_bytes"]["activations"] < off / 10
    config.train.gradient_checkpointing = False
    assert planner.plan(config, world, per_node)["gpu_bytes"]["activations"] == off


def test_model_states_agree_with_deepspeeds_estimator():
    """DeepSpeed's estimator counts 18 bytes per trained parameter per GPU without offload (bf16 param,
    fp32 grad, fp32 master, two Adam moments) and 2 bytes per parameter when the optimizer is offloaded
    (the bf16 partition). The plan's adapter states are the first (for the adapters, the only trained
    parameters) and its frozen partition the second (for the backbone), to ZeRO-3's padding."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    config, world, per_node = _flagship()
    p = planner.plan(config, world, per_node)
    g, n = p["gpu_bytes"], p["parameters"]
    tensors = 40 * 10 + 1000  # padding: at most world - 1 elements per tensor
    _, trained, largest = estimate_zero3_model_states_mem_needs(n["adapter"], 0, 8, 2, cpu_offload=False)
    ours = g["adapter_params"] + g["fp32_masters"] + g["adam_moments"] + g["gradient_partition"]
    assert abs(ours - trained) <= 18 * world * tensors and largest == 0
    _, frozen, largest = estimate_zero3_model_states_mem_needs(n["frozen"] - n["persisted"], 0, 8, 2, cpu_offload=True,
                                                               cpu_offload_params=False)
    assert abs(g["backbone_partition"] - frozen) <= 2 * world * tensors


@pytest.mark.parametrize("preset,method", [("tiny-llama", {"method": "lora", "sibo_lambda": 0.1}),
                                           ("tiny-gptj", {"method": "adapter", "sibo_lambda": 0.1}),
                                           ("tiny-llama", {"method": "adamix_lora"})])
def test_meta_trace_counts_what_real_execution_saves(preset, method):
    """The activation term runs the model on the meta device; the same hook on a real CPU forward saves
    the same bytes (the kernels choose the same saved tensors)."""
    spec = PeftSpec(**method, dropout=0.0).validate()
    model = build_preset(preset, num_layers=2)
    apply_peft(model, spec)
    model.train()
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in owned:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(3, 1000, (2, 64))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if spec.method == "adamix_lora":  # AdaMix's loss: both views in one forward, CE + symmetric KL
            from peft_ds.methods.adamix import consistency_loss

            consistency_loss(model, {"input_ids": ids, "labels": ids}, spec.consistency_weight)
        else:
            model(input_ids=ids, labels=ids)
    traced = planner.saved_tensors(preset, 2, spec, "fp32", 2, 64)
    assert traced["logits"] + traced["other"] == sum(seen.values())
    if spec.method != "adamix_lora":
        assert traced["logits"] == 2 * 64 * 1024 * 4  # fp32 log-probabilities of cross-entropy


@pytest.mark.parametrize("args,message", [
    (["--world-size", "0"], "--world-size must be >= 1"),
    (["--nodes", "2"], "--nodes and --gpus-per-node go together"),
    (["--world-size", "2", "--nodes", "1", "--gpus-per-node", "2"], "not both"),
    (["--world-size", "3"], "global_batch_size"),
    (["--world-size", "16", "--gpu-memory", "0"], "--gpu-memory must be > 0"),
    (["--world-size", "16", "--set", "deepspeed=ds_configs/zero2_bf16.json"], "models ZeRO-3"),
    (["--world-size", "16", "--set", "model.name_or_path=/no/such/model"], "neither a preset"),
])
def test_bad_input_is_one_error_line(capsys, args, message):
    assert main(["plan", FLAGSHIP, *LLAMA13B, *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peft-ds: error: ") and message in lines[0], lines


def test_missing_config_is_one_error_line(capsys, tmp_path):
    assert main(["plan", str(tmp_path / "nope.yaml")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peft-ds: error: ") and "nope.yaml" in lines[0], lines


LONG_RECORDS = [{"instruction": " ".join(f"word{i} plus {j} equals" for j in range(300)), "input": "",
                 "output": "answer " * 40} for i in range(16)]  # every record truncated at the cutoff


# ---- the gathered-parameters term: the replay vs DeepSpeed's own coordinator --------------------------
# name: (preset, layers, method, stage3_prefetch_bucket_size, stage3_max_live_parameters, stage3_max_reuse_distance)
REPLAY_CASES = {
    "prefetch runs ahead into backward": ("tiny-llama", 4, "lora", 60000, 10**9, 1000),
    "max live parameters bind": ("tiny-gptj", 2, "adapter", 20000, 400000, 50000),
    "no prefetch, reuse only": ("tiny-gptj", 2, "adapter", 0, 10**9, 50000),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", REPLAY_CASES)
def test_gathered_parameters_follow_deepspeeds_coordinator_event_by_event(tmp_path, case):
    """After every forward fetch and release of a 2-rank ZeRO-3 step with a complete trace, the elements DeepSpeed
    holds gathered equal the plan's replay (`gathered_during_forward`); the plan counts the last one."""
    preset, layers, method, bucket, live, reuse = REPLAY_CASES[case]
    ds = json.load(open(os.path.join(ROOT, "ds_configs", "zero3_cpu.json")))
    ds["zero_optimization"].update(stage3_prefetch_bucket_size=bucket, stage3_max_live_parameters=live,
                                   stage3_max_reuse_distance=reuse, stage3_param_persistence_threshold=0)
    json.dump(ds, open(tmp_path / "ds.json", "w"))
    config = {"model": {"name_or_path": preset, "num_layers": layers},
              "method": {"method": method, "sibo_lambda": 0.1},
              "data": {"train_file": str(tmp_path / "long.json"), "val_set_size": 0, "cutoff_len": 32},
              "train": {"micro_batch_size": 1, "global_batch_size": 2, "max_steps": 2, "warmup_steps": 0,
                        "save_every": 0, "eval_every": 0},
              "deepspeed": str(tmp_path / "ds.json"), "output_dir": str(tmp_path / "run")}
    (tmp_path / "long.json").write_text(json.dumps(LONG_RECORDS))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), os.path.join(ROOT, "tests", "gathered_trace.py"),
           str(tmp_path / "run.yaml"), str(tmp_path / "events.json")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    measured = json.load(open(tmp_path / "events.json"))
    skeleton = planner.models.build_skeleton(preset, layers)
    with torch.random.fork_rng(devices=[]):
        apply_peft(skeleton, load_config(str(tmp_path / "run.yaml")).method)
    trace = planner.inventory(skeleton, 0)["trace"]
    replayed = planner.gathered_during_forward(trace, bucket, live, reuse)
    assert [kind for kind, _ in trace["forward"]] == [kind for kind, _ in measured]
    assert replayed == [n for _, n in measured]
    predicted = planner.gathered_params(planner.inventory(skeleton, 0), {
        "stage3_prefetch_bucket_size": bucket, "stage3_max_live_parameters": live,
        "stage3_max_reuse_distance": reuse}, 2, 4, False)
    assert predicted == measured[-1][1] * 4


# ---- validation: prediction vs measurement on the CPU (fp32, real widths) -------------------------
# name: (preset, layers, ranks, micro-batch, cutoff, gradient checkpointing, stage3_max_reuse_distance)
CASES = {
    "llama-7b-shape x1, 1 rank, micro-batch 2 x 256": ("llama-7b-shape", 1, 1, 2, 256, False, None),
    "llama-7b-shape x1, 2 ranks": ("llama-7b-shape", 1, 2, 1, 128, False, None),
    "gptj-6b-shape x1, 2 ranks, reuse 1e8": ("gptj-6b-shape", 1, 2, 1, 128, False, 1e8),
    "llama-7b-shape x4 (1.07B), 1 rank, checkpointing": ("llama-7b-shape", 4, 1, 1, 128, True, None),
    "llama-7b-shape x4 (1.07B), 2 ranks, reuse 1e8": ("llama-7b-shape", 4, 2, 1, 128, False, 1e8),
}
TOLERANCE = 0.15


def measure(tmp_path, name, preset, layers, ranks, micro, cutoff, checkpointing, reuse):
    """(predicted non-CUDA bytes per rank, measured peak above baseline of the largest rank)."""
    work = tmp_path / name.replace(" ", "_").replace(",", "")
    work.mkdir()
    data = work / "long.json"
    data.write_text(json.dumps(LONG_RECORDS))
    deepspeed = os.path.join(ROOT, "ds_configs", "zero3_cpu.json")
    if reuse is not None:
        ds = json.load(open(deepspeed))
        ds["zero_optimization"]["stage3_max_reuse_distance"] = reuse
        deepspeed = str(work / "zero3_cpu_reuse.json")
        json.dump(ds, open(deepspeed, "w"))
    config = {"model": {"name_or_path": preset, "num_layers": layers},
              "method": {"method": "lora", "sibo_lambda": 0.1},
              "data": {"train_file": str(data), "val_set_size": 0, "cutoff_len": cutoff},
              "train": {"micro_batch_size": micro, "global_batch_size": micro * ranks, "max_steps": 2,
                        "warmup_steps": 0, "save_every": 0, "eval_every": 0, "gradient_checkpointing": checkpointing},
              "deepspeed": deepspeed, "output_dir": str(work / "run")}
    path = work / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    predicted = planner.plan(load_config(str(path)), ranks, ranks, backend="gloo")["non_cuda_total"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), os.path.join(ROOT, "tests", "memory_train.py"), str(path),
           str(work / "memory")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    rows = [json.load(open(work / f"memory.rank{k}.json")) for k in range(ranks)]
    assert all(row["steps"] == 2 for row in rows)
    return predicted, max(row["above_baseline"] for row in rows)


@pytest.mark.slow
def test_prediction_matches_measured_peak_of_real_training_steps(tmp_path):
    results = {name: measure(tmp_path, name, *case) for name, case in CASES.items()}
    table = "\n".join(f"{name:48s} predicted {p / 2**30:6.3f} GiB  measured {m / 2**30:6.3f} GiB  {p / m - 1:+.1%}"
                      for name, (p, m) in results.items())
    print(table)
    for name, (predicted, measured) in results.items():
        assert abs(predicted / measured - 1) <= TOLERANCE, table


# ---- host memory while the backbone loads ----------------------------------------------------------------
LOAD_RECORDS = [{"instruction": "Add 2 and 3.", "input": "", "output": "5"}] * 8


@pytest.fixture(scope="module")
def billion_dirs(tmp_path_factory):
    """llama-7b-shape cut to 4 layers (1.07B parameters) in bf16, as 4 safetensors shards and as 3 .bin shards."""
    from launch import bin_model_dir

    from peft_ds import models

    root = tmp_path_factory.mktemp("billion")
    st = str(root / "safetensors")
    model = build_preset("llama-7b-shape", num_layers=4, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) >= 1e9
    model.save_pretrained(st, max_shard_size="700MB")
    models.write_tokenizer("llama-7b-shape", st)
    del model
    return {"safetensors": st, "bin": bin_model_dir(st, root / "bin", shards=3)}


@pytest.mark.slow
def test_host_peak_while_the_backbone_loads_matches_the_plan(billion_dirs, tmp_path):
    """Predicted host bytes above the process (rank 0, which reads the checkpoint, and rank 1, which
    receives it) against the measured VmRSS peak of real loads on CPU ranks, within 15%."""
    data = tmp_path / "data.json"
    data.write_text(json.dumps(LOAD_RECORDS))
    rows = []
    for fmt, directory in billion_dirs.items():
        assert len(planner.checkpoint_shards(directory)) >= 3
        for ranks in (1, 2):
            work = tmp_path / f"{fmt}-w{ranks}"
            config = {"model": {"name_or_path": directory, "dtype": "bf16"},
                      "method": {"method": "lora", "sibo_lambda": 0.1},
                      "data": {"train_file": str(data), "val_set_size": 0, "cutoff_len": 32},
                      "train": {"micro_batch_size": 1, "global_batch_size": ranks, "max_steps": 1},
                      "deepspeed": os.path.join(ROOT, "ds_configs", "zero3_bf16.json"), "output_dir": str(work / "run")}
            work.mkdir()
            (work / "run.yaml").write_text(yaml.safe_dump(config))
            load = planner.plan(load_config(str(work / "run.yaml")), ranks, ranks, backend="gloo")["host_at_load"]
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
                   "127.0.0.1", "--master_port", str(free_port()), os.path.join(ROOT, "tests", "memory_load.py"),
                   str(work / "run.yaml"), str(work / "memory")]
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
            for rank in range(ranks):
                measured = json.load(open(work / f"memory.rank{rank}.json"))["above_baseline"]
                terms = load["rank0" if rank == 0 else "other"]
                predicted = sum(terms.values()) - terms["process"]
                rows.append((f"{fmt}, {ranks} rank(s), rank {rank}", predicted, measured))
    table = "\n".join(f"{name:30s} predicted {p / 2**30:6.3f} GiB  measured {m / 2**30:6.3f} GiB  {p / m - 1:+.1%}"
                      for name, p, m in rows)
    print(table)
    assert all(abs(p / m - 1) <= TOLERANCE for _, p, m in rows), table


def test_host_verdict_at_load_and_its_refusal(tmp_path):
    """Per rank and per node: rank 0's memory-mapped checkpoint beside every rank's allowance; --host-memory
    gives the verdict, and --require-fit refuses in one line when the node of rank 0 cannot hold it."""
    from launch import bin_model_dir

    from peft_ds.models import write_preset

    base = bin_model_dir(write_preset("tiny-llama", str(tmp_path / "st")), tmp_path / "bin", shards=2)
    args = ["plan", FLAGSHIP, "--set", f"model.name_or_path={base}", "--set",
            f"data.train_file={os.path.join(ROOT, 'peft_ds', 'assets', 'math_sample.json')}", "--nodes", "2",
            "--gpus-per-node", "8"]
    r = peft_ds(*args, "--json", "--host-memory", "64")
    assert r.returncode == 0, r.stderr
    load = json.loads(r.stdout)["host_at_load"]
    shards = sum(os.path.getsize(os.path.join(base, f)) for f in os.listdir(base) if f.endswith(".bin"))
    assert load["shards"] == 2 and load["formats"] == ["bin"] and load["rank0"]["checkpoint_pages"] == shards
    assert load["other"]["checkpoint_pages"] == 0 and load["rank0"]["load_partition"] == 0  # GPUs hold partitions
    allowance = int(planner.HOST_PROCESS_GIB["nccl"] * planner.GiB)
    assert load["node0_total"] == shards + 8 * allowance and load["node_total"] == 8 * allowance and load["fits"]
    r = peft_ds(*args, "--host-memory", "8", "--require-fit")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "does not fit the host while the backbone loads" in lines[0]
    assert "host total: rank 0" in r.stdout and "does NOT fit in --host-memory 8 GiB" in r.stdout
