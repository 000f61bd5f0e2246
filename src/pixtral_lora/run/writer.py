"""The run directory: its lock, its checks before a start, its checkpoints and what it records.

Layout (`training.output_dir`) in `training`'s docstring. One run writes in a directory at a time
(`io.run_lock`, held by rank 0); a failed start leaves nothing behind; resume picks the newest
*complete* checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import re
import shutil
from pathlib import Path

import torch

from pixtral_lora.config.schema import Config
from pixtral_lora.config.yaml_loading import dump_config, load_config
from pixtral_lora.errors import RunDirError, UserError
from pixtral_lora.outputs import atomic_file, run_lock
from pixtral_lora.run.layout import ADAPTER_DIR, BASE_MODEL_FILE, CHECKPOINTS_DIR, CONFIG_FILE, SPLIT_FILE

logger = logging.getLogger(__name__)


def environment(config: Config, device: str) -> dict:
    """Library versions, device and seeds of a run (environment.json)."""
    import importlib.metadata as md

    packages = [
        "torch",
        "transformers",
        "peft",
        "trl",
        "bitsandbytes",
        "accelerate",
        "datasets",
        "mistral-common",
        "pixtral-lora",
    ]
    versions = {}
    for name in packages:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": versions,
        "seeds": {"training": config.training.seed, "split": config.data.split_seed},
    }


def _in_current_schema(saved_config: Path) -> str | None:
    """A run's config.yaml re-dumped through today's schema, so a field added since (at its default, the
    behaviour the run had) does not make it another run; None when it no longer loads."""
    try:
        return dump_config(load_config(saved_config))
    except UserError:
        return None


def recorded_split(config: Config, also_same: list[Config] = ()) -> dict | None:
    """The split recorded by an earlier run of this same config in its run directory (None if new).

    `also_same`: other forms of the config that count as the same run (as given, before paths were
    made absolute: run directories written before they were). A run directory that holds a different
    config is refused, unless nothing was trained in it yet (a start that died, e.g. of an impossible
    batch size): then the new config starts it afresh.
    """
    run_dir = Path(config.training.output_dir)
    saved_config = run_dir / CONFIG_FILE
    if not saved_config.exists():
        return None
    saved = saved_config.read_text(encoding="utf-8")
    same = {dump_config(c) for c in (config, *also_same)}
    if saved not in same and _in_current_schema(saved_config) not in same:
        trained = (run_dir / ADAPTER_DIR).exists() or any((run_dir / CHECKPOINTS_DIR).glob("checkpoint-*"))
        if not trained:
            logger.warning(
                "%s holds an earlier start with another config and no checkpoint: starting afresh", run_dir
            )
            return None
        raise RunDirError(
            f"{run_dir} holds a run with a different config ({saved_config}); "
            "choose another training.output_dir or delete that directory"
        )
    split_file = run_dir / SPLIT_FILE
    return json.loads(split_file.read_text()) if split_file.exists() else None


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a Trainer checkpoint cannot be resumed from, or None when it is complete.

    Trainer writes trainer_state.json last, so a checkpoint killed while being saved lacks it (or
    holds a truncated one).
    """
    if not checkpoint.is_dir():
        return "not a directory"
    if not (checkpoint / "adapter_model.safetensors").is_file():
        return "no adapter_model.safetensors"
    try:
        json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no trainer_state.json"
    except (ValueError, OSError):
        return "trainer_state.json is truncated"
    return None


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


def last_checkpoint(run_dir: Path, remove_incomplete: bool = False) -> Path | None:
    """The newest *complete* Trainer checkpoint in a run directory.

    Newer incomplete ones (a kill while saving) are skipped with a warning, and deleted when
    `remove_incomplete` (the caller holds the run lock, so nothing else is writing them).
    """
    checkpoints = run_dir / CHECKPOINTS_DIR
    if not checkpoints.is_dir():
        return None
    found = [p for p in checkpoints.iterdir() if re.fullmatch(r"checkpoint-\d+", p.name)]
    for checkpoint in sorted(found, key=_step, reverse=True):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        action = "removing it" if remove_incomplete else "skipping it"
        logger.warning("incomplete checkpoint %s (%s: killed while saving?); %s", checkpoint, problem, action)
        if remove_incomplete:
            shutil.rmtree(checkpoint, ignore_errors=True)
    return None


