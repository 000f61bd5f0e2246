"""A run's fine-tuned model classifying new images, for `predict` and `map`, on transformers or vLLM."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from pathlib import Path

from pixtral_lora import classify
from pixtral_lora.classify.prediction import Prediction
from pixtral_lora.errors import UserError
from pixtral_lora.evaluation.calibration import (
    abstain,
    abstention_threshold,
    is_export_of,
    lora_export_temperature,
    run_temperature,
)
from pixtral_lora.run.reader import Run, file_sha256

logger = logging.getLogger(__name__)

BACKENDS = ("transformers", "vllm")


@dataclasses.dataclass(frozen=True)
class Backend:
    """The engine that answers. vLLM serves Mistral-format exports: `--model` a merged one
    (convert_to_mistral.py), or `base` (the base converted without --adapter) with `lora` (an
    --adapter-only export of the run) applied as LoRA."""

    name: str = "transformers"
    base: str | None = None
    lora: str | None = None

    def check(self, model_path: str | None) -> None:
        if self.name not in BACKENDS:
            raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.name!r}")
        if self.name == "transformers" and (self.base or self.lora):
            raise UserError("--vllm-base and --vllm-lora are for --backend vllm")
        if self.name == "vllm" and not model_path and not (self.base and self.lora):
            raise UserError(
                "--backend vllm needs --model DIR (a merged convert_to_mistral.py export), or --vllm-base "
                "and --vllm-lora (the base in Mistral format and an --adapter-only export of the run)"
            )
        if self.name == "vllm" and model_path and (self.base or self.lora):
            raise UserError("--backend vllm: give --model (merged) or --vllm-base with --vllm-lora, not both")
        if self.name == "vllm" and importlib.util.find_spec("vllm") is None:  # before a model or Ray starts
            raise UserError(
                "the vLLM backend needs vllm (pip install vllm) and a CUDA GPU, or vLLM's CPU build"
            )


class RunClassifier:
    """A run's fine-tuned model classifying new images (`predict`, `map`): the run's config, classes
    and prompt. The model loads at the first batch, so a rerun with nothing left to do loads none."""

    def __init__(
        self,
        run_dir: str | Path,
        model_path: str | None = None,
        resize_to: int | None = None,
        abstain_below: float | None = None,
        target_accuracy: float | None = None,
        force: bool = False,
        backend: Backend = Backend(),
    ):
        from pixtral_lora.task.prompt import messages_to_json

        backend.check(model_path)
        self.backend = backend
        on_run_adapter = model_path is None and backend.name == "transformers"
        self.run = Run.open(run_dir, needs_adapter=on_run_adapter, needs_base=on_run_adapter, force=force)
        if model_path is not None and backend.name == "transformers":
            self.run.check_family(model_path)
        self.run_dir, self.config, self.class_names = self.run.run_dir, self.run.config, self.run.class_names
        self._messages = messages_to_json(self.config.prompt.messages(self.class_names))
        self._model_path, self._resize_to = model_path, resize_to
        self._model = self._renderer = None
        self.temperature: float | None = None
        raw = model_path  # what the abstention check treats as uncalibrated (None: the run's adapter)
        if model_path is None:  # a calibration belongs to the adapter; a merged checkpoint is raw
            if backend.lora is None:
                self.temperature, note = run_temperature(self.run)
            else:
                self.temperature, note = lora_export_temperature(self.run, backend.lora)
                raw = None if is_export_of(self.run, backend.lora) else backend.lora
            logger.info("%s", note)
        self.abstain_below, self.abstention = abstention_threshold(
            self.run, abstain_below, target_accuracy, raw
        )
        if self.abstention:
            logger.info("%s", self.abstention)

    def identity(self) -> str:
        """What the answers come from (`Run.model_identity`; on vLLM the export's weights, marked so):
        resumed results must share it. A file begun on one backend does not resume on the other:
        the same weights give the same labels only to within each engine's kernels."""
        if self.backend.name == "vllm" and self._model_path is None:
            lora = Path(self.backend.lora) / "adapter_model.safetensors"
            identity = f"vllm:{Path(self.backend.base).resolve()}+lora:{file_sha256(lora)}"
        elif self.backend.name == "vllm":
            identity = f"vllm:merged:{Path(self._model_path).resolve()}"
        else:
            identity = self.run.model_identity(self._model_path)
        identity += f"+T:{self.temperature:.6f}" if self.temperature is not None else ""
        return identity + (f"+abstain:{self.abstain_below:.6f}" if self.abstain_below is not None else "")

    def row(self, key: str, image: dict) -> dict:
        """A row to classify: the run's prompt and one image (`{"path": ..., "bytes": ...}`)."""
        return {"id": key, "messages": self._messages, "images": [image], "label": ""}

    def _load(self) -> None:
        if self._model is None and self.backend.name == "transformers":
            self._model = self.run.model("finetuned", self._model_path)
        elif self._model is None:
            from pixtral_lora.classify.vllm_engine import VllmEngine

            model = self._model_path or self.backend.base
            self._model = VllmEngine(model, 1, self.config.model.dtype, self.backend.lora)
        if self._renderer is None:
            self._renderer = self.run.renderer(self._resize_to)

    def __call__(self, rows: list[dict], mode: str, batch_size: int | None = None) -> list[Prediction]:
        self._load()
        options = classify.ClassifyOptions.for_run(
            self.config,
            mode,
            batch_size=batch_size,
            temperature=self.temperature if mode == "score" else None,
        )
        predictions, _ = classify.predict_rows(
            self._model, self._renderer, rows, self.class_names, self.config.prompt, options
        )
        return abstain(predictions, self.abstain_below)
