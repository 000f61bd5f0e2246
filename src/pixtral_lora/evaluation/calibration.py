"""Confidence a mapper can act on: temperature scaling fit on the validation split, and the measures
of how far a confidence can be trusted.

Score mode gives every image a log-likelihood per class; the softmax over classes is its confidence.
VLM classifiers are overconfident; one scalar temperature T (probabilities = softmax(scores / T)),
fit by minimising the negative log-likelihood of the validation split (scipy's bounded scalar
minimiser), fixes most of it. `calibrate_run` writes RUN/calibration.json with T and the adapter's
sha256 (`evaluation/calibrate.py`, the `pixtral-lora calibrate` command): a calibration belongs to
one adapter, and every tool that reads it checks that it still does.

Measures (`confidence_measures`): ECE with equal-width and adaptive (equal-mass) bins, NLL, Brier
score, AUROC of confidence for correct-vs-wrong (sklearn), and the risk-coverage curve (error rate
among the most confident images at each coverage) with its area (AURC) and the selective accuracy at
80/90/95% coverage.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import numpy as np
import scipy.special
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from pixtral_lora.errors import RunDirError, UserError
from pixtral_lora.run.layout import CALIBRATION_FILE

logger = logging.getLogger(__name__)

TEMPERATURE_BOUNDS = (0.05, 20.0)
COVERAGES = (0.8, 0.9, 0.95)


def softmax(scores: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of (n, classes) scores divided by `temperature` (scipy's)."""
    return scipy.special.softmax(np.asarray(scores, dtype=np.float64) / temperature, axis=1)


