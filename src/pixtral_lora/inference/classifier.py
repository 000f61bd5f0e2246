"""A run's fine-tuned model classifying new images, for `predict` and `map`."""

from __future__ import annotations

import logging
from pathlib import Path

from pixtral_lora import classify
from pixtral_lora.classify.prediction import Prediction
from pixtral_lora.evaluation.calibration import abstain, abstention_threshold, run_temperature
from pixtral_lora.run.reader import Run

logger = logging.getLogger(__name__)


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
    ):
        from pixtral_lora.task.prompt import messages_to_json

        self.run = Run.open(
            run_dir, needs_adapter=model_path is None, needs_base=model_path is None, force=force
        )
        if model_path is not None:
            self.run.check_family(model_path)
        self.run_dir, self.config, self.class_names = self.run.run_dir, self.run.config, self.run.class_names
        self._messages = messages_to_json(self.config.prompt.messages(self.class_names))
        self._model_path, self._resize_to = model_path, resize_to
        self._model = self._renderer = None
        self.temperature: float | None = None
        if model_path is None:  # a calibration belongs to the adapter; a merged checkpoint is raw
            self.temperature, note = run_temperature(self.run)
            logger.info("%s", note)
        self.abstain_below, self.abstention = abstention_threshold(
            self.run, abstain_below, target_accuracy, model_path
        )
        if self.abstention:
            logger.info("%s", self.abstention)

    def identity(self) -> str:
        """What the answers come from (`Run.model_identity`): resumed results must share it."""
        identity = self.run.model_identity(self._model_path)
        identity += f"+T:{self.temperature:.6f}" if self.temperature is not None else ""
        return identity + (f"+abstain:{self.abstain_below:.6f}" if self.abstain_below is not None else "")

    def row(self, key: str, image: dict) -> dict:
        """A row to classify: the run's prompt and one image (`{"path": ..., "bytes": ...}`)."""
        return {"id": key, "messages": self._messages, "images": [image], "label": ""}

    def __call__(self, rows: list[dict], mode: str, batch_size: int | None = None) -> list[Prediction]:
        if self._model is None:
            self._model = self.run.model("finetuned", self._model_path)
            self._renderer = self.run.renderer(self._resize_to)
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
