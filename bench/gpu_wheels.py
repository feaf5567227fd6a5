"""The wheels a GPU machine without network needs to run peft-ds (bench/gpu_check.sh installs them there),
and the check, there, that the image satisfies what they require.

What to carry is computed, not listed: starting from peft-ds's own requirements (and the test extra's
peft), the requirements of every carried package are followed through the metadata of the environment
this runs in (the tested stack: constraints.txt's versions). A package is carried when the GPU image
lacks it (bench/gpu_image_packages.txt), when FORCED names it, when the image's recorded version falls
short of what a carried package requires, or when its version there was not read and a carried package
constrains it (small packages only: LARGE ones, over the carry's size, are left to the image and
checked there). torch and CUDA's own packages are never carried: the image's CUDA build is used.

Each carried package: its binary wheel for CPython 3.12 on x86-64 Linux from the package index at the
version installed here; deepspeed (published as an sdist) and peft-ds are built here as pure-Python
wheels (DeepSpeed's ops compile just in time there). Fails when the folder would exceed the limit.

`check --site DIR` (run there, after the wheels are installed into DIR): every requirement of every
package in DIR, and peft-ds's torch requirement, against what that interpreter finds (DIR first, then
the image); each shortfall is one line, and the exit status is 1. It also prints the image's version of
every package it consulted, to be recorded in bench/gpu_image_packages.txt.

    python bench/gpu_wheels.py [--out .whl] [--limit-mib 60]
    python bench/gpu_wheels.py check --site DIR
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
# Too large to carry (the device tool carries 64 MiB in all): left to the image, whose version the check verifies.
LARGE = {"numpy", "pandas", "pyarrow", "scipy", "grpcio", "matplotlib", "pillow", "protobuf", "hf-xet", "regex",
         "tokenizers", "safetensors", "sentencepiece"}
NEVER = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
ROOTS = ("peft-ds", "peft")
BUILT_HERE = {"deepspeed", "peft-ds"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages() -> dict[str, str | None]:
    """name -> the image's version where it was read (name==version), else None."""
    with open(IMAGE) as f:
        lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    return {canonical(name): version or None for name, _, version in (line.partition("==") for line in lines)}


def requirements(name: str, environment: dict | None = None) -> list:
    """The requirements (packaging Requirement) of installed package `name`, without extras and markers
    that do not hold in `environment` (default: this interpreter)."""
    from packaging.requirements import Requirement

    found = []
    for text in md.requires(name) or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({**(environment or {}), "extra": ""}):
            found.append(req)
    return found


GPU_PYTHON = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython"}


def _needed(name: str, specifier, image: dict) -> str | None:
    """Why `name` (required with `specifier` by a carried package) must be carried; None: the image's will do."""
    if NEVER.match(name):
        return None
    if name not in image:
        return "not on the image"
    if name in FORCED or name in BUILT_HERE:
        return "forced"
    version = image[name]
    if version is not None and not specifier.contains(version, prereleases=True):
        return f"the image's {version} is outside {specifier}"
    if version is None and str(specifier) and name not in LARGE:
        return f"the image's version was not read, {specifier} asked"
    return None


def to_carry() -> tuple[dict[str, str], dict[str, str]]:
    """(name -> version installed here, of every package to carry; name -> the requirement left unverified)."""
    from packaging.specifiers import SpecifierSet

    image, carry, unverified = image_packages(), {}, {}
    todo = [(name, SpecifierSet()) for name in ROOTS]
    while todo:
        name, specifier = todo.pop()
        if name in carry:
            continue
        why = _needed(name, specifier, image) if name not in ROOTS else "peft-ds itself" if name == "peft-ds" else (
            _needed(name, specifier, image) or "forced")
        if why is None:
            if image.get(name) is None and str(specifier) and not NEVER.match(name):
                unverified[name] = f"{name}{specifier}"
            continue
        try:
            carry[name] = md.version(name)
        except md.PackageNotFoundError:
            sys.exit(f"gpu_wheels: {name} is required but not installed here; run `make install` first")
        unverified.pop(name, None)
        todo += [(canonical(req.name), req.specifier) for req in requirements(name, GPU_PYTHON)]
    return carry, unverified


def check(site: str) -> int:
    """On the GPU machine, with `site` first on sys.path: every requirement of every package installed in
    `site`, and peft-ds's torch requirement, against the versions this interpreter finds."""
    import glob

    carried = sorted(canonical(os.path.basename(p).split("-", 1)[0]) for p in glob.glob(os.path.join(site, "*.dist-info")))
    consulted, problems = {}, []
    for name in carried:
        for req in requirements(name):
            dep = canonical(req.name)
            try:
                found = md.distribution(dep)
            except md.PackageNotFoundError:
                problems.append(f"{name} {md.version(name)} requires {req}, which is not installed")
                continue
            where = "carried" if os.path.realpath(str(found.locate_file(""))).startswith(os.path.realpath(site)) else "image"
            if where == "image":
                consulted[dep] = found.version
            if not req.specifier.contains(found.version, prereleases=True):
                problems.append(f"{name} {md.version(name)} requires {req}; the {where}'s {dep} is {found.version}")
    print("image versions consulted (record them in bench/gpu_image_packages.txt):")
    for dep, version in sorted(consulted.items()):
        print(f"  {dep}=={version}")
    for line in problems:
        print(f"gpu_wheels check: {line}", file=sys.stderr)
    if problems:
        print(f"gpu_wheels check: {len(problems)} requirement(s) not met: carry what falls short (bench/gpu_wheels.py "
              f"FORCED, or the image's version in bench/gpu_image_packages.txt) and rebuild .whl/", file=sys.stderr)
        return 1
    print(f"gpu_wheels check: the requirements of {len(carried)} carried package(s) are met")
    return 0


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def main() -> int:
    if sys.argv[1:2] == ["check"]:
        parser = argparse.ArgumentParser(prog="gpu_wheels.py check", description="the image against the wheels")
        parser.add_argument("--site", required=True, help="the folder the wheels were installed into")
        return check(parser.parse_args(sys.argv[2:]).site)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, ".whl"), help="wheel folder (default .whl, git-ignored)")
    parser.add_argument("--limit-mib", type=float, default=60.0,
                        help="most the folder may hold (the device tool carries 64 MiB with the working tree)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for old in os.listdir(args.out):  # one version of each: two would stop the install there
        if old.endswith(".whl"):
            os.remove(os.path.join(args.out, old))
    carry, unverified = to_carry()
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
    if unverified:
        print("left to the image, its version not read (the install stage checks them there): "
              + ", ".join(sorted(unverified.values())))
    if len(wheels) != len(carry):
        sys.exit(f"gpu_wheels: {len(carry)} packages to carry but {len(wheels)} wheels were written")
    if total > args.limit_mib * 2**20:
        sys.exit(f"gpu_wheels: {total / 2**20:.1f} MiB exceeds the limit of {args.limit_mib:g} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
