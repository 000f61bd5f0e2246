"""One classified image: what the model answered, the label read from it, and its one outcome."""

from __future__ import annotations

from dataclasses import dataclass

OUTCOMES = ("correct", "wrong", "hallucinated", "unparseable", "unreadable", "abstained")


def outcome(
    gold: str, label: str | None, raw_label: str | None, unreadable: bool = False, abstained: bool = False
) -> str:
    """The one outcome of a prediction (see module docstring)."""
    if unreadable:
        return "unreadable"
    if abstained:
        return "abstained"
    if label is not None:
        return "correct" if label == gold else "wrong"
    return "hallucinated" if raw_label is not None else "unparseable"


@dataclass
class Prediction:
    id: str
    gold: str
    raw_answer: str
    raw_label: str | None
    label: str | None
    confidence: float | None = None
    error: str | None = None  # why the image could not be read (outcome `unreadable`)
    top: list[tuple[str, float]] | None = None  # score mode: the three most probable classes
    class_scores: list[float] | None = None  # score mode: each class's log-likelihood, class order
    calibrated: bool = False  # score mode: confidence from softmax(scores / T) of the run's calibration
    abstained: bool = False  # confidence under the chosen threshold: the label is kept, not given

    def top3(self) -> list[list] | None:
        """The three most probable classes with their probabilities, rounded (score mode), else None."""
        return [[label, round(prob, 6)] for label, prob in self.top] if self.top else None

    @property
    def outcome(self) -> str:
        return outcome(
            self.gold, self.label, self.raw_label, unreadable=self.error is not None, abstained=self.abstained
        )

    def as_dict(self, model: str, mode: str) -> dict:
        return {
            "id": self.id,
            "model": model,
            "mode": mode,
            "gold": self.gold,
            "raw_answer": self.raw_answer,
            "raw_label": self.raw_label,
            "label": self.label,
            "confidence": self.confidence,
            "calibrated": self.calibrated,
            "outcome": self.outcome,
            "error": self.error,
        }
