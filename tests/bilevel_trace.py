"""Test helper run under torchrun: trains one BiLoRA run config while recording, for every level step,
which adapter parameters changed (working values and fp32 masters) and which records each forward saw.

    torchrun --nproc_per_node 2 tests/bilevel_trace.py CONFIG.yaml TRACE_PREFIX

Rank r writes TRACE_PREFIX.r.json. It wraps the real level steps; nothing in the loop is replaced."""

import json
import os
import sys
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import deepspeed  # noqa: E402
import torch  # noqa: E402

from peft_ds import bilevel  # noqa: E402
from peft_ds.config import load_config  # noqa: E402
from peft_ds.injection import adapter_parameters  # noqa: E402
from peft_ds.train import fp32_adapter_state, train  # noqa: E402

STEPS, FORWARDS = [], []


def row_digest(ids):
    return zlib.crc32(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())


def working_values(model):
    params = adapter_parameters(model)
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {n: p.detach().float().clone() for n, p in params.items()}


def changed(before, after):
    return sorted(k for k in before if not torch.equal(before[k], after[k]))


def traced(level, original):
    def step(self, engine, *args, **kwargs):
        before = (working_values(self.model), fp32_adapter_state(self.model))
        FORWARDS.clear()
        result = original(self, engine, *args, **kwargs)
        after = (working_values(self.model), fp32_adapter_state(self.model))
        STEPS.append({"level": level, "changed_working": changed(before[0], after[0]),
                      "changed_master": changed(before[1], after[1]), "forwards": list(FORWARDS)})
        return result
    return step


original_init = bilevel.BilevelObjective.__init__


def init(self, model, *args, **kwargs):
    original_init(self, model, *args, **kwargs)

    def record(module, args, kw):
        ids, mask = kw["input_ids"], kw["attention_mask"]
        FORWARDS.extend(row_digest(ids[i][mask[i].bool()].tolist()) for i in range(len(ids)))

    model.register_forward_pre_hook(record, with_kwargs=True)


bilevel.BilevelObjective.__init__ = init
bilevel.BilevelObjective._lower_step = traced("lower", bilevel.BilevelObjective._lower_step)
bilevel.BilevelObjective._upper_step = traced("upper", bilevel.BilevelObjective._upper_step)

if __name__ == "__main__":
    train(load_config(sys.argv[1]))
    with open(f"{sys.argv[2]}.{torch.distributed.get_rank()}.json", "w") as f:
        json.dump(STEPS, f)
    torch.distributed.destroy_process_group()
