"""Accuracy while training: the validation split classified at every `training.eval_steps`.

The predictions come from `classify.predict_rows`, the code `pixtral-lora eval` runs, in one mode
(`training.eval_classification.mode`). Under data parallel each process classifies a shard and the
predictions are gathered once, so every process computes the same metrics (and so takes the same
best-checkpoint and early-stopping decisions).
"""

from __future__ import annotations

import logging
import time

from pixtral_lora.classify import ClassifyOptions, predict_rows
from pixtral_lora.config.schema import Config
from pixtral_lora.evaluation.metrics import summarise
from pixtral_lora.model.render import Renderer

logger = logging.getLogger(__name__)


def stratified_subsample(rows: list[dict], limit: int | None) -> list[dict]:
    """The first `limit` rows taken round-robin over the labels (fixed: the same rows at every eval)."""
    if not limit or limit >= len(rows):
        return rows
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    queues = [by_label[label] for label in sorted(by_label)]
    picked: list[dict] = []
    depth = 0
    while len(picked) < limit:
        picked += [queue[depth] for queue in queues if depth < len(queue)][: limit - len(picked)]
        depth += 1
    return picked


class ValidationClassifier:
    """Classifies the (subsampled) validation rows; returns metrics named `eval_accuracy`, ..."""

    def __init__(self, config: Config, renderer: Renderer, rows: list[dict], class_names: list[str]):
        self.settings = config.training.eval_classification
        self.config = config
        self.renderer = renderer
        self.rows = stratified_subsample(rows, self.settings.limit)
        self.class_names = class_names

    def __call__(self, model, accelerator=None, prefix: str = "eval") -> dict[str, float]:
        """Metrics of the current model; with an `accelerator`, sharded across its processes."""
        from accelerate.utils import gather_object

        start = time.perf_counter()
        rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
        model.eval()
        options = ClassifyOptions.for_run(
            self.config,
            self.settings.mode,
            batch_size=self.config.training.per_device_eval_batch_size,
            desc=f"classifying validation ({self.settings.mode})",
        )
        predictions, _ = predict_rows(
            model, self.renderer, self.rows[rank::world], self.class_names, self.config.prompt, options
        )
        if world > 1:
            predictions = gather_object(predictions)
        report = summarise(predictions, self.class_names)
        metrics = {
            f"{prefix}_accuracy": report.accuracy,
            f"{prefix}_macro_f1": report.macro_f1,
            f"{prefix}_unparseable_rate": report.parse_failure_rate,
        }
        if self.settings.mode == "generate":
            metrics[f"{prefix}_hallucination_rate"] = report.hallucination_rate
        if report.calibration_ece is not None:
            metrics[f"{prefix}_ece"] = report.calibration_ece
        metrics[f"{prefix}_classification_seconds"] = time.perf_counter() - start
        metrics[f"{prefix}_classified"] = float(report.n)
        return metrics
