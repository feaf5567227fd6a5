"""AdaMix (SPEC 2.4): routing, the one-pass doubled batch, the consistency term, merging, eval mode."""

import copy
import math

import pytest
import torch
from conftest import ARCHS, random_batch, tiny

import peft_ds
from peft_ds import PeftDsError, PeftSpec
from peft_ds.methods.adamix import (AdamixAdapterLinear, AdamixLoraLinear, Router, consistency_loss, merge,
                                    symmetric_kl)

LORA = dict(method="adamix_lora", r=4, alpha=8, dropout=0.0)
ADAPTER = dict(method="adamix_adapter", bottleneck_size=8)


def mixtures(model):
    return [m for m in model.modules() if isinstance(m, (AdamixLoraLinear, AdamixAdapterLinear))]


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "sibo" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_route_sequence_is_seeded_and_resumable():
    a, b = Router(4, seed=11), Router(4, seed=11)
    for _ in range(3):
        a.register(), b.register()
    seq_a = [a.draw().clone() for _ in range(5)]
    state = a.state_dict()
    later = [a.draw().clone() for _ in range(5)]
    seq_b = [b.draw().clone() for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(seq_a, seq_b))  # "ranks" with the same seed route alike
    c = Router(4, seed=999)
    for _ in range(3):
        c.register()
    c.load_state_dict(state)
    assert all(torch.equal(x, c.draw()) for x in later)  # a resumed router continues the sequence


def test_every_expert_is_chosen_uniformly():
    router = Router(4, seed=5)
    router.register()
    counts = torch.zeros(4)
    n = 4000
    for _ in range(n):
        counts += torch.bincount(router.draw().flatten(), minlength=4)
    draws = 4 * n  # 2 views x 2 matrices per draw
    expected, sigma = draws / 4, math.sqrt(draws * 0.25 * 0.75)
    assert ((counts - expected).abs() < 5 * sigma).all(), counts


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("fields", [LORA, dict(LORA, sibo_lambda=0.2), ADAPTER, dict(ADAPTER, sibo_lambda=0.2),
                                    dict(LORA, share_A=True, share_B=False)],
                         ids=["lora", "lora-sibo", "adapter", "adapter-sibo", "lora-B-experts"])
def test_one_pass_equals_two_passes(name, fields):
    model = peft_ds.apply_peft(tiny(name), PeftSpec(**fields)).train()
    randomize(model)
    ids, mask = random_batch(pad_left=[0, 3])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    router = model.adamix_router
    router.auto = False
    router.draw()
    assert not torch.equal(router.routes[:, 0], router.routes[:, 1])  # two different views
    results = []
    for one_pass in (True, False):
        model.zero_grad()
        loss = consistency_loss(model, batch, weight=1.0, one_pass=one_pass)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (l1, g1), (l2, g2) = results
    assert torch.allclose(l1, l2, atol=1e-6) and l1 > 0
    for n in g1:
        assert torch.allclose(g1[n], g2[n], atol=1e-7, rtol=1e-5), n
    assert any(g.abs().sum() > 0 for n, g in g1.items() if "sibo" not in n)


def test_consistency_term_against_direct_computation():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[-100, -100, 4, 2, 6], [1, 3, -100, 5, -100]])
    total, count = 0.0, 0
    for i in range(2):
        for t in range(4):
            if labels[i, t + 1] == -100:
                continue
            p, q = torch.softmax(a[i, t], -1), torch.softmax(b[i, t], -1)
            kl_pq = sum(p[k] * (math.log(p[k]) - math.log(q[k])) for k in range(7))
            kl_qp = sum(q[k] * (math.log(q[k]) - math.log(p[k])) for k in range(7))
            total, count = total + 0.5 * (kl_pq + kl_qp), count + 1
    assert symmetric_kl(a, b, labels).item() == pytest.approx(float(total) / count, rel=1e-5)
    assert symmetric_kl(a, a.clone(), labels).item() == pytest.approx(0.0, abs=1e-7)
    # gradient reaches each side only through its log_softmax (the other side is detached)
    a.requires_grad_(True)
    symmetric_kl(a, b, labels).backward()
    assert a.grad[0, 0].abs().sum() == 0 and a.grad[0, 1].abs().sum() > 0


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("fields", [dict(LORA, sibo_lambda=0.2), dict(LORA, share_A=True, share_B=False),
                                    dict(ADAPTER, sibo_lambda=0.2), dict(ADAPTER, share_down=True, share_up=False)],
                         ids=["lora-sibo", "lora-B-experts", "adapter-sibo", "adapter-up-experts"])
