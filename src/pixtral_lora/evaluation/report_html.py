"""report.html: one self-contained page a person can look at (images inlined, no script, no network).

Summary table (base vs fine-tuned, every mode), per-class precision/recall/F1 worst-first with bars,
confusion heatmaps whose off-diagonal cells link to their examples, an error gallery (every wrong,
hallucinated, unparseable and unreadable item up to a limit, grouped by gold -> predicted, each with
the image as the model saw it), reliability diagrams in score mode, and the run's key facts.

Class names and answers are untrusted text: everything that is not our own markup goes through
`html.escape`.
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np

_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1b1b1b;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left;max-width:26em;overflow-wrap:anywhere}
bdi{unicode-bidi:isolate}h4{overflow-wrap:anywhere}.plots{display:flex;flex-wrap:wrap;gap:12px}.ok{color:#1a7f37}.bad{color:#b42318}
.bar{display:inline-block;height:9px;background:#4c78a8;vertical-align:middle}
.cm td{min-width:22px;font-size:11px;text-align:center}.cm a{color:inherit}
.cm th.rot{writing-mode:vertical-rl;transform:rotate(180deg);font-weight:normal;font-size:11px;
max-height:16em;overflow-wrap:anywhere}
.gallery{display:flex;flex-wrap:wrap;gap:10px}.card{width:180px;border:1px solid #ddd;padding:6px;font-size:12px;
overflow-wrap:anywhere}
.card img{width:168px;height:auto;image-rendering:auto}.card pre{white-space:pre-wrap;word-break:break-all;
margin:4px 0;background:#f7f7f7;font-size:11px}.noimg{width:168px;height:100px;background:#eee;display:flex;
align-items:center;justify-content:center;color:#777}dl.facts{display:grid;grid-template-columns:max-content 1fr;
gap:2px 14px}dl.facts dt{font-weight:600}
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _name(value) -> str:
    """A class name or image id: escaped, and isolated so right-to-left text keeps the line's order."""
    return f"<bdi>{_e(value)}</bdi>"


def _pct(x: float) -> str:
    return f"{x:.1%}"


def _png_uri(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _confidences(predictions, temperature: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, correct) of the answered images: softmax(scores / T)'s top class in score mode,
    else each answer's own confidence."""
    from pixtral_lora.evaluation.calibration import softmax

    answered = [p for p in predictions if p.confidence is not None and p.error is None]
    correct = np.array([p.label == p.gold for p in answered], dtype=float)
    if temperature and answered and all(p.class_scores is not None for p in answered):
        probabilities = softmax(np.array([p.class_scores for p in answered]), temperature)
        return probabilities.max(axis=1), correct
    return np.array([p.confidence for p in answered]), correct


def _reliability_diagram(confidence: np.ndarray, correct: np.ndarray, title: str, bins: int = 10) -> str:
    """A reliability diagram (accuracy per confidence bin against the diagonal) as a PNG data URI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    figure, axes = plt.subplots(figsize=(3.6, 3.4))
    axes.plot([0, 1], [0, 1], "--", color="#999", linewidth=1)
    for b in range(bins):
        members = index == b
        if members.any():
            axes.bar(
                edges[b], correct[members].mean(), width=1 / bins, align="edge", color="#4c78a8", alpha=0.8
            )
    axes.set_xlabel("confidence")
    axes.set_ylabel("accuracy")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    uri = _png_uri(figure)
    plt.close(figure)
    return uri


def _risk_coverage_plot(curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """Risk (error rate) of the most confident images against their share, per curve, as a PNG data URI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pixtral_lora.evaluation.calibration import risk_coverage

    figure, axes = plt.subplots(figsize=(4.2, 3.4))
    for label, (confidence, correct) in curves.items():
        coverage, risk = risk_coverage(confidence, correct)
        axes.plot(coverage, risk, label=f"{label} (AURC {risk.mean():.3f})", linewidth=1.5)
    axes.set_xlabel("coverage (most confident first)")
    axes.set_ylabel("risk (error rate)")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, None)
    axes.legend(fontsize=8, frameon=False)
    axes.set_title("risk-coverage", fontsize=10)
    figure.tight_layout()
    uri = _png_uri(figure)
    plt.close(figure)
    return uri


