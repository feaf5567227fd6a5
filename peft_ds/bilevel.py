"""BiLoRA's bi-level schedule in the training loop (SPEC 2.5), under DeepSpeed ZeRO-3 or without ZeRO.

Each global step runs T1 lower steps (P, Q and every other non-E adapter parameter, on D1 batches,
loss `bilora.lower_objective`: C + gamma1 R1) and then T2 upper steps (E, on D2 batches, loss
C + gamma2 H(lam) for the binary form), each an optimizer step of its own. One DeepSpeed engine holds
both levels: `LevelAdamW` keeps them in two parameter groups (lr and upper_lr) and steps only the
active one, and before each step the other level's gradients are zeroed, so gradient clipping sees
the active level alone (as two optimisers would). E's gradient is reduced across ranks like any other gradient.

The upper step's gradient (`hypergradient`):
- first_order: g = dL2/dE on the D2 batch;
- darts (Betty's, SPEC 2.5): v = dL2/dV from the same backward, eps = 0.01 / ||v||, then the last D1
  batch again at V + eps v and V - eps v with the same dropout masks, each pass's E-gradient
  accumulated on its own, and E's gradient set to g + xi (g- - g+) / (2 eps). V is
  perturbed through GatheredParameters (ZeRO-3 re-partitions the edited values) and restored exactly.
  xi (`darts_xi`) is DARTS's virtual step: 1 (default) is Betty's darts, which has no xi; the lower lr
  is DARTS's second-order approximation (`bilora.darts_hypergradient`);
- exact: autograd through the T1 unrolled SGD steps of this global step from its starting V (lr = the
  lower lr) on the same lower objective C + gamma1 R1, on one unsharded rank only
  (`peft_ds.methods.bilora.exact_hypergradient`).

R1 and H(lam) do not pass through any module output, so under ZeRO-3 their graphs would meet released
(partitioned) parameters in backward; their gradients are computed on gathered copies instead and
added to the gradient partitions before the step."""

from __future__ import annotations

import json
import os

import torch

from .errors import PeftDsError
from .methods import bilora
from .objective import Objective

LOWER, UPPER = "lower", "upper"
D1_STREAM, D2_STREAM = 1, 2  # dropout-seed streams of the two levels' data (objective.Feed)
DARTS_ALPHA = 0.01  # Betty's darts_alpha: eps = alpha / ||v||


class LevelAdamW(torch.optim.AdamW):
    """AdamW over the lower and the upper parameter group that steps only the active level's group.
    ZeRO-3 calls step() once per sub-group with only that sub-group's flat fp32 partition in its group
    (stage3 `_optimizer_step`); emptying the inactive group's params skips it there and without ZeRO."""

    def __init__(self, lower, upper, lr: float, upper_lr: float, weight_decay: float):
        super().__init__([{"params": lower, "lr": lr, "level": LOWER},
                          {"params": upper, "lr": upper_lr, "level": UPPER}], lr=lr, weight_decay=weight_decay)
        self.level = LOWER

    def step(self, closure=None):
        kept = [group["params"] for group in self.param_groups]
        for group in self.param_groups:
            if group["level"] != self.level:
                group["params"] = []
        try:
            return super().step(closure)
        finally:
            for group, params in zip(self.param_groups, kept):
                group["params"] = params


# ---- gradients and values of (possibly ZeRO-3-partitioned) parameters ---------------------------


def _zero3(p) -> bool:
    return hasattr(p, "ds_id")


def _device(p) -> torch.device:
    """Where the values of `p` live: its ZeRO-3 partition's device (the accelerator), or its own."""
    return p.ds_tensor.device if _zero3(p) else p.device


def _gathered(params, modify: bool = False):
    """Full parameters inside the block; with modify, edits made there are re-partitioned on exit."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)


def _full_grad(p) -> torch.Tensor:
    """The full, rank-averaged gradient (collective under ZeRO-3)."""
    from deepspeed.utils import safe_get_full_grad

    g = safe_get_full_grad(p)
    if g is None:
        return torch.zeros(p.ds_shape if _zero3(p) else p.shape, device=_device(p))
    return g.detach().float().clone()


def _local_partition(p, full: torch.Tensor) -> torch.Tensor:
    """This rank's ZeRO-3 partition of a full-shaped tensor, zero-padded as DeepSpeed pads."""
    size = p.ds_tensor.ds_numel
    start = torch.distributed.get_rank() * size
    flat = full.flatten().float()
    out = torch.zeros(size, dtype=torch.float32, device=flat.device)
    n = max(0, min(size, flat.numel() - start))
    out[:n] = flat[start:start + n]
    return out


