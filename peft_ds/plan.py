"""`peft-ds plan`: the per-rank memory of a run, from its run config alone (no weights, no GPU).

The backbone is the real transformers class on the meta device (`models.build_skeleton`) with the
adapters injected by `injection.apply_peft`, so every parameter count is exact; the DeepSpeed settings
are the ones training resolves (`train.prepare` -> `ds_config.resolve`). Each term below is one function
and names the DeepSpeed 0.19.8 code or the formula it follows. Bytes are per rank.

Model states (ZeRO-3, `deepspeed/runtime/zero/partition_parameters.py`, `stage3.py`):
  backbone_partition   frozen parameters, ceil(numel / world) each, in the model dtype (`_partition_param`)
  persisted            parameters with numel <= stage3_param_persistence_threshold stay whole on every rank
                       (`Init._zero_init_param`, `DeepSpeedZeRoOffload.mark_persistent_parameters`)
  adapter_params       trainable partitions, copied into one flat buffer (`lp_param_buffer`, defragment)
  fp32_masters         4 bytes per trainable partition element, none when the model is fp32 and the optimizer
                       is not offloaded (stage3.py `_create_fp32_partitions`: the flat group is reused)
  adam_moments         exp_avg + exp_avg_sq of torch AdamW over the fp32 partition: 8 bytes per element
  gradient_partition   `grad_partitions_flat_buffer`: 4 bytes (gradient_accumulation_dtype fp32) per partition element
  gradient_step_buffers  the fp32 grad the step flattens (`_prepare_fp32_grad_for_sub_group`) and the buffer of the
                       full (unpartitioned) adapter numel in fp32 that `initialize_optimizer_states` allocates
Working buffers:
  reduce_bucket        contiguous_gradients: one reduce_bucket_size buffer per gradient dtype (stage3.py `ipg_buckets`)
  gathered_params      with more than one rank, the full copies gathered at the end of the forward pass, when the
                       activations peak: DeepSpeed's parameter coordinator replayed over the module trace
                       (`gathered_during_forward`: fetch, prefetch up to stage3_prefetch_bucket_size per module
                       fetch while fewer than stage3_max_live_parameters are gathered, release unless reused within
                       stage3_max_reuse_distance or already queued for a later use; partitioned_param_coordinator.py
                       `fetch_sub_module`, `__params_to_release`). Every module fetch, parameterless ones too,
                       prefetches a bucket, so at depth the prefetch runs ahead into the backward pass and re-gathers
                       its parameters up to stage3_max_live_parameters. One rank gathers nothing
                       (`_no_gather_coalesced`) unless the partitions live on the host (offload_param)
  allgather_staging    gloo only (CPU ranks, --backend gloo): all_gather_into_tensor stages its whole output again
Activations (what autograd keeps for backward, counted by running the real model class on the meta device
under torch.autograd.graph.saved_tensors_hooks: frozen weights save no input unless an adapter or a later
trainable needs the gradient through it; parameters themselves are not counted):
  activations          every decoder layer's saved tensors; with gradient checkpointing each layer keeps only its
                       input (micro x cutoff x hidden) and one layer's saved tensors are live while it recomputes
  logits_and_loss      the logits-sized tensors the loss saves (cross-entropy: fp32 log-probabilities, micro x cutoff
                       x vocab x 4; AdaMix: both views and their KL) and, at the start of backward, two fp32
                       gradients of that size per view (nll_loss and log_softmax backward)
  cuda_context_nccl    a stated allowance (CUDA_CONTEXT_GIB): CUDA context and kernels, NCCL buffers, the caching
                       allocator's fragmentation; not counted on the CPU
Host memory while the backbone loads (`host_at_load`; transformers' from_pretrained under zero.Init,
`integrations/deepspeed.py` `_load_state_dict_into_zero3_model`: rank 0 reads each shard and every module
is gathered, filled on rank 0 and re-partitioned; the other ranks read the shards on the meta device):
  checkpoint_pages     rank 0: every shard memory-mapped (safetensors; .bin in torch's zip format): the
                       checkpoint's size in file pages (page cache, counted in the process's RSS and in a
                       job's memory cgroup), mapped until the load ends
  checkpoint_copied    rank 0: a .bin in torch's legacy format is read whole, one shard at a time: the largest
  load_partition       where partitions live on the host (CPU ranks, or offload_param): the rank's partition
                       and the persisted parameters
  load_staging         CPU ranks: the gathered copy of the largest module and a second buffer of its size (the
                       re-partition; gloo's gather stages its output again): 2 x the largest module
  process              a stated allowance per rank (HOST_PROCESS_GIB): interpreter, torch, transformers,
                       DeepSpeed and, with CUDA, the CUDA runtime's host memory
"""

