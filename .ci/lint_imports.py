"""Check the layer contracts of ``.importlinter`` against knowstream.* as it installs.

pyproject maps ``knowstream.models`` onto ``models/``, ``knowstream.flows`` onto
``flows/``, and so on. An editable install resolves those through an import hook
that grimp (import-linter's graph builder) does not follow: it would walk
``knowstream/`` alone and pass every contract on the rest vacuously. So the
package's .py files are laid out as a wheel lays them out, in a temporary folder
that comes first on the path, and the contracts run against that copy.

    .venv/bin/python .ci/lint_imports.py      (make imports)
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import tomllib
from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parent.parent


def source_dir(package: str, package_dir: dict[str, str]) -> Path:
    """The folder holding ``package``: its longest mapped prefix, plus the rest."""
    parts = package.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in package_dir:
            return ROOT / package_dir[prefix] / Path(*parts[n:])
    return ROOT / Path(*parts)


def lay_out(into: Path) -> int:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    copied = 0
    for package in setuptools["packages"]:
        target = into / Path(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for f in source_dir(package, setuptools.get("package-dir", {})).glob("*.py"):
            shutil.copy2(f, target / f.name)
            copied += 1
    return copied


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        if not lay_out(Path(tmp)):
            print("no modules found to check", file=sys.stderr)
            return 1
        # import-linter puts the working folder first on the path: make that the copy.
        os.chdir(tmp)
        sys.path.insert(0, tmp)
        return lint_imports(config_filename=str(ROOT / ".importlinter"), no_cache=True)


if __name__ == "__main__":
    sys.exit(main())
