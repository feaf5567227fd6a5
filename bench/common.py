"""What the benchmarks share: the backbone config they time.

Below a real width, tiny-llama enlarged until a step takes well over 100 ms on the CPU. At a real LLaMA
width (hidden 4096: `llama-7b-shape`, 5120: `llama-13b-shape`) the published preset's layer shapes
(intermediate 11008 / 13824, 32 / 40 heads) cut to `layers`.

The vocabulary defaults to the shipped tokenizer's 1024 (the benches' token ids are < 1000) at every
width: with one or two layers a 32000-wide LM head would be ~40% of a step's matmul work (against ~2%
in the 32-layer model) and would dilute every overhead ratio towards 1; `--vocab 32000` gives the
preset's own head.
"""

import copy
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REAL_WIDTHS = {4096: "llama-7b-shape", 5120: "llama-13b-shape"}


def add_model_arguments(parser, hidden: int = 384, layers: int = 4) -> None:
    parser.add_argument("--hidden", type=int, default=hidden,
                        help=f"width; {', '.join(f'{h}: {p}' for h, p in REAL_WIDTHS.items())} layer shapes")
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary (default: the tokenizer's 1024)")


def model_arguments(args) -> list[str]:
    """The model flags again, for a worker process."""
    return ["--hidden", str(args.hidden), "--layers", str(args.layers)] + (
        [] if args.vocab is None else ["--vocab", str(args.vocab)])


def enlarged_llama_config(hidden: int, layers: int, vocab: int | None = None):
    """A LLaMA config `hidden` wide: the real preset's shapes at a real width, else tiny-llama's classes
    and tokenizer with 64-dim heads and intermediate ~8/3 hidden."""
    from peft_ds.models import TINY_VOCAB, preset_config

    vocab = TINY_VOCAB if vocab is None else vocab
    if hidden in REAL_WIDTHS:
        return preset_config(REAL_WIDTHS[hidden], layers, vocab_size=vocab)
    return preset_config("tiny-llama", hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 8 * 8,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         vocab_size=vocab)


def describe(config) -> str:
    name = REAL_WIDTHS.get(config.hidden_size, "tiny-llama")
    return (f"{name} hidden={config.hidden_size} intermediate={config.intermediate_size} "
            f"heads={config.num_attention_heads} layers={config.num_hidden_layers} vocab={config.vocab_size}")


def shared_copy(backbone):
    """A copy of a backbone's modules over the very same weight tensors (for variants whose backbone
    is frozen: one copy of the weights in memory however many variants)."""
    return copy.deepcopy(backbone, memo={id(p): p for p in backbone.parameters()})


def print_profile(steps: dict, rows: int = 8, watch=()) -> None:
    """{name: step function}: one warm-up call each, then one call each under torch.profiler; prints
    every variant's wall time, its self CPU time per operator (top `rows`, the operators in `watch`,
    and matmuls in total)."""
    import time

    from torch.profiler import profile

    for step in steps.values():
        step()
    for name, step in steps.items():
        t0 = time.perf_counter()
        with profile() as prof:
            step()
        wall = time.perf_counter() - t0
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in ops) / 1e6
        matmul = sum(e.self_cpu_time_total for e in ops if e.key in MATMULS) / 1e6
        print(f"  {name}: {wall:.2f} s wall under the profiler; self CPU {total:.2f} s, of which matmuls "
              f"({'/'.join(MATMULS)}) {matmul:.2f} s")
        for e in ops[:rows] + [e for e in ops[rows:] if e.key in watch]:
            print(f"    {e.key:<36} {e.self_cpu_time_total / 1e6:7.3f} s  {e.count:5d} calls")


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear_pointwise")


# ---- lockstep: variants that each need their own processes (a DeepSpeed engine per variant), timed
# one step at a time in turn, so load on a shared machine hits every variant alike ------------------


def paired_ratio(numerator: list, denominator: list) -> tuple[float, float, float]:
    """(median, low, high) of the per-round ratios numerator[k] / denominator[k] of steps timed side by side
    in the same round; low..high is the distribution-free 95% interval of that median (order statistics
    n/2 -+ 1.96 sqrt(n)/2), so a goal is shown met only when high is within it."""
    ratios = sorted(a / b for a, b in zip(numerator, denominator))
    n = len(ratios)
    half = 0.98 * n ** 0.5
    low, high = max(0, int(n / 2 - half)), min(n - 1, int(n / 2 + half + 0.999))
    return statistics.median(ratios), ratios[low], ratios[high]


def turns(steps: int):
    """In a lockstep worker: the step indices, each started when the parent says so, reported when done."""
    print("ready", flush=True)
    for step in range(steps):
        if sys.stdin.readline().strip() != "go":
            raise SystemExit("lockstep parent gone")
        yield step
        print("done", flush=True)


class _Ranks:
    """The processes of one variant, their output lines read by threads (a parent never blocks on one)."""

    def __init__(self, launches):
        import queue
        import subprocess
        import tempfile
        import threading

        self.lines, self.result, self.error = queue.Queue(), None, None
        self.procs, self.errs = [], []
        for cmd, env in launches:
            err = tempfile.TemporaryFile("w+")
            p = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
            self.procs.append(p)
            self.errs.append(err)
            threading.Thread(target=self._read, args=(p,), daemon=True).start()

    def _read(self, p):
        for line in p.stdout:
            self.lines.put((p, line.strip()))
        self.lines.put((p, None))

    def expect(self, word, timeout: float) -> bool:
        """Wait until every rank said `word` (None: until every rank's output ended); False (and
        self.error) if a rank ended, failed or hung first."""
        import queue
        import time

        waiting, deadline = set(self.procs), time.monotonic() + timeout
        while waiting and self.error is None:
            try:
                p, line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.fail("timed out (hung)")
                break
            if line is None and word is None:
                waiting.discard(p)
            elif line is None:
                self.fail(None)
            elif line.startswith("{"):
                self.result = json.loads(line)
            elif line == word:
                waiting.discard(p)
        return self.error is None

    def send(self, word: str) -> None:
        for p in self.procs:
            p.stdin.write(word + "\n")
            p.stdin.flush()

    def fail(self, why) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        if why is None:
            failed = next((k for k, p in enumerate(self.procs) if p.wait() != 0), 0)
            self.errs[failed].seek(0)
            lines = [line for line in self.errs[failed].read().splitlines() if "rror" in line]
            why = (lines[-1] if lines else f"exit {self.procs[failed].returncode}").strip()[:200]
        self.error = why

    def finish(self, timeout: float) -> None:
        """Close the workers' input; they print their result and exit."""
        for p in self.procs:
            p.stdin.close()
        if self.expect(None, timeout) and any(p.wait() != 0 for p in self.procs):
            self.fail(None)


def lockstep(variants: dict, steps: int, timeout: float = 1800) -> dict:
    """{name: [(command, env) per rank]} -> {name: (the rank-0 worker's JSON result or None, error or None)}.
    Variants are started one after another (each waits for the previous one's ranks to be built),
    then round k runs step k of every variant in turn (workers iterate `turns(steps)`)."""
    running = {}
    for name, launches in variants.items():
        running[name] = _Ranks(launches)
        running[name].expect("ready", timeout)
    for _ in range(steps):
        for ranks in running.values():
            if ranks.error is None:
                ranks.send("go")
                ranks.expect("done", timeout)
    for ranks in running.values():
        if ranks.error is None:
            ranks.finish(timeout)
    return {name: (ranks.result, ranks.error) for name, ranks in running.items()}