def resume_checkpoint(run_dir: Path, resume: str, main_process: bool) -> Path | None:
    """The checkpoint to resume from: "auto" (newest complete), "never", or a path (checked now)."""
    if resume == "never":
        return None
    if resume == "auto":
        return last_checkpoint(run_dir, remove_incomplete=main_process)
    checkpoint = Path(resume)
    if not checkpoint.exists():
        raise RunDirError(f"--resume {resume}: no such checkpoint")
    if problem := checkpoint_problem(checkpoint):
        raise RunDirError(f"--resume {resume}: not a complete Trainer checkpoint ({problem})")
    return checkpoint


def check_resumable(checkpoint: Path, expected: dict[str, tuple[int, ...]], model: str) -> None:
    """A checkpoint holds the adapter this run trains: trained on `model` (its base_model.json, when
    it has one) and the same LoRA tensors with the same shapes as `expected` (the model's own, from
    PEFT). A checkpoint of another base or family, rank or target set is one line, not a traceback
    from the optimizer state or an adapter quietly continued on another model."""
    from pixtral_lora.model.loading import safetensors_shapes
    from pixtral_lora.run.identity import base_mismatch, local_family

    recorded = checkpoint / BASE_MODEL_FILE
    if recorded.is_file():
        identity = json.loads(recorded.read_text(encoding="utf-8"))
        family = local_family(model)
        if identity.get("family") and family and identity["family"] != family:
            why = f"it trained a {identity['family']} model and {model} is a {family} one"
        else:
            why = base_mismatch(identity, model)
        if why:
            raise RunDirError(
                f"--resume {checkpoint}: {why}; resume from a checkpoint of this run, or pass --resume never"
            )
    shapes = safetensors_shapes(checkpoint / "adapter_model.safetensors")
    saved = {key: tuple(shape) for key, shape in shapes.items()}
    missing, extra = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & saved.keys() if expected[k] != saved[k])
    if missing or extra or reshaped:
        example = (
            f"{reshaped[0]} is {list(saved[reshaped[0]])}, here {list(expected[reshaped[0]])}"
            if reshaped
            else f"{(missing or extra)[0]} is {'missing there' if missing else 'not trained here'}"
        )
        raise RunDirError(
            f"--resume {checkpoint}: its adapter was not trained on {model} with this LoRA config "
            f"({len(missing)} tensors missing, {len(extra)} extra, {len(reshaped)} of other shapes; "
            f"{example}); resume from a checkpoint of this run, or pass --resume never"
        )


def drop_metrics_after(run_dir: Path, step: int) -> None:
    """Forget metrics.jsonl records past the checkpoint we resume from: they will be logged again."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return
    lines = metrics.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        with atomic_file(metrics) as handle:
            handle.writelines(line + "\n" for line in kept)


def is_main_process() -> bool:
    """Rank 0 of a launch (torchrun/accelerate set RANK), or a plain single process."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def run_directory(config: Config):
    """Create (or reuse) the run directory and hold its lock; remove it again if this start fails.

    Only rank 0 creates, locks and cleans up; the other ranks of a launch share its directory.
    """
    run_dir = Path(config.training.output_dir)
    if not is_main_process():
        yield run_dir
        return
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        run_dir.mkdir()
        created = True
    except FileExistsError:
        created = False
    try:
        with run_lock(run_dir):
            yield run_dir
    except BaseException:
        if created and not any((run_dir / CHECKPOINTS_DIR).glob("checkpoint-*")):
            shutil.rmtree(run_dir, ignore_errors=True)  # a failed start leaves nothing behind
        raise
