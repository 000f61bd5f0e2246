"""The checkpoint an export reads: where its files are, and the error every export raises."""

from __future__ import annotations

from pathlib import Path

from pixtral_lora.errors import UserError
from pixtral_lora.model.loading import check_model_source


class ExportError(UserError):
    """The checkpoint or adapter cannot be exported as asked."""


def resolve_checkpoint(model: str) -> Path:
    """Local directory of an HF checkpoint (downloads config + safetensors for a hub id)."""
    if check_model_source(model, "--model") == "local":
        return Path(model)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.jinja"]))


def weight_files(checkpoint: Path) -> list[Path]:
    files = sorted(checkpoint.glob("*.safetensors"))
    files = [f for f in files if not f.name.startswith("consolidated")]
    if not files:
        raise ExportError(f"{checkpoint}: no *.safetensors weights (pickled .bin checkpoints are not loaded)")
    return files


def check_cast(name: str, tensor, dtype: str) -> None:
    """A weight written as `dtype` must still be finite: float16 ends at 65504, so a larger bf16 or
    float32 value would silently become inf (and every answer NaN)."""
    import torch

    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ExportError(
            f"{name}: {bad} values are not finite as {dtype} (float16's largest is 65504); write bfloat16 "
            "or float32 instead (--dtype)"
        )
