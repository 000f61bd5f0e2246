"""Likely label errors in a run's split: confident learning (`cleanlab`) on the run's score-mode
probabilities, for `pixtral-lora data audit --run RUN`.

The fine-tuned model scores every image of the recorded split (score mode: each class's answer
log-likelihood, softmax with the run's calibration temperature when it has one). Cleanlab's
`find_label_issues` estimates the joint distribution of given and true labels from those
probabilities and flags the images whose given label it most likely got wrong, ranked by the given
label's self-confidence (least confident first, `get_label_quality_scores`). An image whose model
label differs from its given one (cleanlab's `predicted_neq_given`) is a candidate too, marked so:
confident learning alone misses a mislabelled image when the model's probabilities saturate (see
`FILTERS`).

Validation and test images were never trained on: their probabilities are out of sample, what
confident learning assumes. Training images were, so the model has partly learned their labels, wrong
ones included: they are ranked separately and marked `in_sample` (fewer, and later, flags).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from pixtral_lora.classify import ClassifyOptions, predict_rows
from pixtral_lora.evaluation.calibration import run_temperature, softmax
from pixtral_lora.run.reader import Run

# cleanlab's confident learning, and its plain disagreement filter: a model trained to near-certainty
# on a small split saturates its probabilities, and the per-class thresholds confident learning
# counts with (each class's mean self-confidence) then sit a hair above a mislabelled image's 0.9995
FILTERS = ("prune_by_noise_rate", "predicted_neq_given")
METHOD = (
    "cleanlab.filter.find_label_issues on the fine-tuned model's score-mode probabilities, "
    f"filter_by {' and '.join(FILTERS)} (each candidate says which flagged it), ranked by "
    "cleanlab.rank.get_label_quality_scores (self-confidence, least first)"
)


def rank_label_issues(predictions, class_names: list[str], split_of: dict[str, str], temperature, in_sample):
    """The label-issue candidates among `predictions` (score mode), most likely first."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    scored = [p for p in predictions if p.class_scores is not None]
    found = {
        "images": len(predictions),
        "scored": len(scored),
        "unreadable": len(predictions) - len(scored),
        "in_sample": in_sample,
        "candidates": [],
    }
    if len(scored) < 2:
        return found
    probabilities = softmax(np.array([p.class_scores for p in scored]), temperature or 1.0)
    labels = np.array([class_names.index(p.gold) for p in scored])
    quality = get_label_quality_scores(labels, probabilities)  # self-confidence: P(given label)
    flagged = {
        name: set(find_label_issues(labels, probabilities, filter_by=name).nonzero()[0].tolist())
        for name in FILTERS
    }
    for index in sorted(set().union(*flagged.values()), key=lambda i: (quality[i], scored[i].id)):
        prediction, row = scored[index], probabilities[index]
        found["candidates"].append(
            {
                "id": prediction.id,
                "split": split_of[prediction.id],
                "given": prediction.gold,
                "model": class_names[int(row.argmax())],
                "confidence": round(float(row.max()), 6),
                "given_probability": round(float(row[labels[index]]), 6),
                "label_quality": round(float(quality[index]), 6),
                "flagged_by": [name for name in FILTERS if index in flagged[name]],
                "in_sample": in_sample,
            }
        )
    return found


def find_label_errors(run_dir: str | Path, limit: int | None = None, force: bool = False) -> dict:
    """Score every image of a run's recorded split with its fine-tuned model and rank likely label
    errors: validation and test out of sample, train in sample (see the module docstring). `limit`:
    the first N images of each split."""
    run = Run.open(run_dir, force=force)
    temperature, temperature_note = run_temperature(run)
    model, renderer = run.model("finetuned"), run.renderer()
    model.eval()
    options = ClassifyOptions.for_run(run.config, "score", temperature=temperature)
    predictions, split_of = {}, {}
    for split in ("validation", "test", "train"):
        if not run.split["ids"].get(split):
            continue
        rows, unreadable = run.split_rows(split, limit)
        split_of.update((row["id"], split) for row in rows)
        predictions[split], _ = predict_rows(
            model,
            renderer,
            rows,
            run.class_names,
            run.config.prompt,
            dataclasses.replace(options, desc=f"scoring {split} for label errors"),
            unreadable,
        )
    held_out = predictions.get("validation", []) + predictions.get("test", [])
    return {
        "run": str(run.run_dir),
        "model": run.model_identity(),
        "method": METHOD,
        "temperature": temperature,
        "temperature_note": temperature_note,
        "out_of_sample": rank_label_issues(held_out, run.class_names, split_of, temperature, False),
        "in_sample": rank_label_issues(
            predictions.get("train", []), run.class_names, split_of, temperature, True
        ),
    }
