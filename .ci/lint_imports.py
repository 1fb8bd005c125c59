"""Check the layer contracts of ``.importlinter`` against knowstream.* as it installs.

On the editable install, grimp (import-linter's graph builder) would walk
``knowstream/`` alone and pass every contract on the rest vacuously, so the
contracts run on the package as installed (``installed_layout.py``), first on the path.

    .venv/bin/python .ci/lint_imports.py      (make imports)
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from importlinter.cli import lint_imports
from installed_layout import ROOT, lay_out


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        if not lay_out(Path(tmp)):
            print("no modules found to check", file=sys.stderr)
            return 1
        # import-linter puts the working folder first on the path: make that the layout.
        os.chdir(tmp)
        sys.path.insert(0, tmp)
        return lint_imports(config_filename=str(ROOT / ".importlinter"), no_cache=True)


if __name__ == "__main__":
    sys.exit(main())
