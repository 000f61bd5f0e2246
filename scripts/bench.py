"""Benchmarks of the tiny config: training throughput and evaluation speed, written to a results file.

    python scripts/bench.py [--out benchmarks/results-cpu.json]      (what `make bench` runs)

Training: samples/s and tokens/s (non-padding tokens) from a run of the real recipe, peak memory
(CUDA allocator peak on a GPU, max resident set size on a CPU), and the share of padding tokens in
the batches. Evaluation: images/s for free generation, constrained generation and scoring.
Figures are from one run on one machine: compare ratios measured in the same run, not across runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pixtral_lora.classify import ClassifyOptions, predict_rows  # noqa: E402
from pixtral_lora.classify.score import score_positions  # noqa: E402
from pixtral_lora.config.yaml_loading import load_config  # noqa: E402
from pixtral_lora.data.loaders import to_conversations  # noqa: E402
from pixtral_lora.data.splits import load_run_data  # noqa: E402
from pixtral_lora.data.synth import generate_aid_like  # noqa: E402
from pixtral_lora.model.loading import best_device, load_processor  # noqa: E402
from pixtral_lora.model.render import Renderer, render_dataset  # noqa: E402
from pixtral_lora.model.tiny import build_tiny_model  # noqa: E402
from pixtral_lora.outputs import write_json  # noqa: E402
from pixtral_lora.run.reader import load_eval_model  # noqa: E402
from pixtral_lora.task.answers import answer_token_ids  # noqa: E402
from pixtral_lora.training.recipe import train  # noqa: E402


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def padding_share(rendered, batch_size: int) -> float:
    lengths = [len(ids) for ids in rendered["input_ids"]]
    padded = real = 0
    for start in range(0, len(lengths), batch_size):
        chunk = lengths[start : start + batch_size]
        padded += max(chunk) * len(chunk)
        real += sum(chunk)
    return 1 - real / padded if padded else 0.0


def export_memory(tmp: Path) -> list[dict]:
    """Peak RSS of the exporter (a fresh process each) on two checkpoint sizes that differ only in depth.

    If the exporter streams, the peak grows with the largest tensor (the 131k x 512 embeddings here),
    not with the number of layers: the two peaks should be close although one model is ~2x the other.
    """
    import subprocess

    from pixtral_lora.model.tiny import TinySizes

    results = []
    for layers in (8, 48):
        sizes = TinySizes(
            text_hidden_size=512,
            text_intermediate_size=1536,
            text_layers=layers,
            text_heads=8,
            text_kv_heads=2,
            text_head_dim=64,
        )
        model_dir = build_tiny_model(tmp / f"pixtral-{layers}", sizes=sizes)
        weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
        # RSS is sampled in the converting process (ru_maxrss would be dominated by the CUDA
        # libraries torch maps at import).
        probe = (
            "import threading, time, psutil, transformers, mistral_common\n"
            "from pixtral_lora.export.mistral import export_mistral\n"
            "process = psutil.Process(); base = process.memory_info().rss; peak = [base]; done = []\n"
            "def watch():\n"
            "    while not done:\n"
            "        peak[0] = max(peak[0], process.memory_info().rss); time.sleep(0.005)\n"
            "thread = threading.Thread(target=watch); thread.start()\n"
            f"export_mistral({str(model_dir)!r}, {str(tmp / f'mistral-{layers}')!r}, dtype='float32')\n"
            "done.append(1); thread.join(); print(base, peak[0])\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True
        ).stdout.split()
        base, peak = int(out[-2]), int(out[-1])
        results.append(
            {
                "text_layers": layers,
                "checkpoint_mb": weights / 2**20,
                "largest_tensor_mb": 131072 * 512 * 4 / 2**20,
                "rss_after_imports_mb": base / 2**20,
                "peak_rss_mb": peak / 2**20,
                "export_memory_mb": (peak - base) / 2**20,
            }
        )
    return results


def scoring_vs_generate(model, renderer, rows, config) -> dict:
    """images/s of score mode and free generation on the same images, with 4 and with AID's 30 classes."""
    from pixtral_lora.data.loaders import AID_CLASS_NAMES

    out = {}
    for name, classes in (
        ("4_classes", ["Beach", "Desert", "Forest", "Port"]),
        ("30_classes", AID_CLASS_NAMES),
    ):
        prompt_rows = list(rows)
        figures = {}
        for mode in ("generate", "score"):
            _, speed = predict_rows(
                model,
                renderer,
                prompt_rows,
                classes,
                config.prompt,
                ClassifyOptions(mode, config.eval.batch_size, config.eval.max_new_tokens),
            )
            figures[mode] = speed
        # the count that bounds the ratio on a model whose LM head dominates (the tiny one)
        positions = score_positions(answer_token_ids(renderer.tokenizer, config.prompt, classes))
        out[name] = {
            **figures,
            "score_over_generate": figures["score"] / figures["generate"],
            "projected_positions": positions,
            "lm_head_bound_ratio": positions["generate_mean"] / positions["score"],
        }
    return out