from __future__ import annotations

import collections

import torch

from . import ds_config, models
from .errors import PeftDsError

GiB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
FP32 = 4
CUDA_CONTEXT_GIB = 2.0  # CUDA context + cuBLAS workspace ~0.6 GiB, NCCL ~0.5 GiB, allocator fragmentation
# A rank's host memory besides what its load adds: measured 0.3 GiB RSS after imports on the CPU (gloo); with
# CUDA the runtime's host side (pinned staging, the driver's mappings) adds about 1.5 GiB more
HOST_PROCESS_GIB = {"gloo": 0.5, "nccl": 2.0}
DEFAULT_GPU_MEMORY_GIB = 80.0
OFFLOAD_CONFIG = "ds_configs/zero3_offload.json"
MAX_MICRO_BATCH = 4096
MODEL_STATE_TERMS = ("backbone_partition", "persisted", "adapter_params", "fp32_masters", "adam_moments",
                     "gradient_partition", "gradient_step_buffers")
BUFFER_TERMS = ("reduce_bucket", "gathered_params", "allgather_staging")
ACTIVATION_TERMS = ("activations", "logits_and_loss")


def partition_numel(numel: int, world: int) -> int:
    """ZeRO-3 pads every parameter to a multiple of the world size: ceil(numel / world) per rank."""
    return -(-numel // world)


def inventory(skeleton, threshold: int) -> dict:
    """Element counts of the model's parameters by how ZeRO-3 holds them (`ds_persist`: numel <= threshold)."""
    from .injection import adapter_parameters

    adapters = {id(p) for p in adapter_parameters(skeleton).values()}
    counts = {"frozen": [], "frozen_persisted": [], "adapter": [], "adapter_persisted": []}
    for p in skeleton.parameters():
        kind = "adapter" if id(p) in adapters else "frozen"
        counts[kind + ("_persisted" if p.numel() <= threshold else "")].append(p.numel())
    largest_module = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in skeleton.modules())
    return {**counts, "largest_module": largest_module, "trace": module_trace(skeleton, threshold)}


def backbone_partition(inv, world, dtype_bytes) -> int:
    return sum(partition_numel(n, world) for n in inv["frozen"]) * dtype_bytes


def persisted(inv, world, dtype_bytes) -> int:
    """Whole on every rank (frozen and adapter), besides their partitions (counted with their kind)."""
    return (sum(inv["frozen_persisted"]) + sum(inv["adapter_persisted"])
            + sum(partition_numel(n, world) for n in inv["frozen_persisted"])) * dtype_bytes


def trainable_partition(inv, world) -> int:
    return sum(partition_numel(n, world) for n in inv["adapter"] + inv["adapter_persisted"])


def adapter_params(inv, world, dtype_bytes) -> int:
    return trainable_partition(inv, world) * dtype_bytes


def fp32_masters(inv, world, dtype_bytes, offload_optimizer: bool) -> int:
    if dtype_bytes == FP32 and not offload_optimizer:
        return 0
    return trainable_partition(inv, world) * FP32


def adam_moments(inv, world) -> int:
    return 2 * trainable_partition(inv, world) * FP32


def gradient_partition(inv, world) -> int:
    """`grad_partitions_flat_buffer`: the trainable partition in gradient_accumulation_dtype (fp32)."""
    return trainable_partition(inv, world) * FP32


