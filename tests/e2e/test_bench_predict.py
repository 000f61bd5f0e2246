"""The predict benchmark's memory figure is each process's own peak, not what a child inherits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from peak_rss import measure  # noqa: E402

BIG_MB = 1500

# A parent that holds 1.5 GB (touched, so resident) and then measures small children, as
# bench_predict does after training a model in its own process.
PARENT = f"""
import json, os, subprocess, sys
sys.path.insert(0, {str(ROOT / "scripts")!r})
from peak_rss import measure
ballast = bytearray({BIG_MB} * 2**20)
for i in range(0, len(ballast), 4096):
    ballast[i] = 1
small = [sys.executable, "-c", "pass"]
child = subprocess.Popen(small)
_, _, usage = os.wait4(child.pid, 0)
grandchildren = "import subprocess, sys; [subprocess.run([sys.executable, '-c', f'x = bytearray({{mb}} * 2**20); x[::4096] = bytes(len(x[::4096]))']) for mb in (300, 600)]"
print(json.dumps({{"inherited_mb": usage.ru_maxrss / 1024, "own": measure(small), "tree": measure([sys.executable, "-c", grandchildren])}}))
"""


def test_a_small_child_of_a_large_parent_reports_its_own_peak():
    import json

    result = subprocess.run([sys.executable, "-c", PARENT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["inherited_mb"] > BIG_MB  # the fault: wait4 reports the parent's size for the child
    assert figures["own"]["peak_rss_mb"] < 100  # an empty interpreter, measured by itself
    # every process of a command reports, children of children included, each its own size
    tree = figures["tree"]["per_process_mb"]
    assert len(tree) == 3
    assert 600 < tree[0] < 700 and 300 < tree[1] < 400 and tree[2] < 100


def test_a_command_without_python_children_is_an_error():
    import pytest

    with pytest.raises(RuntimeError, match="no Python process reported"):
        measure(["true"], env=dict(os.environ))
