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


def _dist_info(site, name, version, requires=()):
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                   + "".join(f"Requires-Dist: {r}\n" for r in requires))


def test_install_check_names_every_requirement_the_image_falls_short_of(tmp_path):
    """bench/gpu_wheels.py check, as the install stage runs it there: each carried package's requirements
    against what the interpreter finds (the carried folder first, then the image: here, this environment)."""
    import sys as _sys

    import packaging

    site = tmp_path / "site"
    _dist_info(site, "carried-a", "1.0", ["packaging>=999", "tqdm"])
    _dist_info(site, "carried-b", "2.0", ["carried-a==1.0", "no-such-package-anywhere>=1"])
    check = [_sys.executable, os.path.join(ROOT, "bench", "gpu_wheels.py"), "check", "--site", str(site)]
    r = subprocess.run(check, env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert f"carried-a 1.0 requires packaging>=999; the image's packaging is {packaging.__version__}" in r.stderr
    assert "carried-b 2.0 requires no-such-package-anywhere>=1, which is not installed" in r.stderr
    assert "2 requirement(s) not met" in r.stderr and "carried-a==1.0" not in r.stderr  # met by the carried one
    assert f"packaging=={packaging.__version__}" in r.stdout  # the image's versions, to record
    _sys_site = tmp_path / "fine"
    _dist_info(_sys_site, "carried-c", "1.0", ["packaging>=20"])
    r = subprocess.run([*check[:-1], str(_sys_site)], env={**os.environ, "PYTHONPATH": str(_sys_site)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "the requirements of 1 carried package(s) are met" in r.stdout


def test_a_failed_install_skips_the_rest_at_once(tmp_path):
    """No wheels to install on the GPU machine: the install stage fails, the other stages are reported
    skipped without running, and the report is written."""
    import sys as _sys

    (tmp_path / "none").mkdir()
    env = {**os.environ, "PYTHON": _sys.executable, "WHEELS": str(tmp_path / "none")}
    r = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--out", str(tmp_path / "out")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [(s["stage"], s["status"]) for s in report["stages"]] == [
        ("install", "failed (exit 1)"), ("tests", "skipped (install failed)"), ("mfu", "skipped (install failed)"),
        ("methods", "skipped (install failed)")]
    assert "no wheels in" in (tmp_path / "out" / "gpu_check.log").read_text()


@pytest.mark.slow
def test_a_stage_killed_midway_keeps_the_rows_it_measured(tmp_path):
    """bench/gpu_bench.py writes its JSON as each row is done: killed (as the stage's time limit kills it)
    after the first method, the file holds that method's row."""
    import signal
    import sys as _sys
    import time

    out = tmp_path / "methods.json"
    proc = subprocess.Popen([_sys.executable, os.path.join(ROOT, "bench", "gpu_bench.py"), "methods", "--json", str(out),
                             "--workdir", str(tmp_path / "runs"), "--dry-run"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if out.exists() and json.loads(out.read_text())["methods"]:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    methods = json.loads(out.read_text())["methods"]
    assert "lora" in methods and methods["lora"]["median_step_s"] > 0
