"""`scripts/demo.py` (what `make demo` runs) sets up a pre-labelled project, stops cleanly, and reuses it next time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scripts.ls_harness import REPO

pytestmark = pytest.mark.e2e


def run_demo(data_dir: Path, checkpoint: Path) -> str:
    result = subprocess.run(
        [sys.executable, "scripts/demo.py", "--data-dir", str(data_dir), "--checkpoint", str(checkpoint),
         "--ls-port", "0", "--backend-port", "0", "--images", "3", "--check"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_demo_prelabels_a_project_and_reuses_it(tmp_path: Path, checkpoint: Path) -> None:
    first = run_demo(tmp_path, checkpoint)
    assert "created project" in first
    assert "3 tasks carry predictions" in first
    assert "login:         admin@example.com" in first

    second = run_demo(tmp_path, checkpoint)
    assert "reusing project" in second
    assert "3 tasks carry predictions" in second
    assert "demo: stopping" in second
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout
    assert leftovers == "", f"processes left behind: {leftovers}"