def test_merge_equals_averaged_weights(name, fields):
    model = peft_ds.apply_peft(tiny(name), PeftSpec(**fields)).eval()
    randomize(model)
    ids, mask = random_batch(pad_left=[0, 2])
    eval_logits = model(input_ids=ids, attention_mask=mask).logits
    # the test's own average, written into a plain model of the same architecture
    plain_fields = dict(fields, method=fields["method"].removeprefix("adamix_"),
                        target_modules=model.peft_spec.target_modules, sibo_sites=model.peft_spec.sibo_sites)
    for key in ("share_A", "share_B", "share_down", "share_up"):
        plain_fields.pop(key, None)
    plain = peft_ds.apply_peft(tiny(name), PeftSpec(**plain_fields)).eval()
    averaged = {}
    for key, value in peft_ds.adapter_state_dict(model).items():
        base = key.rsplit(".", 1)[0] if key.rsplit(".", 1)[1].isdigit() else key
        averaged.setdefault(base, []).append(value)
    peft_ds.load_adapter_state_dict(plain, {k: torch.stack(v).mean(0) for k, v in averaged.items()})
    expected = plain(input_ids=ids, attention_mask=mask).logits
    merged = merge(copy.deepcopy(model))
    assert merged.peft_spec == peft_ds.PeftSpec(**{**merged.peft_spec.to_dict(), **plain_fields})
    assert not mixtures(merged)
    assert (merged(input_ids=ids, attention_mask=mask).logits - expected).abs().max() < 1e-5
    assert (eval_logits - expected).abs().max() < 1e-5  # eval mode averages on the fly


def test_shared_B_merge_is_mean_of_expert_deltas():
    model = peft_ds.apply_peft(tiny("tiny-llama"), PeftSpec(**LORA))
    randomize(model)
    module = mixtures(model)[0]
    B = module.lora_B
    per_expert = torch.stack([B @ A for A in module.lora_A]).mean(0) * module.scaling
    plain = module.merged()
    assert torch.allclose(plain.lora_B @ plain.lora_A * plain.scaling, per_expert, atol=1e-7)


def test_no_cached_merge_survives_a_training_step():
    model = peft_ds.apply_peft(tiny("tiny-gptj"), PeftSpec(**LORA))
    randomize(model)
    ids, _ = random_batch()
    before = model.eval()(input_ids=ids).logits
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    consistency_loss(model, {"input_ids": ids, "labels": ids}, 1.0).backward()
    opt.step()
    after = model.eval()(input_ids=ids).logits
    merged = merge(copy.deepcopy(model))(input_ids=ids).logits
    assert (after - before).abs().max() > 1e-4 and torch.allclose(after, merged, atol=1e-5)


def test_initialisation():
    model = peft_ds.apply_peft(tiny("tiny-llama"), PeftSpec(**LORA, num_experts=3))
    module = mixtures(model)[0]
    assert len(module.lora_A) == 3 and isinstance(module.lora_B, torch.nn.Parameter)
    assert all(torch.equal(module.lora_A[0], a) for a in module.lora_A) and module.lora_B.abs().sum() == 0
    model = peft_ds.apply_peft(tiny("tiny-llama"), PeftSpec(**ADAPTER))
    module = mixtures(model)[0]
    downs = list(module.adapter_down)
    assert len(downs) == 4 and not torch.equal(downs[0], downs[1])
    assert all(abs(d.std().item() - 0.02) < 0.004 for d in downs)
    assert module.output_side and module.base_layer.in_features == model.config.intermediate_size
    keys = list(peft_ds.adapter_state_dict(model))
    assert "model.layers.0.mlp.down_proj.adapter_down.3" in keys and "model.layers.0.mlp.down_proj.adapter_up" in keys


@pytest.mark.parametrize("fields,message", [
    (dict(ADAPTER, num_experts=0), "num_experts must be an integer >= 1"),
    (dict(ADAPTER, share_down=True, share_up=True), "share_down and share_up are both set"),
    (dict(LORA, share_A=True, share_B=True), "share_A and share_B are both set"),
    (dict(LORA, consistency_weight=-1.0), "consistency_weight must be >= 0"),
])
def test_bad_settings(fields, message):
    with pytest.raises(PeftDsError, match=message):
        peft_ds.apply_peft(tiny("tiny-llama"), PeftSpec(**fields))
