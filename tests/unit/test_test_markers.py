"""The fast suite is ``pytest -m "not system"``: every test under tests/system is marked."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def collected(*args: str) -> list[str]:
    """Node ids that ``pytest --collect-only ARGS`` selects."""
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    # 0: tests collected, 5: none.
    assert r.returncode in (0, 5), r.stdout + r.stderr
    return [line for line in r.stdout.splitlines() if "::" in line]


def test_every_system_test_is_marked_system():
    # One collection: every system test is deselected by "not system", none is left.
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "-m", "not system", "tests/system"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert r.returncode == 5, r.stdout + r.stderr  # 5: nothing selected
    assert not [line for line in r.stdout.splitlines() if "::" in line], r.stdout
    deselected = re.search(r"\((\d+) deselected\)", r.stdout)
    assert deselected and int(deselected[1]) > 100, r.stdout


def test_the_unit_tests_are_not_marked_system():
    assert collected("-m", "system", "tests/unit/test_naming.py") == []
