"""Evaluation reports on disk: report.json, report.md, predictions.jsonl and confusion matrices."""

from __future__ import annotations

import json
from pathlib import Path

from pixtral_lora.evaluation.metrics import plot_confusion, write_confusion_csv
from pixtral_lora.outputs import EVAL_REPORT_FILES, atomic_directory, atomic_file, write_json

EVAL_KIND = "eval report"


def write_report(
    out: Path,
    results: dict,
    class_names: list[str],
    predictions: dict,
    overwrite: bool = False,
    thumbnails: dict[str, str] | None = None,
    facts: dict | None = None,
    gallery_limit: int = 200,
    warnings: list[str] | None = None,
    twins: dict | None = None,
) -> None:
    """report.json, report.md, report.html, predictions.jsonl, confusion_<model>[_<mode>].csv/png.

    Written together: the directory appears complete or not at all; it replaces a previous report
    only (anything else in `out` needs `overwrite`). `thumbnails`, `facts` and `gallery_limit` are
    for report.html (see `report_html.render_html`); `twins`: the test images with a twin in
    training and the accuracies with and without them (`evaluate.test_twins`).
    """
    from pixtral_lora.evaluation.report_html import render_html

    with atomic_directory(out, EVAL_REPORT_FILES, overwrite, kind=EVAL_KIND) as out_dir:
        abstention = (facts or {}).get("abstention")
        _write_report_files(out_dir, results, class_names, predictions, warnings or [], abstention, twins)
        with atomic_file(out_dir / "report.html") as handle:
            handle.write(render_html(results, class_names, predictions, thumbnails, facts, gallery_limit))


def _write_report_files(
    out_dir: Path,
    results: dict,
    class_names: list[str],
    predictions: dict,
    warnings: list[str],
    abstention: str | None = None,
    twins: dict | None = None,
) -> None:
    write_json(
        out_dir / "report.json",
        {
            "class_names": class_names,
            "warnings": warnings,  # what --force let through (a run used although it changed)
            "abstention": abstention,  # the threshold and where it came from, or None
            "test_twins": twins,  # test images with a twin in train/validation, accuracy without them
            "results": {
                k: {
                    m: r["report"].as_dict() | {"images_per_second": r["images_per_second"]}
                    for m, r in v.items()
                }
                for k, v in results.items()
            },
        },
    )
    with atomic_file(out_dir / "predictions.jsonl") as handle:
        for (model_name, mode), preds in predictions.items():
            for p in preds:
                handle.write(json.dumps(p.as_dict(model_name, mode)) + "\n")
    for model_name, by_mode in results.items():
        for mode, result in by_mode.items():
            stem = f"confusion_{model_name}" + ("" if mode == "generate" else f"_{mode}")
            write_confusion_csv(result["report"], class_names, out_dir / f"{stem}.csv")
            plot_confusion(result["report"], class_names, out_dir / f"{stem}.png", f"{model_name} ({mode})")
    unreadable = {p.id: p.error for preds in predictions.values() for p in preds if p.error is not None}
    with atomic_file(out_dir / "report.md") as handle:
        handle.write(markdown_report(results, class_names, unreadable, warnings, twins))