def _add_grad(p, value: torch.Tensor | None) -> None:
    """grad += value (full-shaped, the same on every rank); value None sets the gradient to zero."""
    from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

    if _zero3(p):
        local = safe_get_local_grad(p)
        new = torch.zeros_like(local) if value is None else local + _local_partition(p, value).to(local.dtype)
        safe_set_local_grad(p, new)
    elif value is None:
        if p.grad is not None:
            p.grad.zero_()
    elif p.grad is None:
        p.grad = value.to(p.dtype).clone()
    else:
        p.grad.add_(value.to(p.grad.dtype))


def _local_grad(p) -> torch.Tensor:
    """A copy of this rank's gradient: its ZeRO-3 partition (fp32), or the whole gradient without ZeRO."""
    from deepspeed.utils import safe_get_local_grad

    if _zero3(p):
        return safe_get_local_grad(p).clone()
    return torch.zeros(p.shape, device=p.device) if p.grad is None else p.grad.detach().float().clone()


def _set_local_grad(p, value: torch.Tensor) -> None:
    """Set this rank's gradient (shaped as `_local_grad` returns it)."""
    from deepspeed.utils import safe_set_local_grad

    if _zero3(p):
        safe_set_local_grad(p, value)
    elif p.grad is None:
        p.grad = value.to(p.dtype).view_as(p).clone()
    else:
        p.grad.copy_(value.view_as(p.grad))


def _gathered_copies(params) -> list[torch.Tensor]:
    """Detached fp32 copies of the full parameter values, requiring grad (collective under ZeRO-3)."""
    with _gathered(params):
        return [p.detach().float().clone().requires_grad_(True) for p in params]


# ---- the schedule -----------------------------------------------------------------------------


