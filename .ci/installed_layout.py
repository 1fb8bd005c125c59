"""knowstream.* laid out as a wheel installs it, as links into the source folders.

pyproject maps ``knowstream.models`` onto ``models/``, ``knowstream.flows`` onto
``flows/``, and so on. An editable install resolves those through an import hook
that static tools do not follow: grimp (import-linter) and mypy would see
``knowstream/`` alone. ``lint_imports.py`` and ``typecheck.py`` run them on this
layout instead.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def source_dir(package: str, package_dir: dict[str, str]) -> Path:
    """The folder holding ``package``: its longest mapped prefix, plus the rest."""
    parts = package.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in package_dir:
            return ROOT / package_dir[prefix] / Path(*parts[n:])
    return ROOT / Path(*parts)


def lay_out(into: Path) -> dict[Path, Path]:
    """Link every module of the package into ``into`` at its installed path; returns
    installed path -> source file. Files, not folders, are linked: grimp does not
    descend into linked folders."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    linked = {}
    for package in setuptools["packages"]:
        target = into / Path(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for f in sorted(source_dir(package, setuptools.get("package-dir", {})).glob("*.py")):
            (target / f.name).symlink_to(f)
            linked[target / f.name] = f
    return linked
