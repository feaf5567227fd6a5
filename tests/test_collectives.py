"""peft-ds's own collectives (loss sums, route digests, evaluation rows, barriers) under NCCL's rule that a
process group takes only the tensors of the device types its backend serves: run on the CPU through a
default group that serves only `cuda` (`cuda:gloo`), and issued from peft_ds/distributed.py alone."""

import ast
import glob
import json
import os
import subprocess
import sys

import pytest
from launch import ROOT, free_port

COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "all_gather_coalesced",
               "broadcast", "broadcast_object_list", "barrier", "monitored_barrier", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "gather", "gather_object", "scatter", "scatter_object_list", "all_to_all",
               "all_to_all_single", "send", "recv", "isend", "irecv", "batch_isend_irecv", "inference_all_reduce"}
COMM_MODULES = ("torch.distributed", "deepspeed.comm")


@pytest.mark.slow
def test_helpers_run_where_the_default_group_refuses_cpu_tensors(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), os.path.join(ROOT, "tests", "collectives.py"), str(tmp_path / "out")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PEFT_DS_DIST_BACKEND": "cuda:gloo"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    for rank in range(2):
        row = json.load(open(tmp_path / f"out.rank{rank}.json"))
        assert row["backend_config"] == "cuda:gloo"
        # the rule holds in this group, as under NCCL
        assert "No backend type associated with device type cpu" in row["default_group_refused_cpu"]
        assert row["all_reduce_sum"] == [1.5 + 3.0, 2.0]
        assert row["same_on_all_ranks"] == [True, False]
        assert row["all_gather_object"] == [{"rank": 0}, {"rank": 1}]
        assert row["describe"].startswith("world size 2 over 1 node")


def _collective_calls(path):
    """(line, dotted name) of every torch.distributed / deepspeed.comm collective called in a module,
    through whichever names the module imported them as."""
    tree = ast.parse(open(path).read(), path)
    aliases = {}  # local name -> dotted module or function
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        parts, func = [], node.func
        while isinstance(func, ast.Attribute):
            parts.append(func.attr)
            func = func.value
        if not isinstance(func, ast.Name):
            continue
        dotted = ".".join([aliases.get(func.id, func.id), *reversed(parts)])
        module, _, name = dotted.rpartition(".")
        if name in COLLECTIVES and module in COMM_MODULES:
            found.append((node.lineno, dotted))
    return found


def test_no_module_but_distributed_issues_a_collective():
    package = os.path.join(ROOT, "peft_ds")
    offenders = [f"{os.path.relpath(path, ROOT)}:{line}: {name}"
                 for path in sorted(glob.glob(os.path.join(package, "**", "*.py"), recursive=True))
                 if path != os.path.join(package, "distributed.py")
                 for line, name in _collective_calls(path)]
    assert not offenders, "collectives outside peft_ds/distributed.py:\n" + "\n".join(offenders)
    # the scan itself finds them where they are
    assert {name for _, name in _collective_calls(os.path.join(package, "distributed.py"))} >= {
        "torch.distributed.all_reduce", "torch.distributed.barrier", "torch.distributed.all_gather_object"}
