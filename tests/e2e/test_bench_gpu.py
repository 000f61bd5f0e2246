"""The GPU check runs end to end on the tiny shape (CPU): training, evaluation, export, logits."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY_ARGS = ["--tiny", "--steps", "2", "--warmup", "1", "--eval-images", "8"]


def load_bench_gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "scripts" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_tiny_runs_every_stage_and_writes_its_figures(tmp_path):
    """Every stage on the Mistral3 shape (the failing-stage test below runs Pixtral-12B's)."""
    out = tmp_path / "gpu.json"
    command = [sys.executable, str(ROOT / "scripts" / "bench_gpu.py"), *TINY_ARGS, "--out", str(out),
               "--model", "mistral-small-3.2"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    training = figures["training"]
    assert figures["model"] == "mistral-small-3.2"
    # a 308x308 image (132 tokens, Pixtral-12B's 304x304 costs 380) + the 30-class prompt
    assert training["samples_per_s"] > 0 and 132 < training["tokens_per_sample"] < 380
    assert training["quantization"] == "4bit"  # the QLoRA path the GPU runs, on bitsandbytes' CPU backend
    assert set(figures["evaluation"]) == {"generate", "constrained", "score"}
    assert all(r["images"] >= 8 and r["images_per_s"] > 0 for r in figures["evaluation"].values())
    assert figures["export"]["seconds"] > 0 and figures["export"]["peak_rss_gib"] > 0
    logits = figures["logits"]
    assert logits["max_abs_logit_difference"] < 1e-3 and logits["argmax_agreement"] == 1.0
    assert figures["failed_stages"] == []
    stages = {"training", "evaluation", "logits", "export", "vllm", "speed_options", "sharded"}
    assert set(figures["stage_seconds"]) == stages
    sharded = figures["sharded"]  # the 2-GPU FSDP + QLoRA stage, on 2 CPU processes here
    assert sharded["launch"] == "train/fsdp_cpu.yaml" and sharded["shape"] == "mistral-small-3.2"
    assert sharded["one_layer"]["seconds_per_optimizer_step"] > 0 and sharded["one_layer"]["layers"] == 1
    assert sharded["one_layer"]["peak_gpu_memory_gib_per_process"] is None  # no CUDA here
    if "skipped" in figures["vllm"]:  # no vLLM in this environment: said, not silently left out
        assert "vLLM is not installed" in figures["vllm"]["skipped"]
    else:
        assert all(figures["vllm"][mode]["images_per_s"] > 0 for mode in ("generate", "constrained", "score"))
    assert figures["speed_options"] == {  # CUDA-only kernels: recorded as skipped, not silently left out
        "flash_attention_2": {"skipped": "CUDA only"},
        "liger_kernel": {"skipped": "CUDA only"},
    }
    assert "training samples/s" in result.stdout and ">= 9.0" in result.stdout  # targets beside figures


def test_a_failing_stage_is_recorded_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    bench = load_bench_gpu()

    def broken_logits(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(bench, "stage_logits", broken_logits)
    monkeypatch.setattr(  # a speed option that runs on a CPU, one that breaks, one not installed
        bench,
        "SPEED_OPTIONS",
        {
            "eager_attention": ("torch", ("model.attn_implementation=eager",), False),
            "broken_option": ("torch", ("model.attn_implementation=no_such_kernel",), False),
            "missing_package": ("no_such_package_here", (), False),
        },
    )
    out = tmp_path / "gpu.json"
    monkeypatch.setattr(
        sys, "argv", ["bench_gpu.py", *TINY_ARGS, "--skip", "evaluation,sharded", "--out", str(out)]
    )
    assert bench.main() == 1
    figures = json.loads(out.read_text())
    assert figures["failed_stages"] == ["logits", "speed_options"]
    options = figures["speed_options"]
    assert (
        options["eager_attention"]["samples_per_s"] > 0
        and options["eager_attention"]["speedup_vs_default"] > 0
    )
    assert "attn_implementation" in options["broken_option"]["error"]
    assert options["missing_package"] == {"skipped": "no_such_package_here is not installed"}
    assert figures["logits"]["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert "broken_logits" in figures["logits"]["traceback"]
    assert figures["training"]["tokens_per_sample"] > 380  # Pixtral-12B: a 304x304 image + the prompt
    assert figures["training"]["samples_per_s"] > 0 and figures["export"]["seconds"] > 0  # ran on
    assert "evaluation" not in figures
    assert "FAILED: logits, speed_options" in capsys.readouterr().out


def test_the_exporter_child_sees_the_callers_pythonpath(monkeypatch):
    """Wheels installed beside the GPU machine's packages (PYTHONPATH) must reach the export process."""
    bench = load_bench_gpu()
    monkeypatch.setenv("PYTHONPATH", "/opt/kit")
    assert bench.child_environment()["PYTHONPATH"].split(os.pathsep) == [str(ROOT / "src"), "/opt/kit"]
    monkeypatch.delenv("PYTHONPATH")
    assert bench.child_environment()["PYTHONPATH"] == str(ROOT / "src")


def test_the_sharded_stage_says_when_one_gpu_is_lent(tmp_path, monkeypatch):
    bench = load_bench_gpu()
    monkeypatch.setattr(bench.torch.cuda, "device_count", lambda: 1)
    figures = bench.stage_sharded(tmp_path, None, "cuda")
    assert figures == {"skipped": "1 GPU lent: FSDP + QLoRA needs 2 (the first session with more runs it)"}
