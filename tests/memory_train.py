"""Test helper run under torchrun: trains one run config (peft_ds.train.train, as `peft-ds train` does)
while sampling this rank's resident memory (bench/zero3_memory.py PeakSampler, every 5 ms), and writes
OUT_PREFIX.rank<R>.json: the baseline and the peak during the training steps, for tests/test_plan.py.

Baseline: the anonymous resident memory (RssAnon) just before the backbone is built, after imports, the
process group and the tokenized data. Peak: the largest RssAnon sampled inside any global step
(Objective.train_step: forward, backward, optimizer step). RssAnon, not VmRSS: file pages (shared
libraries) are not the memory the plan counts. After the build every allocation of 1 MiB or more is
served by mmap (models.return_freed_memory_to_os), so a freed buffer leaves the resident set at once:
the peak is that of the live tensors, as the plan counts them, not of what glibc keeps cached for reuse.

    torchrun --nproc_per_node 2 tests/memory_train.py CONFIG.yaml OUT_PREFIX
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.zero3_memory import PeakSampler, _status  # noqa: E402
from peft_ds import distributed, models, objective  # noqa: E402
from peft_ds.config import load_config  # noqa: E402
from peft_ds.train import train  # noqa: E402


def main(config_path: str, out_prefix: str) -> None:
    record = {"baseline": None, "peak": 0, "steps": 0}
    sampler = PeakSampler()
    build_model, train_step = models.build_model, objective.Objective.train_step

    def measured_build(*args, **kwargs):
        record["baseline"] = _status()["RssAnon"]
        model = build_model(*args, **kwargs)
        models.return_freed_memory_to_os()
        return model

    def measured_step(self, *args, **kwargs):
        sampler.peak = _status()
        result = train_step(self, *args, **kwargs)
        record["peak"] = max(record["peak"], sampler.peak["RssAnon"], _status()["RssAnon"])
        record["steps"] += 1
        return result

    models.build_model, objective.Objective.train_step = measured_build, measured_step
    with sampler:
        train(load_config(config_path))
    rank = int(os.environ.get("RANK", "0"))
    with open(f"{out_prefix}.rank{rank}.json", "w") as f:
        json.dump({**record, "above_baseline": record["peak"] - record["baseline"], "rank": rank}, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
    distributed.shutdown()
    distributed.exit_process(0)