def gradient_step_buffers(inv, world) -> int:
    """The fp32 grad the optimizer step flattens from the partition (`_prepare_fp32_grad_for_sub_group`) and the
    buffer of the sub-group's full (unpartitioned) numel that `initialize_optimizer_states` allocates in fp32."""
    full = sum(inv["adapter"]) + sum(inv["adapter_persisted"])
    return trainable_partition(inv, world) * FP32 + full * FP32


def reduce_bucket(zero: dict, dtype_bytes) -> int:
    return int(zero.get("reduce_bucket_size", 5e8)) * dtype_bytes if zero.get("contiguous_gradients", True) else 0


def gathered_params(inv, zero: dict, world, dtype_bytes, offload_param: bool) -> int:
    if world == 1 and not offload_param:
        return 0
    settings = tuple(int(zero.get(k, d)) for k, d in (("stage3_prefetch_bucket_size", 5e7),
                                                      ("stage3_max_live_parameters", 1e9),
                                                      ("stage3_max_reuse_distance", 1e9)))
    cache = inv.setdefault("gathered_cache", {})
    if settings not in cache:
        cache[settings] = gathered_during_forward(inv["trace"], *settings)[-1]
    return cache[settings] * dtype_bytes


def module_trace(skeleton, threshold: int) -> dict:
    """How ZeRO-3 meets the modules in one forward and backward, recorded by running the skeleton on the meta
    device with a hook before and after every module call (DeepSpeed fetches and releases in the same hooks).
    "forward": the calls as ("fetch" | "release", direct parameters [(key, numel, persisted)]); "order": the
    modules in fetch order (DeepSpeed's `__submodule_order`): the forward fetches, then the backward's, which are
    the forward releases reversed (a container's output gradient arrives before its children's) of the modules
    whose output needs a gradient (DeepSpeed fetches for backward from a hook on the outputs; a frozen layer
    whose input needs no gradient, such as the first layer's base projections, is not fetched again)."""
    events = []

    def params_of(module):
        return [(id(p), p.numel(), p.numel() <= threshold) for p in module.parameters(recurse=False)]

    def before(module, *_):
        events.append(("fetch", params_of(module), False))

    def after(module, _, output):
        outputs = output.values() if isinstance(output, dict) else output if isinstance(output, tuple) else [output]
        needs_grad = any(isinstance(t, torch.Tensor) and t.requires_grad for t in outputs)
        events.append(("release", params_of(module), needs_grad))

    handles = [h for m in skeleton.modules()
               for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        skeleton(input_ids=torch.zeros(1, 8, dtype=torch.long, device="meta"))
    finally:
        for h in handles:
            h.remove()
    forward = [(kind, params) for kind, params, _ in events]
    backward = [params for kind, params, needs_grad in reversed(events) if kind == "release" and needs_grad]
    return {"forward": forward, "order": [params for kind, params in forward if kind == "fetch"] + backward}


def gathered_during_forward(trace: dict, prefetch_bucket: int, max_live: int, reuse_distance: int) -> list[int]:
    """Elements gathered (not persisted) after each forward event: partitioned_param_coordinator.py replayed
    on `module_trace`. A fetch gathers the module's parameters, pops their own entries off the parameter queue,
    then prefetches: pops entries until the not-yet-gathered elements popped reach min(max_live - gathered,
    bucket), marking each popped parameter as queued for that later use. A release keeps a parameter queued for a
    later step or used again within reuse_distance elements of the trace (counted module by module)."""
    order = trace["order"]
    numel = {key: n for params in order for key, n, _ in params}
    persisted = {key for params in order for key, _, kept in params if kept}
    queue = collections.deque((key, at) for at, params in enumerate(order) for key, _, _ in params)
    queued_for = collections.defaultdict(lambda: -1)
    gathered, total, step, after = set(), 0, 0, []

    def gather(key):
        nonlocal total
        if key not in gathered and key not in persisted:
            gathered.add(key)
            total += numel[key]
            return numel[key]
        return 0

    for kind, params in trace["forward"]:
        keys = [key for key, _, _ in params]
        if kind == "fetch":
            for key in keys:
                gather(key)
            pending, popped = {k for k in keys if queued_for[k] < step}, set()
            while queue and len(popped) < len(pending):
                key, at = queue.popleft()
                queued_for[key] = at
                popped.add(key)
            budget, fetched = min(max_live - total, prefetch_bucket), 0
            while prefetch_bucket > 0 and queue and fetched < budget:
                key, at = queue.popleft()
                queued_for[key] = max(queued_for[key], at)
                fetched += gather(key)
            step += 1
            after.append(total)
            continue
        keep, traversed = {k for k in keys if queued_for[k] > step}, 0
        for later in order[step:]:
            if traversed >= reuse_distance:
                break
            for key, n, _ in later:
                keep.add(key)
                traversed += n
        for key in keys:
            if key in gathered and key not in keep:
                gathered.discard(key)
                total -= numel[key]
        after.append(total)
    return after


def checkpoint_shards(name_or_dir) -> list[tuple[str, int, bool]]:
    """(file, bytes, memory-mapped) of each weight shard a model directory's load reads; none for a preset."""
    import os
    import zipfile

    if name_or_dir in models.PRESETS:
        return []
    model_dir = models.local_model_dir(name_or_dir)
    _, shards, _ = models.weight_files(model_dir)
    paths = [os.path.join(model_dir, s) for s in shards]
    return [(s, os.path.getsize(p), s.endswith(".safetensors") or zipfile.is_zipfile(p)) for s, p in zip(shards, paths)]


def host_at_load(inv, world, dtype_bytes, shards, backend: str, offload: bool) -> dict:
    """Host bytes of rank 0 and of any other rank while the backbone loads (see the module docstring)."""
    on_host = backend == "gloo" or offload
    common = {
        "load_partition": (backbone_partition(inv, world, dtype_bytes)
                           + (persisted(inv, world, dtype_bytes) if backend == "gloo" else 0)) if on_host else 0,
        "load_staging": 2 * inv["largest_module"] * dtype_bytes if backend == "gloo" else 0,
        "process": int(HOST_PROCESS_GIB[backend] * GiB),
    }
    rank0 = {"checkpoint_pages": sum(n for _, n, mapped in shards if mapped),
             "checkpoint_copied": max([n for _, n, mapped in shards if not mapped], default=0), **common}
    other = {"checkpoint_pages": 0, "checkpoint_copied": 0, **common}
    return {"rank0": rank0, "other": other}


def allgather_staging(inv, world, dtype_bytes, backend: str) -> int:
    """gloo (CPU ranks) stages the whole output of all_gather_into_tensor in a second buffer (measured: the
    peak is twice the gathered bytes); NCCL gathers in place. DeepSpeed gathers a module's parameters at once."""
    return inv["largest_module"] * dtype_bytes if backend == "gloo" and world > 1 else 0


class _FlashAttention(torch.autograd.Function):
    """What a fused attention kernel saves for backward (CUDA flash / memory-efficient, CPU flash): query,
    key, value, output and the fp32 log-sum-exp per query, no micro x heads x cutoff^2 scores. On the meta
    device torch would take the math path, which saves the scores."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = query.new_empty((*query.shape[:-1], value.shape[-1]))
        ctx.save_for_backward(query, key, value, out, query.new_empty(query.shape[:-1], dtype=torch.float32))
        return out


def _fused_attention(query, key, value, *args, **kwargs):
    return _FlashAttention.apply(query, key, value)


_TRACES: dict = {}


def saved_tensors(name_or_dir, num_layers, spec, dtype, micro, cutoff) -> dict:
    """`_trace`, once per model, spec, dtype and shape in this process."""
    import json

    key = (name_or_dir, num_layers, json.dumps(spec.to_dict(), sort_keys=True), dtype, micro, cutoff)
    if key not in _TRACES:
        _TRACES[key] = _trace(name_or_dir, num_layers, spec, dtype, micro, cutoff)
    return _TRACES[key]


def _trace(name_or_dir, num_layers, spec, dtype, micro, cutoff) -> dict:
    """Bytes autograd saves for one micro-batch's loss (the model's, or AdaMix's consistency loss over the
    doubled batch) computed by the real model class on the meta device: the logits-sized tensors (last
    dimension the vocabulary) apart from the rest. Parameters and buffers are not counted."""
    from .injection import apply_peft

    skeleton = models.build_skeleton(name_or_dir, num_layers)
    with torch.random.fork_rng(devices=[]):
        apply_peft(skeleton, spec)
    skeleton.to(ds_config.DTYPES[dtype]).train()
    vocab = skeleton.config.vocab_size
    owned = {t.untyped_storage()._cdata for t in [*skeleton.parameters(), *skeleton.buffers()]}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in owned:
            seen[storage._cdata] = (storage.nbytes(), t.dim() > 0 and t.shape[-1] == vocab)
        return t

    ids = torch.zeros(micro, cutoff, dtype=torch.long, device="meta")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _fused_attention
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if spec.method.startswith("adamix") and spec.consistency_weight > 0:  # both views in one forward
                from torch.fx.experimental import _config as fx_config

                from .methods.adamix import consistency_loss

                # the KL's boolean index over target positions: every position a target (the cutoff's worst case)
                with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
                    consistency_loss(skeleton, {"input_ids": ids, "labels": ids}, spec.consistency_weight)
            else:
                skeleton(input_ids=ids, labels=ids)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    return {"logits": sum(n for n, is_logits in seen.values() if is_logits),
            "other": sum(n for n, is_logits in seen.values() if not is_logits)}


class ActivationModel:
    """Saved bytes per decoder layer and outside the layers, linear in the micro-batch (traced at 1 and 2)."""

    def __init__(self, name_or_dir, spec, dtype, cutoff, hidden, vocab):
        self.cutoff, self.hidden, self.vocab, self.dtype_bytes = cutoff, hidden, vocab, DTYPE_BYTES[dtype]
        self.views = 2 if spec.method.startswith("adamix") and spec.consistency_weight > 0 else 1  # AdaMix: 2 views
        trace = {(b, n): saved_tensors(name_or_dir, n, spec, dtype, b, cutoff) for b in (1, 2) for n in (1, 2)}
        self.layer = [trace[(b, 2)]["other"] - trace[(b, 1)]["other"] for b in (1, 2)]
        self.outside = [trace[(b, 1)]["other"] - self.layer[i] for i, b in enumerate((1, 2))]
        self.log_probs = [trace[(b, 1)]["logits"] for b in (1, 2)]

    @staticmethod
    def _at(pair, micro):
        return pair[0] + (pair[1] - pair[0]) * (micro - 1)

    def activations(self, micro, layers, checkpointing) -> int:
        layer = self._at(self.layer, micro)
        if checkpointing:  # each layer's input kept; one layer recomputed at a time in backward
            layer_inputs = layers * self.views * micro * self.cutoff * self.hidden * self.dtype_bytes
            return self._at(self.outside, micro) + layer_inputs + layer
        return self._at(self.outside, micro) + layers * layer

    def logits_and_loss(self, micro) -> int:
        return self._at(self.log_probs, micro) + 2 * self.views * micro * self.cutoff * self.vocab * FP32


def world_from(world_size=None, nodes=None, gpus_per_node=None) -> tuple[int, int]:
    """(world size, ranks per node) from --world-size or --nodes x --gpus-per-node."""
    if world_size is not None and (nodes is not None or gpus_per_node is not None):
        raise PeftDsError("give --world-size or --nodes with --gpus-per-node, not both")
    if world_size is not None:
        return world_size, world_size
    if (nodes is None) != (gpus_per_node is None):
        raise PeftDsError("--nodes and --gpus-per-node go together")
    if nodes is None:
        return 1, 1
    if nodes < 1 or gpus_per_node < 1:
        raise PeftDsError("--nodes and --gpus-per-node must be >= 1")
    return nodes * gpus_per_node, gpus_per_node


def _terms(inv, zero, world, dtype_bytes, act: ActivationModel, micro, layers, checkpointing, offload,
           backend) -> dict:
    """Every term in bytes; with `offload` the GPU keeps no partition and no optimizer state (both on the host)."""
    states = {
        "backbone_partition": backbone_partition(inv, world, dtype_bytes),
        "persisted": persisted(inv, world, dtype_bytes),
        "adapter_params": adapter_params(inv, world, dtype_bytes),
        "fp32_masters": fp32_masters(inv, world, dtype_bytes, offload),
        "adam_moments": adam_moments(inv, world),
        "gradient_partition": gradient_partition(inv, world),
        "gradient_step_buffers": gradient_step_buffers(inv, world),
    }
    gpu = {
        **({k: 0 for k in states} | {"persisted": sum(inv["frozen_persisted"] + inv["adapter_persisted"]) * dtype_bytes}
           if offload else states),
        "reduce_bucket": reduce_bucket(zero, dtype_bytes),
        "gathered_params": gathered_params(inv, zero, world, dtype_bytes, offload),
        "allgather_staging": allgather_staging(inv, world, dtype_bytes, backend),
        "activations": act.activations(micro, layers, checkpointing),
        "logits_and_loss": act.logits_and_loss(micro),
    }
    host = {k: v for k, v in states.items() if k != "persisted"} if offload else {}
    return {"gpu": gpu, "host": host}


def plan(config, world: int, ranks_per_node: int, gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB,
         deepspeed: str | None = None, backend: str = "nccl", host_memory_gib: float | None = None) -> dict:
    """The plan of run config `config` on `world` ranks (`ranks_per_node` per node), as a dict of numbers."""
    from .config import check_world_size
    from .injection import apply_peft

    accumulation = check_world_size(config, world)
    path = deepspeed or config.deepspeed
    raw = ds_config.load(path)
    models.check_model_source(config.model.name_or_path, config.model.num_layers)
    dtype = ds_config.model_dtype(raw, config.model.dtype)
    hidden = models.hidden_size_of(config.model.name_or_path)
    t = config.train
    ds = ds_config.resolve(raw, hidden_size=hidden, micro_batch_size=t.micro_batch_size, accumulation=accumulation,
                           world_size=world, dtype=dtype)
    zero = ds.get("zero_optimization", {})
    if ds_config.zero_stage(ds) != 3:
        raise PeftDsError(f"peft-ds plan models ZeRO-3; {path} has zero_optimization.stage {ds_config.zero_stage(ds)}")
    offload = zero.get("offload_param", {}).get("device", "none") == "cpu"
    skeleton = models.build_skeleton(config.model.name_or_path, config.model.num_layers)
    with torch.random.fork_rng(devices=[]):
        apply_peft(skeleton, config.method)
    inv = inventory(skeleton, int(zero.get("stage3_param_persistence_threshold", 1e5)))
    layers = getattr(skeleton.config, "num_hidden_layers", None) or skeleton.config.n_layer
    act = ActivationModel(config.model.name_or_path, config.method, dtype, config.data.cutoff_len, hidden,
                          skeleton.config.vocab_size)
    dtype_bytes = DTYPE_BYTES[dtype]
    context = int(CUDA_CONTEXT_GIB * GiB)

    def at(micro):
        terms = _terms(inv, zero, world, dtype_bytes, act, micro, layers, t.gradient_checkpointing, offload, backend)
        return terms, sum(terms["gpu"].values()) + context

    terms, total = at(t.micro_batch_size)
    shards = checkpoint_shards(config.model.name_or_path)
    load = host_at_load(inv, world, dtype_bytes, shards, backend, offload)
    rank0, other = sum(load["rank0"].values()), sum(load["other"].values())
    per_node = min(ranks_per_node, world)
    load.update({"shards": len(shards), "checkpoint_bytes": sum(n for _, n, _ in shards),
                 "formats": sorted({"safetensors" if s.endswith(".safetensors") else "bin" for s, _, _ in shards}),
                 "rank0_total": rank0, "other_total": other, "node0_total": rank0 + (per_node - 1) * other,
                 "node_total": per_node * other if world > per_node else None,
                 "host_memory": None if host_memory_gib is None else int(host_memory_gib * GiB)})
    load["fits"] = None if host_memory_gib is None else load["node0_total"] <= host_memory_gib * GiB
    budget = gpu_memory_gib * GiB
    largest = 0
    while largest < MAX_MICRO_BATCH and at(largest + 1)[1] <= budget:
        largest += 1
    return {
        "model": config.model.name_or_path, "num_layers": layers, "method": config.method.method,
        "sibo_lambda": config.method.sibo_lambda, "deepspeed": path, "dtype": dtype, "world_size": world,
        "ranks_per_node": ranks_per_node, "micro_batch_size": t.micro_batch_size, "cutoff_len": config.data.cutoff_len,
        "gradient_checkpointing": t.gradient_checkpointing, "offload": offload, "backend": backend,
        "parameters": {"frozen": sum(inv["frozen"]) + sum(inv["frozen_persisted"]),
                       "adapter": sum(inv["adapter"]) + sum(inv["adapter_persisted"]),
                       "persisted": sum(inv["frozen_persisted"]) + sum(inv["adapter_persisted"]),
                       "persistence_threshold": int(zero.get("stage3_param_persistence_threshold", 1e5))},
        "settings": {k: zero.get(k) for k in ("reduce_bucket_size", "stage3_prefetch_bucket_size",
                                              "stage3_max_live_parameters", "stage3_max_reuse_distance")},
        "gpu_bytes": terms["gpu"], "cuda_context_nccl": context,
        "activations_other_mode": act.activations(t.micro_batch_size, layers, not t.gradient_checkpointing),
        "non_cuda_total": total - context, "total": total,
        "host_bytes_per_rank": sum(terms["host"].values()), "host_terms": terms["host"],
        "host_bytes_per_node": sum(terms["host"].values()) * ranks_per_node,
        "host_at_load": load,
        "gpu_memory": int(budget), "fits": total <= budget, "largest_micro_batch": largest,
    }


def plan_run(config, world, ranks_per_node, gpu_memory_gib=DEFAULT_GPU_MEMORY_GIB, offload_config=None,
             backend="nccl", host_memory_gib=None) -> dict:
    """The plan with the run's DeepSpeed config and, beside it, with the offload config."""
    import os

    main = plan(config, world, ranks_per_node, gpu_memory_gib, backend=backend, host_memory_gib=host_memory_gib)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    offload = offload_config or os.path.relpath(os.path.join(root, OFFLOAD_CONFIG))
    main["with_offload"] = plan(config, world, ranks_per_node, gpu_memory_gib, offload, backend, host_memory_gib)
    return main