def _confidence_section(report, predictions, section: int) -> list[str]:
    """Calibration: measures raw and calibrated, reliability diagrams side by side, the risk-coverage curve."""
    confidence = report.confidence
    temperature = confidence.get("temperature")
    kinds = [("raw", None)] + ([("calibrated", temperature)] if confidence.get("calibrated") else [])
    curves = {kind: _confidences(predictions, t) for kind, t in kinds}
    rows = []
    for kind, _ in kinds:
        m = confidence[kind]
        selective = " / ".join(_pct(m["selective_accuracy"][c]) for c in ("0.80", "0.90", "0.95"))
        cells = [m["ece"], m["ece_adaptive"], m["nll"], m["brier"], m["auroc"], m["aurc"]]
        rows.append(
            f"<tr><td class=l>{kind}{f' (T={temperature:.3f})' if kind == 'calibrated' else ''}</td>"
            + "".join(f"<td>{'-' if v is None else f'{v:.3f}'}</td>" for v in cells)
            + f"<td>{selective}</td></tr>"
        )
    note = f"confidence: {_e(confidence['of'])}" + (
        "" if confidence.get("calibrated") else " (uncalibrated: no calibration.json for this adapter)"
    )
    images = [
        f"<img src='{_reliability_diagram(c, k, f'{kind}: reliability')}' alt='reliability diagram, {kind}'>"
        for kind, (c, k) in curves.items()
    ]
    images.append(f"<img src='{_risk_coverage_plot(curves)}' alt='risk-coverage curve'>")
    return [
        f"<h3 id='c{section}'>Calibration</h3><p>{note}</p><table><tr><th class=l>confidence</th><th>expected calibration error</th>"
        "<th>ECE (adaptive)</th><th>NLL</th><th>Brier</th><th>AUROC</th><th>AURC</th>"
        "<th>selective accuracy 80/90/95%</th></tr>",
        *rows,
        "</table><div class=plots>" + "".join(images) + "</div>",
    ]


def _predicted_column(prediction) -> str:
    return prediction.label if prediction.label is not None else f"({prediction.outcome})"


def _summary(results: dict) -> list[str]:
    out = [
        "<h2>Summary</h2><table><tr><th class=l>model</th><th class=l>mode</th><th>accuracy (95% CI)</th>"
        "<th>macro-F1</th><th>hallucinated</th><th>unparseable</th><th>unreadable</th><th>correct</th>"
        "<th>wrong</th><th>abstained (coverage)</th><th>n</th><th>images/s</th></tr>"
    ]
    for model, by_mode in results.items():
        for mode, result in by_mode.items():
            r = result["report"]
            low, high = r.accuracy_ci95
            adds_up = sum(r.counts.values()) == r.n
            out.append(
                f"<tr><td class=l>{_e(model)}</td><td class=l>{_e(mode)}</td>"
                f"<td>{_pct(r.accuracy)} ({_pct(low)}-{_pct(high)})</td><td>{r.macro_f1:.3f}</td>"
                f"<td>{r.counts['hallucinated']}</td><td>{r.counts['unparseable']}</td>"
                f"<td>{r.counts['unreadable']}</td><td>{r.counts['correct']}</td><td>{r.counts['wrong']}</td>"
                f"<td>{r.counts.get('abstained', 0)} ({_pct(r.coverage)})</td>"
                f"<td class={'ok' if adds_up else 'bad'}>{r.n}</td>"
                f"<td>{result['images_per_second']:.2f}</td></tr>"
            )
    out.append(
        "</table><p>Every image has exactly one outcome; the outcome columns add up to n. With abstention, "
        "accuracy is over the answered images, whose share is the coverage.</p>"
    )
    return out


def _per_class(report, class_names: list[str]) -> list[str]:
    rows = sorted(class_names, key=lambda name: (report.per_class[name]["f1"], name))
    out = [
        "<table><tr><th class=l>class (worst first)</th><th>precision</th><th>recall</th><th>F1</th>"
        "<th class=l></th><th>support</th></tr>"
    ]
    for name in rows:
        c = report.per_class[name]
        out.append(
            f"<tr><td class=l>{_name(name)}</td><td>{c['precision']:.3f}</td><td>{c['recall']:.3f}</td>"
            f"<td>{c['f1']:.3f}</td><td class=l><span class=bar style='width:{c['f1'] * 120:.0f}px'></span>"
            f"</td><td>{c['support']}</td></tr>"
        )
    out.append("</table>")
    return out


