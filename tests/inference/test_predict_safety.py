"""predict as a careless user or a kill would have it: another run or mode on the same output, folders
that hold earlier outputs, unwritable locations, SIGTERM to a multi-process launch, a run trained
with relative paths used from elsewhere. Every case through the command users type."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SYNTH_CLASSES, alive, descendants, one_line_error, ray_replicas, run_cli, set_args

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def tiles(aid_dir, tmp_path):
    """Eight scenes, two per class, in one folder."""
    root = tmp_path / "tiles"
    root.mkdir()
    for name in SYNTH_CLASSES:
        for path in sorted((aid_dir / name).iterdir())[:2]:
            shutil.copy(path, root / f"{name}-{path.name}")
    return root


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_another_mode_or_run_on_an_existing_output_is_refused_not_resumed(tiny_run, tiles, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "predictions.jsonl"
    first = run_cli("predict", tiles, "--run", tiny_run, "--out", out, "--mode", "score")
    assert first.returncode == 0, first.stderr[-3000:]
    rows = _rows(out)
    assert {r["mode"] for r in rows} == {"score"} and len({r["model"] for r in rows}) == 1
    before = out.read_bytes()

    line = one_line_error(run_cli("predict", tiles, "--run", tiny_run, "--out", out, "--mode", "constrained"))
    assert "another model or mode" in line and "--overwrite" in line
    assert out.read_bytes() == before  # nothing of the earlier answers lost

    # the same run directory retrained (another adapter): its answers are not the earlier ones
    other_run = tmp_path / "other-run"
    shutil.copytree(tiny_run, other_run, ignore=shutil.ignore_patterns("checkpoints", "eval*"))
    weights = other_run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v * 1.5 for k, v in tensors.items()}, weights, metadata={"format": "pt"})
    line = one_line_error(run_cli("predict", tiles, "--run", other_run, "--out", out))
    assert "another model or mode" in line
    assert out.read_bytes() == before

    replaced = run_cli(
        "predict", tiles, "--run", tiny_run, "--out", out, "--mode", "constrained", "--overwrite"
    )
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert "(0 already done)" in replaced.stdout
    rows = _rows(out)
    assert len(rows) == 8 and {r["mode"] for r in rows} == {"constrained"}
    resumed = run_cli("predict", tiles, "--run", tiny_run, "--out", out, "--mode", "constrained")
    assert resumed.returncode == 0 and "(8 already done)" in resumed.stdout


def test_a_folder_of_tiles_is_images_whatever_else_it_holds(tiny_run, tiles, tmp_path):
    parquet = tmp_path / "earlier.parquet"
    first = run_cli("predict", tiles, "--run", tiny_run, "--out", parquet)
    assert first.returncode == 0, first.stderr[-3000:]
    shutil.copy(parquet, tiles / "earlier.parquet")  # an earlier output kept with the tiles
    (tiles / "metadata.csv").write_text("file_name,note\nBeach-beach_1.jpg,x\n")
    out = tmp_path / "again.jsonl"
    result = run_cli("predict", tiles, "--run", tiny_run, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(_rows(out)) == 8 and all(r["path"].endswith(".jpg") for r in _rows(out))
    as_dataset = run_cli("predict", parquet, "--run", tiny_run, "--out", tmp_path / "d.jsonl")
    assert "no column 'image'" in one_line_error(as_dataset)  # a .parquet file is a dataset when named
    # a folder is read as a dataset when asked: unlabelled images in the Hub's Parquet layout
    from datasets import Dataset, Features
    from datasets import Image as ImageFeature

    hub_folder = tmp_path / "hub-copy"
    (hub_folder / "data").mkdir(parents=True)
    images = [{"bytes": p.read_bytes(), "path": None} for p in sorted(tiles.glob("*.jpg"))[:3]]
    Dataset.from_dict({"image": images}, features=Features({"image": ImageFeature()})).to_parquet(
        str(hub_folder / "data" / "train-00000-of-00001.parquet")
    )
    dataset_run = run_cli(
        "predict", hub_folder, "--dataset", "--run", tiny_run, "--out", tmp_path / "h.jsonl"
    )
    assert dataset_run.returncode == 0, dataset_run.stderr[-3000:]
    assert [r["path"] for r in _rows(tmp_path / "h.jsonl")] == ["train/0", "train/1", "train/2"]


def test_no_lock_is_left_and_an_unwritable_location_is_one_line(tiny_run, tiles, tmp_path):
    out = tmp_path / "out" / "p.csv"
    result = run_cli("predict", tiles, "--run", tiny_run, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.parent.iterdir()) == ["p.csv"]  # no .p.csv.lock, no journal
    line = one_line_error(run_cli("predict", tiles, "--run", tiny_run, "--out", "/proc/pixtral-lora/p.jsonl"))
    assert "/proc" in line and "cannot write" in line
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    line = one_line_error(run_cli("eval", tiny_run, "--out", blocked / "eval", "--limit", "2"))
    assert "a-file" in line


def test_sigterm_to_a_multi_process_predict_stops_its_ray_cluster_and_every_replica(
    tiny_run, aid_dir, tmp_path
):
    pytest.importorskip("ray")
    archive = tmp_path / "archive"
    for copy in range(4):
        shutil.copytree(aid_dir, archive / f"part-{copy}")
    out = tmp_path / "p.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pixtral_lora.cli", "predict", str(archive), "--run", str(tiny_run)]
    command += ["--out", str(out), "--num-processes", "2", "--batch-size", "2"]
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.time() + 300
    replicas: list[int] = []
    while time.time() < deadline and driver.poll() is None:
        replicas = ray_replicas(driver.pid)
        journals = list(tmp_path.glob(".p.jsonl.journal-*"))
        if len(replicas) == 2 and journals and any(j.stat().st_size for j in journals):
            break
        time.sleep(0.1)
    assert driver.poll() is None and len(replicas) == 2, "the job ended before it could be stopped"
    cluster = descendants(driver.pid)  # the local cluster: Ray's own processes and the replicas
    driver.send_signal(signal.SIGTERM)
    driver.wait(timeout=120)
    assert driver.returncode != 0
    deadline = time.time() + 10
    while any(alive(pid) for pid in cluster) and time.time() < deadline:
        time.sleep(0.2)
    assert [title for pid, title in cluster.items() if alive(pid)] == []
    # the output is free again: a rerun resumes from the journal and finishes
    rerun = run_cli("predict", archive, "--run", tiny_run, "--out", out, "--num-processes", "2", env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert len(_rows(out)) == 160 and "(0 already done)" not in rerun.stdout


@pytest.mark.slow  # trains a model
def test_a_run_trained_with_relative_paths_works_from_another_directory(tiny_model_dir, aid_dir, tmp_path):
    work = tmp_path / "project"
    (work / "artifacts").mkdir(parents=True)
    shutil.copytree(tiny_model_dir, work / "artifacts" / "tiny-pixtral")
    shutil.copytree(aid_dir, work / "artifacts" / "aid")
    trained = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            str(ROOT / "configs" / "tiny.yaml"),
            *set_args(
                "model.name_or_path=artifacts/tiny-pixtral",
                "data.path=artifacts/aid",
                "training.output_dir=runs/rel",
                "training.max_steps=1",
                "training.eval_steps=null",
                "data.validation_size=0",
                "training.report_to=none",
            ),
        ],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    recorded = (work / "runs" / "rel" / "config.yaml").read_text()
    assert f"name_or_path: {work / 'artifacts' / 'tiny-pixtral'}" in recorded
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    images = sorted((aid_dir / "Beach").iterdir())[:2]
    result = run_cli(
        "predict", *images[:1], "--run", work / "runs" / "rel", "--out", elsewhere / "p.jsonl", cwd=elsewhere
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # a run directory written before paths were recorded absolute: one line naming the base, at once
    config = work / "runs" / "rel" / "config.yaml"
    config.write_text(recorded.replace(str(work / "artifacts" / "tiny-pixtral"), "artifacts/tiny-pixtral"))
    started = time.time()
    line = one_line_error(
        run_cli("predict", *images[:1], "--run", work / "runs" / "rel", "--out", elsewhere / "q.jsonl", cwd=elsewhere,
             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    )  # fmt: skip
    assert "artifacts/tiny-pixtral" in line and time.time() - started < 60
    assert not (elsewhere / "q.jsonl").exists() and not (elsewhere / ".q.jsonl.lock").exists()
