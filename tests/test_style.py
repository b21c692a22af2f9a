"""The house style, held by ruff (pyproject.toml): lines of at most 120 characters, and pyflakes' checks (unused
imports and names, undefined names) over every file; and one form for a script's last words."""
import glob
import os
import re
import subprocess
import sys

from conftest import ROOT


def test_ruff_finds_nothing():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]


def test_every_message_a_script_exits_with_starts_with_error():
    """What a user reads when a script refuses to go on: one line that starts `error: `, as argparse's and
    common.one_line_errors' do (27 SystemExit messages lacked it, 2026-12-07)."""
    bare = [f"{os.path.basename(p)}:{s[:m.start()].count(chr(10)) + 1}"
            for p in glob.glob(os.path.join(ROOT, "*.py")) for s in [open(p, encoding="utf-8").read()]
            for m in re.finditer(r'SystemExit\(f?"(?!error: )', s)]
    assert not bare, bare
