"""Test helper run under torchrun: builds a run config's backbone as `peft-ds train` does (its checks, then
models.build_model with the resolved ZeRO-3 config) while sampling this rank's resident memory
(bench/zero3_memory.py PeakSampler, every 5 ms), and writes OUT_PREFIX.rank<R>.json: VmRSS before the build
(after imports and the process group) and its peak during the build, for tests/test_plan.py.

    torchrun --nproc_per_node 2 tests/memory_load.py CONFIG.yaml OUT_PREFIX
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.zero3_memory import PeakSampler, _status  # noqa: E402
from peft_ds import distributed, ds_config, models, train  # noqa: E402
from peft_ds.config import load_config  # noqa: E402

if __name__ == "__main__":
    config = load_config(sys.argv[1])
    run = train.prepare(config, distributed.world_size_from_env())
    rank, _ = distributed.init()
    distributed.barrier()
    baseline = _status()["VmRSS"]
    with PeakSampler() as sampler:
        model = models.build_model(config.model.name_or_path, dtype=ds_config.DTYPES[run["dtype"]], ds_config=run["ds"],
                                   num_layers=config.model.num_layers)
    with open(f"{sys.argv[2]}.rank{rank}.json", "w") as f:
        json.dump({"rank": rank, "baseline": baseline, "peak": sampler.peak["VmRSS"],
                   "above_baseline": sampler.peak["VmRSS"] - baseline}, f)
    distributed.barrier()
    distributed.shutdown()
    distributed.exit_process(0)
