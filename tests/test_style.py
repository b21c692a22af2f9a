"""The house style, held by ruff (pyproject.toml): lines of at most 120 characters, and pyflakes' checks (unused
imports and names, undefined names) over every file."""
import subprocess
import sys

from conftest import ROOT


def test_ruff_finds_nothing():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
