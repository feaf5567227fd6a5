"""The LLaMA family beyond LLaMA-1 (issue 18.2), tested like tiny-llama: `tiny-llama3` (grouped-query
attention, llama3 rope scaling, a tokenizer.json without tokenizer.model), `tiny-mistral` (sliding
window) and `tiny-qwen2` (q/k/v biases, tied embeddings): LoRA equals HF PEFT at lambda = 0, SIBO
equals its reference, every method trains with gradients everywhere, generation with a KV cache equals
generation without; 2 ranks == 1 rank under ZeRO-3 (from a preset, a model directory written by
`peft-ds preset`, and a Hugging Face model id in a local cache); consolidation, PEFT export, merge into
base and evaluation. Any other model_type is refused naming the supported ones; a model id absent from
the cache says how to download it."""

import json
import os
import re

import pytest
import torch
from conftest import randomize_adapters, random_batch, tiny
from launch import MATH, adapter, assert_same_adapter, bin_model_dir, losses, peft_ds, torchrun, write_config
import test_lora
import test_sibo

import peft_ds as api
from peft_ds import models
from peft_ds.architectures import ARCHITECTURES
from peft_ds.consolidate import consolidate, read_state
from peft_ds.errors import PeftDsError
from peft_ds.injection import adapter_parameters, adapter_shapes

FAMILIES = ["tiny-llama3", "tiny-mistral", "tiny-qwen2"]
FIXTURES = os.path.join(os.path.dirname(MATH), "eval")


def attention(model, layer=0):
    return model.get_submodule(ARCHITECTURES[model.config.model_type].layers)[layer].self_attn


# ---- the presets -----------------------------------------------------------------------------------------


def test_each_preset_has_its_family_traits():
    llama3, mistral, qwen2 = (tiny(name) for name in FAMILIES)
    for model in (llama3, mistral, qwen2):  # grouped-query attention: k/v_proj narrower than q_proj
        att = attention(model)
        assert att.k_proj.out_features == att.v_proj.out_features < att.q_proj.out_features
    assert type(llama3).__name__ == "LlamaForCausalLM" and llama3.config.rope_parameters["rope_type"] == "llama3"
    unscaled = tiny("tiny-llama3", rope_scaling=None)
    # the llama3 scaling stretches the low frequencies (the rotary table differs) and changes the logits
    assert not torch.equal(llama3.model.rotary_emb.inv_freq, unscaled.model.rotary_emb.inv_freq)
    ids, _ = random_batch(seq=24)
    assert (llama3(ids).logits - unscaled(ids).logits).abs().max() > 1e-4
    assert type(mistral).__name__ == "MistralForCausalLM"
    window = mistral.config.sliding_window
    ids, _ = random_batch(seq=3 * window)
    full = tiny("tiny-mistral", sliding_window=None)(ids).logits
    windowed = mistral(ids).logits
    assert torch.allclose(windowed[:, :window], full[:, :window], atol=1e-5)  # the window acts past its length
    assert (windowed[:, 2 * window:] - full[:, 2 * window:]).abs().max() > 1e-4
    att = attention(qwen2)
    assert type(qwen2).__name__ == "Qwen2ForCausalLM" and att.o_proj.bias is None
    assert all(getattr(att, p).bias.abs().max() > 0 for p in ("q_proj", "k_proj", "v_proj"))
    assert qwen2.lm_head.weight is qwen2.model.embed_tokens.weight


@pytest.mark.parametrize("name", FAMILIES)
def test_preset_directory_is_the_preset(name, tmp_path):
    """`write_preset` (what `peft-ds preset` runs): the directory loads to the same logits and tokenizes
    alike; LLaMA-3 and Qwen2 carry a tokenizer.json and no tokenizer.model."""
    d = models.write_preset(name, str(tmp_path / name))
    files = set(os.listdir(d))
    json_tokenizer = name in models.JSON_TOKENIZERS
    assert ("tokenizer.json" in files) == json_tokenizer and ("tokenizer.model" in files) == (not json_tokenizer)
    model, tokenizer = models.load_model(d)
    ids, mask = random_batch(pad_left=[0, 3])
    assert torch.equal(model.eval()(input_ids=ids, attention_mask=mask).logits,
                       tiny(name)(input_ids=ids, attention_mask=mask).logits)
    preset_tokenizer = models.load_tokenizer_for(name)
    assert type(tokenizer) is type(preset_tokenizer)
    text = "Natalia sold 48 clips in April.\n### Response:\n"
    ids = tokenizer.encode(text)
    assert ids == preset_tokenizer.encode(text) and max(ids) < model.config.vocab_size
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 0)
    # LLaMA-3 puts <|begin_of_text|> (1) first, Qwen2 nothing, Mistral's sentencepiece <s> (1)
    assert (ids[0] == 1) == (name != "tiny-qwen2")


