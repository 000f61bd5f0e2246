import math

import pytest

from pixtral_lora.evaluation.metrics import classification_report

CLASSES = ["A", "B", "C", "D"]  # D has no test images; C is never predicted


def _report():
    gold = ["A", "A", "B", "B", "C"]
    predicted = ["A", "B", "B", None, None]
    raw = ["A", "B", "B", "E", None]  # E: hallucinated label; last: nothing parseable
    return classification_report(gold, predicted, raw, CLASSES)


def test_every_item_has_one_outcome():
    report = _report()
    assert report.counts == {
        "correct": 2, "wrong": 1, "hallucinated": 1, "unparseable": 1, "unreadable": 0, "abstained": 0
    }  # fmt: skip
    assert sum(report.counts.values()) == report.n == 5
    assert report.accuracy == pytest.approx(0.4)
    assert report.hallucination_rate == pytest.approx(0.2) and report.parse_failure_rate == pytest.approx(0.2)


def test_per_class_metrics_by_hand_keyed_by_the_right_names():
    per_class = _report().per_class
    assert per_class["A"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert per_class["B"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert per_class["C"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}  # never predicted
    assert per_class["D"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}  # no test images
    assert _report().macro_f1 == pytest.approx(
        (2 / 3 + 0.5 + 0.0) / 3
    )  # over classes present in the test set


def test_confusion_matrix_has_invalid_columns():
    report = _report()
    assert report.confusion_columns == ["A", "B", "C", "D", "(hallucinated)", "(unparseable)", "(unreadable)"]
    assert report.confusion == [
        [1, 1, 0, 0, 0, 0, 0],
        [0, 1, 0, 0, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 0, 0],
    ]


def test_an_unreadable_image_is_an_outcome_of_its_own_and_counts_against_accuracy():
    report = classification_report(["A", "B"], ["A", None], ["A", None], CLASSES, unreadable=[False, True])
    assert report.counts == {
        "correct": 1,
        "wrong": 0,
        "hallucinated": 0,
        "unparseable": 0,
        "unreadable": 1,
        "abstained": 0,
    }
    assert report.accuracy == 0.5 and report.unreadable_rate == 0.5 and report.parse_failure_rate == 0
    assert report.confusion[1] == [0, 0, 0, 0, 0, 0, 1]  # the (unreadable) column


def test_accuracy_interval_is_wilson():
    low, high = _report().accuracy_ci95
    p, n, z = 0.4, 5, 1.959963984540054
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert (low, high) == pytest.approx((centre - half, centre + half), abs=1e-9)


def test_expected_calibration_error_by_hand():
    from pixtral_lora.evaluation.calibration import expected_calibration_error

    # bin (0.5, 0.6]: confidences 0.55, 0.55, accuracy 1/2 -> |0.5 - 0.55| = 0.05, weight 2/4
    # bin (0.9, 1.0]: confidences 0.95, 1.0, accuracy 2/2 -> |1 - 0.975| = 0.025, weight 2/4
    ece = expected_calibration_error([0.55, 0.55, 0.95, 1.0], [True, False, True, True])
    assert ece == pytest.approx(0.5 * 0.05 + 0.5 * 0.025)
    assert expected_calibration_error([1.0, 1.0], [True, True]) == 0.0