def nll(scores: np.ndarray, gold: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the gold classes under softmax(scores / T) (scipy's log_softmax:
    exact where the probability itself underflows)."""
    log_probabilities = scipy.special.log_softmax(np.asarray(scores, dtype=np.float64) / temperature, axis=1)
    return float(-np.mean(log_probabilities[np.arange(len(gold)), gold]))


def fit_temperature(scores: np.ndarray, gold: np.ndarray) -> float:
    """The temperature that minimises the NLL of `gold` (class indices) under softmax(scores / T)."""
    from scipy.optimize import minimize_scalar

    if len(gold) == 0:
        raise UserError("calibration needs at least one labelled image")
    result = minimize_scalar(
        lambda t: nll(scores, gold, t), bounds=TEMPERATURE_BOUNDS, method="bounded", options={"xatol": 1e-5}
    )
    return float(result.x)


def expected_calibration_error(
    confidences, correct, bins: int = 10, edges: np.ndarray | None = None
) -> float:
    """ECE: |accuracy - mean confidence| per confidence bin, weighted by the bin's share; `bins`
    equal-width bins, or the given bin `edges` (calibration's adaptive, equal-mass bins). The one
    ECE of the project: reports, live validation and calibration all use it."""
    confidence = np.asarray(confidences, dtype=float)
    hits = np.asarray(correct, dtype=float)
    if confidence.size == 0:
        return 0.0
    edges = np.linspace(0.0, 1.0, bins + 1) if edges is None else np.asarray(edges, dtype=float)
    # bin i holds (edges[i], edges[i+1]]; a confidence of exactly 0 goes to the first bin
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, len(edges) - 2)
    total = 0.0
    for b in range(len(edges) - 1):
        members = index == b
        if members.any():
            total += members.mean() * abs(hits[members].mean() - confidence[members].mean())
    return float(total)


def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, risk) when only the k most confident images are kept, for k = 1..n (ties broken
    by input order: a stable sort)."""
    order = np.argsort(-confidence, kind="stable")
    errors = np.cumsum(1.0 - correct[order])
    kept = np.arange(1, len(order) + 1)
    return kept / len(order), errors / kept


def confidence_measures(
    confidence: np.ndarray,
    correct: np.ndarray,
    probabilities: np.ndarray | None = None,
    gold=None,
    bins: int = 10,
) -> dict:
    """How far confidences can be trusted; see the module docstring.

    confidence: (n,) the confidence of each answer; correct: (n,) whether it was right. With
    `probabilities` (n, classes) and `gold` (n,) class indices (score mode), also NLL and Brier score.
    """
    from sklearn.metrics import brier_score_loss, roc_auc_score

    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    n = len(confidence)
    if n == 0 or not np.all(np.isfinite(confidence)):
        return {"n": n, "error": "no confidences" if n == 0 else "non-finite confidences"}
    coverage, risk = risk_coverage(confidence, correct)
    selective = {}
    for wanted in COVERAGES:
        k = max(1, int(np.ceil(wanted * n)))
        selective[f"{wanted:.2f}"] = float(1.0 - risk[k - 1])
    quantiles = np.quantile(confidence, np.linspace(0, 1, bins + 1))
    quantiles[0], quantiles[-1] = 0.0, 1.0
    measures = {
        "n": n,
        "accuracy": float(correct.mean()),
        "mean_confidence": float(confidence.mean()),
        "ece": expected_calibration_error(confidence, correct, bins),
        "ece_adaptive": expected_calibration_error(confidence, correct, edges=np.unique(quantiles)),
        "nll": None,
        "brier": None,
        "auroc": float(roc_auc_score(correct, confidence)) if 0 < correct.sum() < n else None,
        "aurc": float(risk.mean()),
        "selective_accuracy": selective,
    }
    if probabilities is not None:
        probabilities = np.asarray(probabilities, dtype=np.float64)
        gold = np.asarray(gold)
        measures["nll"] = max(
            0.0, float(-np.mean(np.log(np.clip(probabilities[np.arange(n), gold], 1e-12, 1.0))))
        )
        # the multiclass Brier score: the squared distance of each row to its one-hot gold, averaged
        labels = np.arange(probabilities.shape[1])
        measures["brier"] = float(brier_score_loss(gold, probabilities, labels=labels))
    return measures


def class_measures(scores: np.ndarray, gold: np.ndarray, temperature: float = 1.0) -> dict:
    """`confidence_measures` of score mode: softmax(scores / T) over the classes, its argmax the answer."""
    probabilities = softmax(scores, temperature)
    correct = probabilities.argmax(axis=1) == np.asarray(gold)
    return confidence_measures(probabilities.max(axis=1), correct, probabilities, gold)


def abstain_threshold(confidence: np.ndarray, correct: np.ndarray, target_accuracy: float) -> float | None:
    """The lowest confidence threshold whose kept answers reach `target_accuracy` (None: none does):
    what `--target-accuracy` turns into an `--abstain-below` from the validation split.

    An answer is kept when its confidence is at or above the threshold, so every answer tied with it
    is kept too: only the last of a run of equal confidences is a place to cut."""
    if len(confidence) == 0:
        return None
    order = np.argsort(-np.asarray(confidence, dtype=np.float64), kind="stable")
    sorted_confidence = np.asarray(confidence, dtype=np.float64)[order]
    accuracy = np.cumsum(np.asarray(correct, dtype=np.float64)[order]) / np.arange(1, len(order) + 1)
    cut = np.append(sorted_confidence[1:] < sorted_confidence[:-1], True)  # the end of each tie
    reaching = np.nonzero((accuracy >= target_accuracy) & cut)[0]
    return float(sorted_confidence[reaching[-1]]) if len(reaching) else None


# ---------------------------------------------------------------------------------------------------
# A run's calibration


def calibration_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CALIBRATION_FILE


class _Validation(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    confidence: list[Annotated[float, Field(ge=0, le=1, allow_inf_nan=False, strict=False)]]
    correct: list[bool]

    @model_validator(mode="after")
    def _same_length(self):
        if len(self.confidence) != len(self.correct):
            raise ValueError(f"{len(self.confidence)} confidences but {len(self.correct)} correct flags")
        return self


class _CalibrationFile(BaseModel):
    model_config = ConfigDict(extra="allow")
    temperature: Annotated[
        float, Field(ge=TEMPERATURE_BOUNDS[0], le=TEMPERATURE_BOUNDS[1], allow_inf_nan=False, strict=False)
    ]
    adapter_sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    validation: _Validation | None = None


def read_calibration(path: Path) -> dict:
    """A calibration.json validated as strictly as a config: T finite and inside the fit's bounds, the
    adapter's sha256, and a validation block of equal-length confidences in [0, 1] and booleans. A file
    edited by hand (T <= 0, NaN, a malformed block) is a one-line `RunDirError` naming the field."""
    try:
        return _CalibrationFile.model_validate(json.loads(path.read_text(encoding="utf-8"))).model_dump()
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "the file"
        detail = f"{field}: {first['msg']} (got {first.get('input')!r:.60})"
    except ValueError as err:  # invalid JSON or UTF-8
        detail = f"not valid JSON ({err})"
    raise RunDirError(
        f"{path}: {detail}; not a calibration written by `pixtral-lora calibrate`: "
        f"recalibrate with `pixtral-lora calibrate {path.parent}`"
    )


def run_temperature(run) -> tuple[float | None, str]:
    """The temperature of a run's calibration.json when it belongs to the run's adapter, else None,
    and a line saying which (raw probabilities are then reported, marked `calibrated: false`)."""
    path = calibration_path(run.run_dir)
    if not path.is_file():
        return None, f"no {CALIBRATION_FILE}: raw probabilities (run `pixtral-lora calibrate {run.run_dir}`)"
    calibration = read_calibration(path)
    temperature, adapter = calibration["temperature"], calibration["adapter_sha256"]
    if adapter != run.adapter_sha256():
        return None, (
            f"{path} belongs to another adapter (trained further since?): raw probabilities; "
            f"recalibrate with `pixtral-lora calibrate {run.run_dir}`"
        )
    return temperature, f"calibrated with T={temperature:.3f} ({path})"


def is_export_of(run, lora_dir) -> bool:
    """Whether an --adapter-only export was made from the run's own adapter (the sha256 it records)."""
    from pixtral_lora.export.vllm_adapter import source_sha256

    return source_sha256(lora_dir) == run.adapter_sha256()


def lora_export_temperature(run, lora_dir) -> tuple[float | None, str]:
    """`run_temperature` for an --adapter-only export served by vLLM: the run's calibration applies
    only to an export of the run's own adapter."""
    if not is_export_of(run, lora_dir):
        return None, f"{lora_dir} is not an export of {run.run_dir}'s adapter: raw probabilities"
    return run_temperature(run)


def check_calibration(run) -> float:
    """The run's temperature, or a one-line `RunDirError` when it has none that fits its adapter."""
    temperature, note = run_temperature(run)
    if temperature is None:
        raise RunDirError(note)
    return temperature


def abstain(predictions: list, below: float | None) -> list:
    """Mark every valid answer whose confidence is under `below` as abstained (None: none is).

    Only an answer that names a class can abstain: a hallucinated or unparseable answer stays what it
    is (abstaining would take it out of the hallucination count, the study's headline number)."""
    if below is not None:
        for p in predictions:
            p.abstained = (
                p.error is None and p.label is not None and p.confidence is not None and p.confidence < below
            )
    return predictions


def abstention_threshold(
    run, below: float | None, target_accuracy: float | None, model_path: str | Path | None = None
) -> tuple[float | None, str]:
    """The `--abstain-below` threshold, or the one the run's calibration says reaches
    `--target-accuracy` on the validation split (then the calibration must belong to the adapter).

    That threshold is one of the adapter's calibrated confidences: a merged checkpoint (`model_path`)
    gives raw ones, so the two are refused together."""
    if target_accuracy is None:
        return below, (f"abstaining below confidence {below}" if below is not None else "")
    if model_path is not None:
        raise UserError(
            f"--target-accuracy chooses its threshold among the calibrated confidences of {run.run_dir}'s "
            f"adapter, and {model_path} gives raw ones; drop the merged model to use the adapter, or give "
            "--abstain-below"
        )
    check_calibration(run)  # a calibration of another adapter is refused, in one line
    validation = read_calibration(calibration_path(run.run_dir))["validation"]
    if not validation or not validation["confidence"]:
        raise RunDirError(
            f"{calibration_path(run.run_dir)}: no validation confidences to choose a --target-accuracy "
            f"threshold from; recalibrate with `pixtral-lora calibrate {run.run_dir}`"
        )
    threshold = abstain_threshold(
        np.array(validation["confidence"]), np.array(validation["correct"]), target_accuracy
    )
    if threshold is None:
        raise UserError(
            f"--target-accuracy {target_accuracy}: no confidence threshold reaches it on the "
            f"{len(validation['confidence'])} validation images of {run.run_dir}"
        )
    return threshold, (
        f"abstaining below confidence {threshold:.4f}: the threshold that gives {target_accuracy:.0%} selective "
        f"accuracy on the {len(validation['confidence'])} validation images (calibration.json)"
    )
