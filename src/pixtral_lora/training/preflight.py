"""Training's checks before anything is created: the config against the model, the data, the output
directory and this machine.

A config is validated as data (`config.schema`) on every machine; what it asks of the machine (flash
attention, CUDA, Liger, a reporter's package, rasterio) is checked here, by the command that needs it,
so a run trained on a GPU box still opens for `eval`, `predict`, `map` and `calibrate` on a laptop.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from pixtral_lora.config.schema import Config, ConfigError
from pixtral_lora.data.loaders import check_data_path
from pixtral_lora.errors import RunDirError
from pixtral_lora.families import config_json, family_from_config
from pixtral_lora.model.loading import check_model_source, check_quantization
from pixtral_lora.outputs import check_writable


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _machine_problems(config: Config) -> list[str]:
    """What `config` asks of this machine that it lacks, one `field: what to do` line each."""
    problems = []
    if config.model.attn_implementation == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            problems.append(
                "model.attn_implementation: flash_attention_2 needs the flash-attn package (pip install flash-attn)"
            )
        elif not _cuda_available():
            problems.append(
                "model.attn_implementation: flash_attention_2 runs on CUDA GPUs only; use sdpa here"
            )
    if config.training.use_liger_kernel:
        if importlib.util.find_spec("liger_kernel") is None:
            problems.append(
                "training.use_liger_kernel needs the liger-kernel package (pip install liger-kernel)"
            )
        elif not _cuda_available():
            problems.append(
                "training.use_liger_kernel: Liger's kernels are Triton GPU kernels: CUDA only; set it false here"
            )
    if isinstance(config.training.report_to, list) and config.training.report_to:
        from transformers.integrations.integration_utils import (
            INTEGRATION_TO_CALLBACK,
            get_available_reporting_integrations,
        )

        unknown = [name for name in config.training.report_to if name not in INTEGRATION_TO_CALLBACK]
        missing = [
            name for name in config.training.report_to if name not in get_available_reporting_integrations()
        ]
        if unknown:
            problems.append(
                f"training.report_to: unknown reporter {unknown[0]!r}; known: "
                f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))} (or 'auto' / 'none')"
            )
        elif missing:
            problems.append(
                f"training.report_to: {missing[0]!r} is not installed here (pip install {missing[0]}), or use 'none'"
            )
    if (config.data.bands is not None or config.data.stretch != "percentile") and importlib.util.find_spec(
        "rasterio"
    ) is None:
        problems.append("data.bands/data.stretch read rasters with rasterio: pip install -e '.[geo]'")
    return problems


def _launch_problems(config: Config, env) -> list[str]:
    """What the accelerate launch (its environment) would train wrong or crash on, one line each with
    the path that works."""
    problems = []
    four_bit = config.model.quantization == "4bit"
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true" and env.get("FSDP_VERSION", "1") != "2":
        problems.append(
            "FSDP1 (fsdp_version: 1) with LoRA: peft saves only the adapters of modules FSDP1 did not wrap "
            "a second time (4 of the tiny model's 32 tensors, in adapter/ and in every checkpoint, so a "
            "resume restores the same 4): shard with FSDP2 (train/fsdp.yaml, train/fsdp_qlora.yaml)"
        )
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and four_bit:
        if env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
            problems.append(
                "model.quantization: 4bit under DeepSpeed ZeRO-3 fails on vision models ('Cannot copy out "
                "of meta tensor'): use ZeRO-2 with QLoRA, or ZeRO-3 with bf16 LoRA (model.quantization=null)"
            )
    return problems


def check_machine(config: Config) -> None:
    """Raise `ConfigError` listing every setting of `config` this machine cannot train with."""
    problems = _machine_problems(config) + _launch_problems(config, os.environ)
    if problems:
        raise ConfigError("this machine cannot train this config:\n  " + "\n  ".join(problems))


def preflight(config: Config, resume: str = "auto") -> None:
    """Every check that needs no data loading, before anything is created; raises `RunDirError` or
    `ConfigError` with one line naming the field."""
    check_machine(config)
    check_model_source(config.model.name_or_path, "model.name_or_path")
    saved, source = config_json(config.model.name_or_path)
    family = family_from_config(saved, source)  # raises for an unsupported architecture
    check_quantization(config.model.name_or_path, config.model.quantization, saved)  # raises for FP8 + 4-bit
    if config.lora.train_patch_merger and not family.merger_lora_modules:
        raise RunDirError(
            f"lora.train_patch_merger: {family.models} has no patch merger (Mistral3 models do)"
        )
    if config.data.image_longest_edge and config.data.image_longest_edge > family.max_image_size:
        raise RunDirError(
            f"data.image_longest_edge is {config.data.image_longest_edge} but {family.models} take at most "
            f"{family.max_image_size} px"
        )
    check_data_path(config.data.path, "data.path")
    if config.data.test_path:
        check_data_path(config.data.test_path, "data.test_path")
    check_writable(config.training.output_dir, "training.output_dir")
    if resume not in ("auto", "never") and not Path(resume).exists():
        raise RunDirError(f"--resume {resume}: no such checkpoint")
