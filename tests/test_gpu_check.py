"""bench/gpu_check.sh --dry-run: the GPU check's stages on the CPU (tiny shapes, fp32), so the script a
GPU loan runs cannot rot between loans."""

import json
import os
import subprocess

import sys

import pytest
from launch import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))


def test_model_flops_of_llama_7b_lora():
    """bench/flops.py on the real 7B skeleton: 4 x the frozen matrices (every parameter but the embedding
    and the norms), 6 x the LoRA matrices, 12 L h s."""
    from flops import flops_per_token

    from peft_ds import PeftSpec, apply_peft
    from peft_ds.models import build_skeleton

    model = apply_peft(build_skeleton("llama-7b-shape"), PeftSpec(method="lora", r=32, alpha=64))
    frozen = 6_738_415_616 - 32000 * 4096 - (2 * 32 + 1) * 4096
    per_layer_lora = 32 * (3 * (4096 + 4096) + 2 * (4096 + 11008))
    terms = flops_per_token(model, 256)
    assert terms == {"frozen": 4 * frozen, "adapter": 6 * 32 * per_layer_lora, "attention": 12 * 32 * 4096 * 256,
                     "total": 4 * frozen + 6 * 32 * per_layer_lora + 12 * 32 * 4096 * 256}


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_reports(tmp_path):
    r = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=1800)
    log = (tmp_path / "gpu_check.log").read_text()
    assert r.returncode == 0, r.stdout[-3000:] + log[-5000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["install", "tests", "mfu", "methods"]
    assert all(s["status"] == "ok" for s in report["stages"])
    assert "installed" in log and "skipped" in log and "needs CUDA" in log  # CUDA tests skipped, saying so
    rows = report["mfu"]["rows"]
    assert {(row["gradient_checkpointing"], row["micro_batch"]) for row in rows} == \
        {(gc, m) for gc in (False, True) for m in (1, 2)}
    assert all(row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1 and row["hf_peft_step_s"] > 0 for row in rows)
    assert report["mfu"]["flops_per_token"]["total"] > report["mfu"]["flops_per_token"]["frozen"] > 0
    methods = report["methods"]["methods"]
    assert set(methods) == {"lora", "adamix_lora", "bilora"} and all(m["ratio_to_lora"] > 0 for m in methods.values())
    md = (tmp_path / "report.md").read_text()
    assert "| mfu | ok |" in md and "adamix_lora" in md
    assert set(os.listdir(tmp_path)) == {"gpu_check.log", "report.json", "report.md"}  # what the device returns


def test_unknown_argument_is_refused():
    r = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--fast"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "gpu_check: unknown argument --fast (see --help)"
