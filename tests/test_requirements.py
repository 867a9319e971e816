"""pyproject.toml's version ranges against the two sets of versions the suite runs with:
constraints-oldest.txt (`make test-oldest`: every floor) and constraints.txt (`make test`)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
# Extras that only select jax's CUDA plugins: GPU machines, not in either run.
GPU_EXTRAS = {"cuda12", "cuda13"}


def requirements() -> dict[str, list[Requirement]]:
    """pyproject.toml's requirements by where they are listed ("" for the core ones)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = {"": project["dependencies"], **project["optional-dependencies"]}
    return {where: [Requirement(text) for text in texts] for where, texts in listed.items()}


def pins(name: str) -> dict[str, Version]:
    """A constraints file's `name==version` lines, by normalised name."""
    found = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            package, version = line.split("==")
            found[canonicalize_name(package)] = Version(version)
    return found


def test_every_floor_is_the_version_the_oldest_run_installs():
    oldest = pins("constraints-oldest.txt")
    floors = {}
    for where, listed in requirements().items():
        for req in listed:
            name = canonicalize_name(req.name)
            specs = list(req.specifier)
            assert len(specs) == 1, f"{req}: one bound, a floor (>=) or a pin (==)"
            spec = specs[0]
            assert spec.operator in (">=", "=="), f"{req}: a floor (>=) or a pin (==)"
            if spec.operator == "==":  # pinned (ruff): the same version in both runs
                assert name not in oldest, f"{req} is pinned; constraints-oldest.txt need not"
                continue
            floor = Version(spec.version)
            if where in GPU_EXTRAS:
                assert req.extras == {where} and floor == oldest[name], req
                continue
            assert oldest.get(name) == floor, (
                f"pyproject.toml has {req}, constraints-oldest.txt {name}=={oldest.get(name)}; "
                "make them the same and run make test-oldest"
            )
            floors[name] = floor
    assert floors == oldest, "constraints-oldest.txt pins a package pyproject.toml does not list"


def test_the_tested_versions_lie_in_the_ranges():
    newest = pins("constraints.txt")
    for where, listed in requirements().items():
        if where in GPU_EXTRAS:
            continue
        for req in listed:
            version = newest[canonicalize_name(req.name)]
            assert version in req.specifier, f"constraints.txt has {version}, outside {req}"