def input_pipeline(tmp: Path, processor, images: int = 96) -> dict:
    """samples/s of the training input pipeline alone at configs/aid.yaml's settings: 600x600 JPEG
    decoded and resized to 304x304, processor, collate, batch 4; with 0, 1 and 2 DataLoader workers."""
    from torch.utils.data import DataLoader

    from pixtral_lora.data.loaders import AID_CLASS_NAMES, load_aid_folder
    from pixtral_lora.model.render import TrainingCollator

    config = load_config(ROOT / "configs" / "aid.yaml")
    data = generate_aid_like(
        tmp / "aid600", classes=["Beach", "Desert", "Forest", "Port"], per_class=images // 4, size=600
    )
    renderer = Renderer(processor, config.data.image_longest_edge, config.data.max_length)
    rendered = render_dataset(
        renderer, to_conversations(load_aid_folder(data), config.prompt, AID_CLASS_NAMES)
    )
    out = {"images": len(rendered), "batch_size": config.training.per_device_train_batch_size}
    for workers in (0, 1, 2):
        loader = DataLoader(
            rendered,
            batch_size=config.training.per_device_train_batch_size,
            num_workers=workers,
            collate_fn=TrainingCollator(renderer),
        )
        start = time.perf_counter()
        count = sum(batch["input_ids"].shape[0] for batch in loader)
        out[f"workers_{workers}_samples_per_s"] = count / (time.perf_counter() - start)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / f"results-{best_device()}.json"))
    parser.add_argument(
        "--steps", type=int, default=-1, help="optimizer steps (default: the config's epochs)"
    )
    parser.add_argument("--eval-images", type=int, default=32)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_tiny_model(tmp / "tiny-pixtral")
        data_dir = generate_aid_like(
            tmp / "aid", classes=["Beach", "Desert", "Forest", "Port"], per_class=40, size=64
        )
        config = load_config(
            ROOT / "configs" / "tiny.yaml",
            [
                f"model.name_or_path={model_dir}",
                f"data.path={data_dir}",
                f"training.output_dir={tmp / 'run'}",
                f"training.max_steps={args.steps}",
                "training.eval_steps=null",
                "data.validation_size=0",
                "training.report_to=none",
                "training.save_steps=1000",
            ],
        )
        # -- Training --------------------------------------------------------------------------------
        processor = load_processor(model_dir)
        renderer = Renderer(processor, config.data.image_longest_edge, config.data.max_length)
        run_data = load_run_data(config)
        rendered = render_dataset(
            renderer, to_conversations(run_data.splits.train, config.prompt, run_data.class_names)
        )
        run_dir = train(config, resume="never")
        final = [
            json.loads(line)
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "train_runtime" in line
        ][-1]
        steps = json.loads((run_dir / "train_summary.json").read_text())["global_step"]
        samples = round(final["epoch"] * len(rendered))
        mean_tokens = sum(len(ids) for ids in rendered["input_ids"]) / len(rendered)
        training = {
            "steps": steps,
            "samples": samples,
            "runtime_s": final["train_runtime"],
            "samples_per_s": samples / final["train_runtime"],
            "tokens_per_s": samples * mean_tokens / final["train_runtime"],
            "tokens_per_sample": mean_tokens,
            "padding_share": padding_share(rendered, config.training.per_device_train_batch_size),
            "peak_memory_mb": peak_memory_mb(),
        }
        # -- Evaluation -------------------------------------------------------------------------------
        test = run_data.splits.test.select(range(min(args.eval_images, len(run_data.splits.test))))
        rows = list(to_conversations(test, config.prompt, run_data.class_names, with_answer=False))
        model = load_eval_model(str(model_dir), run_dir / "adapter", None, config.model.dtype)
        evaluation = {}
        for mode in ("generate", "constrained", "score"):
            start = time.perf_counter()
            predictions, speed = predict_rows(
                model,
                renderer,
                rows,
                run_data.class_names,
                config.prompt,
                ClassifyOptions(mode, config.eval.batch_size, config.eval.max_new_tokens),
            )
            evaluation[mode] = {
                "images": len(rows),
                "images_per_s": speed,
                "wall_s": time.perf_counter() - start,
                "accuracy": sum(p.label == p.gold for p in predictions) / len(predictions),
            }
        scoring = scoring_vs_generate(model, renderer, rows, config)
        # -- Export: peak memory against the size of the weights -------------------------------------
        export = export_memory(tmp)
        pipeline = input_pipeline(tmp, processor)
    results = {
        "benchmark": "tiny Pixtral (configs/tiny.yaml), synthetic 64x64 scenes",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
            "device": best_device(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "versions": {"torch": torch.__version__},
        "training": training,
        "evaluation": evaluation,
        "scoring_vs_generate": scoring,
        "input_pipeline_aid_settings": pipeline,
        "export": export,
        "reproduce": "make bench",
    }
    write_json(args.out, results)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
