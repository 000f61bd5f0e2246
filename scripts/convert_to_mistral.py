"""Merge LoRA adapters into Pixtral and write Mistral's native format for vLLM.

    python scripts/convert_to_mistral.py --model mistral-community/pixtral-12b \
        --adapter runs/aid/adapter --out runs/aid/mistral
    vllm serve runs/aid/mistral --tokenizer-mode mistral --config-format mistral --load-format mistral

    --format hf        a merged HF checkpoint instead (transformers / vLLM HF format)
    --adapter-only     only the adapter, for vLLM's LoRA serving of the Mistral-format base:
        vllm serve mistralai/Pixtral-12B-2409 --tokenizer-mode mistral --config-format mistral \
            --load-format mistral --enable-lora --max-lora-rank 16 --lora-modules aid=OUT

--out is replaced only when it holds a previous export of the same kind (else --overwrite); an
adapter is merged only into the base it was trained on (name and, when local, a fingerprint of its
files), else --force.

The base (hub id or local HF checkpoint, either key layout) is read tensor by tensor from
safetensors; LoRA is merged in float32 into the full-precision weights, never into 4-bit ones.
The output directory appears only when it is complete.
"""

import argparse
import logging
import sys

from pixtral_lora.config.schema import PositiveFloat, cli_number
from pixtral_lora.errors import user_errors
from pixtral_lora.export.hf import export_hf
from pixtral_lora.export.mistral import export_mistral
from pixtral_lora.export.vllm_adapter import export_adapter_only


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", help="base model: hub id or local HF checkpoint (not needed with --adapter-only)"
    )
    parser.add_argument(
        "--adapter", help="LoRA adapter directory (e.g. runs/aid/adapter); omit to convert the base"
    )
    parser.add_argument(
        "--out", required=True, help="output directory (written under a temporary name, then renamed)"
    )
    parser.add_argument("--format", choices=["mistral", "hf"], default="mistral")
    parser.add_argument(
        "--adapter-only", action="store_true", help="export only the adapter for vLLM LoRA serving"
    )
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out even if it is not a previous export"
    )
    parser.add_argument(
        "--force", action="store_true", help="merge into a base other than the one the adapter was trained on"
    )
    parser.add_argument(
        "--tekken", help="tekken.json to ship (default: the base's, else Pixtral-12B's from mistral-common)"
    )
    parser.add_argument(
        "--max-shard-gb",
        type=cli_number(PositiveFloat),
        help="split consolidated.safetensors into shards of this size",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.adapter_only:
            if not args.adapter:
                parser.error("--adapter-only needs --adapter")
            out = export_adapter_only(args.adapter, args.out, args.overwrite, args.model)
        elif not args.model:
            parser.error("--model is required")
        elif args.format == "hf":
            out = export_hf(args.model, args.out, args.adapter, args.dtype, args.overwrite, args.force)
        else:
            shard = int(args.max_shard_gb * 2**30) if args.max_shard_gb else None
            out = export_mistral(
                args.model, args.out, args.adapter, args.dtype, args.tekken, shard, args.overwrite, args.force
            )
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"written: {out}")
    if args.adapter_only:
        print((out / "vllm_serve.sh").read_text(encoding="utf-8"))
    elif args.format == "mistral":
        print(
            f"serve:   vllm serve {out} --tokenizer-mode mistral --config-format mistral --load-format mistral"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
