import os
import sys

# Every process of the suite runs torch on one thread, and the ranks and commands it starts inherit it.
# `make test` runs two test files at once on 2 cores, and a process whose OpenMP team is larger than
# the cores left to it waits at every parallel region for a descheduled thread: 1-rank runs with 2
# threads beside one busy loop took 20x their quiet time, on 1 thread 1.1x. The same thread count on
# every rank also makes the 2-rank = 1-rank comparisons compare the same kernels.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from peft_ds.models import build_preset  # noqa: E402

ARCHS = ["tiny-llama", "tiny-gptj"]
# The longest test files (minutes, measured serially on 2 cores), started first: `make test` runs two files
# at a time (pytest-xdist --dist loadfile), and the two workers end together when no long file starts last.
LONGEST_FIRST = ("test_real_width.py", "test_train_distributed.py", "test_launch.py", "test_plan.py",
                 "test_train_resume.py", "test_consolidate.py", "test_bilevel.py", "test_train_inputs.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = os.path.basename(str(item.path))
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def tiny(name, **overrides):
    """A small copy of a preset for fast unit tests (same classes, fewer layers)."""
    return build_preset(name, **overrides).eval()


def randomize_adapters(model, seed=7, std=0.05):
    """Non-zero values in every adapter parameter, so B = 0 does not hide anything."""
    from peft_ds.injection import adapter_parameters

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter_parameters(model).items():
            if name.endswith("sibo_theta"):
                continue
            p.copy_(torch.randn(p.shape, generator=g) * std)


def random_batch(batch=2, seq=12, vocab=1000, seed=3, pad_left=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if pad_left:
        for b, n in enumerate(pad_left):
            ids[b, :n] = 0
            mask[b, :n] = 0
    return ids, mask
