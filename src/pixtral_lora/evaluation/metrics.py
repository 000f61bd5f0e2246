"""Classification metrics where every test item has exactly one outcome, and nothing is dropped.

Outcomes: `correct`, `wrong` (a valid class, not the gold one), `hallucinated` (a label was read but
it names no class), `unparseable` (no label could be read) and `unreadable` (the image itself could
not be decoded: the model was never asked) and `abstained` (its confidence was under the chosen
`--abstain-below`: the answer is kept but not given). Accuracy counts only `correct`, over all n
items, or with abstention over the answered ones, reported with their share (`coverage`);
per-class metrics use sklearn with `labels=class_names`, so rows are keyed by the right names even
when a class is never predicted or has no test images.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from pixtral_lora.classify.prediction import OUTCOMES, Prediction, outcome
from pixtral_lora.evaluation.calibration import expected_calibration_error

HALLUCINATED_COLUMN = "(hallucinated)"
UNPARSEABLE_COLUMN = "(unparseable)"
UNREADABLE_COLUMN = "(unreadable)"
ABSTAINED_COLUMN = "(abstained)"
_INVALID_COLUMNS = {
    "hallucinated": HALLUCINATED_COLUMN,
    "unparseable": UNPARSEABLE_COLUMN,
    "unreadable": UNREADABLE_COLUMN,
    "abstained": ABSTAINED_COLUMN,
}


@dataclass
class ClassificationReport:
    n: int
    counts: dict[str, int]
    accuracy: float
    accuracy_ci95: tuple[float, float]
    macro_f1: float
    hallucination_rate: float
    parse_failure_rate: float
    unreadable_rate: float
    per_class: dict[str, dict[str, float]]
    confusion: list[list[int]]  # rows: gold classes; columns: classes + hallucinated + unparseable
    confusion_columns: list[str]
    # Score mode only: mean confidence and expected calibration error of the confidences.
    mean_confidence: float | None = None
    calibration_ece: float | None = None
    # Score mode: `calibration.confidence_measures` of the raw and (with a run's temperature) the
    # calibrated probabilities: {"temperature", "raw", "calibrated"}.
    confidence: dict | None = None
    coverage: float = 1.0  # share of the n images answered (not abstained)

    def as_dict(self) -> dict:
        return {
            "coverage": self.coverage,
            "mean_confidence": self.mean_confidence,
            "calibration_ece": self.calibration_ece,
            "confidence": self.confidence,
            "n": self.n,
            "counts": self.counts,
            "accuracy": self.accuracy,
            "accuracy_ci95": list(self.accuracy_ci95),
            "macro_f1": self.macro_f1,
            "hallucination_rate": self.hallucination_rate,
            "parse_failure_rate": self.parse_failure_rate,
            "unreadable_rate": self.unreadable_rate,
            "per_class": self.per_class,
            "confusion": self.confusion,
            "confusion_columns": self.confusion_columns,
        }


def classification_report(
    gold: list[str],
    predicted: list[str | None],
    raw: list[str | None],
    class_names: list[str],
    unreadable: list[bool] | None = None,
    abstained: list[bool] | None = None,
) -> ClassificationReport:
    """Metrics for aligned lists of gold labels, predicted class names (None if invalid), raw labels and
    (optionally) whether each image was unreadable, and whether its answer was abstained from."""
    unreadable = unreadable if unreadable is not None else [False] * len(gold)
    abstained = abstained if abstained is not None else [False] * len(gold)
    if not (len(gold) == len(predicted) == len(raw) == len(unreadable) == len(abstained)):
        raise ValueError("gold, predicted, raw, unreadable and abstained must have the same length")
    n = len(gold)
    outcomes = [
        outcome(g, p, r, u, a)
        for g, p, r, u, a in zip(gold, predicted, raw, unreadable, abstained, strict=True)
    ]
    counts = {name: outcomes.count(name) for name in OUTCOMES}
    if sum(counts.values()) != n:  # every item has exactly one outcome
        raise AssertionError("outcome counts do not add up")
    columns = [*class_names, HALLUCINATED_COLUMN, UNPARSEABLE_COLUMN, UNREADABLE_COLUMN]
    if counts["abstained"]:
        columns.append(ABSTAINED_COLUMN)
    predicted_columns = [
        _INVALID_COLUMNS[o] if o in _INVALID_COLUMNS else p for p, o in zip(predicted, outcomes, strict=True)
    ]
    matrix = (
        confusion_matrix(gold, predicted_columns, labels=columns)[: len(class_names)]
        if n
        else np.zeros((len(class_names), len(columns)), int)
    )
    precision, recall, f1, support = (
        precision_recall_fscore_support(gold, predicted_columns, labels=class_names, zero_division=0)
        if n
        else (np.zeros(len(class_names)),) * 4
    )
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    }
    present = [i for i, name in enumerate(class_names) if per_class[name]["support"] > 0]
    macro_f1 = float(np.mean([f1[i] for i in present])) if present else 0.0
    answered = n - counts["abstained"]  # abstained images are not in the accuracy, but in its coverage
    accuracy = counts["correct"] / answered if answered else 0.0
    ci = (
        binomtest(counts["correct"], answered).proportion_ci(confidence_level=0.95, method="wilson")
        if answered
        else None
    )
    return ClassificationReport(
        n=n,
        counts=counts,
        accuracy=accuracy,
        accuracy_ci95=(float(ci.low), float(ci.high)) if ci else (0.0, 0.0),
        macro_f1=macro_f1,
        hallucination_rate=counts["hallucinated"] / n if n else 0.0,
        parse_failure_rate=counts["unparseable"] / n if n else 0.0,
        unreadable_rate=counts["unreadable"] / n if n else 0.0,
        per_class=per_class,
        confusion=matrix.tolist(),
        confusion_columns=columns,
        coverage=answered / n if n else 1.0,
    )


def write_confusion_csv(report: ClassificationReport, class_names: list[str], path: Path) -> None:
    """Confusion matrix as CSV: one row per gold class, one column per predicted class (+ invalid)."""
    from pixtral_lora.outputs import atomic_file

    with atomic_file(path) as handle:
        writer = csv.writer(handle)
        writer.writerow(["gold \\ predicted", *report.confusion_columns])
        for name, row in zip(class_names, report.confusion, strict=True):
            writer.writerow([name, *row])


def plot_confusion(report: ClassificationReport, class_names: list[str], path: Path, title: str) -> None:
    """Heatmap of the row-normalised confusion matrix with the class names on both axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pixtral_lora.outputs import atomic_file

    matrix = np.asarray(report.confusion, dtype=float)
    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    size = max(6.0, 0.38 * len(report.confusion_columns) + 3)
    figure, axes = plt.subplots(figsize=(size + 1.5, size))
    image = axes.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(report.confusion_columns)), report.confusion_columns, rotation=90, fontsize=8)
    axes.set_yticks(range(len(class_names)), class_names, fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("gold")
    axes.set_title(
        f"{title}\naccuracy {report.accuracy:.1%}, hallucinated {report.hallucination_rate:.1%}, n={report.n}"
    )
    if len(class_names) <= 40:
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                if matrix[i, j]:
                    axes.text(
                        j,
                        i,
                        int(matrix[i, j]),
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if normalised[i, j] > 0.5 else "black",
                    )
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of gold class")
    figure.tight_layout()
    with atomic_file(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=110)
    plt.close(figure)


def summarise(predictions: list[Prediction], class_names: list[str], temperature: float | None = None):
    """The classification report of a model's predictions; in score mode also how far its confidences
    can be trusted, raw and (with a calibration's `temperature`) calibrated."""
    report = classification_report(
        [p.gold for p in predictions],
        [p.label for p in predictions],
        [p.raw_label for p in predictions],
        class_names,
        [p.error is not None for p in predictions],
        [p.abstained for p in predictions],
    )
    scored = [p for p in predictions if p.error is None]
    if scored and all(p.confidence is not None for p in scored):
        confidences = [p.confidence for p in scored]
        report.mean_confidence = float(sum(confidences) / len(confidences))
        report.calibration_ece = expected_calibration_error(confidences, [p.label == p.gold for p in scored])
    if (
        scored
        and all(p.confidence is not None for p in scored)
        and any(p.class_scores is None for p in scored)
    ):
        from pixtral_lora.evaluation.calibration import confidence_measures

        correct = [p.label == p.gold for p in scored]  # generate/constrained: the answer's probability
        report.confidence = {
            "temperature": None,
            "raw": confidence_measures([p.confidence for p in scored], correct),
            "calibrated": None,
            "of": "answer probability",
        }
    elif scored and all(p.class_scores is not None and p.gold in class_names for p in scored):
        from pixtral_lora.evaluation.calibration import class_measures

        scores = np.array([p.class_scores for p in scored])
        gold = np.array([class_names.index(p.gold) for p in scored])
        report.confidence = {
            "of": "softmax over the classes",
            "temperature": temperature,
            "raw": class_measures(scores, gold),
            "calibrated": class_measures(scores, gold, temperature) if temperature else None,
        }
    return report
