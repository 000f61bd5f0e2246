"""Per-GPU memory of each training launch, estimated from a model's shape (no weights, no GPU).

    python scripts/estimate_memory.py --model mistral-small-3.2 --gpus 2 4
    python scripts/estimate_memory.py --model-dir runs/tiny-model --json out.json

The model is built on PyTorch's meta device from its config.json, so every parameter is counted as
transformers defines it; the LoRA targets are the recipe's (`--config`, configs/aid.yaml by default).
What each launch holds per GPU, in bytes, for N GPUs:

- weights: bf16 (2 B/parameter), or QLoRA: bitsandbytes NF4 with double quantization (4 bits plus
  one fp32 absmax per 64 weights, itself quantized to 8 bits per 256 blocks: 0.5 + 1/64 + 4/(64*256)
  B/weight) for the language model's linear layers the recipe quantizes, bf16 for the rest;
- LoRA: the adapter's weights and gradients (2 + 2 B) and AdamW's two fp32 moments plus an fp32
  master copy (12 B): 16 B per adapter parameter;
- FSDP2 / ZeRO-3 shard weights and LoRA state over N, and gather one wrapped block at a time (the
  largest decoder layer, whole, counted once); ZeRO-2 shards the adapter's gradients and optimizer
  state only; data parallel shards nothing.

Activations are not estimated (they depend on batch, tokens per image and checkpointing):
`scripts/bench_gpu.py` measures the peak on a GPU.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pixtral_lora.config.yaml_loading import load_config  # noqa: E402
from pixtral_lora.families import by_shape, family_from_config, shape_names  # noqa: E402
from pixtral_lora.model.loading import UNQUANTIZED  # noqa: E402
from pixtral_lora.outputs import atomic_file  # noqa: E402
from pixtral_lora.training.recipe import lora_target_regex  # noqa: E402

NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # per weight: 4 bits, 8-bit absmax per 64, fp32 per 256 blocks
LORA_BYTES = 16  # bf16/fp32 weight + gradient + AdamW moments + master copy
GIB = 2**30


def count(config: dict, train_config) -> dict:
    """Parameters of the model `config` describes, by what each launch does with them."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    fields = {k: v for k, v in config.items() if k != "model_type"}
    hf_config = AutoConfig.for_model(config["model_type"], **fields)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(hf_config)
    family = family_from_config(config, "config.json")
    targets = re.compile(lora_target_regex(train_config, family))
    quantized = kept = lora = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            if targets.fullmatch(name):
                lora += train_config.lora.r * (module.in_features + module.out_features)
            if not any(part in name for part in UNQUANTIZED):
                quantized += module.weight.numel()
                kept += module.bias.numel() if module.bias is not None else 0
                continue
        kept += sum(p.numel() for p in module.parameters(recurse=False))
    layer_names = set(family.shard_layers(config))
    layer = max(
        sum(p.numel() for p in module.parameters())
        for module in model.modules()
        if type(module).__name__ in layer_names
    )
    return {"quantized": quantized, "kept": kept, "lora": lora, "largest_layer": layer}


def per_gpu(counts: dict, gpus: int) -> dict[str, float]:
    """Bytes per GPU for each launch the README's table lists."""
    bf16 = 2 * (counts["quantized"] + counts["kept"])
    nf4 = NF4_BYTES * counts["quantized"] + 2 * counts["kept"]
    lora = LORA_BYTES * counts["lora"]
    lora_weights = 4 * counts["lora"]  # weight + gradient, bf16
    layer = 2 * counts["largest_layer"]
    return {
        "one GPU, QLoRA": nf4 + lora,
        "data parallel, QLoRA": nf4 + lora,
        "FSDP2 + QLoRA (fsdp_qlora.yaml)": nf4 / gpus + lora / gpus + NF4_BYTES * counts["largest_layer"],
        "FSDP2 bf16 LoRA (fsdp.yaml)": bf16 / gpus + lora / gpus + layer,
        "ZeRO-2 + QLoRA (deepspeed_zero2.yaml)": nf4 + lora_weights + (lora - lora_weights) / gpus,
        "ZeRO-3 bf16 LoRA (deepspeed_zero3.yaml)": bf16 / gpus + lora / gpus + layer,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", choices=shape_names(), default="pixtral-12b", help="a released shape")
    source.add_argument("--model-dir", type=Path, help="a local checkpoint: its config.json")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "aid.yaml", help="LoRA settings")
    parser.add_argument("--gpus", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    if args.model_dir:
        config = json.loads((args.model_dir / "config.json").read_text())
        name = str(args.model_dir)
    else:
        config, name = by_shape(args.model).shapes[args.model][0](), args.model
    counts = count(config, load_config(args.config))
    table = {gpus: per_gpu(counts, gpus) for gpus in args.gpus}
    print(f"{name}: {counts['quantized'] / 1e9:.2f}B quantizable + {counts['kept'] / 1e9:.2f}B kept in bf16, "
          f"LoRA {counts['lora'] / 1e6:.1f}M (r={load_config(args.config).lora.r}); GiB per GPU, "
          "weights + LoRA state + one gathered block, activations not included")  # fmt: skip
    print("| launch | " + " | ".join(f"{gpus} GPUs" for gpus in args.gpus) + " |")
    print("|---|" + "---|" * len(args.gpus))
    for launch in table[args.gpus[0]]:
        print(f"| {launch} | " + " | ".join(f"{table[g][launch] / GIB:.1f}" for g in args.gpus) + " |")
    if args.json:
        with atomic_file(args.json) as handle:
            json.dump({"model": name, "counts": counts, "bytes_per_gpu": table}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
