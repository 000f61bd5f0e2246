"""`predict --ray-address local --num-processes 2`: a Ray Data job on a local cluster (127.0.0.1) with
2 replicas over 2,000 inputs (relative paths, read by the replicas too); the driver SIGKILLed mid-run
and the command rerun resumes; in that rerun a replica SIGKILLed mid-run and the job still finishes;
every input exactly once, in input order, with the rows one process writes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SYNTH_CLASSES, alive, ray_replicas

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

INPUTS = 2000


@pytest.fixture()
def archive(aid_dir, tmp_path):
    """2,000 tiles: the synthetic scenes copied under new names."""
    root = tmp_path / "tiles"
    root.mkdir()
    scenes = sorted(aid_dir.rglob("*.jpg"))
    for i in range(INPUTS):
        shutil.copyfile(scenes[i % len(scenes)], root / f"{i:05d}.jpg")
    return root


def _command(run: Path, out: str) -> list[str]:
    """The job, run in the archive's parent with relative paths: a replica reads them from there too."""
    return [sys.executable, "-m", "pixtral_lora.cli", "predict", "tiles", "--run", str(run), "--out", out,
            "--mode", "score", "--batch-size", "32", "--ray-address", "local", "--num-processes", "2"]  # fmt: skip


def _journal_rows(out: Path) -> int:
    journals = list(out.parent.glob(f".{out.name}.journal-*"))
    return sum(path.read_text().count("\n") for path in journals)


def _wait_for(condition, what: str, process, seconds: float = 600) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert process.poll() is None, f"the job ended (exit {process.poll()}) before {what}"
        assert time.time() < deadline, f"no {what} in {seconds} s"
        time.sleep(0.05)


def _stop_cluster(process) -> None:
    """What a killed driver's local cluster left running (its session's processes)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_a_ray_job_resumes_after_a_killed_driver_and_survives_a_killed_replica_with_every_input_once(
    tiny_run, archive, tmp_path
):
    inputs = sorted(f"tiles/{p.name}" for p in archive.glob("*.jpg"))
    # one process, the reference rows for the first 64 inputs
    (tmp_path / "first.txt").write_text("".join(f"{path}\n" for path in inputs[:64]))
    done = subprocess.run([sys.executable, "-m", "pixtral_lora.cli", "predict", "first.txt", "--run", str(tiny_run),
                           "--out", "one-process.jsonl", "--mode", "score"], capture_output=True, text=True,
                          cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]

    # 1. the driver SIGKILLed mid-run: its journal keeps what was written
    out = tmp_path / "ray.jsonl"
    job = subprocess.Popen(_command(tiny_run, out.name), cwd=tmp_path, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        _wait_for(lambda: _journal_rows(out) >= 256 and len(ray_replicas(job.pid)) == 2, "256 rows", job)
        replicas = ray_replicas(job.pid)
        job.send_signal(signal.SIGKILL)
        job.wait()
        written = _journal_rows(out)
        # the replicas do not outlive their driver (Ray's kernel fate-sharing): gone within seconds
        deadline = time.time() + 30
        while any(alive(pid) for pid in replicas) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(alive(pid) for pid in replicas), "a replica outlived its SIGKILLed driver by 30 s"
    finally:
        _stop_cluster(job)
    assert written < INPUTS, "the driver was killed after the job was done"

    # 2. the command rerun resumes; a replica SIGKILLed mid-run is restarted, its batch run again
    log = tmp_path / "job.log"
    with open(log, "w") as output:
        job = subprocess.Popen(_command(tiny_run, out.name), cwd=tmp_path, stdout=output, stderr=subprocess.STDOUT,
                               start_new_session=True)  # fmt: skip
        try:
            _wait_for(
                lambda: _journal_rows(out) >= written + 64 and len(ray_replicas(job.pid)) == 2,
                "64 more rows from 2 replicas",
                job,
            )
            os.kill(ray_replicas(job.pid)[0], signal.SIGKILL)
            at_kill = _journal_rows(out)
            job.wait(timeout=900)
        finally:
            _stop_cluster(job)
    stdout = log.read_text()
    assert job.returncode == 0, stdout[-3000:]
    assert at_kill < INPUTS, "the replica was killed after the job was done"
    skipped = int(stdout.split(f"{INPUTS} inputs (")[1].split(" already done")[0])
    assert skipped >= written - 32  # a line cut by the kill is redone
    rows = _rows(out)
    assert [r["path"] for r in rows] == inputs  # every input exactly once, in input order
    assert not list(tmp_path.glob(".ray.jsonl.journal-*"))  # merged and removed
    one = {r["path"]: r for r in _rows(tmp_path / "one-process.jsonl")}
    for row in rows[:64]:  # what one process writes, the backend named
        assert row["label"] == one[row["path"]]["label"] and row["backend"] == "transformers"
        assert row["confidence"] == pytest.approx(one[row["path"]]["confidence"], abs=1e-5)
    assert all(r["label"] in SYNTH_CLASSES for r in rows)
