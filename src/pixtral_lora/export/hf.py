"""A merged HF checkpoint: PEFT's merge_and_unload on the full-precision base."""

from __future__ import annotations

import shutil
from pathlib import Path

from pixtral_lora.export.checkpoint import check_cast, resolve_checkpoint
from pixtral_lora.export.lora import check_adapter
from pixtral_lora.model.loading import checkpoint_tekken
from pixtral_lora.outputs import HF_CHECKPOINT_FILES, atomic_directory

HF_KIND = "HF checkpoint"


def export_hf(
    model: str,
    out: str | Path,
    adapter: str | Path | None,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    force: bool = False,
) -> Path:
    """A merged HF checkpoint (PEFT's merge_and_unload on the full-precision base) with its processor
    and the base's tekken.json; an FP8 base is written dequantized (`pixtral-lora dequantize`)."""
    from pixtral_lora.model.loading import load_model, load_processor
    from pixtral_lora.outputs import check_replaceable

    inputs = {"--model checkpoint": model, "--adapter": adapter}
    check_replaceable(out, HF_CHECKPOINT_FILES, overwrite, HF_KIND, inputs)
    checkpoint = resolve_checkpoint(model)
    if adapter:
        check_adapter(checkpoint, model, adapter, force)

    base = load_model(
        model, quantization=None, dtype=dtype, device="cpu"
    )  # full precision: never merge into 4-bit
    if adapter:
        from peft import PeftModel

        base = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    for name, tensor in base.state_dict().items():  # from_pretrained casts to `dtype` without a word
        check_cast(name, tensor, dtype)
    processor = load_processor(adapter if adapter and (Path(adapter) / "tokenizer.json").is_file() else model)
    if getattr(base.config, "quantization_config", None):  # FP8 loaded dequantized: the copy is plain
        del base.config.quantization_config
        base.hf_quantizer = None
    tekken = checkpoint_tekken(checkpoint)
    with atomic_directory(out, HF_CHECKPOINT_FILES, overwrite, kind=HF_KIND, inputs=inputs) as tmp:
        base.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        if tekken is not None and checkpoint.joinpath("tekken.json").is_file():
            shutil.copyfile(tekken, tmp / "tekken.json")
    return Path(out)
