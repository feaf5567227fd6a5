import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))
version = {}
with open(os.path.join(here, "peft_ds", "version.py")) as f:
    exec(f.read(), version)

setup(
    name="peft-ds",
    version=version["__version__"],
    description="Parameter-efficient adapters (LoRA, adapters, SIBO, AdaMix, BiLoRA) on frozen LLaMA/GPT-J "
    "under DeepSpeed ZeRO-3, launched on Slurm",
    packages=find_packages(include=["peft_ds", "peft_ds.*"]),
    package_data={"peft_ds": ["assets/*", "assets/eval/*/*.json"]},
    python_requires=">=3.10",
    # The ranges the test suite ran on (constraints.txt pins the exact point CI installs): upper bounds on
    # the majors, and on DeepSpeed's minor (its 0.x minor releases change ZeRO-3 internals we read). torch
    # from 2.11 (the GPU image's): the tests that start no process pass on 2.11.0 as on the pinned 2.13.0.
    install_requires=[
        "torch>=2.11,<3",
        "deepspeed>=0.19.8,<0.20",  # ZeRO-3 + activation checkpointing with frozen parameters (DeepSpeed PR #8148)
        "transformers>=5.24,<6",
        "datasets",
        "sentencepiece",
        "safetensors",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "tensorboard>=2.14,<3",  # train.report_to's default exporter: event files beside metrics.jsonl
    ],
    extras_require={"test": ["pytest", "pytest-xdist", "peft", "mpi4py", "mpich"], "mpi": ["mpi4py"]},
    entry_points={"console_scripts": ["peft-ds=peft_ds.cli:console"]},
)