def markdown_report(
    results: dict,
    class_names: list[str],
    unreadable: dict[str, str] | None = None,
    warnings: list[str] | None = None,
    twins: dict | None = None,
) -> str:
    """The report as markdown: summary table, calibration, unreadable images, per-class tables."""
    lines = ["# Evaluation report", ""]
    lines += [f"**Warning:** {warning}" for warning in warnings or []] + ([""] if warnings else [])
    any_result = next(iter(next(iter(results.values())).values()))["report"]
    lines.append(
        f"{any_result.n} test images, {len(class_names)} classes. Every image has exactly one outcome; "
        "the outcome columns add up to n."
    )
    lines += [
        "",
        "| model | mode | accuracy (95% CI) | macro-F1 | hallucinated | unparseable | unreadable | correct | wrong "
        "| abstained | n | images/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model_name, by_mode in results.items():
        for mode, result in by_mode.items():
            r = result["report"]
            lines.append(
                f"| {model_name} | {mode} | {r.accuracy:.1%} ({r.accuracy_ci95[0]:.1%}-{r.accuracy_ci95[1]:.1%}) | "
                f"{r.macro_f1:.3f} | {r.hallucination_rate:.1%} ({r.counts['hallucinated']}) | "
                f"{r.parse_failure_rate:.1%} ({r.counts['unparseable']}) | {r.counts['unreadable']} | "
                f"{r.counts['correct']} | {r.counts['wrong']} | {r.counts.get('abstained', 0)} | "
                f"{r.n} | {result['images_per_second']:.2f} |"
            )
    abstained = [
        f"- {model_name}/{mode}: abstained on {r['report'].counts['abstained']} of {r['report'].n} "
        f"(coverage {r['report'].coverage:.1%}); accuracy {r['report'].accuracy:.1%} over the answered"
        for model_name, by_mode in results.items()
        for mode, r in by_mode.items()
        if r["report"].counts.get("abstained")
    ]
    if abstained:
        lines += ["", "Abstention (answers under the confidence threshold are not given):", *abstained]
    if twins:
        lines += ["", f"**Leakage:** {twins['line']}."]
    lines += confidence_table(results)
    if unreadable:
        lines += [
            "",
            f"Unreadable images ({len(unreadable)}; the model was not asked, they count as not correct):",
        ]
        lines += [f"- `{image_id}`: {reason}" for image_id, reason in sorted(unreadable.items())]
    lines += [
        "",
        "Modes: `generate` = free greedy answer parsed leniently (the study's setting); `constrained` = "
        "decoding restricted to valid answers; `score` = class with the highest answer likelihood.",
        "",
    ]
    for model_name, by_mode in results.items():
        for mode, result in by_mode.items():
            r = result["report"]
            lines += [
                f"## Per class: {model_name}, {mode}",
                "",
                "| class | precision | recall | F1 | support |",
                "|---|---|---|---|---|",
            ]
            for name in class_names:
                c = r.per_class[name]
                lines.append(
                    f"| {name} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |"
                )
            lines.append("")
    return "\n".join(lines) + "\n"


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def confidence_table(results: dict) -> list[str]:
    """Markdown lines: how far each model's and mode's confidences can be trusted (raw and, where the
    run has a calibration for the adapter, calibrated)."""
    rows = []
    for model_name, by_mode in results.items():
        for mode, result in by_mode.items():
            confidence = result["report"].confidence
            if not confidence:
                continue
            temperature = confidence.get("temperature")
            for kind in ("raw", "calibrated"):
                m = confidence.get(kind)
                if not m or "ece" not in m:  # no (finite) confidences to measure
                    continue
                label = (
                    f"calibrated (T={temperature:.3f})"
                    if kind == "calibrated"
                    else f"raw ({confidence['of']})"
                )
                selective = m["selective_accuracy"]
                rows.append(
                    f"| {model_name} | {mode} | {label} | {_fmt(m['ece'])} | {_fmt(m['ece_adaptive'])} | "
                    f"{_fmt(m['nll'])} | {_fmt(m['brier'])} | {_fmt(m['auroc'])} | {_fmt(m['aurc'])} | "
                    + " / ".join(_fmt(selective[c], ".1%") for c in ("0.80", "0.90", "0.95"))
                    + " |"
                )
    if not rows:
        return []
    return [
        "",
        "Confidence: expected calibration error (10 equal-width / equal-mass bins), NLL and Brier score "
        "(score mode), AUROC of confidence for right vs wrong, area under the risk-coverage curve, and "
        "the accuracy of the most confident 80% / 90% / 95% (uncalibrated for generate/constrained):",
        "",
        "| model | mode | confidence | ECE | ECE (adaptive) | NLL | Brier | AUROC | AURC | selective accuracy 80/90/95% |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
