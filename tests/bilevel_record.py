"""Test helper run under torchrun on 1 rank without ZeRO: trains one BiLoRA run config while saving, for
every global step, the adapter values at its start and E's gradient as each upper step hands it to the
optimizer.

    torchrun --nproc_per_node 1 tests/bilevel_record.py CONFIG.yaml RECORD.pt

RECORD.pt: a list over global steps of {"start": {name: tensor}, "upper_grads": [{name: tensor}, ...]}.
It wraps the real steps; nothing in the loop is replaced."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from peft_ds import bilevel  # noqa: E402
from peft_ds.config import load_config  # noqa: E402
from peft_ds.injection import adapter_parameters  # noqa: E402
from peft_ds.train import train  # noqa: E402

RECORD = []
original_train_step, original_step = bilevel.BilevelObjective.train_step, bilevel.BilevelObjective._step


def train_step(self, *args, **kwargs):
    RECORD.append({"start": {n: p.detach().clone() for n, p in adapter_parameters(self.model).items()},
                   "upper_grads": []})
    return original_train_step(self, *args, **kwargs)


def step(self, engine, level):
    if level == bilevel.UPPER:
        names = {id(p): n for n, p in self.model.named_parameters()}
        RECORD[-1]["upper_grads"].append({names[id(p)]: p.grad.detach().clone() for p in self.upper})
    return original_step(self, engine, level)


bilevel.BilevelObjective.train_step = train_step
bilevel.BilevelObjective._step = step

if __name__ == "__main__":
    train(load_config(sys.argv[1]))
    torch.save(RECORD, sys.argv[2])
    torch.distributed.destroy_process_group()
