"""The installed stack: setup.py declares ranges with upper bounds on the majors of torch, transformers
and DeepSpeed; constraints.txt pins one exact point inside them for every requirement; and the suite
runs on exactly that point (scripts/install.sh installs from constraints.txt), so a tolerance tuned
to one stack is tested on that stack."""

import os
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOUNDED = ("torch", "transformers", "deepspeed")


def _name(name):
    return name.lower().replace("_", "-")


def requirements():
    """peft-ds's install_requires and its [test] extra, as installed from setup.py."""
    reqs = [Requirement(r) for r in metadata.requires("peft-ds")]
    return {_name(r.name): r for r in reqs if r.marker is None or r.marker.evaluate({"extra": "test"})}


def pins():
    with open(os.path.join(ROOT, "constraints.txt")) as f:
        lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    pinned = {}
    for line in lines:
        name, _, version = line.partition("==")
        assert version and "+" not in version, f"constraints.txt: {line!r} is not an exact, label-free pin"
        pinned[_name(name)] = Version(version)
    return pinned


@pytest.mark.parametrize("package", BOUNDED)
def test_setup_declares_an_upper_bound(package):
    spec = requirements()[package].specifier
    assert any(s.operator == "<" for s in spec), f"{package}{spec} has no upper bound"
    upper = min(Version(s.version) for s in spec if s.operator == "<")
    assert upper.major <= pins()[package].major + 1


def test_every_requirement_is_pinned_inside_its_range():
    pinned = pins()
    for name, req in requirements().items():
        assert name in pinned, f"constraints.txt does not pin {name}"
        assert req.specifier.contains(pinned[name], prereleases=True), f"{name}=={pinned[name]} outside {req}"


def test_the_suite_runs_on_the_pinned_stack():
    for name, version in pins().items():
        installed = Version(metadata.version(name))
        assert Version(installed.public) == version, f"{name} {installed} installed, constraints.txt pins {version}"
