"""GPU benchmark of the real Pixtral-12B shape: QLoRA step time and peak VRAM on AID-sized samples.

    python scripts/bench_gpu.py [--steps 10] [--out benchmarks/results-gpu-12b.json]
    python scripts/bench_gpu.py --tiny --steps 2     # the same code path on the tiny shape (CPU ok)

No download: the 12B architecture (configs of mistral-community/pixtral-12b) is built with random
weights in bf16, written as safetensors to a temporary directory, and loaded back through the
project's loader in 4-bit NF4, exactly as `configs/aid.yaml` trains it. The data are 600x600
synthetic scenes under AID's 30 class names, so prompts, image tokens (304x304 -> 380) and answers
have the lengths of the real run. Step time and samples/s come from the Trainer; peak VRAM is the
CUDA allocator's peak during training (the bf16 build is freed and the counter reset before).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pixtral_lora.config import load_config  # noqa: E402
from pixtral_lora.data import AID_CLASS_NAMES  # noqa: E402
from pixtral_lora.io import write_json  # noqa: E402
from pixtral_lora.modeling import TinyPixtralSizes, build_processor, pixtral_config  # noqa: E402
from pixtral_lora.synth import SCENES, draw_scene  # noqa: E402
from pixtral_lora.training import train  # noqa: E402


def write_random_checkpoint(out: Path, tiny: bool, device: str) -> None:
    from transformers import LlavaForConditionalGeneration

    config = pixtral_config(TinyPixtralSizes() if tiny else None)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="5GB")
    build_processor().save_pretrained(out)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_aid_sized_data(out: Path, per_class: int, size: int) -> None:
    painters = sorted(SCENES)
    for index, class_name in enumerate(AID_CLASS_NAMES):
        folder = out / class_name
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(1, per_class + 1):
            draw_scene(painters[index % len(painters)], n, size, seed=index).save(
                folder / f"{class_name.lower()}_{n}.jpg", quality=90
            )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--tiny", action="store_true", help="tiny widths/depths (checks the script without a GPU)"
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="per-device batch (default: configs/aid.yaml's)"
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results-gpu-12b.json"))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.tiny and device != "cuda":
        print("the 12B benchmark needs a CUDA GPU; use --tiny to check the script on a CPU", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        write_random_checkpoint(tmp / "model", args.tiny, device)
        build_s = time.perf_counter() - start
        aid_config = load_config(ROOT / "configs" / "aid.yaml")
        batch = args.batch or aid_config.training.per_device_train_batch_size
        accumulation = aid_config.training.gradient_accumulation_steps
        per_class = max(5, -(-args.steps * batch * accumulation // (len(AID_CLASS_NAMES) * 0.8)) // 1)
        write_aid_sized_data(tmp / "data", int(per_class) + 1, 600)
        overrides = [
            f"model.name_or_path={tmp / 'model'}",
            f"data.path={tmp / 'data'}",
            f"training.output_dir={tmp / 'run'}",
            f"training.max_steps={args.steps}",
            f"training.per_device_train_batch_size={batch}",
            "training.logging_steps=1",
            "training.save_steps=100000",
            "training.report_to=none",
            "training.dataloader_num_workers=2",
        ]
        config = load_config(ROOT / "configs" / "aid.yaml", overrides)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        run_dir = train(config, resume="never")
        peak_vram = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        final = next(r for r in reversed(records) if "train_runtime" in r)
        samples = args.steps * batch * accumulation
        results = {
            "benchmark": "Pixtral-12B shape, random weights, QLoRA (configs/aid.yaml) on 600x600 AID-sized samples"
            if not args.tiny
            else "tiny shape (script check only)",
            "date": time.strftime("%Y-%m-%d"),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "versions": {"torch": torch.__version__, "cuda": torch.version.cuda},
            "steps": args.steps,
            "per_device_batch": batch,
            "gradient_accumulation": accumulation,
            "samples": samples,
            "train_runtime_s": final["train_runtime"],
            "seconds_per_optimizer_step": final["train_runtime"] / args.steps,
            "samples_per_s": samples / final["train_runtime"],
            "peak_vram_gib": peak_vram,
            "checkpoint_build_s": build_s,
            "reproduce": f"python scripts/bench_gpu.py --steps {args.steps}",
            "final_loss": next((r["loss"] for r in reversed(records) if "loss" in r), None),
        }
    write_json(args.out, results)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