class BilevelObjective(Objective):
    def __init__(self, model, spec, optimizer: LevelAdamW, scheduler, d1, d2):
        self.model, self.spec, self.optimizer, self.scheduler = model, spec, optimizer, scheduler
        self.d1, self.d2 = d1, d2
        self.lower, self.upper = bilora.split_parameters(model)
        self.modules = bilora.modules(model)
        self._metrics = {}

    def train_step(self, engine, feed, dataset, step: int, after_backward=None) -> dict:
        """T1 lower steps, then T2 upper steps; `dataset` is unused (the levels have their own)."""
        T1, T2 = self.spec.T1, self.spec.T2
        start = self._lower_values() if self.spec.hypergradient == "exact" else None
        lower_batches, loss_sum, losses, tokens, r1 = [], 0.0, 0, 0.0, 0.0
        for t in range(T1):
            feed_step = feed.micro_batches(self.d1, step * T1 + t, stream=D1_STREAM)
            stats = self._lower_step(engine, feed_step, after_backward if t == 0 else None)
            lower_batches.append(feed_step)
            loss_sum, losses, tokens, r1 = (loss_sum + stats["loss_sum"], losses + len(feed_step.batches),
                                           tokens + stats["tokens"], stats["r1"])
        upper_sum = 0.0
        for t in range(T2):
            feed_step = feed.micro_batches(self.d2, step * T2 + t, stream=D2_STREAM)
            upper_sum += self._upper_step(engine, feed_step, lower_batches, start)
            tokens += sum(float(b["attention_mask"].sum()) for b in feed_step.batches)
        from .distributed import all_reduce_sum

        upper_sum, upper_count = all_reduce_sum([upper_sum, float(T2 * feed.accumulation)])
        self._metrics = {"upper_loss": upper_sum / upper_count, "r1": r1, **self._lam_summary()}
        return {"loss_sum": loss_sum, "losses": losses, "tokens": tokens}

    def _backward(self, engine, loss, last: bool) -> None:
        engine.set_gradient_accumulation_boundary(last)  # last: DeepSpeed's reduction (no-ZeRO) and step
        engine.backward(loss)

    def _step(self, engine, level: str) -> None:
        """The optimizer step of one level, with the other level's gradients zeroed."""
        for p in (self.upper if level == LOWER else self.lower):
            _add_grad(p, None)
        self.optimizer.level = level
        engine.set_gradient_accumulation_boundary(True)
        engine.step()

    def _forward_backward(self, engine, feed_step, after_backward=None) -> float:
        """The micro-batches' losses, backward (gradients accumulate); their sum."""
        total, last = 0.0, len(feed_step.batches) - 1
        for k, (batch, seed) in enumerate(zip(feed_step.batches, feed_step.seeds)):
            torch.manual_seed(seed)
            loss = engine(**batch).loss
            self._backward(engine, loss, k == last)
            if after_backward is not None:
                after_backward(k)
            total += loss.item()
        return total

    def _lower_step(self, engine, feed_step, after_backward=None) -> dict:
        """P, Q (E fixed) on a D1 batch, minimising `bilora.lower_objective` (C + gamma1 R1): C's gradient
        from the micro-batches' backward, the rest from the same objective at C = 0 on gathered P, Q."""
        loss_sum = self._forward_backward(engine, feed_step, after_backward=after_backward)
        pairs = self._orthogonal_pairs()
        copies = _gathered_copies(pairs)
        rest, r1 = bilora.lower_objective(torch.zeros(()), copies, self.spec.gamma1)
        if self.spec.gamma1 > 0:
            for p, g in zip(pairs, torch.autograd.grad(rest, copies)):
                _add_grad(p, g)
        self._step(engine, LOWER)
        tokens = sum(float(b["attention_mask"].sum()) for b in feed_step.batches)
        return {"loss_sum": loss_sum, "tokens": tokens, "r1": float(r1)}

    def _upper_step(self, engine, d2_step, lower_batches, start) -> float:
        """E on a D2 batch: C + gamma2 H(lam), with the configured hypergradient."""
        kind = self.spec.hypergradient
        if kind == "exact":
            upper_sum = self._exact_gradient(engine, d2_step, lower_batches, start)
        else:
            upper_sum = self._forward_backward(engine, d2_step)
            if kind == "darts":
                self._darts_term(engine, lower_batches[-1])
        binary = [m.bilora_E for m in self.modules if m.form == "binary"]
        if binary and self.spec.gamma2 > 0:
            self._add_regulariser(binary, bilora.entropy_of, self.spec.gamma2)
        self._step(engine, UPPER)
        return upper_sum

    def _darts_term(self, engine, last_d1) -> None:
        """E.grad = g + xi (g- - g+) / (2 eps), g+- = dL1/dE at V +- eps v on the last D1 batch. Each
        perturbed pass's E-gradient is accumulated on its own (from zero, as any gradient), so 1 rank and
        several sum the same terms, and the two are combined on this rank's partition."""
        v = [_full_grad(p) for p in self.lower]
        eps = bilora.darts_eps(v, DARTS_ALPHA)
        g = [_local_grad(p) for p in self.upper]
        with _gathered(self.lower):
            saved = [p.detach().clone() for p in self.lower]
        perturbed = []
        for sign in (1.0, -1.0):
            for p in self.upper:
                _add_grad(p, None)
            self._set_lower([s + sign * eps * d.to(s.dtype).view_as(s) for s, d in zip(saved, v)])
            self._forward_backward(engine, last_d1)
            perturbed.append([_local_grad(p) for p in self.upper])
        self._set_lower(saved)
        for p, gi, gp, gm in zip(self.upper, g, *perturbed):
            _set_local_grad(p, bilora.darts_combine(gi, gp, gm, eps, self.spec.darts_xi))

    def _exact_gradient(self, engine, d2_step, lower_batches, start) -> float:
        """E.grad = d L2(V_T(E), E) / dE through this global step's T1 SGD steps of the lower objective
        (C + gamma1 R1, as the lower steps) from `start`; returns the sum of the D2 micro-batch losses at
        the current V (for the log)."""
        model, lr = engine.module, self.scheduler.get_last_lr()[0]

        def mean_loss(feed_step):
            def loss(f):
                total = 0.0
                for batch, seed in zip(feed_step.batches, feed_step.seeds):
                    torch.manual_seed(seed)
                    total = total + f(**batch).loss
                return total / len(feed_step.batches)
            return loss

        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):  # the fused CPU/GPU kernels have no double backward
            grads = bilora.exact_hypergradient(model, self.lower, self.upper, [mean_loss(b) for b in lower_batches],
                                               mean_loss(d2_step), lr, gamma1=self.spec.gamma1,
                                               start=start)
        for p, g in zip(self.upper, grads):
            p.grad = g.detach().clone()
        with torch.no_grad():
            return float(mean_loss(d2_step)(model)) * len(d2_step.batches)

    # ---- helpers ----

    def _orthogonal_pairs(self):
        return bilora.orthogonal_pairs(self.model)

    def _add_regulariser(self, params, fn, weight: float) -> float:
        """weight * d fn / d params added to their gradients; returns fn's value."""
        copies = _gathered_copies(params)
        value = fn(*copies)
        if weight > 0:
            for p, g in zip(params, torch.autograd.grad(value, copies)):
                _add_grad(p, weight * g)
        return float(value.detach())

    def _set_lower(self, values) -> None:
        with _gathered(self.lower, modify=True), torch.no_grad():
            for p, value in zip(self.lower, values):
                p.data.copy_(value)

    def _lower_values(self):
        with _gathered(self.lower):
            return [p.detach().clone() for p in self.lower]

    def lam_values(self) -> dict[str, list[float]]:
        """lam of every BiLoRA module (collective under ZeRO-3), keyed by module name."""
        names = {id(m): n for n, m in self.model.named_modules()}
        with _gathered(self.upper):
            return {names[id(m)]: m.lam().detach().float().tolist() for m in self.modules}

    def _lam_summary(self) -> dict:
        lam = torch.tensor([v for values in self.lam_values().values() for v in values])
        return {"lam_min": float(lam.min()), "lam_max": float(lam.max()), "lam_std": float(lam.std())}

    def metrics(self) -> dict:
        return dict(self._metrics)

    def write_outputs(self, out_dir: str, is_main: bool) -> dict:
        """lam.json (lam per module) and lam.png (sorted lam per module); collective."""
        lam = self.lam_values()
        paths = {"lam": os.path.join(out_dir, "lam.json"), "lam_plot": os.path.join(out_dir, "lam.png")}
        if is_main:
            with open(paths["lam"], "w") as f:
                json.dump({"singular_values": self.spec.singular_values, "lam": lam}, f, indent=1)
            plot_lam(lam, self.spec.singular_values, paths["lam_plot"])
        return paths


