"""AdaMix: mixture of adaptations (SPEC 2.4; Wang et al., EMNLP 2022), composable with SIBO.

Mixture modules hold M experts of LoRA's A and/or B (default: M experts of A, B shared) or of the
adapter's down and/or up projection (default: M experts of down, up shared). In training every
mixture module uses one expert per view for the whole micro-batch, chosen by a `Router` whose
generator is seeded identically on every rank; in eval mode each expert set is averaged on the fly
(nothing cached), and `merge()` turns the model into plain LoRA / plain adapters.

Consistency regularisation (SPEC 2.4): loss = CE(view 1) + w * symKL(view 1, view 2) over target
tokens. Both views run as ONE forward of the doubled batch, each half through its own route and
dropout mask: ZeRO-3 gathers each layer once and never sees two forwards before a backward.
"""

from __future__ import annotations

import dataclasses
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from ..objective import Objective
from .adapter import AdapterLinear
from .init import drawn, normal
from .lora import LoraLinear, add_rounded_once
from .sibo import InitialResidual

IGNORE_INDEX = -100


class Router:
    """Stochastic routing: expert indices [module, view, (A or down, B or up)], drawn for all mixture
    modules at once from one generator. Plain object, shared by the model's mixture modules."""

    def __init__(self, num_experts: int, seed: int = 0):
        self.num_experts = num_experts
        self.generator = torch.Generator().manual_seed(seed)
        self.num_modules = 0
        self.routes = None
        self.views = 1
        self.auto = True  # draw at every training forward; the training loop draws once per step instead

    def register(self) -> int:
        self.num_modules += 1
        return self.num_modules - 1

    def draw(self) -> torch.Tensor:
        self.routes = torch.randint(self.num_experts, (self.num_modules, 2, 2), generator=self.generator)
        return self.routes

    def route(self, index: int, view: int) -> tuple[int, int]:
        if self.routes is None:
            raise RuntimeError("AdaMix: no route drawn (train-mode forward outside the model's forward)")
        a, b = self.routes[index, view].tolist()
        return a, b

    def digest(self) -> int:
        return zlib.crc32(self.routes.numpy().tobytes()) if self.routes is not None else 0

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def stacked(weights) -> torch.Tensor:
    """Experts as one [M, ...] tensor (a shared matrix as M = 1). Every forward reads every expert,
    in the same order, whatever the route: ZeRO-3 traces parameter use and prefetches by that trace,
    and fails on a use pattern that changes from step to step. Unrouted experts get zero gradients."""
    return weights.unsqueeze(0) if isinstance(weights, torch.Tensor) else torch.stack(list(weights))


def expert(experts: torch.Tensor, index):
    """One expert of a stacked set, or its mean (index None: eval / merge); a shared matrix as is."""
    if experts.shape[0] == 1:
        return experts[0]
    return experts.mean(0) if index is None else experts[index]


def _experts(first: torch.Tensor, count: int, init=None) -> nn.Module | nn.Parameter:
    """A shared Parameter (count 1) or a ParameterList of `count` experts (copies of `first`, or drawn
    by `init`)."""
    if count == 1:
        return nn.Parameter(first)
    return nn.ParameterList([nn.Parameter(first.clone() if init is None else init(first)) for _ in range(count)])


def over_views(module, z: torch.Tensor, apply, *alongside: torch.Tensor) -> torch.Tensor:
    """apply(z_part, i, j, *alongside_parts) with the routed experts of each view (each half of a doubled
    batch; tensors `alongside` are split the same way), or with the averaged experts in eval mode."""
    if not module.training:
        return apply(z, None, None, *alongside)
    router = module._router
    if router.views == 1:
        return apply(z, *router.route(module.route_index, 0), *alongside)
    split = zip(*(t.chunk(router.views, dim=0) for t in (z, *alongside)))
    return torch.cat([apply(part, *router.route(module.route_index, view), *rest)
                      for view, (part, *rest) in enumerate(split)], dim=0)


