"""Over-smoothing diagnostic (SIBO Eq. 3) against a direct pairwise computation."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHS, tiny

import peft_ds
from peft_ds.architectures import ARCHITECTURES
from peft_ds.cli import main
from peft_ds.diagnostics import token_similarity


@torch.no_grad()
def direct_eq3(hidden, mask):
    """1/(m(m-1)) sum_{i != j} cos(h_i, h_j) per sequence over non-padding tokens, mean over sequences."""
    values = []
    for b in range(hidden.shape[0]):
        tokens = [hidden[b, t] for t in range(hidden.shape[1]) if mask[b, t]]
        m = len(tokens)
        total = sum(F.cosine_similarity(tokens[i], tokens[j], dim=0) for i in range(m) for j in range(m) if i != j)
        values.append(total / (m * (m - 1)))
    return float(torch.stack(values).mean())


@pytest.mark.parametrize("name", ARCHS)
def test_token_similarity_equals_eq3(name):
    model = tiny(name)
    arch = ARCHITECTURES[model.config.model_type]
    # hand-made batch: different lengths, left padding, one token repeated
    ids = torch.tensor([[0, 0, 0, 5, 17, 17, 99, 4],
                        [7, 8, 9, 10, 11, 12, 13, 14],
                        [0, 0, 0, 0, 0, 0, 40, 41]])
    mask = (ids != 0).long()
    last = {}
    model.get_submodule(arch.layers)[-1].register_forward_hook(
        lambda m, a, o: last.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    hidden = list(out.hidden_states[:-1]) + [last["h"]]  # transformers' last entry is after the final norm
    expected = [direct_eq3(h, mask) for h in hidden]
    got = token_similarity(model, {"input_ids": ids, "attention_mask": mask})
    assert len(got) == model.config.num_hidden_layers + 1
    assert got == pytest.approx(expected, abs=1e-5)


def test_smoothness_cli_writes_json_and_png(tmp_path):
    from peft_ds.adapter_io import save_adapter
    from peft_ds.models import build_preset

    model = peft_ds.apply_peft(build_preset("tiny-llama"), peft_ds.PeftSpec(method="adapter", bottleneck_size=8,
                                                                             sibo_lambda=0.2))
    save_adapter(model, str(tmp_path / "adapter"), base_model="tiny-llama")
    out = tmp_path / "smooth"
    rc = main(["smoothness", "--model", "tiny-llama", "--model", "tiny-gptj", "--adapter", str(tmp_path / "adapter"),
               "--num-examples", "4", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "smoothness.json").read_text())
    assert len(data["curves"]) == 3
    assert all(len(v) == 5 for v in data["curves"].values())
    curves = list(data["curves"].values())
    assert curves[0] != curves[2]  # the adapter (bert init, not identity) changes the representation
    assert (out / "smoothness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # never overwrites existing results without --force
    before = (out / "smoothness.json").read_bytes()
    rc = main(["smoothness", "--model", "tiny-llama", "--num-examples", "2", "--out", str(out)])
    assert rc == 2 and (out / "smoothness.json").read_bytes() == before
