"""BiLoRA: pseudo-SVD LoRA trained by bi-level optimisation (SPEC 2.5; Qiang, Zhang, Xie, 2024).

    dW = s * P diag(lam(E)) Q,   s = alpha / r,   P: out x r, Q: r x in (N(0, 0.02), as AdaLoRA), E: r

lam(E): softmax (default; E = 0 at init, so lam = 1/r), real (lam = E), binary (lam = sigmoid(E),
with gamma2 times the entropy H(lam) added to the upper loss). The lower level trains P and Q (and any
other non-E adapter parameter) on D1 with gamma1 * R1; the upper level trains E on D2.

Hypergradients for E (`hypergradient`): `darts` (Betty's finite-difference form, SPEC 2.5; its xi is
DARTS's virtual step), `first_order` (the direct term only) and `exact` (autograd through T1 unrolled
SGD steps of the lower objective C + gamma1 R1, `lower_objective`)."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from .init import device_of, drawn, normal
from .lora import LoraLinear, add_rounded_once
from .sibo import InitialResidual, branch_input

LAMBDA_FORMS = ("softmax", "real", "binary")
UPPER = "bilora_E"


def singular_values(E: torch.Tensor, form: str) -> torch.Tensor:
    """lam(E), BiLoRA's pseudo singular values."""
    if form == "softmax":
        return torch.softmax(E.float(), -1).to(E.dtype)
    if form == "binary":
        return torch.sigmoid(E)
    return E


class BiLoraLinear(nn.Module):
    """Wraps a frozen nn.Linear:  y = W x + s * P diag(lam(E)) Q dropout(x~)."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float, form: str,
                 initial_residual: InitialResidual | None = None):
        super().__init__()
        self.base_layer = base_layer
        device = device_of(base_layer)
        self.bilora_P = drawn((base_layer.out_features, r), device, normal(0.02))
        self.bilora_E = drawn((r,), device)
        self.bilora_Q = drawn((r, base_layer.in_features), device, normal(0.02))
        self.form = form
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._initial_residual = initial_residual

    def lam(self) -> torch.Tensor:
        return singular_values(self.bilora_E, self.form)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        z = self.dropout(branch_input(self._initial_residual, x).to(self.bilora_P.dtype))
        h = F.linear(z, self.bilora_Q) * (self.lam() * self.scaling)
        return add_rounded_once(result, F.linear(h, self.bilora_P))

    def fold(self) -> LoraLinear:
        """A plain LoRA with identical outputs (`folded_weights`), same r and alpha."""
        plain = LoraLinear(self.base_layer, self.r, self.alpha, 0.0, self._initial_residual)
        plain.dropout = self.dropout
        with torch.no_grad():
            lora_A, lora_B = folded_weights(self.bilora_P, self.bilora_E, self.bilora_Q, self.form)
            plain.lora_A.copy_(lora_A)
            plain.lora_B.copy_(lora_B)
        return plain.train(self.training)


def folded_weights(P: torch.Tensor, E: torch.Tensor, Q: torch.Tensor, form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC 2.5 export: (A', B') = (Q, P diag(lam(E)))."""
    return Q, P * singular_values(E, form)


def modules(model: nn.Module) -> list[BiLoraLinear]:
    return [m for m in model.modules() if isinstance(m, BiLoraLinear)]


def orthogonality_of(*pairs: torch.Tensor) -> torch.Tensor:
    """R1 = sum_k ||P_k^T P_k - I||_F^2 + ||Q_k Q_k^T - I||_F^2, for P_1, Q_1, P_2, Q_2, ..."""
    total = torch.zeros(())
    for P, Q in zip(pairs[0::2], pairs[1::2]):
        P, Q = P.float(), Q.float()
        eye = torch.eye(P.shape[1], device=P.device)
        total = total + ((P.T @ P - eye) ** 2).sum() + ((Q @ Q.T - eye) ** 2).sum()
    return total


def entropy_of(*Es: torch.Tensor) -> torch.Tensor:
    """H(lam) = -sum [lam log lam + (1 - lam) log(1 - lam)], lam = sigmoid(E) (the binary form). SPEC 2.5:
    the paper's printed R2 is minus this; minimising H pushes lam to 0 or 1, the paper's stated intent."""
    total = torch.zeros(())
    for E in Es:
        lam = singular_values(E.float(), "binary").clamp(1e-6, 1 - 1e-6)
        total = total - (lam * lam.log() + (1 - lam) * (1 - lam).log()).sum()
    return total


def orthogonal_pairs(model: nn.Module) -> list[nn.Parameter]:
    """P_1, Q_1, P_2, Q_2, ... of the model's BiLoRA modules, as R1 takes them."""
    return [p for m in modules(model) for p in (m.bilora_P, m.bilora_Q)]


def orthogonality(model: nn.Module) -> torch.Tensor:
    """R1 over the model's BiLoRA modules."""
    return orthogonality_of(*orthogonal_pairs(model))


