"""Test helper run under torchrun: NCCL's rule on the CPU. With PEFT_DS_DIST_BACKEND=cuda:gloo the default
process group serves only the `cuda` device type, so a CPU tensor is refused there as NCCL refuses it
("No backend type associated with device type cpu"). Checks that the default group does refuse one, then
runs every collective helper of peft_ds.distributed through `init` as training does, and writes what each
returned to OUT.rank<R>.json.

    PEFT_DS_DIST_BACKEND=cuda:gloo torchrun --nproc_per_node 2 tests/collectives.py OUT
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from peft_ds import distributed  # noqa: E402

if __name__ == "__main__":
    rank, world = distributed.init()
    try:
        torch.distributed.all_reduce(torch.ones(1))
        refused = None
    except RuntimeError as e:  # the rule holds: CPU tensors are not taken by the default group
        refused = str(e).splitlines()[0]
    result = {
        "backend_config": str(torch.distributed.get_backend_config()),
        "default_group_refused_cpu": refused,
        "all_reduce_sum": distributed.all_reduce_sum([1.5 * (rank + 1), 1.0]),
        "same_on_all_ranks": [distributed.same_on_all_ranks(7), distributed.same_on_all_ranks(rank)],
        "all_gather_object": distributed.all_gather_object({"rank": rank}),
        "describe": distributed.describe(),
    }
    distributed.barrier()
    with open(f"{sys.argv[1]}.rank{rank}.json", "w") as f:
        json.dump(result, f)
    distributed.shutdown()
    distributed.exit_process(0)
