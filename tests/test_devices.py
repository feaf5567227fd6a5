"""Where each piece runs on a GPU node, with CUDA's device queries stood in for on this CPU machine: the
device a rank takes from what is visible to it (srun binding one GPU per task, or all of the node's), the
LOCAL_RANK DeepSpeed then reads, evaluation on the local GPU in the run's dtype, and adapter initial
values drawn by the CPU generator whatever the weights' device."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny
from launch import ROOT

from peft_ds import PeftDsError, PeftSpec, apply_peft, distributed
from peft_ds.injection import adapter_parameters


@pytest.mark.parametrize("local_rank,visible,index", [(3, 1, 0), (0, 1, 0), (3, 8, 3), (7, 8, 7), (1, 2, 1)])
def test_a_rank_takes_the_gpu_it_can_see(local_rank, visible, index):
    assert distributed.cuda_device_index(local_rank, visible) == index


@pytest.mark.parametrize("local_rank,visible,message", [(3, 2, "local rank 3 sees only 2 GPUs"),
                                                        (0, 0, "no GPU is visible")])
def test_a_rank_that_cannot_tell_its_gpu_is_refused(local_rank, visible, message):
    with pytest.raises(PeftDsError, match=message):
        distributed.cuda_device_index(local_rank, visible)


STAND_IN = """
import json, os, sys, torch
visible = int(sys.argv[1])
chosen = []
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: visible
torch.cuda.set_device = lambda device: chosen.append(str(device))
from peft_ds import distributed
distributed.init()
print(json.dumps({"set_device": chosen, "LOCAL_RANK": os.environ["LOCAL_RANK"],
                  "local_device": str(distributed.local_device())}))
distributed.shutdown()
distributed.exit_process(0)
"""


@pytest.mark.parametrize("visible,device", [(1, "cuda:0"), (8, "cuda:3")])
def test_init_binds_the_visible_gpu_and_deepspeed_reads_the_same(visible, device):
    """Local rank 3 of its node (SLURM_LOCALID=3 under srun): with one GPU visible (srun binding a GPU per
    task) it takes that one, not device 3, and LOCAL_RANK, which DeepSpeed's engine and zero.Init read for
    their device, says the same; with the node's 8 visible it takes the fourth."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_"))}
    env.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "3", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(distributed.free_port()), "PEFT_DS_DIST_BACKEND": "gloo", "DS_ACCELERATOR": "cpu"})
    r = subprocess.run([sys.executable, "-c", STAND_IN, str(visible)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == {"set_device": [device], "LOCAL_RANK": device.split(":")[1], "local_device": device}


def test_evaluation_runs_on_the_gpu_in_the_runs_dtype(tmp_path, monkeypatch):
    """Without --deepspeed, on a node with CUDA: the model is built for the local GPU (here stood in for:
    built on the CPU) in the dtype the adapter was trained in; on the CPU in fp32."""
    from peft_ds import evaluation, models
    from peft_ds.adapter_io import provenance, save_adapter

    model = tiny("tiny-llama")
    apply_peft(model, PeftSpec(method="lora", r=4, alpha=8))
    adapter = tmp_path / "adapter"
    save_adapter(model, str(adapter), base_model="tiny-llama",
                 extra=provenance("peft-ds train", str(tmp_path / "checkpoints/step1"), 8, 1, "lora", model_dtype="bf16"))
    built, build = [], models.build_model

    def build_model(name, dtype, ds_config=None, num_layers=None, device=None):
        built.append({"dtype": dtype, "device": str(device), "ds_config": ds_config})
        return build(name, dtype=dtype, num_layers=num_layers)  # on the CPU, in that dtype

    monkeypatch.setattr(models, "build_model", build_model)
    monkeypatch.setattr(distributed, "local_device", lambda: torch.device("cuda", 0))
    data = os.path.join(ROOT, "peft_ds", "assets", "eval")
    report = evaluation.evaluate("tiny-llama", ["SVAMP"], data, adapter=str(adapter), limit=1, num_beams=1,
                                 max_new_tokens=2, progress=False)
    assert built == [{"dtype": torch.bfloat16, "device": "cuda:0", "ds_config": None}]
    assert report["dtype"] == "bf16" and report["device"] == "cuda:0"
    assert evaluation.evaluation_dtype("auto", torch.device("cpu"), str(adapter)) == "fp32"
    assert evaluation.evaluation_dtype("fp16", torch.device("cuda", 0), str(adapter)) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert evaluation.evaluation_dtype("auto", torch.device("cuda", 0), None) == "fp16"  # a base alone, a V100


class StoodInCuda(torch.nn.Parameter):
    """A weight that says it lives on cuda:0 (its values stay on the CPU)."""

    @property
    def device(self):
        return torch.device("cuda", 0)


METHODS = [PeftSpec(method="lora", r=4, alpha=8, sibo_lambda=0.2, sibo_learnable=True),
           PeftSpec(method="adapter", bottleneck_size=8, sibo_lambda=0.2),
           PeftSpec(method="adamix_lora", r=4, alpha=8), PeftSpec(method="adamix_adapter", bottleneck_size=8),
           PeftSpec(method="bilora", r=4, alpha=8)]


@pytest.mark.parametrize("spec", METHODS, ids=lambda s: s.method)
def test_adapters_start_from_the_cpu_generators_draw_whatever_the_weights_device(spec, monkeypatch):
    """Every adapter value is drawn on the CPU by the seeded CPU generator and then placed on the weight's
    device: with weights that live on cuda:0 (stood in for; placing a tensor there is recorded, not done)
    the adapters equal those of the same seed on the CPU. A draw on cuda:0 itself would use the GPU's
    unseeded generator (here: fail, torch has no CUDA)."""
    plain, model = tiny("tiny-llama"), tiny("tiny-llama")
    torch.manual_seed(0)
    reference = adapter_parameters(apply_peft(plain, spec))
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight = StoodInCuda(module.weight.data, requires_grad=False)
    placed, to = [], torch.Tensor.to

    def stood_in_to(self, *args, **kwargs):
        target = next((a for a in args if isinstance(a, (str, torch.device))), kwargs.get("device"))
        if target is not None and torch.device(target).type == "cuda":
            placed.append(tuple(self.shape))
            return self
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", stood_in_to)
    torch.manual_seed(0)
    got = adapter_parameters(apply_peft(model, spec))
    monkeypatch.setattr(torch.Tensor, "to", to)
    assert got.keys() == reference.keys() and placed
    for name, value in got.items():
        assert torch.equal(value, reference[name]), name
