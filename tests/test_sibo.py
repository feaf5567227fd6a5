"""SIBO (SPEC 2.3) against independent references written here, and the h0 plumbing: activation
checkpointing, generate() with and without KV cache, padding, no state between forwards."""

import copy
import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHS, randomize_adapters, random_batch, tiny

import peft_ds
from peft_ds.architectures import ARCHITECTURES

LAM = 0.3


def reference_model(plain, arch, spec, state):
    """SPEC 2.1-2.3 written out with plain tensor ops on an untouched copy of the backbone."""
    model = copy.deepcopy(plain)
    h0 = {}
    model.get_submodule(arch.embedding).register_forward_hook(lambda m, a, out: h0.__setitem__("h0", out))
    layers_path = arch.layers + "."

    def lam_of(path):
        layer = path[len(layers_path):].split(".")[0]
        theta = state.get(f"{layers_path}{layer}.sibo_theta")
        return torch.sigmoid(theta) if theta is not None else spec.sibo_lambda

    def blend(x, path):
        lam = lam_of(path)
        return (1 - lam) * x + lam * h0["h0"]

    sites = {"llama": {"lora": ("up_proj",), "adapter": ("gate_proj", "up_proj")},
             "gptj": {"lora": ("fc_in",), "adapter": ()}}[arch.name][spec.method] if spec.sibo else ()
    for key in state:
        path, name = key.rsplit(".", 1)
        lin = model.get_submodule(path) if name in ("lora_A", "adapter_down") else None
        if lin is None:
            continue
        site = path.rsplit(".", 1)[1] in sites
        if name == "lora_A":
            A, B, s = state[path + ".lora_A"], state[path + ".lora_B"], spec.alpha / spec.r

            def forward(x, lin=lin, A=A, B=B, s=s, site=site, path=path):
                xt = blend(x, path) if site else x
                return F.linear(x, lin.weight, lin.bias) + s * (xt @ A.T @ B.T)
        else:
            D, U = state[path + ".adapter_down"], state[path + ".adapter_up"]
            output_side = path.endswith(("fc_out", "down_proj"))

            def forward(x, lin=lin, D=D, U=U, site=site, path=path, output_side=output_side):
                if output_side:
                    y = F.linear(x, lin.weight, lin.bias)
                    return y + torch.tanh(y @ D.T) @ U.T
                xt = blend(x, path) if site else x
                return F.linear(x + torch.tanh(xt @ D.T) @ U.T, lin.weight, lin.bias)
        lin.forward = forward
    if spec.sibo and spec.method == "adapter" and arch.name == "gptj":
        # Official GPT-J Adapter-SIBO: the whole MLP input is blended.
        for i, layer in enumerate(model.get_submodule(arch.layers)):
            layer.mlp.register_forward_pre_hook(
                lambda m, args, i=i: (blend(args[0], f"{layers_path}{i}.mlp"),))
    return model


