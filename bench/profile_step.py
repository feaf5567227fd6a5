"""Where a `peft-ds train` step's CPU time goes: one step of a real multi-rank run under torch.profiler.

Runs the run config through `peft_ds.train.train` (as `peft-ds train` does) on the ranks torchrun starts,
and on rank 0 profiles global step STEP (after warm-up steps, so DeepSpeed's trace is complete): prints the
self CPU time per operator (top rows), the matmuls' share and the collectives' share. Used for the
model-FLOPs figure of bench/vs_trainer.py (whose workdir holds the run configs it trains).

    torchrun --nproc_per_node 2 bench/profile_step.py CONFIG.yaml [--step 8] [--rows 15]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import MATMULS  # noqa: E402

from peft_ds import distributed, objective  # noqa: E402
from peft_ds.config import load_config  # noqa: E402
from peft_ds.train import train  # noqa: E402

COLLECTIVE_WORDS = ("gloo", "all_gather", "reduce_scatter", "allreduce", "all_reduce", "c10d", "broadcast")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--step", type=int, default=8, help="the global step to profile (default 8)")
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--out", default=None,
                        help="output_dir, new (default: peft-ds-profile-MASTER_PORT in the temporary directory)")
    args = parser.parse_args()
    import tempfile

    from torch.profiler import profile

    # one directory for every rank (a checkpoint is saved at the end): named by the run's port
    out = args.out or os.path.join(tempfile.gettempdir(), f"peft-ds-profile-{os.environ.get('MASTER_PORT', '0')}")
    config = load_config(args.config, [f"output_dir={out}", f"train.max_steps={args.step}", "train.save_every=0",
                                       "train.eval_every=0"])
    rank = int(os.environ.get("RANK", "0"))
    original = objective.Objective.train_step

    def profiled(self, engine, feed, dataset, step, *rest, **kwargs):
        if step + 1 != args.step or rank != 0:
            return original(self, engine, feed, dataset, step, *rest, **kwargs)
        with profile() as prof:
            result = original(self, engine, feed, dataset, step, *rest, **kwargs)
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in ops) / 1e6
        matmul = sum(e.self_cpu_time_total for e in ops if e.key in MATMULS) / 1e6
        comm = sum(e.self_cpu_time_total for e in ops if any(w in e.key.lower() for w in COLLECTIVE_WORDS)) / 1e6
        print(f"step {args.step}, rank 0: self CPU {total:.3f} s; matmuls ({'/'.join(MATMULS)}) {matmul:.3f} s "
              f"({matmul / total:.1%}); collectives {comm:.3f} s ({comm / total:.1%})", flush=True)
        for e in ops[:args.rows]:
            print(f"  {e.key:<48} {e.self_cpu_time_total / 1e6:7.3f} s  {e.self_cpu_time_total / 1e6 / total:6.1%}"
                  f"  {e.count:6d} calls", flush=True)
        return result

    objective.Objective.train_step = profiled
    train(config)


if __name__ == "__main__":
    main()
    distributed.shutdown()
    distributed.exit_process(0)
