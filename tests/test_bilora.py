"""BiLoRA (SPEC 2.5): forward against an independent reference for the three lam forms, R1 and the
entropy penalty, fold(), and the hypergradients (darts at xi = lr and at the default xi, and
first_order, against exact; exact against an independent unroll of C + gamma1 R1)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHS, random_batch, tiny

import peft_ds
from peft_ds import PeftDsError, PeftSpec
from peft_ds.methods import bilora

FORMS = ["softmax", "real", "binary"]


def randomize(model, seed=1, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def reference(plain, state, form, s):
    """W x + s * P diag(lam(E)) Q x written out on an untouched copy of the backbone."""
    model = copy.deepcopy(plain)
    lam_of = {"softmax": lambda e: torch.exp(e) / torch.exp(e).sum(), "real": lambda e: e,
              "binary": lambda e: 1 / (1 + torch.exp(-e))}[form]
    for key in state:
        if key.endswith("bilora_P"):
            path = key[: -len(".bilora_P")]
            lin = model.get_submodule(path)
            P, E, Q = state[path + ".bilora_P"], state[path + ".bilora_E"], state[path + ".bilora_Q"]

            def forward(x, lin=lin, P=P, E=E, Q=Q):
                return F.linear(x, lin.weight, lin.bias) + s * (x @ Q.T @ torch.diag(lam_of(E)) @ P.T)

            lin.forward = forward
    return model


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("form", FORMS)
def test_forward_matches_reference(name, form):
    plain = tiny(name)
    model = peft_ds.apply_peft(copy.deepcopy(plain), PeftSpec(method="bilora", r=4, alpha=8, dropout=0.0,
                                                              singular_values=form)).eval()
    randomize(model, std=0.05)
    ids, mask = random_batch(pad_left=[0, 3])
    expected = reference(plain, peft_ds.adapter_state_dict(model), form, 8 / 4)(input_ids=ids, attention_mask=mask)
    assert (model(input_ids=ids, attention_mask=mask).logits - expected.logits).abs().max() < 1e-5
    keys = list(peft_ds.adapter_state_dict(model))
    assert any(k.endswith("mlp.up_proj.bilora_E") or k.endswith("mlp.fc_in.bilora_E") for k in keys)


def test_init_and_softmax_sums_to_one():
    model = peft_ds.apply_peft(tiny("tiny-llama"), PeftSpec(method="bilora", r=8, alpha=16))
    modules = bilora.modules(model)
    assert len(modules) == 5 * model.config.num_hidden_layers
    m = modules[0]
    assert m.bilora_P.shape == (m.base_layer.out_features, 8) and m.bilora_Q.shape == (8, m.base_layer.in_features)
    assert torch.equal(m.bilora_E, torch.zeros(8)) and torch.allclose(m.lam(), torch.full((8,), 1 / 8))
    assert abs(m.bilora_P.std().item() - 0.02) < 0.003
    randomize(model)
    assert all(torch.allclose(m.lam().sum(), torch.tensor(1.0)) for m in modules)


def test_regularisers_equal_direct_computations():
    model = peft_ds.apply_peft(tiny("tiny-gptj"), PeftSpec(method="bilora", r=4, alpha=8,
                                                           singular_values="binary"))
    randomize(model)
    r1, h = 0.0, 0.0
    for m in bilora.modules(model):
        P, Q = m.bilora_P.detach(), m.bilora_Q.detach()
        for i in range(4):
            for j in range(4):
                r1 += (float(P[:, i] @ P[:, j]) - (i == j)) ** 2 + (float(Q[i] @ Q[j]) - (i == j)) ** 2
        for e in m.bilora_E.detach().tolist():
            lam = 1 / (1 + torch.exp(torch.tensor(-e))).item()
            h -= lam * torch.log(torch.tensor(lam)).item() + (1 - lam) * torch.log(torch.tensor(1 - lam)).item()
    assert bilora.orthogonality(model).item() == pytest.approx(r1, rel=1e-5)
    assert bilora.entropy(model).item() == pytest.approx(h, rel=1e-5)
    # orthonormal P and Q give R1 = 0; the entropy is largest at lam = 0.5 (E = 0)
    with torch.no_grad():
        for m in bilora.modules(model):
            m.bilora_P.copy_(torch.linalg.qr(m.bilora_P)[0])
            m.bilora_Q.copy_(torch.linalg.qr(m.bilora_Q.T)[0].T)
            m.bilora_E.zero_()
    assert bilora.orthogonality(model).item() == pytest.approx(0.0, abs=1e-4)
    assert bilora.entropy(model).item() == pytest.approx(4 * len(bilora.modules(model)) * 0.693147, rel=1e-5)
    softmax = peft_ds.apply_peft(tiny("tiny-gptj"), PeftSpec(method="bilora", r=4, alpha=8))
    assert bilora.entropy(softmax).item() == 0.0  # the penalty belongs to the binary form only


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("form", FORMS)
def test_fold_gives_identical_outputs(name, form):
    model = peft_ds.apply_peft(tiny(name), PeftSpec(method="bilora", r=4, alpha=8, dropout=0.0,
                                                    singular_values=form, sibo_lambda=0.2)).eval()
    randomize(model, std=0.05)
    ids, mask = random_batch(pad_left=[0, 2])
    before = model(input_ids=ids, attention_mask=mask).logits
    folded = bilora.fold(copy.deepcopy(model))
    assert folded.peft_spec.method == "lora" and not bilora.modules(folded)
    assert (folded(input_ids=ids, attention_mask=mask).logits - before).abs().max() < 1e-6
    m = next(m for m in bilora.modules(model) if m._initial_residual is None)  # callable outside a forward
    x = torch.randn(3, m.base_layer.in_features)
    with torch.no_grad():
        assert (m.fold()(x) - m(x)).abs().max() < 1e-6


def _cat(tensors):
    return torch.cat([t.flatten() for t in tensors])


def _cos(a, b):
    a, b = _cat(a), _cat(b)
    return float(a @ b / (a.norm() * b.norm()))


def _norm(a):
    return float(_cat(a).norm())


def _minus(a, b):
    return [x - y for x, y in zip(a, b)]


ETA, GAMMA1 = 1e-3, 0.1  # the lower lr of the setting below; R1's weight (PeftSpec's default)


def _hypergradient_setting(form):
    """tiny-llama (2 layers, eager attention for double backward), BiLoRA r 4 on the default targets,
    adapter weights N(0, 0.3^2) (P, Q far from orthogonal, so R1 pulls), a D1 and a D2 batch."""
    model = peft_ds.apply_peft(tiny("tiny-llama", num_hidden_layers=2, attn_implementation="eager"),
                               PeftSpec(method="bilora", r=4, alpha=8, dropout=0.0, singular_values=form)).train()
    randomize(model)
    ids1, _ = random_batch(seed=1)
    ids2, _ = random_batch(seed=2)
    return model, lambda f: f(input_ids=ids1, labels=ids1).loss, lambda f: f(input_ids=ids2, labels=ids2).loss


@pytest.fixture(scope="module", params=["softmax", "binary"])
def hypergradients(request):
    """At the setting above: exact through one SGD step of C with lr ETA; then that step done for real,
    and at its end darts with xi = ETA and with the default xi, first_order, and the Hessian-vector
    product -d2L1/dEdV v (v = dL2/dV) by double backward. gamma1 = 0 here: R1 does not depend on E, and
    on these far-from-orthogonal P, Q its pull would move V by far more than C's step, so the
    approximations, taken at the end of the step, would be compared at a distant point; exact with R1
    has its own test below."""
    torch.manual_seed(1234)
    model, lower_loss, upper_loss = _hypergradient_setting(request.param)
    lower, upper = bilora.split_parameters(model)
    assert all(p.dim() == 1 for p in upper) and len(upper) == len(bilora.modules(model))
    out = {"exact": bilora.exact_hypergradient(model, lower, upper, [lower_loss], upper_loss, ETA, gamma1=0.0)}
    step = torch.autograd.grad(lower_loss(model), lower)
    with torch.no_grad():
        for p, d in zip(lower, step):
            p -= ETA * d  # the same lower step, done for real
    saved = [p.detach().clone() for p in lower]
    for name, xi in (("darts_eta", ETA), ("darts_default", PeftSpec().darts_xi)):
        out[name] = bilora.darts_hypergradient(upper_loss(model), lambda: lower_loss(model), lower, upper, xi=xi)
        assert all(torch.equal(p, s) for p, s in zip(lower, saved))  # V restored exactly
    out["direct"] = list(torch.autograd.grad(upper_loss(model), upper))
    out["first"] = bilora.darts_hypergradient(upper_loss(model), None, lower, upper, first_order=True)
    v = torch.autograd.grad(upper_loss(model), lower)
    dL1_dV = torch.autograd.grad(lower_loss(model), lower, create_graph=True)
    out["hvp"] = [-h for h in torch.autograd.grad(sum((d * w).sum() for d, w in zip(dL1_dV, v)), upper)]
    return out


def test_darts_at_xi_lr_agrees_with_exact_and_first_order_is_the_direct_term(hypergradients):
    """xi = the lower lr (DARTS's second-order approximation) against exact through that one step:
    measured cosines 0.9999998 (softmax) and 0.999995 (binary)."""
    h = hypergradients
    assert all(torch.equal(a, b) for a, b in zip(h["first"], h["direct"]))
    assert _cos(h["darts_eta"], h["exact"]) >= 0.9999
    # the implicit terms alone agree too (the finite difference is a real Hessian-vector product), so
    # the agreement above is not only the shared direct term
    implicit_darts, implicit_exact = _minus(h["darts_eta"], h["first"]), _minus(h["exact"], h["first"])
    assert _cos(implicit_darts, implicit_exact) >= 0.95 and _norm(implicit_exact) > 1e-4


def test_darts_at_the_default_xi_is_bettys_term_1_over_lr_times_the_unrolled_one(hypergradients):
    """The default xi = 1 is Betty's darts, what the authors' lab code runs: its implicit term is the
    Hessian-vector product -d2L1/dEdV v itself (measured: cosine 0.9999996 / 0.99999, norm ratio
    0.9999 / 1.0013), 1/lr times the implicit term of the one-step unroll (measured ratio 986 / 949
    at lr 1e-3, cosine 0.9998 / 0.979). It dominates the direct term, so the whole hypergradient is
    far from exact's (measured cosine 0.59 softmax, -0.18 binary): xi = 1 is not an approximation of
    exact at T1 = 1; xi = lr is (the test above)."""
    h = hypergradients
    assert PeftSpec().darts_xi == 1.0
    implicit = _minus(h["darts_default"], h["first"])
    assert _cos(implicit, h["hvp"]) >= 0.999 and abs(_norm(implicit) / _norm(h["hvp"]) - 1) <= 0.01
    unrolled = _minus(h["exact"], h["first"])
    assert _cos(implicit, unrolled) >= 0.95 and 0.9 / ETA <= _norm(implicit) / _norm(unrolled) <= 1.1 / ETA
    assert _norm(implicit) > _norm(h["first"]) and _cos(h["darts_default"], h["exact"]) < 0.9


def _independent_unroll(model, lower_loss_fns, upper_loss_fn, lr, gamma1):
    """d C(V_T, E; D2) / dE through T SGD steps V <- V - lr d(C + gamma1 R1)/dV, written out here with
    torch.func and R1 = sum ||P^T P - I||^2 + ||Q Q^T - I||^2 by hand (nothing from bilora)."""
    from torch.func import functional_call

    E = {n: p for n, p in model.named_parameters() if n.endswith("bilora_E")}
    V = {n: p for n, p in model.named_parameters() if n.endswith(("bilora_P", "bilora_Q"))}

    def r1(V):
        eye = torch.eye(4)
        return sum(((M.T @ M - eye) ** 2).sum() if n.endswith("P") else ((M @ M.T - eye) ** 2).sum()
                   for n, M in V.items())

    for loss_fn in lower_loss_fns:
        loss = loss_fn(lambda **k: functional_call(model, V, (), k)) + gamma1 * r1(V)
        grads = torch.autograd.grad(loss, list(V.values()), create_graph=True)
        V = {n: p - lr * d for (n, p), d in zip(V.items(), grads)}
    return list(torch.autograd.grad(upper_loss_fn(lambda **k: functional_call(model, V, (), k)), list(E.values())))


def test_exact_unrolls_the_lower_objective_with_R1():
    """exact through T1 = 2 steps (D1 batch, then D2 batch as a second lower batch) equals the unroll
    written out independently, gamma1 R1 included; without R1 it would be off by ~10%."""
    model, lower_loss, upper_loss = _hypergradient_setting("softmax")
    lower, upper = bilora.split_parameters(model)
    got = bilora.exact_hypergradient(model, lower, upper, [lower_loss, upper_loss], upper_loss, ETA, gamma1=GAMMA1)
    expected = _independent_unroll(model, [lower_loss, upper_loss], upper_loss, ETA, GAMMA1)
    assert _norm(_minus(got, expected)) <= 1e-5 * _norm(expected)
    without_r1 = _independent_unroll(model, [lower_loss, upper_loss], upper_loss, ETA, 0.0)
    assert _norm(_minus(without_r1, expected)) >= 0.01 * _norm(expected)


def test_train_help_says_what_darts_xi_is(capsys):
    from peft_ds.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "method.darts_xi is DARTS's virtual step" in text and "1 (default) is Betty's darts" in text
    assert "train.lr gives DARTS's second-order approximation" in text


@pytest.mark.parametrize("fields,message", [
    (dict(T1=0), "T1 must be an integer >= 1"),
    (dict(T2=0), "T2 must be an integer >= 1"),
    (dict(split_ratio=1.0), "split_ratio must be in \\(0, 1\\)"),
    (dict(split_ratio=0.0), "split_ratio must be in \\(0, 1\\)"),
    (dict(singular_values="relu"), "unknown singular_values form 'relu'"),
    (dict(hypergradient="neumann"), "unknown hypergradient 'neumann'"),
])
def test_bad_settings(fields, message):
    with pytest.raises(PeftDsError, match=message):
        peft_ds.apply_peft(tiny("tiny-llama"), PeftSpec(method="bilora", **fields))


@pytest.mark.parametrize("overrides,message", [
    (["method.hypergradient=exact"], "hypergradient exact .* needs it unsharded; ZeRO-3 shards it"),
    (["method.hypergradient=exact", "deepspeed=ds_configs/no_zero_cpu.json"], "exact runs on 1 rank only"),
    (["deepspeed=ds_configs/zero2_bf16.json"], "method bilora trains under ZeRO stage 3"),
    (["method.split_ratio=0.999"], r"D2 \(upper level\) holds 3 records, fewer than one global batch \(16\)"),
])
def test_bad_training_settings_fail_before_any_work(tmp_path, overrides, message):
    from peft_ds.config import load_config
    from peft_ds.train import prepare

    config = load_config(None, ["method.method=bilora", f"output_dir={tmp_path}/out", *overrides])
    world = 2 if "exact runs on 1 rank" in message else 1
    with pytest.raises(PeftDsError, match=message):
        prepare(config, world)
    assert not (tmp_path / "out").exists()


def test_bad_settings_from_the_command_line(tmp_path):
    from launch import peft_ds as cli

    r = cli("train", "configs/llama7b_bilora.yaml", "--set", "method.method=bilora", "--set", "method.T1=0", "--set", f"output_dir={tmp_path}/o")
    assert r.returncode == 2 and "T1 must be an integer >= 1" in r.stderr and not (tmp_path / "o").exists()


def test_d1_d2_split_is_seeded_disjoint_and_8_to_2():
    from peft_ds.data import bilevel_split

    d1, d2 = bilevel_split(1000, 0.8, seed=42)
    assert len(d1) == 800 and len(d2) == 200 and not set(d1) & set(d2) and sorted(d1 + d2) == list(range(1000))
    assert (d1, d2) == bilevel_split(1000, 0.8, seed=42) and d2 != bilevel_split(1000, 0.8, seed=7)[1]
    with pytest.raises(PeftDsError, match="leaves one level without records"):
        bilevel_split(3, 0.2, seed=0)
