"""Test helper run under torchrun: trains one run config (peft_ds.train.train) and records, after every
forward fetch and release of DeepSpeed's parameter coordinator once its trace is complete, how many elements
of the model are gathered (ds_status not NOT_AVAILABLE, not persisted). Rank 0 writes OUT.json: the list of
("fetch" | "release", gathered elements) of the first forward pass with a complete trace, for tests/test_plan.py.

    torchrun --nproc_per_node 2 tests/gathered_trace.py CONFIG.yaml OUT.json
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus  # noqa: E402
from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator  # noqa: E402

from peft_ds import distributed, models  # noqa: E402
from peft_ds.config import load_config  # noqa: E402
from peft_ds.train import train  # noqa: E402


def main(config_path: str, out: str) -> None:
    built, events = [], []
    build_model = models.build_model
    fetch, release = PartitionedParameterCoordinator.fetch_sub_module, PartitionedParameterCoordinator.release_sub_module

    def record(coordinator, kind):
        if coordinator.is_complete_trace() and built:
            events.append((kind, sum(p.ds_numel for p in built[0].parameters()
                                     if p.ds_status != ZeroParamStatus.NOT_AVAILABLE and not p.ds_persist)))

    def recorded_build(*args, **kwargs):
        built.append(build_model(*args, **kwargs))
        return built[0]

    def recorded_fetch(self, module, forward):
        fetch(self, module, forward)
        if forward:
            record(self, "fetch")

    def recorded_release(self, module, forward=False):
        release(self, module, forward)
        if forward:
            record(self, "release")

    models.build_model = recorded_build
    PartitionedParameterCoordinator.fetch_sub_module = recorded_fetch
    PartitionedParameterCoordinator.release_sub_module = recorded_release
    train(load_config(config_path))
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out, "w") as f:
            json.dump(events, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
    distributed.shutdown()
    distributed.exit_process(0)
