"""mypy over knowstream.* as it installs (``installed_layout.py``); config in pyproject.

The layout is a stable folder (``build/installed``) so mypy's cache stays valid
between runs, and reported paths are mapped back to the source files.

    .venv/bin/python .ci/typecheck.py        (make types)
"""

from __future__ import annotations

import shutil
import sys

from installed_layout import ROOT, lay_out
from mypy import api

LAYOUT = ROOT / "build" / "installed"


def main() -> int:
    shutil.rmtree(LAYOUT, ignore_errors=True)
    linked = lay_out(LAYOUT)
    stdout, stderr, status = api.run(
        ["--config-file", str(ROOT / "pyproject.toml"), str(LAYOUT / "knowstream")]
    )
    for installed, source in linked.items():
        shown, real = str(installed.relative_to(ROOT)), str(source.relative_to(ROOT))
        stdout, stderr = stdout.replace(shown, real), stderr.replace(shown, real)
    sys.stdout.write(stdout)
    sys.stderr.write(stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