def test_shipped_tokenizer_json_is_regenerated_byte_for_byte():
    from peft_ds import sample_data

    with open(MATH) as f:
        records = json.load(f)
    with open(os.path.join(os.path.dirname(MATH), sample_data.COMMONSENSE_FILE)) as f:
        records += json.load(f)
    with open(models.TINY_TOKENIZER_JSON, "rb") as f:
        assert sample_data.train_bpe_tokenizer(sample_data.render_prompts(records)) == f.read()


# ---- the methods on each family --------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_equals_hf_peft(name):
    """tests/test_lora.py on each family: LoRA's shapes from the linear it wraps (GQA's narrower k/v),
    LoRA within 1e-5 of HF PEFT in fp32, LoRA-SIBO at lambda = 0 on a bf16 backbone bit for bit (Qwen2's
    biases included)."""
    test_lora.test_lora_init_is_identity_and_shapes(name)
    test_lora.test_lora_matches_hf_peft(name)
    test_lora.test_bf16_backbone_equals_hf_peft_exactly(name, torch.float32)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("spec", test_sibo.SPECS, ids=["lora-sibo", "adapter-sibo", "adapter", "lora-sibo-learnable"])
def test_sibo_matches_reference(name, spec):
    """SIBO's default sites are LLaMA's (up_proj; gate_proj and up_proj for the adapter): the reference
    of tests/test_sibo.py, written with plain tensor ops and each frozen linear's own bias."""
    assert ARCHITECTURES[models.PRESETS[name]["model_type"]] is ARCHITECTURES["llama"]
    test_sibo.test_matches_reference(name, spec)


METHODS = {"lora-sibo": dict(method="lora", r=4, alpha=8, sibo_lambda=0.2),
           "adapter-sibo": dict(method="adapter", bottleneck_size=8, sibo_lambda=0.2),
           "adamix-lora-sibo": dict(method="adamix_lora", r=4, alpha=8, num_experts=2, sibo_lambda=0.2),
           "adamix-adapter-sibo": dict(method="adamix_adapter", bottleneck_size=8, num_experts=2, sibo_lambda=0.2),
           "bilora-sibo": dict(method="bilora", r=4, alpha=8, sibo_lambda=0.2),
           "lora-sibo-learnable": dict(method="lora", r=4, alpha=8, sibo_lambda=0.2, sibo_learnable=True)}


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("label", ["adamix-lora-sibo", "adamix-adapter-sibo", "bilora-sibo", "lora-sibo-learnable"])
def test_every_method_trains_on_every_family(name, label):
    """Every adapter parameter gets a gradient, shaped by the linear it wraps (GQA's narrower k/v), and
    a step changes the loss (LoRA- and Adapter-SIBO: above, and in the ZeRO-3 runs' gradient check)."""
    model = api.apply_peft(tiny(name).train(), api.PeftSpec(**METHODS[label]))
    params = adapter_parameters(model)
    assert params and set(api.adapter_state_dict(model)) == set(params)
    shapes = adapter_shapes(tiny(name), model.peft_spec)
    assert {k: tuple(p.shape) for k, p in params.items()} == dict(shapes)
    ids, mask = random_batch(seq=24)
    optimizer = torch.optim.SGD(params.values(), lr=0.5)
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    missing = [k for k, p in params.items() if p.grad is None]
    assert not missing, missing
    optimizer.step()
    assert model(input_ids=ids, attention_mask=mask, labels=ids).loss.item() != loss.item()