SPECS = [
    peft_ds.PeftSpec(method="lora", r=4, alpha=8, dropout=0.0, sibo_lambda=LAM),
    peft_ds.PeftSpec(method="adapter", bottleneck_size=8, sibo_lambda=LAM),
    peft_ds.PeftSpec(method="adapter", bottleneck_size=8, sibo_lambda=0.0),
    peft_ds.PeftSpec(method="lora", r=4, alpha=8, dropout=0.0, sibo_lambda=LAM, sibo_learnable=True),
]


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("spec", SPECS, ids=["lora-sibo", "adapter-sibo", "adapter", "lora-sibo-learnable"])
def test_matches_reference(name, spec):
    plain = tiny(name)
    arch = ARCHITECTURES[plain.config.model_type]
    model = peft_ds.apply_peft(copy.deepcopy(plain), spec)
    randomize_adapters(model)
    if spec.sibo_learnable:
        with torch.no_grad():
            for i, layer in enumerate(model.get_submodule(arch.layers)):
                layer.sibo_theta.fill_(-1.0 + 0.5 * i)  # a different lambda in every layer
    state = peft_ds.adapter_state_dict(model)
    reference = reference_model(plain, arch, spec, state)
    ids, mask = random_batch(pad_left=[0, 4])
    ours = model(input_ids=ids, attention_mask=mask).logits
    expected = reference(input_ids=ids, attention_mask=mask).logits
    assert (ours - expected).abs().max().item() < 1e-5
    if spec.sibo:  # the SIBO term matters: the plain method differs
        plain_spec = dataclasses.replace(spec, sibo_lambda=0.0, sibo_learnable=False)
        no_sibo = reference_model(plain, arch, plain_spec, {k: v for k, v in state.items() if "sibo" not in k})
        assert (no_sibo(input_ids=ids, attention_mask=mask).logits - ours).abs().max() > 1e-4


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("lam", [0.1, 0.5, 0.9])
def test_lora_sibo_at_init_is_base_model(name, lam):
    plain = tiny(name)
    ids, mask = random_batch(pad_left=[2, 0])
    base = plain(input_ids=ids, attention_mask=mask).logits
    model = peft_ds.apply_peft(plain, peft_ds.PeftSpec(method="lora", r=4, alpha=8, sibo_lambda=lam))
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, base)


@pytest.mark.parametrize("name", ARCHS)
def test_only_default_sites_see_h0(name):
    # Scaling the embedding output changes h0 and everything downstream; compare each LoRA module's
    # output against a recomputation from its own input with h0 removed instead.
    plain = tiny(name)
    model = peft_ds.apply_peft(plain, peft_ds.PeftSpec(method="lora", r=4, alpha=8, dropout=0.0, sibo_lambda=LAM))
    randomize_adapters(model)
    record = {}
    for n, m in model.named_modules():
        if hasattr(m, "lora_A"):
            m.register_forward_hook(lambda m, a, o, n=n: record.__setitem__(n, (m, a[0], o)))
    ids, _ = random_batch()
    model(input_ids=ids)
    site = "up_proj" if name == "tiny-llama" else "fc_in"
    sited = 0
    for n, (m, x, out) in record.items():
        no_h0 = F.linear(x, m.base_layer.weight, m.base_layer.bias) + m.scaling * (x @ m.lora_A.T @ m.lora_B.T)
        if n.endswith(site):
            assert (out - no_h0).abs().max() > 1e-4
            sited += 1
        else:
            assert torch.allclose(out, no_h0, atol=1e-6)
    assert sited == model.config.num_hidden_layers


