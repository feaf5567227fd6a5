"""Over-smoothing diagnostic (SPEC 5; SIBO Eq. 3): per layer, the mean token-wise cosine similarity
    1/(m(m-1)) sum_{i != j} cos(h_i, h_j)
over the m non-padding tokens of each sequence, averaged over the sequences of the batch.
Layer 0 is h0 (the token-embedding output); layer l >= 1 is the output of decoder layer l."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import architectures


def mean_pairwise_cosine(hidden: torch.Tensor) -> torch.Tensor:
    """SIBO Eq. 3 for one sequence: hidden is m x d, m >= 2."""
    m = hidden.shape[0]
    unit = F.normalize(hidden.float(), dim=-1)
    sim = unit @ unit.T
    return (sim.sum() - sim.diagonal().sum()) / (m * (m - 1))


@torch.no_grad()
def token_similarity(model: nn.Module, batch: dict) -> list[float]:
    """Per-layer over-smoothing of `model` on `batch` (input_ids, attention_mask)."""
    arch = architectures.detect(model)
    outputs = []

    def record(module, args, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)

    hooks = [model.get_submodule(arch.embedding).register_forward_hook(record)]
    hooks += [layer.register_forward_hook(record) for layer in model.get_submodule(arch.layers)]
    was_training = model.training
    model.eval()
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(batch["input_ids"])
    keep = [b for b in range(mask.shape[0]) if int(mask[b].sum()) >= 2]
    result = []
    for hidden in outputs[: 1 + len(model.get_submodule(arch.layers))]:
        per_seq = [mean_pairwise_cosine(hidden[b][mask[b].bool()]) for b in keep]
        result.append(torch.stack(per_seq).mean().item())
    return result


def plot_similarity(curves: dict, path: str, title: str = "Over-smoothing: mean token-wise cosine similarity") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, values in curves.items():
        ax.plot(range(len(values)), values, marker="o", label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer (0 = token embedding)")
    ax.set_ylabel("mean token-wise cosine similarity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
