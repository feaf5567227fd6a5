"""Test helper run under torchrun: builds a preset partitioned by ZeRO-3 (models.build_model, as training does)
and has rank 0 save every parameter, gathered, and every buffer to OUT.pt, for tests/test_presets.py.

    torchrun --nproc_per_node 2 tests/zero3_build.py PRESET NUM_LAYERS PERSISTENCE_THRESHOLD OUT.pt
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import deepspeed  # noqa: E402
import torch  # noqa: E402

from peft_ds import distributed, models  # noqa: E402


def main(name: str, num_layers: str, threshold: str, out: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    config = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": torch.distributed.get_world_size(),
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": int(threshold)}}
    model = models.build_model(name, ds_config=config, num_layers=int(num_layers))
    gathered = {}
    for n, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            gathered[n] = p.data.clone()
    gathered.update({f"buffer:{n}": b.clone() for n, b in model.named_buffers()})
    if torch.distributed.get_rank() == 0:
        torch.save(gathered, out)


if __name__ == "__main__":
    main(*sys.argv[1:5])
    distributed.shutdown()
    distributed.exit_process(0)