class AdamixLoraLinear(LoraLinear):
    """y = W x + s * B_j A_i dropout(x~): A experts start as identical copies, B zeros (AdaMix NLG)."""

    def __init__(self, base_layer, r, alpha, dropout, num_experts, share_A, share_B, router: Router,
                 initial_residual: InitialResidual | None = None):
        super().__init__(base_layer, r, alpha, dropout, initial_residual)
        a, b = self.lora_A.data, self.lora_B.data
        del self.lora_A, self.lora_B
        self.lora_A = _experts(a, 1 if share_A else num_experts)
        self.lora_B = _experts(b, 1 if share_B else num_experts)
        self._router = router
        self.route_index = router.register()

    def add_delta(self, result, z):
        """result + s * B_j A_i z per view. In fp32 as LoraLinear: s on the r-wide intermediate and each view's
        addition fused into its last matmul (two passes over the output less). 16-bit: PEFT's order, one
        rounding."""
        A, B = stacked(self.lora_A), stacked(self.lora_B)
        if not result.dtype == z.dtype == torch.float32:
            delta = over_views(self, z, lambda part, i, j: F.linear(F.linear(part, expert(A, i)), expert(B, j)))
            return add_rounded_once(result, delta * self.scaling)

        def fused(part, i, j, out):
            h = F.linear(part, expert(A, i)) * self.scaling
            rows = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), expert(B, j).t())
            return rows.view(out.shape)

        return over_views(self, z, fused, result)

    def merged(self) -> LoraLinear:
        """A plain LoRA with each expert set averaged: with shared B, exactly the mean of the experts' dW."""
        plain = LoraLinear(self.base_layer, self.lora_B_shape()[1], self.scaling * self.lora_B_shape()[1],
                           0.0, self._initial_residual)
        plain.dropout = self.dropout
        with torch.no_grad():
            plain.lora_A.copy_(expert(stacked(self.lora_A), None))
            plain.lora_B.copy_(expert(stacked(self.lora_B), None))
        return plain.train(self.training)

    def lora_B_shape(self):
        return stacked(self.lora_B).shape[1:]


class AdamixAdapterLinear(AdapterLinear):
    """a(x) = x + scale * U_j f(D_i dropout(x~)): every expert its own N(0, 0.02) draw (AdaMix NLU)."""

    def __init__(self, base_layer, bottleneck_size, non_linearity, dropout, scale, output_side, num_experts,
                 share_down, share_up, router: Router, initial_residual: InitialResidual | None = None):
        super().__init__(base_layer, bottleneck_size, non_linearity, dropout, scale, output_side, initial_residual)

        def redraw(t):
            return drawn(t.shape, t.device, normal(0.02)).data

        down, up = self.adapter_down.data, self.adapter_up.data
        del self.adapter_down, self.adapter_up
        self.adapter_down = _experts(down, 1 if share_down else num_experts, redraw)
        self.adapter_up = _experts(up, 1 if share_up else num_experts, redraw)
        self._router = router
        self.route_index = router.register()

    def branch(self, z):
        D, U = stacked(self.adapter_down), stacked(self.adapter_up)
        return over_views(self, z, lambda part, i, j: F.linear(
            self.activation(F.linear(part, expert(D, i))), expert(U, j)) * self.scale)

    def merged(self) -> AdapterLinear:
        down = expert(stacked(self.adapter_down), None)
        plain = AdapterLinear(self.base_layer, down.shape[0], self.non_linearity, 0.0, self.scale, self.output_side,
                              self._initial_residual)
        plain.dropout = self.dropout
        with torch.no_grad():
            plain.adapter_down.copy_(down)
            plain.adapter_up.copy_(expert(stacked(self.adapter_up), None))
        return plain.train(self.training)


MIXTURES = (AdamixLoraLinear, AdamixAdapterLinear)


