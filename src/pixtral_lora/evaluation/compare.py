"""`pixtral-lora compare RUN_DIR...`: runs side by side, and whether their difference is real.

One row per run: the config keys that differ between the runs (and only those), the fine-tuned
model's accuracy and hallucination rate per evaluated mode with 95% intervals, its confidence's ECE and
AURC (calibrated where the run has a calibration for its adapter, else raw, marked), the best step and
the training time. For each pair of runs evaluated on the same test images, an exact McNemar test
on the paired per-image outcomes (correct or not): scipy's binomial test on the discordant pairs.
"""

from __future__ import annotations

import html
import json
from itertools import combinations
from pathlib import Path

import yaml

from pixtral_lora.run.layout import CONFIG_FILE
from pixtral_lora.run.writer import RunDirError


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _load_run(run_dir: Path, eval_name: str, model: str) -> dict:
    report_path = run_dir / eval_name / "report.json"
    if not (run_dir / CONFIG_FILE).is_file():
        raise RunDirError(f"{run_dir}: no config.yaml; not a run directory")
    if not report_path.is_file():
        raise RunDirError(f"{run_dir}: no {eval_name}/report.json; run `pixtral-lora eval {run_dir}` first")
    report = json.loads(report_path.read_text())
    if model not in report["results"]:
        raise RunDirError(f"{report_path}: no results for the {model} model")
    outcomes: dict[str, dict[str, bool]] = {}
    with open(run_dir / eval_name / "predictions.jsonl", encoding="utf-8") as handle:
        for line in handle:
            p = json.loads(line)
            if p["model"] == model:
                outcomes.setdefault(p["mode"], {})[p["id"]] = p["outcome"] == "correct"
    summary_path = run_dir / "train_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    train_time = None
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            train_time = json.loads(line).get("train_runtime", train_time)
    best = summary.get("best_checkpoint")
    return {
        "name": str(run_dir),
        "config": _flatten(yaml.safe_load((run_dir / CONFIG_FILE).read_text())),
        "results": report["results"][model],
        "outcomes": outcomes,
        "best_step": int(best.rsplit("-", 1)[1]) if best else summary.get("global_step"),
        "train_seconds": train_time,
    }


def mcnemar(a: dict[str, bool], b: dict[str, bool]) -> dict:
    """Exact McNemar test of two classifiers' paired outcomes (image id -> correct) on the same images."""
    from scipy.stats import binomtest

    only_a = sum(1 for i in a if a[i] and not b[i])
    only_b = sum(1 for i in a if b[i] and not a[i])
    discordant = only_a + only_b
    p_value = binomtest(only_a, discordant, 0.5).pvalue if discordant else 1.0
    return {"n": len(a), "only_first_correct": only_a, "only_second_correct": only_b, "p_value": p_value}


def compare(run_dirs: list[str | Path], eval_name: str = "eval", model: str = "finetuned") -> dict:
    """The comparison as data: runs (differing config keys, results, best step, time) and tests."""
    if len(run_dirs) < 2:
        raise RunDirError("compare needs at least two run directories")
    runs = [_load_run(Path(d), eval_name, model) for d in run_dirs]
    keys = sorted({k for run in runs for k in run["config"]})
    differing = [
        k for k in keys if len({json.dumps(run["config"].get(k), sort_keys=True) for run in runs}) > 1
    ]
    differing = [k for k in differing if k != "training.output_dir"]
    tests = []
    for (i, first), (j, second) in combinations(enumerate(runs), 2):
        for mode in sorted(set(first["outcomes"]) & set(second["outcomes"])):
            a, b = first["outcomes"][mode], second["outcomes"][mode]
            if set(a) != set(b):
                tests.append({"runs": [i, j], "mode": mode, "skipped": "evaluated on different images"})
                continue
            tests.append({"runs": [i, j], "mode": mode, **mcnemar(a, b)})
    return {"differing_keys": differing, "runs": runs, "tests": tests}


def _rows(data: dict) -> tuple[list[str], list[list[str]]]:
    modes = sorted({mode for run in data["runs"] for mode in run["results"]})
    header = ["run", *data["differing_keys"]]
    header += [f"{mode} {what}" for mode in modes for what in ("accuracy (95% CI)", "hallucinated")]
    calibrated = [
        m for m in modes if any((run["results"].get(m) or {}).get("confidence") for run in data["runs"])
    ]
    header += [f"{mode} {what}" for mode in calibrated for what in ("ECE", "AURC")]
    header += ["best step", "train time"]
    rows = []
    for run in data["runs"]:
        row = [run["name"], *(json.dumps(run["config"].get(k)) for k in data["differing_keys"])]
        for mode in modes:
            r = run["results"].get(mode)
            if r is None:
                row += ["", ""]
                continue
            low, high = r["accuracy_ci95"]
            row += [f"{r['accuracy']:.1%} ({low:.1%}-{high:.1%})", f"{r['hallucination_rate']:.1%}"]
        for mode in calibrated:  # calibrated where the run has a calibration, else raw: say which
            confidence = (run["results"].get(mode) or {}).get("confidence") or {}
            kind = "calibrated" if confidence.get("calibrated") else "raw"
            measures = confidence.get(kind)
            usable = measures and "ece" in measures
            row += [f"{measures['ece']:.3f} ({kind})", f"{measures['aurc']:.3f}"] if usable else ["", ""]
        seconds = run["train_seconds"]
        row += [str(run["best_step"] or ""), f"{seconds / 60:.1f} min" if seconds else ""]
        rows.append(row)
    return header, rows


def _test_lines(data: dict) -> list[str]:
    lines = []
    for test in data["tests"]:
        first, second = (data["runs"][i]["name"] for i in test["runs"])
        if "skipped" in test:
            lines.append(f"{first} vs {second} ({test['mode']}): not tested, {test['skipped']}")
            continue
        lines.append(
            f"{first} vs {second} ({test['mode']}, n={test['n']}): only the first right on "
            f"{test['only_first_correct']}, only the second on {test['only_second_correct']}; exact McNemar "
            f"p = {test['p_value']:.3g}" + (" (a real difference at 5%)" if test["p_value"] < 0.05 else "")
        )
    return lines


def render_markdown(data: dict) -> str:
    """The comparison as a markdown table plus the McNemar tests."""
    header, rows = _rows(data)
    lines = ["# Run comparison", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    lines += ["", "Paired tests on the same test images:", *[f"- {line}" for line in _test_lines(data)]]
    return "\n".join(lines) + "\n"


def render_html(data: dict) -> str:
    """The comparison as a self-contained HTML page."""
    header, rows = _rows(data)
    e = html.escape
    table = "<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"
    table += "".join("<tr>" + "".join(f"<td><bdi>{e(c)}</bdi></td>" for c in row) + "</tr>" for row in rows)
    tests = "".join(f"<li>{e(line)}</li>" for line in _test_lines(data))
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>Run comparison</title><style>"
        "body{font:14px system-ui,sans-serif;margin:24px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;max-width:30em;overflow-wrap:anywhere}th{background:#f3f3f3}"
        "bdi{unicode-bidi:isolate}</style></head><body>"
        f"<h1>Run comparison</h1><table>{table}</table><h2>Paired tests</h2><ul>{tests}</ul></body></html>\n"
    )
