"""A trained run, opened once: its checks, config, classes, recorded split, renderer and models.

`Run.open(run_dir)` is what `eval`, `predict`, `map` and the vLLM evaluation start from: it checks the
directory, reads `config.yaml` and `split.json` once, and checks the base model is reachable before
anything loads (a run trained on a local base that has since moved is one line, not a minute of
waiting on the Hub). It sits below training, evaluation and inference; none of them imports another
to read a run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from pixtral_lora.config.schema import Config
from pixtral_lora.config.yaml_loading import load_config
from pixtral_lora.data.raster import band_options
from pixtral_lora.errors import RunDirError
from pixtral_lora.run.identity import base_mismatch, config_changes, content_sha256, local_family
from pixtral_lora.run.layout import (
    ADAPTER_DIR,
    BASE_MODEL_FILE,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    SPLIT_FILE,
    TRAIN_SUMMARY_FILE,
)

logger = logging.getLogger(__name__)


def load_eval_model(
    base: str,
    adapter: str | Path | None = None,
    quantization: str | None = None,
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
):
    """The base model, with a LoRA adapter applied when given; in eval mode. Flash attention falls
    back to sdpa where it cannot run (`model.loading.usable_attention`)."""
    from pixtral_lora.model.loading import load_model, usable_attention

    model = load_model(
        base,
        quantization=quantization,
        dtype=dtype,
        attn_implementation=usable_attention(attn_implementation),
    )
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    model.eval()
    return model


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Run:
    """A run directory written by `train.py` (see `training`'s docstring for its layout)."""

    run_dir: Path
    config: Config
    class_names: list[str]
    split: dict
    force: bool = False
    # What --force let through (a changed base, config or split): every output of the command says it.
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def open(
        cls, run_dir: str | Path, needs_adapter: bool = True, needs_base: bool = True, force: bool = False
    ) -> Run:
        """Check and read a run directory; `needs_adapter` unless a merged model stands in for it,
        `needs_base` when the base model will be loaded (its source is checked now, in one line).

        What the run's answers depend on is checked against what it was trained with (`run.identity`):
        the base (with the adapter), config.yaml's answer-shaping fields; the held-out split's images
        when they are read (`split_rows`). A difference is a `RunDirError`, or with `force` a warning.
        """
        from pixtral_lora.model.loading import check_model_source

        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise RunDirError(f"{run_dir}: no such run directory")
        for name in (CONFIG_FILE, SPLIT_FILE):
            if not (run_dir / name).is_file():
                raise RunDirError(f"{run_dir}: no {name}; is this a run directory written by train.py?")
        if needs_adapter and not (run_dir / ADAPTER_DIR / "adapter_config.json").is_file():
            checkpoints = sorted((run_dir / CHECKPOINTS_DIR).glob("checkpoint-*"))
            progress = f"; its last checkpoint is {checkpoints[-1].name}" if checkpoints else ""
            raise RunDirError(
                f"{run_dir}: no adapter/ yet: training has not finished{progress} (rerun train.py to resume, "
                "or use a merged model: eval --merged, predict and map --model)"
            )
        if needs_adapter:
            from pixtral_lora.model.loading import read_adapter_config

            read_adapter_config(run_dir / ADAPTER_DIR)  # complete, and its config agrees with its tensors
        config = load_config(run_dir / CONFIG_FILE)
        try:
            split = json.loads((run_dir / SPLIT_FILE).read_text(encoding="utf-8"))
            class_names = list(split["class_names"])
        except (ValueError, KeyError, TypeError) as err:
            raise RunDirError(f"{run_dir / 'split.json'}: not a split written by train.py ({err})") from None
        if needs_base:
            check_model_source(config.model.name_or_path, f"{run_dir / 'config.yaml'}: model.name_or_path")
        run = cls(run_dir, config, class_names, split, force)
        if needs_adapter and needs_base:
            run._check_base()
        run._check_config()
        return run

    def _differs(self, problem: str, remedy: str) -> None:
        """A run that is not what it was trained as: refused, or under --force a warning kept."""
        if not self.force:
            raise RunDirError(f"{self.run_dir}: {problem}; {remedy}, or pass --force to use it anyway")
        logger.warning("%s: %s (--force)", self.run_dir, problem)
        self.warnings.append(f"--force: {problem}")

    @functools.cached_property
    def base_record(self) -> dict | None:
        """adapter/base_model.json, read once (None for an adapter from before it was recorded)."""
        recorded_file = self.adapter_dir / BASE_MODEL_FILE
        if not recorded_file.is_file():
            return None
        try:
            recorded = json.loads(recorded_file.read_text(encoding="utf-8"))
            if not isinstance(recorded, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            raise RunDirError(f"{recorded_file}: not the base record train.py writes ({err})") from None
        return recorded

    def _check_base(self) -> None:
        recorded = self.base_record
        if recorded is None:
            return
        problem = base_mismatch(recorded, self.config.model.name_or_path)
        if problem:
            self._differs(problem, "point model.name_or_path in config.yaml at the base it was trained on")

    def _check_config(self) -> None:
        summary_file = self.run_dir / TRAIN_SUMMARY_FILE
        try:
            recorded = json.loads(summary_file.read_text(encoding="utf-8")).get("trained_with")
        except (OSError, ValueError, AttributeError):
            return  # training has not finished, or a run from before this was recorded
        if not isinstance(recorded, dict):
            return
        changed = config_changes(recorded, self.config)
        if changed:
            shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
            self._differs(
                f"{CONFIG_FILE} was edited since the adapter was trained ({shown} changed)",
                f"restore those fields of {self.run_dir / CONFIG_FILE}",
            )

    def check_family(self, merged: str | Path) -> None:
        """A merged checkpoint of another family than the run's base cannot answer its prompts."""
        trained = (self.base_record or {}).get("family") or local_family(self.config.model.name_or_path)
        given = local_family(merged)
        if trained and given and trained != given:
            raise RunDirError(
                f"the merged model {merged} is a {given} checkpoint, but {self.run_dir} was trained on a "
                f"{trained} base; give a merged export of this run"
            )

    @property
    def adapter_dir(self) -> Path:
        return self.run_dir / ADAPTER_DIR

    def adapter_sha256(self) -> str | None:
        """sha256 of the adapter's weights (what a calibration or a resumed output belongs to),
        hashed once per opened run."""
        if not hasattr(self, "_adapter_sha256"):
            weights = self.adapter_dir / "adapter_model.safetensors"
            self._adapter_sha256 = file_sha256(weights) if weights.is_file() else None
        return self._adapter_sha256

    def model_identity(self, model_path: str | None = None) -> str:
        """What answers come from: the adapter's sha256 on the base, or a merged checkpoint's path.

        Resumable commands (`predict`, `map`) keep earlier results only when this is unchanged.
        """
        if model_path is not None:
            return f"merged:{Path(model_path).resolve()}"
        return f"{self.config.model.name_or_path}+adapter:{self.adapter_sha256() or 'none'}"

    def splits(self):
        """The recorded split's datasets (`Splits`): the run's data loaded, each split's recorded ids
        selected (what training left out, `data.leakage: drop_test`'s included, stays out)."""
        from pixtral_lora.data.loaders import Splits, select_ids
        from pixtral_lora.data.splits import load_run_data

        loaded, ids = load_run_data(self.config).splits, self.split["ids"]
        return Splits(
            train=select_ids(loaded.train, ids["train"]),
            test=select_ids(loaded.test, ids["test"]),
            validation=select_ids(loaded.validation, ids["validation"]) if ids.get("validation") else None,
        )

    def split_rows(self, split: str = "test", limit: int | None = None) -> tuple[list[dict], dict[str, str]]:
        """A recorded split as prompt rows (first `limit`), and its images training found unreadable
        (id -> reason)."""
        from pixtral_lora.data.loaders import as_conversations

        chosen = getattr(self.splits(), split)
        recorded = (self.split.get("content_sha256") or {}).get(split)
        if recorded and content_sha256(chosen) != recorded:
            self._differs(
                f"the {split} split's images under data.path differ from those the run was trained with",
                "restore the data the run was trained on",
            )
        if limit:
            chosen = chosen.select(range(min(limit, len(chosen))))
        rows = list(as_conversations(chosen, self.config.prompt, self.class_names, with_answer=False))
        unreadable = {
            i: "unreadable when the run was trained" for i in self.split.get("unreadable", {}).get(split, [])
        }
        return rows, unreadable

    def test_rows(self, limit: int | None = None) -> tuple[list[dict], dict[str, str]]:
        """The recorded test split as prompt rows (see `split_rows`)."""
        return self.split_rows("test", limit)

    def renderer(self, resize_to: int | None = None):
        """The processor the run saved with its adapter (else the base's), with the run's image size."""
        from pixtral_lora.model.loading import load_processor
        from pixtral_lora.model.render import Renderer

        source = self.adapter_dir if self.adapter_dir.is_dir() else self.config.model.name_or_path
        return Renderer(
            load_processor(source),
            resize_to or self.config.data.image_longest_edge,
            bands=band_options(self.config.data),
        )

    def model(self, which: str, merged: str | Path | None = None):
        """ "base", or the fine-tuned model: the run's adapter on the base, or a merged checkpoint."""
        model = self.config.model
        attention = model.attn_implementation
        if which == "base":
            return load_eval_model(model.name_or_path, None, model.quantization, model.dtype, attention)
        if merged is not None:
            self.check_family(merged)
            return load_eval_model(str(merged), None, None, model.dtype, attention)
        return load_eval_model(
            model.name_or_path, self.adapter_dir, model.quantization, model.dtype, attention
        )
