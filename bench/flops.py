"""Model FLOPs of one adapter training step on a frozen decoder, and the peak rates they are set against.

Per token (model FLOPs: what the step must compute, not what a kernel happens to do; recomputation under
gradient checkpointing is not counted):
  4 N_frozen   forward 2 N, backward 2 N through the frozen weights (input gradients only: no weight
               gradient exists for a frozen matrix); N_frozen counts every frozen matrix a token meets,
               the LM head included, the embedding lookup not
  6 N_adapter  forward 2 N, backward 4 N (input and weight gradients) of the adapter matrices
  12 L h s     attention scores and weighted values, forward 4 L h s, backward 8 L h s, counted over the
               whole sequence as PaLM's appendix B does (causal masking not subtracted)
Elementwise work (norms, activations, SIBO's blend, softmax) is left out.
"""

from __future__ import annotations

import torch

# Dense bf16 peaks (no sparsity), TFLOP/s, from the vendors' datasheets (SXM parts).
PEAK_BF16_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0}


def frozen_matrix_params(model) -> int:
    """Elements of every frozen weight matrix a token passes through (decoder linears and the LM head)."""
    from peft_ds.injection import adapter_parameters

    trainable = {id(p) for p in adapter_parameters(model).values()}
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in trainable:
            total += _numel(module.weight)
    return total


def adapter_matrix_params(model) -> int:
    from peft_ds.injection import adapter_parameters

    return sum(_numel(p) for p in adapter_parameters(model).values() if len(_shape(p)) == 2)


def _shape(param) -> tuple:
    return tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 keeps the full shape aside


def _numel(param) -> int:
    return int(torch.Size(_shape(param)).numel())


def flops_per_token(model, seq: int) -> dict:
    """The three terms above and their sum, for `model` with its adapters injected."""
    config = model.config
    layers = config.num_hidden_layers
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    terms = {"frozen": 4 * frozen_matrix_params(model), "adapter": 6 * adapter_matrix_params(model),
             "attention": 12 * layers * hidden * seq}
    terms["total"] = sum(terms.values())
    return terms


def gpu_peak_bf16() -> tuple[str, float | None]:
    """(device name, dense bf16 peak FLOP/s from the table, or None for a GPU not in it)."""
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return name, tflops * 1e12
    return name, None


def cpu_gemm_ceiling(dtype=torch.float32, n: int = 2048, repeats: int = 5) -> float:
    """Measured FLOP/s of an n x n x n matmul with this process's threads (the CPU's practical peak)."""
    import time

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - began)
    return 2 * n**3 / best