def _gib(n) -> str:
    return f"{n / GiB:8.2f} GiB"


def format_plan(p: dict) -> str:
    n = p["parameters"]
    lines = [f"peft-ds plan: {p['model']} ({p['num_layers']} layers), {p['method']}"
             f"{' + SIBO' if p['sibo_lambda'] > 0 else ''}, {p['dtype']}, micro-batch {p['micro_batch_size']} x cutoff "
             f"{p['cutoff_len']}, gradient checkpointing {'on' if p['gradient_checkpointing'] else 'off'}, "
             f"{p['world_size']} rank(s), {p['deepspeed']}",
             f"  parameters: {n['frozen'] / 1e9:.3f}B frozen, {n['adapter'] / 1e6:.2f}M adapter, "
             f"{n['persisted'] / 1e6:.3f}M persisted (numel <= {n['persistence_threshold']})",
             "  per rank (GPU):"]
    notes = {"backbone_partition": "frozen params / world (ZeRO-3 partition)",
             "persisted": "numel <= stage3_param_persistence_threshold, whole on every rank",
             "adapter_params": "trainable partition (lp_param_buffer)",
             "fp32_masters": "fp32 master partition (none for fp32 without offload)",
             "adam_moments": "AdamW exp_avg + exp_avg_sq, fp32 partition",
             "gradient_partition": "grad_partitions_flat_buffer, fp32",
             "gradient_step_buffers": "step's fp32 grad + full-size fp32 initial grad buffer",
             "reduce_bucket": f"reduce_bucket_size {p['settings']['reduce_bucket_size']}",
             "allgather_staging": f"{p['backend']}: " + ("the gathered module staged again" if p["backend"] == "gloo"
                                                          else "gathers in place"),
             "gathered_params": "at the end of forward: ZeRO-3's fetch/prefetch/release replayed (prefetch "
                                f"{p['settings']['stage3_prefetch_bucket_size']:g}, max live "
                                f"{p['settings']['stage3_max_live_parameters']:g}, reuse "
                                f"{p['settings']['stage3_max_reuse_distance']:g})",
             "activations": "saved for backward (checkpointing " +
                            ("on" if p["gradient_checkpointing"] else "off") +
                            f"; {'off' if p['gradient_checkpointing'] else 'on'}: "
                            f"{p['activations_other_mode'] / GiB:.2f} GiB)",
             "logits_and_loss": "fp32 log-probs + 2 fp32 gradients, micro x cutoff x vocab"}
    for name, value in p["gpu_bytes"].items():
        lines.append(f"    {name:22s}{_gib(value)}  {notes[name]}")
    lines.append(f"    {'cuda_context_nccl':22s}{_gib(p['cuda_context_nccl'])}  stated allowance")
    verdict = "fits" if p["fits"] else "does NOT fit"
    lines.append(f"  total {_gib(p['total']).strip()} per rank: {verdict} in {p['gpu_memory'] / GiB:g} GiB; "
                 f"largest micro-batch that fits: {p['largest_micro_batch']}")
    h = p["host_at_load"]
    source = (f"rank 0 reads the checkpoint ({h['shards']} {'/'.join(h['formats'])} shard(s), "
              f"{h['checkpoint_bytes'] / GiB:.2f} GiB), the others receive it" if h["shards"]
              else "a preset: drawn, no checkpoint read")
    lines.append(f"  host while the backbone loads, per rank ({source}):")
    load_notes = {"checkpoint_pages": "rank 0: the memory-mapped shards (page cache), mapped until the load ends",
                  "checkpoint_copied": "rank 0: the largest .bin shard of torch's legacy format, read whole",
                  "load_partition": "the rank's partition on the host (CPU ranks, offload_param)",
                  "load_staging": "CPU ranks: 2 x the largest module (its gathered copy, a second buffer)",
                  "process": "stated allowance (interpreter, libraries" +
                             (", the CUDA runtime's host side)" if p["backend"] == "nccl" else ")")}
    for name in h["rank0"]:
        other = h["other"][name]
        lines.append(f"    {name:22s}{_gib(h['rank0'][name])}" + (f" (others {other / GiB:.2f})"
                     if other != h["rank0"][name] else " " * 15) + f"  {load_notes[name]}")
    nodes = f"node of rank 0 {_gib(h['node0_total']).strip()} ({min(p['ranks_per_node'], p['world_size'])} ranks)"
    if h["node_total"] is not None:
        nodes += f", other nodes {_gib(h['node_total']).strip()}"
    verdict = ("" if h["fits"] is None else f": {'fits' if h['fits'] else 'does NOT fit'} in --host-memory "
               f"{h['host_memory'] / GiB:g} GiB")
    lines.append(f"  host total: rank 0 {_gib(h['rank0_total']).strip()}, other ranks {_gib(h['other_total']).strip()}; "
                 f"{nodes}{verdict}")
    o = p.get("with_offload")
    if o:
        verdict = "fits" if o["fits"] else "does NOT fit"
        lines.append(f"  with {o['deepspeed']} (params and optimizer on the host): GPU {_gib(o['total']).strip()} per "
                     f"rank ({verdict}, largest micro-batch {o['largest_micro_batch']}), "
                     f"host {_gib(o['host_bytes_per_rank']).strip()} per rank, "
                     f"{_gib(o['host_bytes_per_node']).strip()} per node of {o['ranks_per_node']}")
    return "\n".join(lines)


__all__ = ["plan", "plan_run", "format_plan", "saved_tensors", "inventory", "partition_numel", "world_from", "GiB",
           "CUDA_CONTEXT_GIB", "HOST_PROCESS_GIB", "MODEL_STATE_TERMS", "BUFFER_TERMS", "ACTIVATION_TERMS",
           "host_at_load", "checkpoint_shards"]
