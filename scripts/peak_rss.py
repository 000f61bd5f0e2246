"""Peak resident memory of a command and of every Python process it starts, each measured by itself.

    from peak_rss import measure
    result = measure([sys.executable, "-m", "pixtral_lora.cli", "predict", ...])
    result["peak_rss_mb"], result["per_process_mb"]

Each Python process reports its own high-water mark (VmHWM in /proc/self/status) when it exits,
through a `sitecustomize` module put first on PYTHONPATH, which every child inherits (the workers of
`--num-processes` too). Not `ru_maxrss` from `wait4`: a child's high-water mark starts from the memory
of the process it was forked from, so a benchmark that trained a model before launching a command
reports its own size for every command it measures.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

_SITECUSTOMIZE = """
import atexit, os

def _report_peak_rss():
    with open("/proc/self/status") as status:
        peak_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    with open(os.path.join(os.environ["PEAK_RSS_DIR"], str(os.getpid())), "w") as out:
        out.write(str(peak_kb))

if os.environ.get("PEAK_RSS_DIR"):
    atexit.register(_report_peak_rss)
"""


def measure(command: list[str], env: dict | None = None, cwd: str | Path | None = None) -> dict:
    """Run `command` to its end; its wall time, exit status and every Python process's own peak RSS.

    Returns {"seconds", "returncode", "peak_rss_mb" (the largest process), "per_process_mb" (each
    process that reported, largest first)}.
    """
    env = dict(os.environ if env is None else env)
    with tempfile.TemporaryDirectory(prefix="peak-rss-") as scratch:
        probe, reports = Path(scratch) / "probe", Path(scratch) / "reports"
        probe.mkdir()
        reports.mkdir()
        (probe / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(probe), env.get("PYTHONPATH", "")]))
        env["PEAK_RSS_DIR"] = str(reports)
        started = time.perf_counter()
        completed = subprocess.run(
            command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        seconds = time.perf_counter() - started
        peaks = sorted((int(p.read_text()) / 1024 for p in reports.iterdir()), reverse=True)
    if not peaks:
        raise RuntimeError(f"{command[0]}: no Python process reported its peak memory")
    return {
        "seconds": seconds,
        "returncode": completed.returncode,
        "stderr_tail": completed.stderr.decode(errors="replace")[-2000:],
        "peak_rss_mb": peaks[0],
        "per_process_mb": peaks,
    }
