"""Archive-scale predict: streams, resumes after a real SIGKILL, splits over processes, every input once."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SYNTH_CLASSES, hub_like_dataset

from pixtral_lora.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def archive(aid_dir, tmp_path):
    """The 40 synthetic scenes in nested folders, as an archive of tiles."""
    root = tmp_path / "archive"
    for name in SYNTH_CLASSES:
        shutil.copytree(aid_dir / name, root / "region-a" / name)
    return root


def _inputs(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*.jpg"))


def test_predict_resumes_after_a_kill_and_ends_with_every_input_once(tiny_run, archive, tmp_path):
    out = tmp_path / "predictions.jsonl"
    command = [sys.executable, "-m", "pixtral_lora.cli", "predict", str(archive), "--run", str(tiny_run)]
    command += ["--out", str(out), "--batch-size", "2", "--mode", "score"]
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 6:  # written as it goes, per batch
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait()
    written = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    assert 6 <= len(written) < 40, "the kill came after the run finished"
    assert (
        main(["predict", str(archive), "--run", str(tiny_run), "--out", str(out), "--batch-size", "4"]) == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in rows] == _inputs(archive)  # every input exactly once, in input order
    before = {r["path"]: r for r in written}
    for row in rows:  # what was done before the kill was kept, not redone
        if row["path"] in before:
            assert row == before[row["path"]]
    assert all(r["label"] in SYNTH_CLASSES and len(r["top3"]) == 3 for r in rows)
    for row in rows:  # score mode: the softmax's top three, the first of them the confidence
        probabilities = [p for _, p in row["top3"]]
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1 + 1e-5
        assert row["top3"][0] == [row["label"], pytest.approx(row["confidence"], abs=1e-6)]


def test_two_processes_are_a_local_ray_job_whose_rows_merge_in_input_order(tiny_run, archive, tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "predictions.csv"
    command = [sys.executable, "-m", "pixtral_lora.cli", "predict", str(archive), "--run", str(tiny_run)]
    command += ["--out", str(out), "--num-processes", "2", "--mode", "generate", "--batch-size", "8"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Started a local Ray instance" in result.stderr  # --num-processes alone: a cluster on this machine
    import csv

    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == _inputs(archive)
    assert not list(tmp_path.glob(".predictions.csv.journal-*"))  # merged and removed
    assert "40 inputs" in result.stdout
    one = tmp_path / "one.csv"
    done = subprocess.run([*command[:7], "--out", str(one), "--mode", "generate"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert [(r["path"], r["label"]) for r in csv.DictReader(one.open())] == [
        (r["path"], r["label"]) for r in rows
    ]


def test_lists_globs_and_datasets_are_sources_and_parquet_an_output(tiny_run, archive, aid_dir, tmp_path):
    import pyarrow.parquet as pq

    listing = tmp_path / "tiles.txt"
    chosen = _inputs(archive)[::10]
    listing.write_text("\n".join(chosen) + "\n")
    out = tmp_path / "p.parquet"
    assert main(["predict", str(listing), "--run", str(tiny_run), "--out", str(out)]) == 0
    table = pq.read_table(out).to_pylist()
    assert [r["path"] for r in table] == chosen and all(r["outcome"] == "valid" for r in table)
    assert (
        main(
            [
                "predict",
                str(archive / "region-a" / "Beach" / "*.jpg"),
                "--run",
                str(tiny_run),
                "--out",
                str(tmp_path / "g.jsonl"),
            ]
        )
        == 0
    )
    assert len((tmp_path / "g.jsonl").read_text().splitlines()) == 10
    hub_like_dataset(aid_dir).to_parquet(tmp_path / "scenes.parquet")
    assert (
        main(
            [
                "predict",
                str(tmp_path / "scenes.parquet"),
                "--run",
                str(tiny_run),
                "--out",
                str(tmp_path / "d.jsonl"),
            ]
        )
        == 0
    )
    keys = [json.loads(line)["path"] for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert keys == [f"train/{i}" for i in range(40)]


def test_a_second_predict_on_the_same_output_fails_at_once(tiny_run, archive, tmp_path, capsys):
    from pixtral_lora.outputs import output_lock

    out = tmp_path / "p.jsonl"
    with output_lock(out):
        assert main(["predict", str(archive), "--run", str(tiny_run), "--out", str(out)]) == 2
    assert "being written by another command" in capsys.readouterr().err and not out.exists()


def test_num_processes_without_ray_installed_is_one_line_naming_the_extra(tiny_run, aid_dir, tmp_path):
    import os

    blocked = tmp_path / "no-ray" / "ray"  # an import of ray that fails, as where it is not installed
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(blocked.parent), os.environ.get("PYTHONPATH")])),
    }
    out = tmp_path / "p.jsonl"
    command = [
        sys.executable,
        "-m",
        "pixtral_lora.cli",
        "predict",
        str(aid_dir / "Port"),
        "--run",
        str(tiny_run),
    ]
    result = subprocess.run([*command, "--out", str(out), "--num-processes", "2"], capture_output=True, text=True,
                            env=env, cwd=ROOT)  # fmt: skip
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "pip install 'pixtral-lora[ray]'" in result.stderr and not out.exists()
    one = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, env=env, cwd=ROOT)
    assert one.returncode == 0, one.stderr[-2000:]  # one process needs no Ray
