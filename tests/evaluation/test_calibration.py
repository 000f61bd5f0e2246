"""Calibrated confidence: temperature scaling, the measures against independent references, and
calibration and abstention through the commands (calibrate, eval, predict, map)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import one_line_error, run_cli

from pixtral_lora.evaluation.calibration import (
    abstain_threshold,
    class_measures,
    confidence_measures,
    fit_temperature,
    softmax,
)

ROOT = Path(__file__).resolve().parents[2]


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    scores = rng.normal(0, 3, size=(20_000, 6))
    true_temperature = 2.5
    gold = np.array([rng.choice(6, p=row) for row in softmax(scores, true_temperature)])
    assert fit_temperature(scores, gold) == pytest.approx(true_temperature, rel=0.05)


def _reference_ece(confidence, correct, bins=10):
    total = 0.0
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        members = [
            (c, k)
            for c, k in zip(confidence, correct, strict=True)
            if (low < c <= high) or (b == 0 and c == 0)
        ]
        if members:
            accuracy = sum(k for _, k in members) / len(members)
            mean = sum(c for c, _ in members) / len(members)
            total += len(members) / len(confidence) * abs(accuracy - mean)
    return total


def _reference_auroc(confidence, correct):
    """The probability that a right answer is more confident than a wrong one (ties count half)."""
    right = [c for c, k in zip(confidence, correct, strict=True) if k]
    wrong = [c for c, k in zip(confidence, correct, strict=True) if not k]
    wins = sum((r > w) + 0.5 * (r == w) for r in right for w in wrong)
    return wins / (len(right) * len(wrong))


def _reference_aurc(confidence, correct):
    ranked = sorted(zip(confidence, correct, strict=True), key=lambda pair: -pair[0])
    risks = []
    for k in range(1, len(ranked) + 1):
        kept = ranked[:k]
        risks.append(sum(1 for _, right in kept if not right) / k)
    return sum(risks) / len(risks)


def test_measures_equal_independent_references_on_fixed_inputs():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    confidence = rng.uniform(0.2, 1.0, 200)
    correct = rng.uniform(0, 1, 200) < confidence  # roughly calibrated, with noise
    measures = confidence_measures(confidence, correct)
    assert measures["ece"] == pytest.approx(_reference_ece(confidence, correct), abs=1e-12)
    assert measures["auroc"] == pytest.approx(_reference_auroc(confidence, correct), abs=1e-12)
    assert measures["auroc"] == pytest.approx(roc_auc_score(correct, confidence), abs=1e-12)
    assert measures["aurc"] == pytest.approx(_reference_aurc(confidence, correct), abs=1e-12)
    kept = np.sort(confidence)[::-1][:180]  # 90% coverage: the 180 most confident
    assert measures["selective_accuracy"]["0.90"] == pytest.approx(correct[confidence >= kept[-1]].mean())
    # score mode's NLL and Brier score from the class probabilities
    scores = rng.normal(0, 2, size=(50, 4))
    gold = rng.integers(0, 4, 50)
    probabilities = softmax(scores)
    m = class_measures(scores, gold)
    assert m["nll"] == pytest.approx(-np.mean(np.log(probabilities[np.arange(50), gold])))
    assert m["brier"] == pytest.approx(np.mean(np.sum((probabilities - np.eye(4)[gold]) ** 2, axis=1)))


def test_the_abstention_threshold_reaches_the_target_on_its_own_data():
    confidence = np.array([0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5])
    correct = np.array([1, 1, 1, 0, 1, 0, 0], dtype=bool)
    assert abstain_threshold(confidence, correct, 1.0) == 0.9
    assert abstain_threshold(confidence, correct, 0.8) == 0.7  # 4 of the 5 most confident
    assert abstain_threshold(confidence, ~correct * False, 0.5) is None
    # an answer tied with the threshold is kept: a cut inside a tie would break the promise
    tied = np.array([0.9, 0.8, 0.8, 0.7])
    assert abstain_threshold(tied, np.array([1, 1, 0, 1], dtype=bool), 1.0) == 0.9
    assert abstain_threshold(tied, np.array([1, 1, 0, 1], dtype=bool), 0.6) == 0.7
    assert abstain_threshold(np.array([]), np.array([], dtype=bool), 0.5) is None


def test_target_accuracy_keeps_ties_and_is_only_applied_to_calibrated_confidences(
    tiny_run, tiny_model_dir, aid_dir, tmp_path
):
    """Through the commands: a validation block with a tie at the cut gives the threshold above the
    tie; a merged model (raw confidences) with --target-accuracy is refused in one line; eval applies
    the threshold to the fine-tuned model's calibrated score mode only, never to the base model."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoints", "eval*"))
    path = run / "calibration.json"
    validation = {"confidence": [0.9, 0.8, 0.8, 0.7], "correct": [True, True, False, True]}
    path.write_text(json.dumps({**json.loads(path.read_text()), "validation": validation}))
    out = tmp_path / "p.jsonl"
    result = run_cli("predict", aid_dir / "Beach", "--run", run, "--out", out, "--target-accuracy", "1.0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "abstaining below confidence 0.9000" in result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["outcome"] == "abstained" for r in rows} == {r["confidence"] < 0.9 for r in rows}

    merged = one_line_error(run_cli("predict", aid_dir / "Beach", "--run", run, "--out", tmp_path / "m.jsonl",
                                    "--model", tiny_model_dir, "--target-accuracy", "1.0"))  # fmt: skip
    assert "raw ones" in merged and "--abstain-below" in merged
    assert not (tmp_path / "m.jsonl").exists()

    evaluated = run_cli("eval", run, "--models", "base,finetuned", "--modes", "score", "--limit", "6",
                        "--out", tmp_path / "eval", "--target-accuracy", "0.5")  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["results"]["base"]["score"]["counts"]["abstained"] == 0
    assert "fine-tuned model's score mode only" in report["abstention"]


def test_calibrate_lowers_validation_nll_and_eval_reports_before_and_after(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoints", "eval*"))
    assert (run / "calibration.json").is_file()  # train.py calibrates at its end (a validation split exists)
    (run / "calibration.json").unlink()
    result = run_cli("calibrate", run)
    assert result.returncode == 0, result.stderr[-3000:]
    calibration = json.loads((run / "calibration.json").read_text())
    assert calibration["split"] == "validation" and calibration["n"] == len(
        json.loads((run / "split.json").read_text())["ids"]["validation"]
    )
    assert calibration["after"]["nll"] <= calibration["before"]["nll"]
    assert f"T = {calibration['temperature']:.3f}" in result.stdout

    evaluated = run_cli("eval", run, "--modes", "score,generate", "--models", "finetuned", "--limit", "12",
                     "--abstain-below", "0.9")  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads((run / "eval" / "report.json").read_text())
    score = report["results"]["finetuned"]["score"]
    assert score["confidence"]["temperature"] == pytest.approx(calibration["temperature"])
    assert score["confidence"]["calibrated"]["nll"] is not None and score["confidence"]["raw"]["aurc"] >= 0
    for mode in ("score", "generate"):
        counts = report["results"]["finetuned"][mode]["counts"]
        assert sum(counts.values()) == 12  # correct + wrong + ... + unreadable + abstained = n
        answered = 12 - counts["abstained"]
        assert report["results"]["finetuned"][mode]["coverage"] == pytest.approx(answered / 12)
    # report.md's summary table: its outcome columns add up to n with abstention too
    table = [line for line in (run / "eval" / "report.md").read_text().splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    outcomes = ["hallucinated", "unparseable", "unreadable", "correct", "wrong", "abstained"]
    for line in table[1:3]:
        cells = dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True))
        counted = [int(cells[name].split("(")[-1].rstrip(")")) for name in outcomes]
        assert sum(counted) == int(cells["n"]) == 12, cells
    predictions = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    abstained = [p for p in predictions if p["outcome"] == "abstained"]
    assert all(p["confidence"] < 0.9 and p["label"] for p in abstained)  # the label it would have had
    assert all(p["calibrated"] for p in predictions if p["mode"] == "score")
    html = (run / "eval" / "report.html").read_text()
    assert "risk-coverage curve" in html and "reliability diagram, calibrated" in html


def test_predict_and_map_carry_the_calibrated_flag_and_abstain(tiny_run, aid_dir, tmp_path):
    from conftest import SYNTH_CLASSES

    from pixtral_lora.data.synth import generate_scene_mosaic

    out = tmp_path / "p.jsonl"
    result = run_cli("predict", aid_dir, "--run", tiny_run, "--out", out, "--target-accuracy", "0.9")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "abstaining below confidence" in result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["calibrated"] for r in rows)
    calibration = json.loads((tiny_run / "calibration.json").read_text())
    threshold = abstain_threshold(
        np.array(calibration["validation"]["confidence"]), np.array(calibration["validation"]["correct"]), 0.9
    )
    assert {r["outcome"] == "abstained" for r in rows} == {r["confidence"] < threshold for r in rows}

    scene = tmp_path / "scene.tif"
    generate_scene_mosaic(scene, SYNTH_CLASSES, grid=(2, 2), tile=64, seed=5)
    mapped = run_cli("map", scene, "--run", tiny_run, "--out", tmp_path / "m.geojson", "--tile", 64,
                  "--abstain-below", "0.999999")  # fmt: skip
    assert mapped.returncode == 0, mapped.stderr[-3000:]
    features = json.loads((tmp_path / "m.geojson").read_text())["features"]
    assert all(f["properties"]["calibrated"] for f in features)
    assert len(features) == 4
    for feature in features:  # abstained exactly where the confidence is under the threshold
        props = feature["properties"]
        assert props["abstained"] == (props["confidence"] < 0.999999)
    # the summary counts an abstained tile as abstained, never under the label it would have had
    abstained = sum(f["properties"]["abstained"] for f in features)
    per_label = {f["properties"]["label"]: 0 for f in features if not f["properties"]["abstained"]}
    for feature in features:
        if not feature["properties"]["abstained"]:
            per_label[feature["properties"]["label"]] += 1
    summary = mapped.stdout.splitlines()[0]
    assert (f"(abstained) {abstained}" in summary) == bool(abstained)
    assert all(f"{label} {count}" in summary for label, count in per_label.items())
    assert abstained + sum(per_label.values()) == 4


