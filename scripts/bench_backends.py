"""Benchmark of predict's engines on one tiny run and the same images: transformers vs vLLM per mode,
and Ray with 1 vs 2 replicas.

    python scripts/bench_backends.py --vllm-python .venv-vllm/bin/python \
        [--out benchmarks/results-backends-cpu.json]                        (part of `make bench`)

Per mode, each engine as `predict` runs it (`scripts/bench_engine.py`: transformers on the run's
adapter; vLLM on the run's merged float32 Mistral-format export, what `predict --backend vllm --model
DIR` serves, in vLLM's own virtualenv), warm, on the same images; the engine's start is reported
apart. Ray: the `pixtral-lora predict --num-processes N` command as a user types it, run twice, on a
few images and on many: images/s is the extra images over the extra seconds, so the cluster's and
the replicas' start cancels out. Figures are from one run on one machine: compare ratios within it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pixtral_lora.outputs import write_json  # noqa: E402

CLASSES = ["Beach", "Desert", "Forest", "Port"]
MODES = ("generate", "constrained", "score")
VLLM_ENV = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}


def run(python: str, *args: str, env: dict | None = None) -> float:
    """A project command (python ARGS) that must succeed; its wall seconds."""
    started = time.perf_counter()
    result = subprocess.run([python, *args], capture_output=True, text=True, cwd=ROOT, env=env)
    if result.returncode:
        raise SystemExit(f"failed: {python} {' '.join(args)}\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def listing(path: Path, images: list[Path]) -> Path:
    path.write_text("".join(f"{image}\n" for image in images), encoding="utf-8")
    return path


def throughput(python: str, few: Path, many: Path, counts: tuple[int, int], out: Path, args: list[str],
               env: dict | None = None) -> dict:  # fmt: skip
    """images/s of `predict` between a run on `few` and one on `many` images, and the start seconds."""
    seconds = []
    for name, source in (("few", few), ("many", many)):
        target = out.with_name(f"{out.stem}-{name}.jsonl")
        seconds.append(run(python, "-m", "pixtral_lora.cli", "predict", str(source), *args, "--out", str(target),
                           "--overwrite", env=env))  # fmt: skip
    per_image = (seconds[1] - seconds[0]) / (counts[1] - counts[0])
    return {
        "images_per_second": round(1 / per_image, 2) if per_image > 0 else None,
        "start_seconds": round(seconds[0] - per_image * counts[0], 1),
        "wall_seconds": [round(s, 1) for s in seconds],
        "images": list(counts),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vllm-python", required=True, help="the python of vLLM's virtualenv (.venv-vllm)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results-backends-cpu.json"))
    parser.add_argument("--few", type=int, default=8, help="images of the short run of each Ray setting")
    parser.add_argument("--many", type=int, default=200, help="images timed per mode on each engine")
    parser.add_argument(
        "--ray-many", type=int, default=800, help="images of the long run of the Ray settings"
    )
    args = parser.parse_args()
    py = sys.executable
    results: dict = {"machine": {"cpus": os.cpu_count()}}
    with tempfile.TemporaryDirectory(prefix="bench-backends-") as scratch:
        work = Path(scratch)
        model, data, images = work / "tiny-pixtral", work / "train-data", work / "images"
        print("building the tiny model, a run and its merged export with the project's commands", flush=True)
        run(py, "-m", "pixtral_lora.cli", "tiny-model", "--out", str(model))
        run(py, "-m", "pixtral_lora.cli", "data", "generate", "--out", str(data), "--per-class", "40", "--size", "64",
            "--classes", ",".join(CLASSES))  # fmt: skip
        sets = [f"model.name_or_path={model}", f"data.path={data}", f"training.output_dir={work / 'run'}",
                "training.report_to=none", "training.num_train_epochs=4"]  # fmt: skip
        run(py, "train.py", str(ROOT / "configs" / "tiny.yaml"), *[a for s in sets for a in ("--set", s)])
        merged = work / "merged"
        run(py, str(ROOT / "scripts" / "convert_to_mistral.py"), "--model", str(model), "--adapter",
            str(work / "run" / "adapter"), "--out", str(merged), "--dtype", "float32")  # fmt: skip
        per_class = max(args.many, args.ray_many) // len(CLASSES)
        run(py, "-m", "pixtral_lora.cli", "data", "generate", "--out", str(images), "--per-class", str(per_class),
            "--size", "64", "--classes", ",".join(CLASSES), "--seed", "7")  # fmt: skip
        found = sorted(images.rglob("*.jpg"))
        common = ["--run", str(work / "run")]
        engines: dict = {}
        for backend, python, extra, env in (
            ("transformers", py, [], None),
            ("vllm", args.vllm_python, ["--backend", "vllm", "--model", str(merged)], VLLM_ENV),
        ):
            print(f"every mode on one warm {backend} engine", flush=True)
            out = work / f"engine-{backend}.json"
            listing(work / "engine-images.txt", found[: args.many])
            run(python, str(ROOT / "scripts" / "bench_engine.py"), *common, *extra, "--images",
                str(work / "engine-images.txt"), "--count", str(args.many), "--out", str(out), env=env)  # fmt: skip
            engines[backend] = json.loads(out.read_text(encoding="utf-8"))
        results["engines_per_mode"] = {
            mode: {
                "transformers_images_per_s": engines["transformers"][mode]["images_per_s"],
                "vllm_merged_float32_images_per_s": engines["vllm"][mode]["images_per_s"],
                "vllm_over_transformers": engines["vllm"][mode]["images_per_s"]
                / engines["transformers"][mode]["images_per_s"],
            }
            for mode in MODES
        }
        results["engine_start_s"] = {b: engines[b]["engine_start_s"] for b in engines}
        results["versions"] = {b: engines[b]["version"] for b in engines}
        few = listing(work / "few.txt", found[: args.few])
        ray_many = listing(work / "ray-many.txt", found[: args.ray_many])
        replicas = {}
        for count in (1, 2):
            print(f"predict on Ray (transformers, score): {count} replica(s)", flush=True)
            replicas[str(count)] = throughput(
                py, few, ray_many, (args.few, args.ray_many), work / f"ray-{count}",
                [*common, "--mode", "score", "--ray-address", "local", "--num-processes", str(count)],
            )  # fmt: skip
        one, two = (replicas[k]["images_per_second"] for k in ("1", "2"))
        results["ray_score_replicas"] = {**replicas, "speed_up_2_over_1": two / one if one and two else None}
    write_json(args.out, results)
    print(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
