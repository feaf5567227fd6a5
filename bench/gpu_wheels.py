"""The wheels a GPU machine without network needs to run peft-ds (bench/gpu_check.sh installs them there).

What to carry is computed, not listed: starting from peft-ds's own requirements (and the test extra's
peft), every requirement is followed through the metadata of the environment this runs in (the tested
stack: constraints.txt's versions), and a package is carried when the GPU image lacks it
(bench/gpu_image_packages.txt) or when FORCED names it (the image has it at a version peft-ds is not
tested with). torch and CUDA's own packages are never carried: the image's CUDA build is used.

Each carried package: its binary wheel for CPython 3.12 on x86-64 Linux from the package index at the
version installed here; deepspeed (published as an sdist) and peft-ds are built here as pure-Python
wheels (DeepSpeed's ops compile just in time there). Fails when the folder would exceed the limit.

    python bench/gpu_wheels.py [--out .whl] [--limit-mib 60]
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = os.path.join(ROOT, "bench", "gpu_image_packages.txt")
# On the image, but at versions older than the stack peft-ds is tested on (transformers 5.17 there).
FORCED = {"transformers", "huggingface-hub", "tokenizers", "peft"}
NEVER = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
ROOTS = ("peft-ds", "peft")
BUILT_HERE = {"deepspeed", "peft-ds"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages() -> set[str]:
    with open(IMAGE) as f:
        return {canonical(line.strip()) for line in f if line.strip() and not line.startswith("#")}


def requirements(name: str) -> list[str]:
    """The names `name` requires, without extras and markers that do not hold here."""
    from packaging.requirements import Requirement

    found = []
    for text in md.requires(name) or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            found.append(canonical(req.name))
    return found


def to_carry() -> dict[str, str]:
    """name -> installed version of every package to carry."""
    have, carry, seen, todo = image_packages(), {}, set(), list(ROOTS)
    while todo:
        name = todo.pop()
        if name in seen or NEVER.match(name):
            continue
        seen.add(name)
        try:
            version = md.version(name)
        except md.PackageNotFoundError:
            sys.exit(f"gpu_wheels: {name} is required but not installed here; run `make install` first")
        if name not in have or name in FORCED or name in BUILT_HERE:
            carry[name] = version
        todo += requirements(name)
    return carry


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, ".whl"), help="wheel folder (default .whl, git-ignored)")
    parser.add_argument("--limit-mib", type=float, default=60.0,
                        help="most the folder may hold (the device tool carries 64 MiB with the working tree)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for old in os.listdir(args.out):  # one version of each: two would stop the install there
        if old.endswith(".whl"):
            os.remove(os.path.join(args.out, old))
    carry = to_carry()
    platform_args = [x for p in PLATFORMS for x in ("--platform", p)]
    for name, version in sorted(carry.items()):
        if name == "peft-ds":
            pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", args.out, ROOT)
        elif name == "deepspeed":
            os.environ["DS_BUILD_OPS"] = "0"
            pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", args.out, f"deepspeed=={version}")
        else:
            pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation",
                "cp", *platform_args, "-d", args.out, f"{name}=={version}")
    wheels = sorted(f for f in os.listdir(args.out) if f.endswith(".whl"))
    total = sum(os.path.getsize(os.path.join(args.out, f)) for f in wheels)
    for f in wheels:
        print(f"{os.path.getsize(os.path.join(args.out, f)) / 2**20:8.2f} MiB  {f}")
    print(f"{total / 2**20:8.2f} MiB  {len(wheels)} wheels in {args.out} (limit {args.limit_mib:g} MiB)")
    if len(wheels) != len(carry):
        sys.exit(f"gpu_wheels: {len(carry)} packages to carry but {len(wheels)} wheels were written")
    if total > args.limit_mib * 2**20:
        sys.exit(f"gpu_wheels: {total / 2**20:.1f} MiB exceeds the limit of {args.limit_mib:g} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
