"""The GPU check runs end to end on the tiny shape (CPU): training, evaluation, export, logits."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_gpu_tiny_runs_every_stage_and_writes_its_figures(tmp_path):
    out = tmp_path / "gpu.json"
    command = [
        sys.executable,
        str(ROOT / "scripts" / "bench_gpu.py"),
        "--tiny",
        "--steps",
        "2",
        "--warmup",
        "1",
    ]
    command += ["--eval-images", "8", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    training = figures["training"]
    assert training["samples_per_s"] > 0 and training["tokens_per_sample"] > 380  # 304x304 image + prompt
    assert set(figures["evaluation"]) == {"generate", "constrained", "score"}
    assert all(r["images"] >= 8 and r["images_per_s"] > 0 for r in figures["evaluation"].values())
    assert figures["export"]["seconds"] > 0 and figures["export"]["peak_rss_gib"] > 0
    logits = figures["logits"]
    assert logits["max_abs_logit_difference"] < 1e-3 and logits["argmax_agreement"] == 1.0
    assert "training samples/s" in result.stdout and ">= 9.0" in result.stdout  # targets beside figures
