"""Evaluation: the held-out split of a run, base model and fine-tuned model side by side.

Three modes (`classify`), each reported separately:

- `generate`: greedy decoding of a free answer, parsed by `task.answers.AnswerParser` (what the study did).
- `constrained`: greedy decoding through a prefix tree of the valid answers (HF `generate`'s
  `prefix_allowed_tokens_fn`), so only a class from the set can come out: zero hallucinations by
  construction.
- `score`: every class answer is scored by its log-likelihood given the image (batched, the shared
  answer prefix scored once, the classes' own tokens packed after each prompt: `classify/score.py`); the
  argmax is the prediction and the softmax over classes a confidence per image (its calibration,
  ECE, is in the report).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from pixtral_lora import classify
from pixtral_lora.evaluation.calibration import abstain, abstention_threshold, run_temperature
from pixtral_lora.evaluation.metrics import summarise
from pixtral_lora.evaluation.reports import write_report
from pixtral_lora.model.render import Renderer
from pixtral_lora.run.layout import ADAPTER_DIR, CONFIG_FILE, DATA_REPORT_FILE, ENVIRONMENT_FILE, SPLIT_FILE
from pixtral_lora.run.reader import Run

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """What `evaluate_run` evaluates and where it writes, built once by `pixtral-lora eval`."""

    modes: tuple[str, ...] | None = None  # None: the run config's eval.modes
    models: tuple[str, ...] = ("base", "finetuned")
    limit: int | None = None
    out_dir: str | Path | None = None  # None: eval.output_dir, else RUN/eval
    strict: bool | None = None  # None: the run config's eval.strict
    merged: str | Path | None = None  # an HF checkpoint to evaluate as the fine-tuned model
    overwrite: bool = False
    force: bool = False  # use a run whose base/config/split changed since training
    gallery_limit: int = 200
    abstain_below: float | None = None
    target_accuracy: float | None = None


def evaluate_run(run_dir: str | Path, options: EvalOptions = EvalOptions()) -> Path:
    """Evaluate a run's held-out split with the base and the fine-tuned model; returns the report dir.

    The fine-tuned model is the run's adapter on the base, or `merged` (an HF checkpoint) when given.
    The report directory replaces a previous report only (anything else needs `overwrite`).
    """
    from pixtral_lora.evaluation.reports import EVAL_KIND
    from pixtral_lora.outputs import EVAL_REPORT_FILES, check_replaceable, check_writable

    models, merged, target_accuracy = options.models, options.merged, options.target_accuracy
    needs_adapter = "finetuned" in models and merged is None
    run = Run.open(
        run_dir,
        needs_adapter=needs_adapter,
        needs_base="base" in models or needs_adapter,
        force=options.force,
    )
    if merged is not None:
        run.check_family(merged)
    run_dir, config, class_names = run.run_dir, run.config, run.class_names
    out = Path(options.out_dir or config.eval.output_dir or run_dir / "eval")
    check_replaceable(out, EVAL_REPORT_FILES, options.overwrite, EVAL_KIND)
    check_writable(out.parent, "--out")
    threshold, abstention = abstention_threshold(run, options.abstain_below, target_accuracy, merged)
    if target_accuracy is not None:
        abstention += "; applied to the fine-tuned model's score mode only"
    if abstention:
        logger.info("%s", abstention)
    rows, unreadable = run.test_rows(options.limit)
    renderer = run.renderer()
    results: dict = {}
    predictions: dict = {}
    for model_name in models:
        model = run.model(model_name, merged)
        results[model_name] = {}
        temperature = None
        if model_name == "finetuned" and merged is None:  # a calibration belongs to the run's adapter
            temperature, note = run_temperature(run)
            logger.info("%s", note)
        for mode in options.modes or config.eval.modes:
            classify_options = classify.ClassifyOptions.for_run(
                config,
                mode,
                strict=options.strict,
                desc=f"{model_name}/{mode}",
                temperature=temperature if mode == "score" else None,
            )
            preds, speed = classify.predict_rows(
                model, renderer, rows, class_names, config.prompt, classify_options, unreadable
            )
            report = summarise(
                # a threshold chosen for a target accuracy is one of the adapter's calibrated
                # confidences in score mode: the base model's and generate mode's are other numbers
                abstain(
                    preds,
                    threshold
                    if target_accuracy is None or (mode == "score" and temperature is not None)
                    else None,
                ),
                class_names,
                temperature if mode == "score" else None,
            )
            results[model_name][mode] = {"report": report, "images_per_second": speed}
            predictions[(model_name, mode)] = preds
            logger.info(
                "%s/%s: accuracy %.3f, hallucinated %.3f, unparseable %.3f (n=%d)",
                model_name,
                mode,
                report.accuracy,
                report.hallucination_rate,
                report.parse_failure_rate,
                report.n,
            )
        del model
    thumbnails = _thumbnails(rows, predictions, renderer, options.gallery_limit)
    facts = run_facts(run_dir, config, merged)
    twins = test_twins(run, predictions, class_names)
    if twins:
        facts["test images with a twin in training"] = twins["line"]
        logger.warning("%s", twins["line"])
    if abstention:
        facts["abstention"] = abstention
    if run.warnings:
        facts["warnings"] = "; ".join(run.warnings)
    write_report(
        out,
        results,
        class_names,
        predictions,
        options.overwrite,
        thumbnails,
        facts,
        options.gallery_limit,
        run.warnings,
        twins,
    )
    return out


def _thumbnails(rows: list[dict], predictions: dict, renderer: Renderer, limit: int, size: int = 160) -> dict:
    """Image id -> JPEG data URI of the image as the model saw it (resized), for the gallery's items."""
    from pixtral_lora.data.images import ImageError, encode_data_uri
    from pixtral_lora.evaluation.report_html import gallery_items

    by_id = {row["id"]: row for row in rows}
    wanted = {p.id for (_, mode), preds in predictions.items() for p in gallery_items(preds, mode, limit)}
    thumbnails = {}
    for image_id in sorted(wanted):
        try:
            image = renderer.load_images(by_id[image_id]["images"])[0].copy()
        except (ImageError, IndexError):
            continue
        image.thumbnail((size, size))
        thumbnails[image_id] = encode_data_uri(image)
    return thumbnails


