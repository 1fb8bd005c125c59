"""models/plot_eval.py as a command: --help, and a chart from a result file."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.fast  # needs no service: the `make test-fast` tier


def run(*args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "knowstream.models.plot_eval", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


def test_help_explains_the_arguments():
    result = run("--help")
    assert result.returncode == 0, result.stderr
    assert "result" in result.stdout and "out" in result.stdout


def test_draws_each_mode_with_its_control(tmp_path):
    rows = {
        "closed_book": {"f1": 10.0, "f1_ci": [8.0, 12.0]},
        "mac@3": {"f1": 9.0, "f1_ci": [7.0, 11.0]},
        "mac_wrong@3": {"f1": 9.5, "f1_ci": [7.5, 11.5]},
    }
    result = {"rows": rows, "split": "eval", "n": 3, "mac_version": "mac-x", "device": "cpu"}
    (tmp_path / "r.json").write_text(json.dumps(result))
    done = run(str(tmp_path / "r.json"), str(tmp_path / "r.png"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def knowstream(*args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "knowstream.cli", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


def test_plot_is_a_cli_subcommand(tmp_path):
    rows = {"rag@3": {"f1": 12.0, "f1_ci": [11.0, 13.0]}}
    result = {"rows": rows, "split": "eval", "n": 3, "mac_version": None, "device": "cpu"}
    (tmp_path / "r.json").write_text(json.dumps(result))
    done = knowstream("plot", str(tmp_path / "r.json"), str(tmp_path / "r.png"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = knowstream("plot", str(tmp_path / "nothing.json"), str(tmp_path / "x.png"))
    assert missing.returncode == 1
    assert missing.stderr.strip().count("\n") == 0 and "no such file" in missing.stderr
