"""Test helper run under torchrun: trains several run configs one after another in one process group
(one launch instead of one per config), each with its own output_dir; then leaves as `peft-ds train`
does (peft_ds.distributed.shutdown, exit_process).

    torchrun --nproc_per_node 2 tests/multi_train.py CONFIG.yaml [CONFIG.yaml ...]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from peft_ds import distributed  # noqa: E402
from peft_ds.config import load_config  # noqa: E402
from peft_ds.train import train  # noqa: E402

if __name__ == "__main__":
    for path in sys.argv[1:]:
        train(load_config(path))
    distributed.shutdown()
    distributed.exit_process(0)
