"""`pixtral-lora calibrate RUN_DIR`: fit a run's temperature on its validation split (never on test)
and write RUN_DIR/calibration.json (see `calibration` for the measures and how it is read)."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

import numpy as np

from pixtral_lora.classify import ClassifyOptions, predict_rows
from pixtral_lora.errors import RunDirError
from pixtral_lora.evaluation.calibration import calibration_path, class_measures, fit_temperature, softmax
from pixtral_lora.outputs import write_json
from pixtral_lora.run.reader import Run

logger = logging.getLogger(__name__)


def calibrate_run(
    run_dir: str | Path, limit: int | None = None, model=None, renderer=None, force: bool = False
) -> dict:
    """Fit the temperature of a run's fine-tuned model on its validation split; write calibration.json.

    `model`/`renderer`: the fine-tuned model already in memory (training's, at its end), else loaded.
    Returns what was written: T, n, the split, NLL/ECE before and after, the adapter's sha256.
    """
    run = Run.open(run_dir, force=force)
    if not run.split.get("ids", {}).get("validation"):
        raise RunDirError(
            f"{run.run_dir}: no validation split to calibrate on (train with data.validation_size > 0); "
            "the test split is never used for calibration"
        )
    rows, unreadable = run.split_rows("validation", limit)
    if model is None:
        model, renderer = run.model("finetuned"), run.renderer()
    model.eval()
    options = ClassifyOptions.for_run(run.config, "score", desc="calibrating (score, validation)")
    predictions, _ = predict_rows(
        model, renderer, rows, run.class_names, run.config.prompt, options, unreadable
    )
    scored = [p for p in predictions if p.class_scores is not None]
    if not scored:
        raise RunDirError(
            f"{run.run_dir}: none of the {len(predictions)} validation images could be scored "
            f"({sum(1 for p in predictions if p.error)} unreadable); nothing to calibrate on"
        )
    scores = np.array([p.class_scores for p in scored])
    gold = np.array([run.class_names.index(p.gold) for p in scored])
    right = softmax(scores).argmax(axis=1) == gold
    note = None
    if right.all() or not right.any():
        # every answer right (or every one wrong): the NLL falls without end as T shrinks (or grows),
        # so no temperature is identifiable from this split; the raw probabilities are kept
        temperature = 1.0
        note = (
            f"all {len(gold)} validation answers are {'right' if right.all() else 'wrong'}: no temperature can "
            "be fit from them, T stays 1 (raw); a larger validation split (data.validation_size) helps"
        )
        logger.warning("%s", note)
    else:
        temperature = fit_temperature(scores, gold)
    before, after = class_measures(scores, gold), class_measures(scores, gold, temperature)
    calibrated = softmax(scores, temperature)
    result = {
        "temperature": temperature,
        "n": len(scored),
        "split": "validation",
        "note": note,
        "warnings": run.warnings,
        "adapter_sha256": run.adapter_sha256(),
        "before": {k: before[k] for k in ("nll", "ece", "ece_adaptive", "brier")},
        "after": {k: after[k] for k in ("nll", "ece", "ece_adaptive", "brier")},
        "fitted": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        # each validation image's calibrated confidence and whether it was right: what
        # `--target-accuracy` turns into an abstention threshold
        "validation": {
            "confidence": [round(float(c), 6) for c in calibrated.max(axis=1)],
            "correct": [bool(c) for c in calibrated.argmax(axis=1) == gold],
        },
    }
    write_json(calibration_path(run.run_dir), result)
    logger.info(
        "calibrated on %d validation images: T=%.3f, NLL %.3f -> %.3f, ECE %.3f -> %.3f",
        len(scored), temperature, before["nll"], after["nll"], before["ece"], after["ece"],
    )  # fmt: skip
    return result