def _checkpointing_enable(model, reentrant):
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("method", ["lora", "adapter"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_same_loss_and_grads(name, method, reentrant):
    spec = peft_ds.PeftSpec(method=method, r=4, alpha=8, bottleneck_size=8, dropout=0.0,
                            sibo_lambda=LAM, sibo_learnable=True)
    assert_checkpointing_changes_nothing(name, spec, lambda model: _checkpointing_enable(model, reentrant))


def assert_checkpointing_changes_nothing(name, spec, enable, calls=None):
    """Loss and every adapter gradient the same with and without activation checkpointing (`enable`);
    with `calls`, each decoder layer's body ran once per forward and once more per recomputation."""
    results = []
    for checkpointing in (False, True):
        model = peft_ds.apply_peft(tiny(name), spec)
        randomize_adapters(model)
        model.train()
        if checkpointing:
            enable(model)
        ids, mask = random_batch(pad_left=[3, 0])
        if calls is not None:
            calls.clear()
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        if calls is not None:
            assert len(calls) == model.config.num_hidden_layers * (2 if checkpointing else 1)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert all(g.abs().sum() > 0 for g in grads.values())
        results.append((loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        assert torch.allclose(grads_a[n], grads_b[n], atol=1e-6, rtol=1e-5), n


def _layer_forwards(variant, inner, calls):
    """A decoder layer's forward as another transformers version might wrap it: a checkpointing wrapper
    under another name than today's, or no wrapper at all. `calls` counts runs of the layer's body."""
    def body(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return inner(self, *args, **kwargs)

    def checkpointing_wrapper(self, *args, **kwargs):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(functools.partial(body, self, **kwargs), *args)
        return body(self, *args, **kwargs)

    return {"renamed-wrapper": checkpointing_wrapper, "no-wrapper": body}[variant]


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("variant", ["renamed-wrapper", "no-wrapper"])
def test_checkpointing_needs_no_transformers_internals(name, variant, monkeypatch):
    """SIBO's h0 under activation checkpointing relies on the layer's `gradient_checkpointing` flag and
    `_gradient_checkpointing_func` only, not on how transformers wraps a layer's forward: with either
    form, same loss and gradients as without checkpointing, and each layer's body runs exactly twice
    (the forward and one recomputation: never checkpointed twice)."""
    spec = peft_ds.PeftSpec(method="lora", r=4, alpha=8, dropout=0.0, sibo_lambda=LAM, sibo_learnable=True)
    layer_cls = type(tiny(name).get_submodule(ARCHITECTURES[tiny(name).config.model_type].layers)[0])
    inner = getattr(layer_cls.forward, "__wrapped__", layer_cls.forward)  # the body beneath today's wrapper
    calls = []
    monkeypatch.setattr(layer_cls, "forward", _layer_forwards(variant, inner, calls))
    assert_checkpointing_changes_nothing(name, spec, lambda model: _checkpointing_enable(model, False), calls)


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_generate_with_and_without_cache(name, method):
    model = peft_ds.apply_peft(tiny(name), peft_ds.PeftSpec(method=method, r=4, alpha=8, bottleneck_size=8,
                                                            sibo_lambda=LAM))
    randomize_adapters(model, std=0.2)
    ids, mask = random_batch(batch=3, seq=7, pad_left=[0, 2, 4])
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    cached = model.generate(ids, use_cache=True, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert cached.shape == (3, 17)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("name", ARCHS)
def test_padding_does_not_change_real_tokens(name):
    model = peft_ds.apply_peft(tiny(name), peft_ds.PeftSpec(method="lora", r=4, alpha=8, dropout=0.0,
                                                            sibo_lambda=LAM))
    randomize_adapters(model)
    ids, _ = random_batch(batch=1, seq=9)
    alone = model(input_ids=ids).logits
    padded = torch.cat([torch.zeros(1, 5, dtype=ids.dtype), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=ids.dtype), torch.ones_like(ids)], dim=1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=padded, attention_mask=mask, position_ids=position_ids).logits[:, 5:]
    assert (out - alone).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", ARCHS)
def test_no_h0_survives_a_forward(name):
    model = peft_ds.apply_peft(tiny(name), peft_ds.PeftSpec(method="lora", r=4, alpha=8, dropout=0.0,
                                                            sibo_lambda=LAM))
    randomize_adapters(model)
    arch = ARCHITECTURES[model.config.model_type]
    site = model.get_submodule(arch.layers)[0].get_submodule("mlp.up_proj" if name == "tiny-llama" else "mlp.fc_in")
    residual = site._initial_residual
    ids, _ = random_batch()
    out_ids = model(input_ids=ids).logits
    assert residual._h0 is None and residual._active == []
    with pytest.raises(RuntimeError, match="no h0"):
        site(torch.randn(1, 3, model.config.hidden_size if name == "tiny-llama" else model.config.n_embd))
    # a forward from inputs_embeds uses them as h0, exactly like input_ids
    embeds = model.get_submodule(arch.embedding)(ids)
    out_embeds = model(inputs_embeds=embeds).logits
    assert torch.allclose(out_ids, out_embeds, atol=1e-6)
    # a second, different forward is not influenced by the first
    other, _ = random_batch(seed=99)
    fresh = copy.deepcopy(model)
    assert torch.equal(model(input_ids=other).logits, fresh(input_ids=other).logits)