def _confusion(report, class_names: list[str], section: int, shown: set[tuple[str, str]]) -> list[str]:
    matrix = np.asarray(report.confusion, dtype=float)
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    out = ["<table class=cm><tr><th class=l>gold \\ predicted</th>"]
    out += [f"<th class=rot>{_name(column)}</th>" for column in report.confusion_columns]
    out.append("</tr>")
    for i, gold in enumerate(class_names):
        out.append(f"<tr><th class=l>{_name(gold)}</th>")
        for j, column in enumerate(report.confusion_columns):
            count = int(matrix[i, j])
            shade = int(255 - 180 * share[i, j])
            color = f"rgb({shade},{shade + (255 - shade) // 3},255)"
            text = str(count) if count else ""
            if count and i != j and (gold, column) in shown:
                text = f"<a href='#g{section}-{i}-{j}'>{count}</a>"
            out.append(f"<td style='background:{color}'>{text}</td>")
        out.append("</tr>")
    out.append("</table>")
    return out


def gallery_items(predictions, mode: str, limit: int) -> list:
    """The mistakes the gallery shows for one model and mode: the first `limit`, the most confident
    first in score mode (evaluation makes thumbnails for exactly these)."""
    mistakes = [p for p in predictions if p.outcome != "correct"]
    if mode == "score":
        mistakes.sort(key=lambda p: -(p.confidence or 0.0))
    return mistakes[:limit]


def _gallery(
    predictions, class_names: list[str], section: int, thumbnails: dict[str, str], limit: int, mode: str
) -> tuple[list[str], set[tuple[str, str]]]:
    mistakes = gallery_items(predictions, mode, limit)
    groups: dict[tuple[str, str], list] = {}
    for p in mistakes:
        groups.setdefault((p.gold, _predicted_column(p)), []).append(p)
    columns = [*class_names, "(hallucinated)", "(unparseable)", "(unreadable)"]
    total = sum(1 for p in predictions if p.outcome != "correct")
    out = [f"<h3>Error gallery ({len(mistakes)} of {total} mistakes shown)</h3>"]
    for (gold, predicted), items in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        i, j = class_names.index(gold), columns.index(predicted)
        out.append(f"<h4 id='g{section}-{i}-{j}'>{_name(gold)} &rarr; {_name(predicted)} ({len(items)})</h4>")
        out.append("<div class=gallery>")
        for p in items:
            image = thumbnails.get(p.id)
            picture = f"<img src='{image}' alt='{_e(p.id)}'>" if image else "<div class=noimg>no image</div>"
            confidence = "" if p.confidence is None else f"<br>confidence {p.confidence:.3f}"
            detail = f"<pre>{_e(p.error)}</pre>" if p.error else f"<pre>{_e(p.raw_answer)}</pre>"
            out.append(
                f"<div class=card>{picture}<br><b>{_name(p.id)}</b><br>gold {_name(p.gold)}<br>"
                f"predicted {_name(predicted)}{confidence}{detail}</div>"
            )
        out.append("</div>")
    return out, set(groups)


def render_html(
    results: dict,
    class_names: list[str],
    predictions: dict,
    thumbnails: dict[str, str] | None = None,
    facts: dict | None = None,
    gallery_limit: int = 200,
) -> str:
    """The whole report as one HTML document.

    results: model -> mode -> {"report": ClassificationReport, "images_per_second": float};
    predictions: (model, mode) -> [Prediction]; thumbnails: image id -> data URI of the image as the
    model saw it; facts: the run's key facts (label -> value); gallery_limit: mistakes shown per
    model and mode.
    """
    thumbnails = thumbnails or {}
    out = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>Evaluation report</title>",
        f"<style>{_STYLE}</style></head><body><h1>Evaluation report</h1>",
    ]
    if facts:
        out.append("<h2>Run</h2><dl class=facts>")
        out += [f"<dt>{_e(key)}</dt><dd>{_e(value)}</dd>" for key, value in facts.items()]
        out.append("</dl>")
    out += _summary(results)
    section = 0
    for model, by_mode in results.items():
        for mode, result in by_mode.items():
            section += 1
            report = result["report"]
            out.append(f"<h2 id='s{section}'>{_e(model)}, {_e(mode)}</h2>")
            gallery, shown = _gallery(
                predictions[(model, mode)], class_names, section, thumbnails, gallery_limit, mode
            )
            out.append("<h3>Confusion matrix (cells link to their examples)</h3>")
            out += _confusion(report, class_names, section, shown)
            out.append("<h3>Per class</h3>")
            out += _per_class(report, class_names)
            if report.confidence and "ece" in report.confidence["raw"]:
                out += _confidence_section(report, predictions[(model, mode)], section)
            out += gallery
    out.append("</body></html>")
    return "\n".join(out) + "\n"
