"""A PEFT LoRA adapter as the exports merge it: W + (B @ A) * alpha / r, and the checks that it fits
the base it is merged into."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open

from pixtral_lora.export.checkpoint import ExportError, weight_files
from pixtral_lora.export.names import current_hf_name
from pixtral_lora.model.loading import ModelSourceError, read_adapter_config
from pixtral_lora.run.identity import base_mismatch
from pixtral_lora.run.layout import BASE_MODEL_FILE

logger = logging.getLogger(__name__)


class LoraDeltas:
    """The LoRA updates of a PEFT adapter, keyed by the current-layout HF weight name, and its
    checked adapter_config.json (`config`)."""

    def __init__(self, adapter_dir: str | Path):
        adapter_dir = Path(adapter_dir)
        config_path, weights_path = (
            adapter_dir / "adapter_config.json",
            adapter_dir / "adapter_model.safetensors",
        )
        try:
            config = read_adapter_config(adapter_dir)  # config and tensor shapes agree, files complete
        except ModelSourceError as err:
            raise ExportError(str(err)) from None
        self.config = config
        if config.get("peft_type") != "LORA":
            raise ExportError(f"{config_path}: peft_type {config.get('peft_type')!r} is not LORA")
        for unsupported in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save"):
            if config.get(unsupported):
                raise ExportError(f"{config_path}: {unsupported} is not supported by the exporter")
        rank, alpha = config["r"], config["lora_alpha"]
        self.scale = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
        self.factors: dict[str, dict[str, torch.Tensor]] = {}
        with safe_open(weights_path, framework="pt") as handle:
            for key in handle.keys():
                match = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
                if not match:
                    raise ExportError(f"{weights_path}: unexpected adapter tensor {key!r}")
                module = current_hf_name(match.group(1)) + ".weight"
                self.factors.setdefault(module, {})[match.group(2)] = handle.get_tensor(key)
        self.unused = set(self.factors)

    def delta(self, hf_name: str) -> torch.Tensor | None:
        """(B @ A) * scale for this weight, float32, or None when the adapter does not touch it."""
        factors = self.factors.get(current_hf_name(hf_name))
        if factors is None:
            return None
        self.unused.discard(current_hf_name(hf_name))
        return (factors["B"].float() @ factors["A"].float()) * self.scale


def _base_shapes(checkpoint: Path) -> dict[str, list[int]]:
    """Current-layout HF name -> shape of every base weight, from the safetensors headers alone."""
    shapes = {}
    for file in weight_files(checkpoint):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                shapes[current_hf_name(key)] = handle.get_slice(key).get_shape()
    return shapes


def check_adapter(checkpoint: Path, model: str, adapter: str | Path, force: bool = False) -> LoraDeltas:
    """Refuse, in one line, an adapter that does not fit this base or was trained on another one;
    returns its `LoraDeltas` (read once, for the merge that follows).

    Shapes: every LoRA pair must give a delta of its base weight's shape. Identity: the base named in
    adapter_config.json, and (when the run recorded one and the base is local) the fingerprint of the
    base's files, must match `model`; `force` accepts a different base of the same shape.
    """
    adapter = Path(adapter)
    deltas = LoraDeltas(adapter)
    shapes = _base_shapes(checkpoint)
    for module, factors in deltas.factors.items():
        if module not in shapes:
            raise ExportError(f"{adapter}: adapter weight {module} has no counterpart in {checkpoint}")
        wanted = [factors["B"].shape[0], factors["A"].shape[1]]
        if list(shapes[module]) != wanted:
            raise ExportError(
                f"{adapter} does not fit {model}: {module} is {list(shapes[module])} in the base but "
                f"{wanted} in the adapter (trained on a base of another shape?)"
            )
    config = deltas.config
    recorded = {}
    if (adapter / BASE_MODEL_FILE).is_file():
        try:
            recorded = json.loads((adapter / BASE_MODEL_FILE).read_text(encoding="utf-8"))
        except ValueError as err:
            raise ExportError(f"{adapter / 'base_model.json'}: not valid JSON ({err})") from None
    recorded.setdefault("name_or_path", config.get("base_model_name_or_path"))
    problem = base_mismatch(recorded, model)
    if problem is None:
        return deltas
    if force:
        logger.warning("merging into %s although %s (--force)", model, problem)
        return deltas
    raise ExportError(f"{adapter} -> {model}: {problem}; pass --force to merge into this base anyway")
