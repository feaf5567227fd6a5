import os
import sys

import pytest
import torch

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