def merge(model: nn.Module) -> nn.Module:
    """Replace every mixture module by its averaged plain module, in place (inference and export)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, MIXTURES):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.merged())
    model.peft_spec = merged_spec(model.peft_spec)
    return model


def merged_spec(spec):
    return dataclasses.replace(spec, method=spec.method.removeprefix("adamix_"))


def merge_state(state: dict) -> dict:
    """`merge` on an adapter state dict: every expert set `X.N` (N = 0..M-1) becomes its mean `X`."""
    groups = {}
    for name, value in state.items():
        stem, _, index = name.rpartition(".")
        if index.isdigit():
            groups.setdefault(stem, {})[int(index)] = value
        else:
            groups[name] = value
    return {stem: value if isinstance(value, torch.Tensor) else expert(stacked([value[i] for i in sorted(value)]), None)
            for stem, value in groups.items()}


# ---- consistency regularisation -----------------------------------------------------------------


def causal_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, mean over target tokens (labels != -100), as transformers computes it."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


def symmetric_kl(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """SPEC 2.4: 0.5 * (KL(log_softmax(a) || softmax(b detached)) + KL(log_softmax(b) || softmax(a
    detached))) in fp32, over the target positions (next label != -100), mean over those positions."""
    target = labels[:, 1:] != IGNORE_INDEX
    a, b = a[:, :-1][target].float(), b[:, :-1][target].float()
    log_a, log_b = F.log_softmax(a, -1), F.log_softmax(b, -1)
    kl_ab = F.kl_div(log_a, log_b.detach(), log_target=True, reduction="none").sum(-1)
    kl_ba = F.kl_div(log_b, log_a.detach(), log_target=True, reduction="none").sum(-1)
    return 0.5 * (kl_ab + kl_ba).mean()


def consistency_loss(model, batch: dict, weight: float, one_pass: bool = True) -> torch.Tensor:
    """CE(view 1) + weight * symKL(view 1, view 2). one_pass: the doubled batch in one forward (each
    half its own route); otherwise two forwards with the same two routes (for tests and benchmarks)."""
    router = model.adamix_router
    if one_pass:
        doubled = {k: torch.cat([v, v], dim=0) for k, v in batch.items() if k != "labels"}
        router.views = 2
        try:
            logits = model(**doubled).logits
        finally:
            router.views = 1
        first, second = logits.chunk(2, dim=0)
    else:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        auto, router.auto = router.auto, False
        routes = router.routes
        try:
            first = model(**inputs).logits
            router.routes = routes[:, [1, 1]]  # view 2's route in the view-1 slot
            second = model(**inputs).logits
        finally:
            router.routes, router.auto = routes, auto
    return causal_ce(first, batch["labels"]) + weight * symmetric_kl(first, second, batch["labels"])


def _draw_hook(module, args, kwargs):
    router = module.adamix_router
    if router.auto and module.training:
        router.draw()


def attach_router(model: nn.Module, base_model: nn.Module, router: Router) -> None:
    """The model's router; in plain PyTorch a training-mode forward draws fresh routes first."""
    model.adamix_router = router
    base_model.adamix_router = router
    base_model.register_forward_pre_hook(_draw_hook, with_kwargs=True)


class AdamixObjective(Objective):
    """The training loop's AdaMix hooks: one route per optimizer step for every micro-batch on every
    rank (so any world size trains alike; AdaMix's code draws per forward, the same thing without
    gradient accumulation), the consistency loss, and the route generator's state for checkpoints."""

    def __init__(self, router: Router, consistency_weight: float):
        self.router, self.weight = router, consistency_weight
        router.auto = False

    def begin_step(self, step: int) -> None:
        self.router.draw()

    def loss(self, model, batch):
        if self.weight == 0:
            return model(**batch).loss
        return consistency_loss(model, batch, self.weight)

    def metrics(self) -> dict:
        return {"route_digest": self.router.digest()}

    def state_dict(self) -> dict:
        return self.router.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.router.load_state_dict(state)