def plot_lam(lam: dict[str, list[float]], form: str, png_path: str) -> None:
    """Sorted lam of every module, one line each, coloured by depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    cmap = plt.get_cmap("viridis")
    for i, (name, values) in enumerate(lam.items()):
        ax.plot(range(1, len(values) + 1), sorted(values, reverse=True), color=cmap(i / max(1, len(lam) - 1)),
                alpha=0.6, lw=1)
    ax.set_xlabel("rank index (sorted)")
    ax.set_ylabel(f"lam ({form})")
    ax.set_title(f"BiLoRA pseudo singular values of {len(lam)} modules\n(colour: depth, dark = first layer)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


# ---- set-up checks and data -------------------------------------------------------------------


def check(spec, zero_stage: int, world_size: int) -> None:
    """Settings the bi-level loop cannot run with; raised before any work starts."""
    if zero_stage not in (0, 3):
        raise PeftDsError(f"method bilora trains under ZeRO stage 3 (or without ZeRO for debugging), the DeepSpeed "
                          f"config asks for stage {zero_stage}")
    if spec.hypergradient == "exact" and zero_stage == 3:
        raise PeftDsError("hypergradient exact differentiates through unrolled steps of the whole model and needs it "
                          "unsharded; ZeRO-3 shards it: use darts or first_order, or exact with "
                          "ds_configs/no_zero_cpu.json on 1 rank (small models only)")
    if spec.hypergradient == "exact" and world_size > 1:
        raise PeftDsError(f"hypergradient exact runs on 1 rank only (small models), this run has {world_size}")


def levels(train_set, upper_set, spec, seed: int, global_batch: int):
    """(D1, D2): D1 the training set and D2 the given upper-level set, or a seeded split of the training
    set at spec.split_ratio. Each must hold at least one global batch."""
    from .data import bilevel_split

    if upper_set is None:
        d1_ids, d2_ids = bilevel_split(len(train_set), spec.split_ratio, seed)
        d1, d2 = train_set.select(d1_ids), train_set.select(d2_ids)
    else:
        d1, d2 = train_set, upper_set
    for name, ds in (("D1 (lower level)", d1), ("D2 (upper level)", d2)):
        if len(ds) < global_batch:
            raise PeftDsError(f"BiLoRA's {name} holds {len(ds)} records, fewer than one global batch ({global_batch})")
    return d1, d2