AUDIT_FILE = Path("audit") / "audit.json"  # where `data audit --run RUN --out RUN/audit` writes


def test_twins(run, predictions: dict, class_names: list[str]) -> dict | None:
    """The evaluated test images with an exact or near twin in train or validation (split.json's
    training-time check; also RUN/audit/audit.json when the run was audited there) and each result's
    accuracy with and without them; None when there are none."""
    sources, ids = [], set()
    for where, found in (
        ("split.json (train.py's leakage check)", run.split.get("leakage")),
        (str(AUDIT_FILE), _audit_leakage(run.run_dir / AUDIT_FILE)),
    ):
        if found and found.get("test_ids"):
            ids |= set(found["test_ids"])
            sources.append(where)
    evaluated = {p.id for preds in predictions.values() for p in preds}
    present = sorted(ids & evaluated)
    if not present:
        return None
    accuracy, parts = {}, []
    for (model_name, mode), preds in predictions.items():
        kept = [p for p in preds if p.id not in ids]
        both = {
            "with": summarise(preds, class_names).accuracy,
            "without": summarise(kept, class_names).accuracy if kept else None,
            "n_without": len(kept),
        }
        accuracy.setdefault(model_name, {})[mode] = both
        without = f"{both['without']:.1%}" if kept else "n/a"
        parts.append(f"{model_name}/{mode} {both['with']:.1%} with them, {without} without")
    line = (
        f"{len(present)} of {len(evaluated)} test images have an exact or near twin in train or validation "
        f"({', '.join(sources)}); accuracy: {'; '.join(parts)}"
    )
    return {"ids": present, "sources": sources, "accuracy": accuracy, "line": line}


def _audit_leakage(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("leakage")
    except (OSError, ValueError, AttributeError):
        logger.warning("%s: not a data audit's audit.json; its twins are not counted", path)
        return None


def run_facts(run_dir: Path, config, merged: str | Path | None = None) -> dict:
    """The run's key facts for a report: model, adapter, data, split sizes, config hash, date, versions."""
    import datetime
    import hashlib

    split = json.loads((run_dir / SPLIT_FILE).read_text())
    environment = run_dir / ENVIRONMENT_FILE
    versions = json.loads(environment.read_text()).get("versions", {}) if environment.is_file() else {}
    config_text = (run_dir / CONFIG_FILE).read_bytes()
    data_report = run_dir / DATA_REPORT_FILE
    excluded = json.loads(data_report.read_text()).get("excluded") if data_report.is_file() else None
    return {
        "run": str(run_dir),
        "base model": config.model.name_or_path,
        "fine-tuned model": str(merged) if merged else str(run_dir / ADAPTER_DIR),
        "data": config.data.path,
        "split sizes": ", ".join(f"{name} {len(ids)}" for name, ids in split["ids"].items()),
        "classes": len(split["class_names"]),
        "config sha256": hashlib.sha256(config_text).hexdigest()[:16],
        "evaluated": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items() if v),
    } | (
        {"excluded": f"{excluded['count']} ids left out by data.exclude ({excluded['file']})"}
        if excluded
        else {}
    )
