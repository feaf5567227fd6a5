"""The presets: the real widths are the published configs (parameter counts on the meta device), and
`num_layers` / `model.num_layers` cuts a preset's depth everywhere a preset is used."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from peft_ds import PeftDsError, PeftSpec, apply_peft
from peft_ds.adapter_io import preset_depth, read_adapter_config, save_adapter
from peft_ds.config import load_config
from peft_ds.models import build_preset, build_skeleton, check_model_source, preset_fields, write_preset


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_llama_shapes_have_the_published_parameter_counts():
    """LLaMA-7B: 6,738,415,616 and LLaMA-13B: 13,015,864,320 parameters (the released checkpoints)."""
    assert _count(build_skeleton("llama-7b-shape")) == 6_738_415_616
    assert _count(build_skeleton("llama-13b-shape")) == 13_015_864_320
    seven = build_skeleton("llama-7b-shape").config
    assert (seven.hidden_size, seven.intermediate_size, seven.num_attention_heads, seven.num_key_value_heads,
            seven.num_hidden_layers, seven.vocab_size, seven.rms_norm_eps, seven.tie_word_embeddings) == \
        (4096, 11008, 32, 32, 32, 32000, 1e-6, False)


def test_gptj_shape_is_gpt_j_6b():
    model = build_skeleton("gptj-6b-shape")
    c = model.config
    assert (c.n_embd, c.n_head, c.n_layer, c.rotary_dim, c.vocab_size, c.n_positions, c.activation_function,
            c.layer_norm_epsilon, c.tie_word_embeddings) == (4096, 16, 28, 64, 50400, 2048, "gelu_new", 1e-5, False)
    h, v, inner = 4096, 50400, 16384  # n_inner null: 4 x n_embd
    block = 2 * h + 4 * h * h + (h * inner + inner) + (inner * h + h)
    assert tuple(model.transformer.h[0].mlp.fc_in.weight.shape) == (inner, h)
    assert _count(model) == v * h + 28 * block + 2 * h + (h * v + v)


@pytest.mark.parametrize("name", ["llama-7b-shape", "gptj-6b-shape", "tiny-llama"])
def test_num_layers_cuts_only_the_depth(name):
    full, cut = build_skeleton(name).config.to_dict(), build_skeleton(name, 2).config.to_dict()
    depth = "n_layer" if full["model_type"] == "gptj" else "num_hidden_layers"
    assert cut[depth] == 2 and {k: v for k, v in cut.items() if k != depth} == \
        {k: v for k, v in full.items() if k != depth}


def test_cut_preset_keeps_the_weights_of_its_layers():
    """The init is seeded per parameter name: a cut preset is the first layers of the whole one."""
    whole, cut = build_preset("tiny-llama"), dict(build_preset("tiny-llama", num_layers=2).named_parameters())
    assert len(cut) < len(dict(whole.named_parameters()))
    for name, param in whole.named_parameters():
        if name in cut:
            assert torch.equal(param, cut[name]), name


def test_init_values_do_not_depend_on_the_number_of_threads(monkeypatch):
    """The preset init draws its blocks on a pool of torch.get_num_threads() threads: the same weights on 1 and
    on 4 threads, and block b of a parameter is the draw of the generator seeded with (seed, name, b)."""
    import zlib

    import peft_ds.models as models

    monkeypatch.setattr(models, "INIT_BLOCK", 1000)  # several blocks in every matrix
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = build_preset("tiny-llama", num_layers=1)
        torch.set_num_threads(4)
        four = dict(build_preset("tiny-llama", num_layers=1).named_parameters())
    finally:
        torch.set_num_threads(threads)
    for name, param in one.named_parameters():
        assert torch.equal(param, four[name]), name
    name = "model.layers.0.self_attn.q_proj.weight"
    weight = four[name].detach().view(-1)
    block = 1000 // four[name].shape[1] * four[name].shape[1]
    assert weight.numel() > 2 * block
    g = torch.Generator().manual_seed(models.PRESET_SEED * 1_000_003 + zlib.crc32(f"{name}:1".encode()))
    drawn = torch.empty(block).normal_(0.0, one.config.initializer_range, generator=g)
    assert torch.equal(weight[block:2 * block], drawn)


def test_num_layers_is_refused_for_a_directory_and_below_one(tmp_path):
    write_preset("tiny-llama", str(tmp_path / "m"), num_layers=1)
    with pytest.raises(PeftDsError, match="always taken whole"):
        check_model_source(str(tmp_path / "m"), 2)
    for bad in (0, -1, True):
        with pytest.raises(PeftDsError, match="model.num_layers must be an integer >= 1"):
            check_model_source("tiny-llama", bad)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "peft_ds", *args], capture_output=True, text=True, cwd=ROOT)


def test_check_refuses_num_layers_for_a_directory_in_one_line(tmp_path):
    write_preset("tiny-llama", str(tmp_path / "m"))
    r = _cli("check", os.path.join(ROOT, "configs", "demo_tiny_llama_lora_sibo.yaml"), "--world-size", "2",
             "--set", f"model.name_or_path={tmp_path / 'm'}", "--set", "model.num_layers=1",
             "--set", f"output_dir={tmp_path / 'run'}")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "always taken whole" in r.stderr
    assert not (tmp_path / "run").exists()
    r = _cli("check", os.path.join(ROOT, "configs", "demo_tiny_llama_lora_sibo.yaml"), "--world-size", "2",
             "--set", "model.name_or_path=llama-13b-shape", "--set", "model.num_layers=1",
             "--set", f"output_dir={tmp_path / 'run'}")
    assert r.returncode == 0, r.stderr


def test_cli_preset_writes_a_cut_real_config(tmp_path):
    r = _cli("preset", "tiny-gptj", str(tmp_path / "g"), "--num-layers", "1")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "g" / "config.json").read_text())["n_layer"] == 1
    r = _cli("preset", "llama-7b-shape", str(tmp_path / "l"), "--num-layers", "0")
    assert r.returncode == 2 and "--num-layers must be >= 1" in r.stderr and not (tmp_path / "l").exists()


def test_run_config_takes_num_layers():
    assert load_config(None, ["model.name_or_path=llama-7b-shape", "model.num_layers=2"]).model.num_layers == 2
    with pytest.raises(PeftDsError, match="model.num_layers must be of type int"):
        load_config(None, ["model.num_layers=two"])


def test_an_adapter_rebuilds_its_preset_at_the_depth_it_was_trained_on(tmp_path):
    model = apply_peft(build_preset("tiny-llama", num_layers=2), PeftSpec(method="lora", r=4, alpha=8))
    save_adapter(model, str(tmp_path / "a"), base_model="tiny-llama")
    config = read_adapter_config(str(tmp_path / "a"))
    assert preset_depth(config, "tiny-llama", None) == 2 and preset_depth(config, "tiny-llama", 3) == 3
    from peft_ds.evaluation import _check_adapter

    assert _check_adapter(str(tmp_path / "a"), "tiny-llama", None) == 2
    with pytest.raises(PeftDsError, match="was trained on"):
        _check_adapter(str(tmp_path / "a"), "tiny-llama", 4)
    assert preset_fields("tiny-llama", 2)["num_hidden_layers"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("name,threshold", [("tiny-llama", 0), ("tiny-gptj", 3000), ("tiny-qwen2", 100)])
def test_zero3_ranks_draw_their_own_partitions_of_the_same_weights(tmp_path, name, threshold):
    """Under ZeRO-3 each rank draws only its partition's blocks (persisted parameters whole): gathered on 2 ranks,
    every parameter and buffer equals the plain build's, bit for bit (transformers' own ZeRO-3 init is skipped)."""
    from launch import free_port

    out = tmp_path / "zero3.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), os.path.join(ROOT, "tests", "zero3_build.py"), name, "2",
           str(threshold), str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    partitioned = torch.load(out, weights_only=True)
    model = build_preset(name, num_layers=2)
    plain = {**{n: p.data for n, p in model.named_parameters()}, **{f"buffer:{n}": b for n, b in model.named_buffers()}}
    assert partitioned.keys() == plain.keys() and any(n.startswith("buffer:") for n in plain)
    for n, tensor in partitioned.items():
        assert torch.equal(tensor, plain[n]), n
