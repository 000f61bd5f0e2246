"""Benchmarks of archive-scale predict on the tiny model (CPU): speed per mode, memory vs input count,
and the speed-up of two processes over one.

    python scripts/bench_predict.py [--out benchmarks/results-predict-cpu.json]   (part of `make bench`)

Each measurement is a fresh `pixtral-lora predict` command; every process of it (each worker of
`--num-processes`) reports its own peak resident set size (VmHWM, `scripts/peak_rss.py`: not
wait4's ru_maxrss, which a child inherits from this benchmark, the process that trained the model),
its images/s comes from the wall time of the whole command (model load included, as a user sees it).
Figures are from one run on one machine: compare ratios within it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from peak_rss import measure  # noqa: E402

from pixtral_lora.config.yaml_loading import load_config  # noqa: E402
from pixtral_lora.data.synth import generate_aid_like  # noqa: E402
from pixtral_lora.model.tiny import build_tiny_model  # noqa: E402
from pixtral_lora.outputs import write_json  # noqa: E402
from pixtral_lora.training.recipe import train  # noqa: E402

CLASSES = ["Beach", "Desert", "Forest", "Port"]


def run_predict(source: Path, run: Path, out: Path, mode: str, processes: int = 1) -> dict:
    """Wall time and peak RSS (MB: the largest process, and each worker's) of one predict command."""
    command = [sys.executable, "-m", "pixtral_lora.cli", "predict", str(source), "--run", str(run)]
    command += ["--out", str(out), "--mode", mode, "--num-processes", str(processes)]
    measured = measure(command)
    if measured["returncode"] != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {measured['stderr_tail']}")
    return {
        "seconds": measured["seconds"],
        "peak_rss_mb": measured["peak_rss_mb"],
        # with --num-processes N: the N workers and the launcher that started them, largest first
        "per_process_peak_rss_mb": [round(mb, 1) for mb in measured["per_process_mb"]],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results-predict-cpu.json"))
    parser.add_argument("--large", type=int, default=5000, help="input count of the memory comparison")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results: dict = {"machine": {"cpus": os.cpu_count()}}
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        model = build_tiny_model(tmp / "tiny")
        data = generate_aid_like(tmp / "train-data", classes=CLASSES, per_class=40, size=64)
        config = load_config(
            ROOT / "configs" / "tiny.yaml",
            [
                f"model.name_or_path={model}",
                f"data.path={data}",
                f"training.output_dir={tmp / 'run'}",
                "training.max_steps=30",
                "training.report_to=none",
            ],
        )
        run = train(config)
        per_class = args.large // len(CLASSES)
        large = generate_aid_like(tmp / "large", classes=CLASSES, per_class=per_class, size=64, seed=7)
        small = tmp / "small"
        for name in CLASSES:
            (small / name).mkdir(parents=True)
            for path in sorted((large / name).iterdir())[:25]:
                (small / name / path.name).symlink_to(path)
        modes = {}
        for mode in ("generate", "constrained", "score"):
            measured = run_predict(small, run, tmp / f"{mode}.jsonl", mode)
            modes[mode] = {**measured, "images_per_second": 100 / measured["seconds"]}
        results["modes_100_images"] = modes
        memory = {}
        for name, source, count in (("100", small, 100), (str(args.large), large, per_class * len(CLASSES))):
            memory[name] = {
                **run_predict(source, run, tmp / f"mem-{name}.jsonl", "generate"),
                "inputs": count,
            }
        results["peak_rss_vs_inputs_generate"] = memory
        medium = tmp / "medium"
        for name in CLASSES:
            (medium / name).mkdir(parents=True)
            for path in sorted((large / name).iterdir())[:500]:
                (medium / name / path.name).symlink_to(path)
        one = run_predict(medium, run, tmp / "one.jsonl", "generate", 1)
        two = run_predict(medium, run, tmp / "two.jsonl", "generate", 2)
        results["processes_2000_images_generate"] = {
            "one": one,
            "two": two,
            "speed_up": one["seconds"] / two["seconds"],
        }
    write_json(args.out, results)
    print(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