def lower_objective(data_loss: torch.Tensor, P_and_Q, gamma1: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L1, R1) with L1 = C(V, E; D1) + gamma1 R1(V), the paper's lower problem (SPEC 2.5): what every
    lower step minimises and what `exact_hypergradient` unrolls. P_and_Q as `orthogonality_of` takes them."""
    r1 = orthogonality_of(*P_and_Q)
    return data_loss + gamma1 * r1, r1


def entropy(model: nn.Module) -> torch.Tensor:
    """H(lam) over the model's binary-form BiLoRA modules (0 for the other forms)."""
    return entropy_of(*[m.bilora_E for m in modules(model) if m.form == "binary"])


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(lower, upper): E is the upper level; every other trainable adapter parameter is the lower."""
    lower, upper = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (upper if name.endswith(UPPER) else lower).append(p)
    return lower, upper


def fold(model: nn.Module) -> nn.Module:
    """Replace every BiLoRA module by its folded plain LoRA, in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BiLoraLinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.fold())
    model.peft_spec = folded_spec(model.peft_spec)
    return model


def folded_spec(spec):
    return dataclasses.replace(spec, method="lora")


def fold_state(state: dict, form: str) -> dict:
    """`fold` on an adapter state dict: every `X.bilora_P/E/Q` becomes `X.lora_A/B`; other keys kept."""
    out = {}
    for name, value in state.items():
        prefix, _, kind = name.rpartition(".")
        if kind == UPPER or kind == "bilora_Q":
            continue
        if kind == "bilora_P":
            out[f"{prefix}.lora_A"], out[f"{prefix}.lora_B"] = folded_weights(
                value, state[f"{prefix}.{UPPER}"], state[f"{prefix}.bilora_Q"], form)
        else:
            out[name] = value
    return out


# ---- hypergradients of the upper loss with respect to E (SPEC 2.5) ------------------------------


def darts_eps(v, alpha: float = 0.01) -> float:
    """eps = alpha / ||v||. The squares are summed in float64 (each fp32 square is exact there), so eps
    does not depend on the order of the sum (threads, ranks): the finite difference divides by 2 eps and
    would amplify a difference in eps's last bit into E's gradient."""
    return alpha / (math.sqrt(sum(float(t.detach().double().square().sum()) for t in v)) + 1e-15)


def darts_combine(g, g_plus, g_minus, eps: float, xi: float):
    """E's darts gradient g + xi (g- - g+) / (2 eps): the difference of the two perturbed gradients is taken
    first, at their own magnitude (not accumulated into g as two terms scaled by 1 / (2 eps) that cancel)."""
    return g + xi * (g_minus - g_plus) / (2 * eps)


def darts_hypergradient(upper_loss, lower_loss_fn, lower, upper, first_order: bool = False, xi: float = 1.0,
                        alpha: float = 0.01):
    """E's gradient: g = dL2/dE; for darts also v = dL2/dV, eps = alpha / ||v||, g+- = dL1/dE at
    V +- eps v (lower_loss_fn: the lower loss on the last D1 batch; C alone will do, gamma1 R1 does not
    depend on E), and g + xi (g- - g+) / (2 eps), where (g- - g+) / (2 eps) ~ -d2L1/dEdV v.
    xi = 1 is Betty's darts (no xi: the implicit-function hypergradient with the inverse lower Hessian
    replaced by the identity); xi = the lower lr is DARTS's second-order approximation, the hypergradient
    through one unrolled SGD step. The lower parameters are restored exactly (saved, not re-added)."""
    grads = torch.autograd.grad(upper_loss, upper + ([] if first_order else lower), allow_unused=True)
    g = [torch.zeros_like(p) if d is None else d for p, d in zip(upper, grads[: len(upper)])]
    if first_order:
        return g
    v = [torch.zeros_like(p) if d is None else d for p, d in zip(lower, grads[len(upper):])]
    eps = darts_eps(v, alpha)
    saved = [p.detach().clone() for p in lower]
    terms = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            for p, s, d in zip(lower, saved, v):
                p.copy_(s + sign * eps * d)
        terms.append(torch.autograd.grad(lower_loss_fn(), upper, allow_unused=True))
    with torch.no_grad():
        for p, s in zip(lower, saved):
            p.copy_(s)
    g_plus, g_minus = ([torch.zeros_like(p) if d is None else d for p, d in zip(upper, t)] for t in terms)
    return [darts_combine(gi, gp, gm, eps, xi) for gi, gp, gm in zip(g, g_plus, g_minus)]


def exact_hypergradient(model, lower, upper, lower_loss_fns, upper_loss_fn, lr: float, *, gamma1: float, start=None):
    """d L2(V_T(E), E) / dE through T unrolled SGD steps V_{t+1} = V_t - lr dL1_t/dV (create_graph) of
    the lower objective L1_t = `lower_objective`(lower_loss_fns[t], gamma1), from V_0 = the lower
    parameters' values or `start`: for small models and tests; it holds every step's graph."""
    from torch.func import functional_call

    names = {id(p): n for n, p in model.named_parameters()}
    if start is None:
        params = {names[id(p)]: p for p in lower}
    else:
        params = {names[id(p)]: s.detach().clone().requires_grad_(True) for p, s in zip(lower, start)}
    pair_names = [names[id(p)] for p in orthogonal_pairs(model)]
    for loss_fn in lower_loss_fns:
        data_loss = loss_fn(lambda *a, **k: functional_call(model, params, a, k))
        loss, _ = lower_objective(data_loss, [params[n] for n in pair_names], gamma1)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        params = {n: p - lr * d for (n, p), d in zip(params.items(), grads)}
    loss = upper_loss_fn(lambda *a, **k: functional_call(model, params, a, k))
    return list(torch.autograd.grad(loss, upper))