def test_a_calibration_of_another_adapter_is_refused_for_a_target_and_reported_as_raw(
    tiny_run, aid_dir, tmp_path
):
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoints", "eval*"))
    weights = run / "adapter" / "adapter_model.safetensors"
    save_file({k: v * 1.01 for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    line = one_line_error(run_cli("predict", aid_dir / "Beach", "--run", run, "--out", tmp_path / "p.jsonl",
                                "--target-accuracy", "0.9"))  # fmt: skip
    assert "belongs to another adapter" in line and "pixtral-lora calibrate" in line
    raw = run_cli("predict", aid_dir / "Beach", "--run", run, "--out", tmp_path / "q.jsonl")
    assert raw.returncode == 0, raw.stderr[-3000:]
    assert "belongs to another adapter" in raw.stderr
    assert not any(json.loads(line)["calibrated"] for line in (tmp_path / "q.jsonl").read_text().splitlines())
    generate = run_cli("predict", aid_dir / "Beach", "--run", run, "--out", tmp_path / "r.jsonl", "--mode",
                    "generate", "--target-accuracy", "0.9")  # fmt: skip
    assert "--mode score" in one_line_error(generate)


def test_only_a_valid_answer_abstains_through_eval(tiny_run, tmp_path):
    """`eval --abstain-below` on the base model (whose free answers name no class): a hallucinated or
    unparseable answer stays what it is, so the hallucination count is the same with and without
    abstention and the outcomes still add up to n (through the command a user types)."""
    reports = {}
    for name, extra in (("plain", []), ("abstaining", ["--abstain-below", "1.0"])):
        out = tmp_path / name
        result = run_cli("eval", tiny_run, "--models", "base,finetuned", "--modes", "generate", "--limit", "8",
                         "--out", out, *extra)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        reports[name] = json.loads((out / "report.json").read_text())["results"]
    for model in ("base", "finetuned"):
        plain, abstaining = reports["plain"][model]["generate"], reports["abstaining"][model]["generate"]
        for outcome in ("hallucinated", "unparseable", "unreadable"):
            assert abstaining["counts"][outcome] == plain["counts"][outcome], (model, outcome)
        assert sum(abstaining["counts"].values()) == abstaining["n"] == 8
        valid = plain["counts"]["correct"] + plain["counts"]["wrong"]
        assert abstaining["counts"]["abstained"] == valid  # every valid answer is under 1.0
    assert (
        reports["plain"]["base"]["generate"]["counts"]["correct"]
        + reports["plain"]["base"]["generate"]["counts"]["wrong"]
        < 8
    )  # the base model's babble is in the test: some answers name no class


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"temperature": -1.0}, "temperature: Input should be greater than or equal to 0.05"),
        ({"temperature": 0}, "temperature: Input should be greater than or equal to 0.05"),
        ({"temperature": float("nan")}, "temperature: Input should be a finite number"),
        ({"temperature": 1e6}, "temperature: Input should be less than or equal to 20"),
        (
            {"validation": {"confidence": [0.5], "correct": [True, False]}},
            "1 confidences but 2 correct flags",
        ),
        ({"validation": {"confidence": [0.5, 7], "correct": [True, False]}}, "validation.confidence.1"),
    ],
    ids=["negative", "zero", "nan", "out-of-bounds", "lengths", "confidence-above-1"],
)
def test_a_tampered_calibration_is_one_line_in_every_command_that_reads_it(
    tiny_run, aid_dir, tmp_path, change, named
):
    """calibration.json is read back as strictly as a config: a T of 0, below 0, NaN or past the fit's
    bounds, or a malformed validation block, is refused in one line naming the field (eval and predict,
    as typed), instead of being used as it is."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoints", "eval*"))
    path = run / "calibration.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))  # bare NaN, as json writes it
    for command in (
        [
            "eval",
            run,
            "--models",
            "finetuned",
            "--modes",
            "score",
            "--limit",
            "2",
            "--out",
            tmp_path / "eval",
        ],
        [
            "predict",
            aid_dir / "Beach",
            "--run",
            run,
            "--out",
            tmp_path / "p.jsonl",
            "--target-accuracy",
            "0.9",
        ],
    ):
        line = one_line_error(run_cli(*command))
        assert "calibration.json" in line and named in line, (command, line)
    assert not (tmp_path / "eval").exists() and not (tmp_path / "p.jsonl").exists()
