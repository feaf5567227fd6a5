"""`peft-ds consolidate` on checkpoints of real 1-, 2- and 3-rank ZeRO-3 runs: tensors bit for bit
equal to DeepSpeed's own reconstruction and to the live fp32 masters at save time; PEFT export and
merge-into-base give the adapter model's logits; every refusal leaves the output untouched; a tampered
tensor is caught by `peft_ds.load_adapter`; an output never replaces the checkpoint or base it reads, a
--force replacement killed at any step leaves the previous output, modes follow the umask."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from launch import ROOT, adapter, bin_model_dir, peft_ds, torchrun, write_config
from safetensors.torch import load_file

from peft_ds import load_adapter
from peft_ds.consolidate import open_checkpoint, read_state
from peft_ds.errors import PeftDsError
from peft_ds.models import build_preset, write_preset

pytestmark = pytest.mark.slow

TRAIN = dict(micro_batch_size=1, global_batch_size=6, max_steps=2, lr=1.0e-2)
# Sizes not divisible by the world size: learnable SIBO's theta (1 element), BiLoRA r = 3 (E: 3),
# r = 4 on hidden 256 (1024 elements) at 3 ranks; adapters on a checkpoint holding frozen fragments.
RUNS = {
    2: {
        "llama_lora": ("tiny-llama", {"method": "lora", "r": 4, "alpha": 8}, {"save_every": 1}),
        "llama_lora_sibo": ("tiny-llama", {"method": "lora", "r": 4, "alpha": 8, "sibo_lambda": 0.2,
                                           "sibo_learnable": True}, {}),
        "llama_adamix_lora": ("tiny-llama", {"method": "adamix_lora", "r": 4, "alpha": 8, "num_experts": 3}, {}),
        "gptj_bilora": ("tiny-gptj", {"method": "bilora", "r": 3, "alpha": 6}, {}),
        "gptj_adapter_frozen": ("tiny-gptj", {"method": "adapter", "bottleneck_size": 5}, {"save_frozen_params": True}),
    },
    3: {
        "llama_lora": ("tiny-llama", {"method": "lora", "r": 4, "alpha": 8}, {}),
        "gptj_adamix_adapter": ("tiny-gptj", {"method": "adamix_adapter", "bottleneck_size": 7, "num_experts": 2}, {}),
    },
    1: {
        "gptj_lora": ("tiny-gptj", {"method": "lora", "r": 3, "alpha": 6, "sibo_lambda": 0.1}, {}),
    },
}


class TrainedRuns:
    """Run directories by (name, world size); the runs of a world size are trained, in one launch, when
    the first of them is asked for (a test selected with -k trains only what it uses)."""

    def __init__(self, tmp):
        self.tmp, self.trained = tmp, set()

    def __getitem__(self, key):
        name, world = key
        if world not in self.trained:
            paths = [write_config(self.tmp / f"{other}_ws{world}.yaml", self.tmp / f"{other}_ws{world}", model=model,
                                  method=method, **{**TRAIN, **extra})
                     for other, (model, method, extra) in RUNS[world].items()]
            torchrun(world, paths)
            self.trained.add(world)
        return self.tmp / f"{name}_ws{world}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return TrainedRuns(tmp_path_factory.mktemp("consolidate_runs"))


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bases")
    return {name: write_preset(name, str(tmp / name)) for name in ("tiny-llama", "tiny-gptj")}


def consolidate(*args):
    return peft_ds("consolidate", *map(str, args), "--quiet")


def run_ok(*args):
    r = consolidate(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def batch():
    g = torch.Generator().manual_seed(5)
    return torch.randint(3, 1000, (2, 16), generator=g)


@torch.no_grad()
def logits(model):
    return model.eval()(batch()).logits


def adapter_model(model_name, adapter_dir):
    return load_adapter(build_preset(model_name), str(adapter_dir))


# ---- reconstruction ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [(name, world) for world, configs in RUNS.items() for name in configs],
                         ids=lambda k: f"{k[0]}-ws{k[1]}")
def test_tensors_equal_deepspeed_and_live_masters(runs, key, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run_dir = runs[key]
    ckpt = open_checkpoint(str(run_dir))
    assert ckpt.world_size == key[1] and ckpt.tag == "step2"
    ours = read_state(str(run_dir))
    theirs = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag="step2",
                                                      exclude_frozen_parameters=True)
    live = adapter(run_dir)  # safe_get_full_fp32_param of every adapter parameter, right after the save
    assert list(ours) == list(theirs) and set(ours) == set(live)
    for name, value in ours.items():
        assert value.dtype == torch.float32
        assert torch.equal(value, theirs[name].contiguous()), name
        assert torch.equal(value, live[name]), name
    # the command writes exactly these tensors (experts kept, nothing folded)
    run_ok(run_dir, "--out", tmp_path / "native", "--keep-experts")
    written = load_file(str(tmp_path / "native" / "adapter.safetensors"))
    assert set(written) == set(ours) and all(torch.equal(written[k], ours[k]) for k in ours)
    config = json.loads((tmp_path / "native" / "adapter_config.json").read_text())
    assert config["source"]["world_size"] == key[1] and config["source"]["tag"] == "step2"
    assert config["peft_spec"]["method"] == RUNS[key[1]][key[0]][1]["method"] and len(config["sha256"]) == len(ours)
    assert config["base"]["config_sha256"]


@pytest.mark.parametrize("world", [2, 3])
def test_padding_is_exercised(runs, world):
    odd = [(name, k) for name in RUNS[world] for k, v in read_state(str(runs[(name, world)])).items()
           if v.numel() % world]
    assert odd, f"no tensor at world size {world} has a size that needs padding"


def test_frozen_fragments_left_unread(runs, tmp_path):
    run_dir = runs[("gptj_adapter_frozen", 2)]
    states = torch.load(str(run_dir / "checkpoints" / "step2" / "zero_pp_rank_0_mp_rank_00_model_states.pt"),
                        map_location="cpu", weights_only=True, mmap=True)
    assert len(states["frozen_param_fragments"]) > 0  # the backbone's shards are in the file
    assert open_checkpoint(str(run_dir)).frozen_fragments
    r = run_ok(run_dir, "--out", tmp_path / "out")
    assert "frozen backbone fragments left unread" in r.stdout


def test_tag_and_dtype(runs, tmp_path):
    run_dir = runs[("llama_lora", 2)]
    step1 = read_state(str(run_dir), tag="step1")
    assert not torch.equal(step1["model.layers.0.self_attn.q_proj.lora_B"],
                           read_state(str(run_dir))["model.layers.0.self_attn.q_proj.lora_B"])
    # a tag directory given directly, bf16 output
    r = run_ok(run_dir / "checkpoints" / "step1", "--out", tmp_path / "bf16", "--dtype", "bf16")
    assert "from step1 of 2 rank(s)" in r.stdout and "tensors" in r.stdout
    written = load_file(str(tmp_path / "bf16" / "adapter.safetensors"))
    assert all(written[k].dtype == torch.bfloat16 and torch.equal(written[k], step1[k].bfloat16()) for k in step1)


# ---- load_adapter, PEFT export, merge into base -----------------------------------------------------------


@pytest.mark.parametrize("name,model_name", [("llama_lora", "tiny-llama"), ("llama_adamix_lora", "tiny-llama"),
                                             ("gptj_bilora", "tiny-gptj")])
def test_peft_export_gives_load_adapter_logits(runs, name, model_name, tmp_path):
    from peft import PeftModel

    run_dir = runs[(name, 2)]
    run_ok(run_dir, "--out", tmp_path / "native")  # AdaMix averaged; BiLoRA kept as P, E, Q
    run_ok(run_dir, "--out", tmp_path / "peft", "--format", "peft")
    ours = logits(adapter_model(model_name, tmp_path / "native"))
    peft_model = PeftModel.from_pretrained(build_preset(model_name), str(tmp_path / "peft"))
    theirs = logits(peft_model)
    base = logits(build_preset(model_name))
    assert (ours - base).abs().max() > 1e-3  # the adapter changes the logits well beyond the tolerance
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,model_name", [("llama_lora", "tiny-llama"), ("llama_adamix_lora", "tiny-llama"),
                                             ("gptj_bilora", "tiny-gptj")])
def test_merge_into_base_loads_with_plain_transformers(runs, base_dirs, name, model_name, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = runs[(name, 2)]
    run_ok(run_dir, "--out", tmp_path / "native")
    r = run_ok(run_dir, "--out", tmp_path / "merged", "--merge-into-base", base_dirs[model_name])
    assert "merged model" in r.stdout
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), local_files_only=True)
    assert os.path.isfile(tmp_path / "merged" / "tokenizer.model")
    torch.testing.assert_close(logits(merged), logits(adapter_model(model_name, tmp_path / "native")),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shards", [1, 3])
def test_merge_into_a_bin_base_writes_safetensors(runs, base_dirs, tmp_path, shards):
    """A base of .bin weights (one pytorch_model.bin, or shards with an index) merges into safetensors
    shards (transformers' names, an index of their own when sharded), equal to the merge into the same
    base as safetensors; no .bin is left in the output."""
    from safetensors.torch import load_file

    base = bin_model_dir(base_dirs["tiny-llama"], tmp_path / "bin_base", shards=shards)
    run_ok(runs[("llama_lora", 2)], "--out", tmp_path / "from_st", "--merge-into-base", base_dirs["tiny-llama"])
    r = run_ok(runs[("llama_lora", 2)], "--out", tmp_path / "from_bin", "--merge-into-base", base)
    names = sorted(os.listdir(tmp_path / "from_bin"))
    assert not any(n.endswith(".bin") or n == "pytorch_model.bin.index.json" for n in names), names
    assert "left out" not in r.stdout
    if shards == 1:
        assert "model.safetensors" in names
        files = ["model.safetensors"]
    else:
        index = json.loads((tmp_path / "from_bin" / "model.safetensors.index.json").read_text())["weight_map"]
        files = sorted(set(index.values()))
        assert files == [f"model-{k:05d}-of-00003.safetensors" for k in (1, 2, 3)] and set(files) <= set(names)
    ours = {k: v for f in files for k, v in load_file(str(tmp_path / "from_bin" / f)).items()}
    theirs = load_file(str(tmp_path / "from_st" / "model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_merge_into_base_leaves_out_other_weights(runs, base_dirs, tmp_path):
    """A base directory with .bin weights too (as many LLaMA-7B directories have): the merged model has
    only the merged safetensors, configuration, tokenizer and generation files; the rest is named."""
    base = tmp_path / "base"
    shutil.copytree(base_dirs["tiny-llama"], base)
    stale = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json",
             "README.md"]
    for name in stale:
        (base / name).write_bytes(b"unmerged")
    (base / "original").mkdir()
    (base / "original" / "consolidated.00.pth").write_bytes(b"unmerged")
    (base / "generation_config.json").write_text('{"bos_token_id": 1, "eos_token_id": 2}')
    r = consolidate(runs[("llama_lora", 2)], "--out", tmp_path / "merged", "--merge-into-base", base)
    assert r.returncode == 0, r.stderr[-3000:]
    merged = sorted(os.listdir(tmp_path / "merged"))
    assert not set(stale + ["original"]) & set(merged)
    assert {"config.json", "generation_config.json", "tokenizer.model", "model.safetensors",
            "peft_ds_merge.json"} <= set(merged)
    assert all(name.endswith(".json") or name in ("tokenizer.model", "model.safetensors") for name in merged), merged
    assert "left out of the merged model" in r.stdout and all(name in r.stdout for name in stale + ["original"])
    with open(tmp_path / "merged" / "peft_ds_merge.json") as f:
        assert sorted(json.load(f)["base_files_left_out"]) == sorted(stale + ["original"])


def test_load_adapter_keeps_sibo_for_generation(runs, tmp_path):
    run_dir = runs[("llama_lora_sibo", 2)]
    run_ok(run_dir, "--out", tmp_path / "native")
    model = adapter_model("tiny-llama", tmp_path / "native")
    assert model.peft_spec.sibo and model.peft_spec.sibo_learnable
    trained = adapter_model("tiny-llama", run_dir / "adapter")  # train's own export of the same step
    torch.testing.assert_close(logits(model), logits(trained), rtol=0, atol=0)
    prompt = batch()[:1, :6]
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


def test_tampered_tensor_is_reported(runs, tmp_path):
    run_ok(runs[("llama_lora", 2)], "--out", tmp_path / "native")
    path = tmp_path / "native" / "adapter.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # one bit of the last tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(PeftDsError, match="sha256"):
        adapter_model("tiny-llama", tmp_path / "native")


# ---- refusals ---------------------------------------------------------------------------------------------


def copy_run(run_dir, tmp_path, name="copy"):
    target = tmp_path / name
    shutil.copytree(run_dir / "checkpoints", target / "checkpoints")
    return target


def edit_meta(run, **changes):
    path = run / "checkpoints" / "step2" / "peft_ds_checkpoint.json"
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            meta[section][field] = value
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))


def snapshot(directory):
    return {p: open(os.path.join(d, p), "rb").read() for d, _, files in os.walk(directory) for p in files}


def assert_refused(args, out, message, force=True):
    """Exit 2 with one error line naming the problem; the existing output is untouched, no leftovers."""
    before = snapshot(out)
    r = consolidate(*args, "--out", out, *(["--force"] if force else []))
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("peft-ds: error:") and message in lines[0], r.stderr
    assert snapshot(out) == before
    assert not [p for p in os.listdir(os.path.dirname(out)) if ".partial-" in p]


def refusal_cases(runs, tmp_path):
    lora2, lora3 = runs[("llama_lora", 2)], runs[("llama_lora", 3)]
    cases = {}

    run = copy_run(lora2, tmp_path, "missing")
    os.remove(run / "checkpoints" / "step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    cases["missing rank file"] = ([run], "missing rank file zero_pp_rank_1_mp_rank_00_optim_states.pt")

    run = copy_run(lora2, tmp_path, "mixed_tags")
    shutil.copyfile(run / "checkpoints" / "step1" / "zero_pp_rank_1_mp_rank_00_model_states.pt",
                    run / "checkpoints" / "step2" / "zero_pp_rank_1_mp_rank_00_model_states.pt")
    cases["mixed tags"] = ([run], "rank files of different saves are mixed")

    run = copy_run(lora2, tmp_path, "world_size")
    for kind in ("model", "optim"):
        shutil.copyfile(lora3 / "checkpoints" / "step2" / f"zero_pp_rank_1_mp_rank_00_{kind}_states.pt",
                        run / "checkpoints" / "step2" / f"zero_pp_rank_1_mp_rank_00_{kind}_states.pt")
    cases["world size mismatch"] = ([run], "written by a run of 3 ranks")

    run = copy_run(lora2, tmp_path, "extra_rank")
    for kind in ("model", "optim"):
        shutil.copyfile(lora3 / "checkpoints" / "step2" / f"zero_pp_rank_2_mp_rank_00_{kind}_states.pt",
                        run / "checkpoints" / "step2" / f"zero_pp_rank_2_mp_rank_00_{kind}_states.pt")
    cases["extra rank"] = ([run], "more rank files than its world size 2")

    run = copy_run(lora2, tmp_path, "shape")
    meta = json.loads((run / "checkpoints" / "step2" / "peft_ds_checkpoint.json").read_text())
    edit_meta(run, peft_spec={**meta["peft_spec"], "r": 8})
    cases["shape mismatch"] = ([run], "has shape (4, 256), but the config's r is 8")

    run = copy_run(lora2, tmp_path, "mixed_runs")
    for kind in ("model", "optim"):
        shutil.copyfile(runs[("llama_lora_sibo", 2)] / "checkpoints" / "step2" / f"zero_pp_rank_1_mp_rank_00_{kind}_states.pt",
                        run / "checkpoints" / "step2" / f"zero_pp_rank_1_mp_rank_00_{kind}_states.pt")
    cases["mixed runs"] = ([run], "lists other parameters or shapes than rank 0")

    run = copy_run(lora2, tmp_path, "method")
    edit_meta(run, method="bilora", peft_spec={**meta["peft_spec"], "method": "bilora"},
              config__method={**meta["config"]["method"], "method": "bilora"})
    cases["method"] = ([run], "holds lora parameters, but its config says method bilora")

    run = copy_run(lora2, tmp_path, "truncated")
    path = run / "checkpoints" / "step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    path.write_bytes(path.read_bytes()[:1000])
    cases["truncated"] = ([run], "cannot read")

    cases["unknown tag"] = ([lora2, "--tag", "step7"], "step7")
    cases["peft adapter"] = ([runs[("gptj_adapter_frozen", 2)], "--format", "peft"], "use --format native")
    cases["peft sibo"] = ([runs[("llama_lora_sibo", 2)], "--format", "peft"], "SIBO is on")
    cases["merge sibo"] = ([runs[("llama_lora_sibo", 2)], "--merge-into-base", lora2], "LoRA-SIBO cannot be merged")
    cases["peft experts"] = ([runs[("llama_adamix_lora", 2)], "--format", "peft", "--keep-experts"], "--keep-experts")
    cases["merge other base"] = ([lora2, "--merge-into-base", "GPTJ_BASE"], "the adapter was trained on")
    return cases


def test_refusals_leave_output_untouched(runs, base_dirs, tmp_path):
    out = tmp_path / "outputs" / "existing"
    out.mkdir(parents=True)
    (out / "adapter_config.json").write_text('{"keep": "me"}')
    for case, (args, message) in refusal_cases(runs, tmp_path).items():
        args = [base_dirs["tiny-gptj"] if a == "GPTJ_BASE" else a for a in args]
        assert_refused(args, str(out), message)
    # an existing output without --force, for a checkpoint that is fine
    assert_refused([runs[("llama_lora", 2)]], str(out), "exists (use --force", force=False)
    # --force replaces it, once the new output is complete
    run_ok(runs[("llama_lora", 2)], "--out", out, "--force")
    assert json.loads((out / "adapter_config.json").read_text())["format"] == "peft-ds-adapter"


def test_help_lists_the_options():
    r = peft_ds("consolidate", "--help")
    assert r.returncode == 0
    for option in ("--tag", "--format", "--merge-into-base", "--dtype", "--force", "--keep-experts", "--fold"):
        assert option in r.stdout


# ---- outputs: never over the input, never half-swapped, never private (issue 14) ---------------------------


def copy_whole_run(run_dir, tmp_path, name):
    target = tmp_path / name
    shutil.copytree(run_dir, target, symlinks=True)
    return target


def refused(args, message):
    """Exit 2 with one `peft-ds: error:` line naming the problem."""
    r = consolidate(*args)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("peft-ds: error:"), r.stdout + r.stderr
    assert message in lines[0], lines[0]


def test_output_never_replaces_the_checkpoint_or_base(runs, base_dirs, tmp_path):
    run = copy_whole_run(runs[("llama_lora", 2)], tmp_path, "run")
    base = tmp_path / "base"
    shutil.copytree(base_dirs["tiny-llama"], base)
    os.symlink(run, tmp_path / "run_link")
    before = (snapshot(run), snapshot(base), sorted(os.listdir(tmp_path)))
    cases = [
        ([run, "--out", run], "is the run directory"),
        ([run / "checkpoints" / "step2", "--out", run], "is the run directory"),
        ([run, "--out", tmp_path], "contains the run directory"),
        ([run, "--out", run / "checkpoints"], "is the checkpoint directory"),
        ([run, "--out", run / "checkpoints" / "step2"], "lies inside the checkpoint directory"),
        ([run, "--out", run / "checkpoints" / "step1"], "lies inside the checkpoint directory"),
        ([run, "--out", run / "config.yaml"], "is the run's config.yaml"),
        ([run, "--out", run / "metrics.jsonl"], "is the run's metrics.jsonl"),
        ([run, "--out", run / "adapter"], "is the run's adapter"),
        ([run, "--out", run / "adapter" / "sub"], "lies inside the run's adapter"),
        ([run, "--out", tmp_path / "run_link" / "checkpoints" / ".." / "checkpoints" / "step2"],
         "lies inside the checkpoint directory"),
        ([tmp_path / "run_link", "--out", run], "is the run directory"),
        ([run, "--out", base, "--merge-into-base", base], "is the base model directory"),
        ([run, "--out", base / "merged", "--merge-into-base", base], "lies inside the base model directory"),
    ]
    for args, message in cases:
        refused([*args, "--force"], message)
        assert (snapshot(run), snapshot(base), sorted(os.listdir(tmp_path))) == before, args
    # relative to the working directory
    r = subprocess.run([sys.executable, "-m", "peft_ds", "consolidate", "run", "--out",
                        "run/checkpoints/../checkpoints", "--force", "--quiet"], cwd=tmp_path, capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 2 and "is the checkpoint directory" in r.stderr and snapshot(run) == before[0]
    # a new directory inside the run, beside its checkpoints (as the Slurm job's consolidated/), is fine
    run_ok(run, "--out", run / "consolidated", "--force")
    run_ok(run, "--out", run / "consolidated", "--force")
    assert {"adapter.safetensors", "adapter_config.json"} == set(os.listdir(run / "consolidated"))


def test_unwritable_output_is_refused_before_reading(runs, tmp_path):
    from faults import read_only_dir

    run_dir = runs[("llama_lora", 2)]
    with read_only_dir(tmp_path / "ro") as ro:
        refused([run_dir, "--out", os.path.join(ro, "adapters", "x")], "cannot be written: no new file can be made")
        assert os.listdir(ro) == []
    (tmp_path / "file").write_text("x")
    refused([run_dir, "--out", tmp_path / "file" / "x"], "is not a directory")
    assert sorted(os.listdir(tmp_path)) == ["file", "ro"]


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
def test_force_replacement_killed_at_every_step(runs, tmp_path, monkeypatch, swap):
    """--force over an existing output, killed at each file-system step: the previous output stays
    whole at --out (or the next run puts it back first), and the next run leaves no leftover."""
    from faults import Killed, kill_at, without_exchange

    from peft_ds.consolidate import consolidate as run

    if swap == "two renames":
        without_exchange(monkeypatch)
    run_dir = runs[("llama_lora", 2)]
    out = str(tmp_path / "adapter")

    def tensors_of(path):
        return {k: v.tolist() for k, v in load_file(os.path.join(path, "adapter.safetensors")).items()}

    run(str(run_dir), out, tag="step1", progress=False)
    old = tensors_of(out)
    with kill_at(monkeypatch) as seen:
        run(str(run_dir), out, force=True, progress=False)
    new = tensors_of(out)
    assert old != new
    outcomes = set()
    for step in range(seen["steps"]):
        run(str(run_dir), out, tag="step1", force=True, progress=False)
        with kill_at(monkeypatch, step), pytest.raises(Killed):
            run(str(run_dir), out, force=True, progress=False)
        if not os.path.exists(out):
            # killed between the two renames: the next run puts the previous output back before it
            # considers --force (so without it, it refuses to replace what it put back)
            assert swap == "two renames"
            with pytest.raises(PeftDsError, match="exists"):
                run(str(run_dir), out, progress=False)
            outcomes.add("put back")
        adapter_model("tiny-llama", out)  # whole: loads, every checksum holds
        outcomes.add("new" if tensors_of(out) == new else "old")
        assert tensors_of(out) in (old, new)
        run(str(run_dir), out, force=True, progress=False)
        assert tensors_of(out) == new and os.listdir(tmp_path) == ["adapter"], os.listdir(tmp_path)
    assert outcomes == ({"old", "new"} if swap == "exchange" else {"old", "new", "put back"})


@pytest.mark.parametrize("mask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_output_modes_follow_the_umask(runs, tmp_path, mask):
    previous = os.umask(mask)
    try:
        run_ok(runs[("llama_lora", 2)], "--out", tmp_path / "native")
        run_ok(runs[("llama_lora", 2)], "--out", tmp_path / "peft", "--format", "peft")
    finally:
        os.umask(previous)
    from faults import assert_modes_follow

    assert_modes_follow(mask, tmp_path / "native", tmp_path / "peft")