@pytest.mark.parametrize("name", FAMILIES)
def test_generate_with_and_without_cache(name):
    """SIBO's h0 with a KV cache, past Mistral's sliding window (7 + 20 tokens > 16): the cached
    generation, which embeds only each new token, equals the uncached one."""
    model = api.apply_peft(tiny(name), api.PeftSpec(method="lora", r=4, alpha=8, sibo_lambda=0.3))
    randomize_adapters(model, std=0.2)
    ids, mask = random_batch(batch=3, seq=7, pad_left=[0, 2, 4])
    kwargs = dict(attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
    cached = model.generate(ids, use_cache=True, **kwargs)
    assert cached.shape == (3, 27) and (getattr(model.config, "sliding_window", None) or 0) < 27
    assert torch.equal(cached, model.generate(ids, use_cache=False, **kwargs))


# ---- model types and sources -----------------------------------------------------------------------------


SUPPORTED = "supported: llama (LlamaForCausalLM), mistral (MistralForCausalLM), qwen2 (Qwen2ForCausalLM), gptj"


def test_other_model_types_are_refused_naming_the_supported(tmp_path, capsys):
    from transformers import Phi3Config, Phi3ForCausalLM

    from peft_ds.cli import main

    d = tmp_path / "phi3"
    models.write_preset("tiny-llama", str(d))
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "model_type": "phi3", "architectures": ["Phi3ForCausalLM"]}))
    capsys.readouterr()  # the preset writer's progress output
    with pytest.raises(PeftDsError, match=re.escape(f"unsupported model_type 'phi3'; {SUPPORTED}")):
        models.check_model_source(str(d))
    assert main(["evaluate", "--base", str(d), "--dataset", "gsm8k", "--data-dir", FIXTURES, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("peft-ds: error:") and SUPPORTED in err[0], err
    phi3 = Phi3ForCausalLM(Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=64, pad_token_id=0))
    with pytest.raises(PeftDsError, match="unsupported architecture 'phi3' .*" + re.escape(SUPPORTED)):
        api.apply_peft(phi3, api.PeftSpec(method="lora"))


def fake_hub_cache(root, repo_id, preset):
    """A Hugging Face hub cache as `hf download` leaves it: models--org--name/snapshots/<commit>/ holding
    the files, refs/main naming the commit."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    models.write_preset(preset, str(repo / "snapshots" / commit))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return str(repo / "snapshots" / commit)


def test_model_id_in_the_local_cache_is_resolved_offline(tmp_path, monkeypatch):
    import huggingface_hub

    snapshot = fake_hub_cache(tmp_path / "hub", "peft-ds/tiny-qwen2", "tiny-qwen2")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models.local_model_dir("peft-ds/tiny-qwen2") == snapshot
    assert models.check_model_source("peft-ds/tiny-qwen2") == "qwen2"
    assert models.hidden_size_of("peft-ds/tiny-qwen2") == 128
    assert type(models.build_skeleton("peft-ds/tiny-qwen2")).__name__ == "Qwen2ForCausalLM"
    model, tokenizer = models.load_model("peft-ds/tiny-qwen2")
    ids, _ = random_batch()
    assert torch.equal(model.eval()(ids).logits, tiny("tiny-qwen2")(ids).logits)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    with pytest.raises(PeftDsError) as err:
        models.check_model_source("peft-ds/absent-model")
    message = str(err.value)
    assert "\n" not in message and f"nor a model in the local Hugging Face cache ({tmp_path / 'hub'})" in message
    assert "`hf download peft-ds/absent-model`" in message and "huggingface-cli download peft-ds/absent-model" in message
    with pytest.raises(PeftDsError, match="neither a preset .* nor a model directory .* does not exist"):
        models.check_model_source(str(tmp_path / "no" / "such" / "dir"))


# ---- ZeRO-3 training, consolidation, export, merge, evaluation --------------------------------------------

QWEN2_ID = "peft-ds/tiny-qwen2"
# family -> the methods trained on 1 and on 2 ranks; each family's model comes from another source
RUNS = {"tiny-llama3": ["lora-sibo", "adamix-lora-sibo"],  # a directory written by `peft-ds preset`
        "tiny-mistral": ["adapter-sibo", "bilora-sibo"],  # the preset name
        "tiny-qwen2": ["lora", "adamix-adapter-sibo"]}  # a model id in a local Hugging Face cache
TRAIN_METHODS = {**METHODS, "lora": dict(method="lora", r=4, alpha=8)}


class Trained:
    """Where each family's model comes from, and the run directories by (family, method, world size)."""

    def __init__(self, root):
        self.root = root
        self.llama3_dir = str(root / "tiny-llama3")
        self.hub = root / "hub"
        self.qwen2_snapshot = fake_hub_cache(self.hub, QWEN2_ID, "tiny-qwen2")
        self.source = {"tiny-llama3": self.llama3_dir, "tiny-mistral": "tiny-mistral", "tiny-qwen2": QWEN2_ID}

    def __call__(self, family, label, world):
        return self.root / f"{family}-{label}-w{world}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    runs = Trained(tmp_path_factory.mktemp("families"))
    r = peft_ds("preset", "tiny-llama3", runs.llama3_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    configs = {1: [], 2: []}
    for family, labels in RUNS.items():
        for label in labels:
            for world in (1, 2):
                out = runs(family, label, world)
                configs[world].append(write_config(f"{out}.yaml", out, model=runs.source[family],
                                                   method=TRAIN_METHODS[label]))
    # the same LLaMA-3 directory as .bin shards, as the papers' base models ship: 2 ZeRO-3 ranks
    bin_dir = bin_model_dir(runs.llama3_dir, runs.root / "tiny-llama3-bin", shards=3)
    out = runs("tiny-llama3-bin", "lora-sibo", 2)
    configs[2].append(write_config(f"{out}.yaml", out, model=bin_dir, method=TRAIN_METHODS["lora-sibo"]))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_HUB_CACHE", str(runs.hub))  # the ranks resolve the Qwen2 id in the fake cache, offline
        env.setenv("HF_HUB_OFFLINE", "1")
        for world, paths in configs.items():
            torchrun(world, paths)
    return runs


@pytest.fixture
def hub(trained, monkeypatch):
    """This process reads the fake cache too (huggingface_hub fixed its cache path at import)."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(trained.hub))
    return trained


@pytest.mark.slow
@pytest.mark.parametrize("family,label", [(f, m) for f, labels in RUNS.items() for m in labels])
def test_two_ranks_equal_one_rank(trained, family, label):
    """As tests/test_train_distributed.py for tiny-llama (same tolerances)."""
    one, two = trained(family, label, 1), trained(family, label, 2)
    assert_same_adapter(adapter(two), adapter(one), tol=5e-5)
    la, lb = losses(one), losses(two)
    assert la.keys() == lb.keys() == set(range(1, 6))
    assert all(abs(la[s] - lb[s]) <= 1e-5 * abs(la[s]) for s in la)
    assert len({round(v, 6) for v in la.values()}) == 5
    with open(two / "config.yaml") as f:
        assert f"name_or_path: {trained.source[family]}" in f.read()  # the id or path as given, not resolved
    # the 2-rank checkpoint consolidates to the adapter the run exported (fp32 masters, bit for bit)
    state = read_state(str(two))
    assert state.keys() == adapter(two).keys() and all(torch.equal(v, adapter(two)[k]) for k, v in state.items())


@pytest.mark.slow
def test_two_zero3_ranks_from_bin_shards_equal_the_safetensors_directory(trained):
    """2 ranks loading 3 .bin shards (weights_only, one shard at a time into their ZeRO-3 partitions) train
    exactly what they train from the same weights as safetensors: adapters and losses bit for bit."""
    ours, theirs = trained("tiny-llama3-bin", "lora-sibo", 2), trained("tiny-llama3", "lora-sibo", 2)
    a, b = adapter(ours), adapter(theirs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(ours) == losses(theirs)


@pytest.mark.slow
def test_qwen2_peft_export_and_merge_into_base(hub, tmp_path):
    """Qwen2 (q/k/v biases, tied embeddings): the PEFT export on PEFT's own model and the merged model
    loaded by plain transformers give the native adapter's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = str(hub("tiny-qwen2", "lora", 2))
    quiet = dict(progress=False)
    consolidate(run, str(tmp_path / "native"), **quiet)
    consolidate(run, str(tmp_path / "peft"), fmt="peft", **quiet)
    consolidate(run, str(tmp_path / "merged"), merge_into_base=hub.qwen2_snapshot, **quiet)
    ids, mask = random_batch(pad_left=[0, 3], seq=24)

    def logits(model):
        with torch.no_grad():
            return model.eval()(input_ids=ids, attention_mask=mask).logits

    ours = logits(api.load_adapter(models.load_model(QWEN2_ID)[0], str(tmp_path / "native")))
    assert (ours - logits(tiny("tiny-qwen2"))).abs().max() > 1e-3
    torch.testing.assert_close(logits(PeftModel.from_pretrained(tiny("tiny-qwen2"), str(tmp_path / "peft"))), ours,
                               rtol=1e-5, atol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), local_files_only=True)
    torch.testing.assert_close(logits(merged), ours, rtol=1e-4, atol=1e-4)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path / "merged"))
    base_bias = tiny("tiny-qwen2").model.layers[0].self_attn.q_proj.bias
    assert torch.equal(merged.model.layers[0].self_attn.q_proj.bias, base_bias)  # the merge leaves biases as they are


@pytest.mark.slow
@pytest.mark.parametrize("family,label", [(f, labels[0]) for f, labels in RUNS.items()])
def test_evaluation_on_each_family(hub, family, label, tmp_path):
    """`evaluate` with each family's trained adapter on its own source (directory, preset, cached id)."""
    from peft_ds.evaluation import evaluate

    report = evaluate(hub.source[family], ["gsm8k", "boolq"], FIXTURES, adapter=str(hub(family, label, 2) / "adapter"),
                      num_beams=1, max_new_tokens=8, limit=2, out=str(tmp_path / "eval.json"), progress=False)
    assert [(r["dataset"], r["id"]) for r in report["rows"]] == [("gsm8k", 0), ("gsm8k", 1), ("boolq", 0), ("boolq", 1)]
    assert all(isinstance(r["output"], str) and "prediction_faithful" in r for r in report["rows"])
    with open(tmp_path / "eval.json") as f:
        assert json.load(f)["accuracy"]["gsm8k"]["examples"] == 2
