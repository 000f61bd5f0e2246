"""report.html: one self-contained page a person can look at (images inlined, no script, no network).

Summary table (base vs fine-tuned, every mode), per-class precision/recall/F1 worst-first with bars,
confusion heatmaps whose off-diagonal cells link to their examples, an error gallery (every wrong,
hallucinated, unparseable and unreadable item up to a limit, grouped by gold -> predicted, each with
the image as the model saw it), reliability diagrams in score mode, and the run's key facts.

Rendered by one jinja2 template with autoescape on: class names, answers, ids and facts are
untrusted text and reach the page only escaped (the template holds all the markup, Python only
the numbers and strings).
"""

from __future__ import annotations

import base64
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


def _confidence_section(report, predictions) -> dict:
    """Calibration: measures raw and calibrated, reliability diagrams side by side, the risk-coverage curve."""
    confidence = report.confidence
    temperature = confidence.get("temperature")
    kinds = [("raw", None)] + ([("calibrated", temperature)] if confidence.get("calibrated") else [])
    curves = {kind: _confidences(predictions, t) for kind, t in kinds}
    rows = []
    for kind, _ in kinds:
        m = confidence[kind]
        rows.append(
            {
                "kind": kind + (f" (T={temperature:.3f})" if kind == "calibrated" else ""),
                "cells": [
                    "-" if v is None else f"{v:.3f}"
                    for v in (m["ece"], m["ece_adaptive"], m["nll"], m["brier"], m["auroc"], m["aurc"])
                ],
                "selective": " / ".join(_pct(m["selective_accuracy"][c]) for c in ("0.80", "0.90", "0.95")),
            }
        )
    plots = [
        {"src": _reliability_diagram(c, k, f"{kind}: reliability"), "alt": f"reliability diagram, {kind}"}
        for kind, (c, k) in curves.items()
    ]
    plots.append({"src": _risk_coverage_plot(curves), "alt": "risk-coverage curve"})
    return {
        "of": confidence["of"],
        "calibrated": bool(confidence.get("calibrated")),
        "rows": rows,
        "plots": plots,
    }


def _predicted_column(prediction) -> str:
    return prediction.label if prediction.label is not None else f"({prediction.outcome})"


def _summary(results: dict) -> list[dict]:
    rows = []
    for model, by_mode in results.items():
        for mode, result in by_mode.items():
            r = result["report"]
            low, high = r.accuracy_ci95
            rows.append(
                {
                    "model": model,
                    "mode": mode,
                    "accuracy": f"{_pct(r.accuracy)} ({_pct(low)}-{_pct(high)})",
                    "macro_f1": f"{r.macro_f1:.3f}",
                    "counts": r.counts,
                    "abstained": f"{r.counts.get('abstained', 0)} ({_pct(r.coverage)})",
                    "n": r.n,
                    "adds_up": sum(r.counts.values()) == r.n,
                    "speed": f"{result['images_per_second']:.2f}",
                }
            )
    return rows


def _per_class(report, class_names: list[str]) -> list[dict]:
    rows = sorted(class_names, key=lambda name: (report.per_class[name]["f1"], name))
    return [
        {
            "name": name,
            **{k: f"{report.per_class[name][k]:.3f}" for k in ("precision", "recall", "f1")},
            "width": f"{report.per_class[name]['f1'] * 120:.0f}",
            "support": report.per_class[name]["support"],
        }
        for name in rows
    ]


def _confusion(report, class_names: list[str], section: int, shown: set[tuple[str, str]]) -> dict:
    matrix = np.asarray(report.confusion, dtype=float)
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    rows = []
    for i, gold in enumerate(class_names):
        cells = []
        for j, column in enumerate(report.confusion_columns):
            count = int(matrix[i, j])
            shade = int(255 - 180 * share[i, j])
            cells.append(
                {
                    "count": count,
                    "color": f"rgb({shade},{shade + (255 - shade) // 3},255)",
                    "link": f"g{section}-{i}-{j}" if count and i != j and (gold, column) in shown else None,
                }
            )
        rows.append({"gold": gold, "cells": cells})
    return {"columns": report.confusion_columns, "rows": rows}


def gallery_items(predictions, mode: str, limit: int) -> list:
    """The mistakes the gallery shows for one model and mode: the first `limit`, the most confident
    first in score mode (evaluation makes thumbnails for exactly these)."""
    mistakes = [p for p in predictions if p.outcome != "correct"]
    if mode == "score":
        mistakes.sort(key=lambda p: -(p.confidence or 0.0))
    return mistakes[:limit]


def _gallery(
    predictions, class_names: list[str], section: int, thumbnails: dict[str, str], limit: int, mode: str
) -> tuple[dict, set[tuple[str, str]]]:
    mistakes = gallery_items(predictions, mode, limit)
    groups: dict[tuple[str, str], list] = {}
    for p in mistakes:
        groups.setdefault((p.gold, _predicted_column(p)), []).append(p)
    columns = [*class_names, "(hallucinated)", "(unparseable)", "(unreadable)"]
    gallery = {
        "shown": len(mistakes),
        "total": sum(1 for p in predictions if p.outcome != "correct"),
        "groups": [
            {
                "anchor": f"g{section}-{class_names.index(gold)}-{columns.index(predicted)}",
                "gold": gold,
                "predicted": predicted,
                "items": [
                    {
                        "id": p.id,
                        "image": thumbnails.get(p.id),
                        "confidence": None if p.confidence is None else f"{p.confidence:.3f}",
                        "detail": p.error or p.raw_answer,
                    }
                    for p in items
                ],
            }
            for (gold, predicted), items in sorted(groups.items(), key=lambda kv: -len(kv[1]))
        ],
    }
    return gallery, set(groups)


_TEMPLATE = """\
{%- macro name(value) %}<bdi>{{ value }}</bdi>{% endmacro -%}
<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>Evaluation report</title>
<style>{{ style }}</style></head><body><h1>Evaluation report</h1>
{% if facts %}<h2>Run</h2><dl class=facts>
{% for key, value in facts %}<dt>{{ key }}</dt><dd>{{ value }}</dd>
{% endfor %}</dl>
{% endif %}
<h2>Summary</h2><table><tr><th class=l>model</th><th class=l>mode</th><th>accuracy (95% CI)</th>\
<th>macro-F1</th><th>hallucinated</th><th>unparseable</th><th>unreadable</th><th>correct</th>\
<th>wrong</th><th>abstained (coverage)</th><th>n</th><th>images/s</th></tr>
{% for r in summary %}<tr><td class=l>{{ r.model }}</td><td class=l>{{ r.mode }}</td><td>{{ r.accuracy }}</td>\
<td>{{ r.macro_f1 }}</td><td>{{ r.counts.hallucinated }}</td><td>{{ r.counts.unparseable }}</td>\
<td>{{ r.counts.unreadable }}</td><td>{{ r.counts.correct }}</td><td>{{ r.counts.wrong }}</td>\
<td>{{ r.abstained }}</td><td class={{ 'ok' if r.adds_up else 'bad' }}>{{ r.n }}</td><td>{{ r.speed }}</td></tr>
{% endfor %}</table><p>Every image has exactly one outcome; the outcome columns add up to n. With abstention, \
accuracy is over the answered images, whose share is the coverage.</p>
{% for s in sections %}
<h2 id="s{{ s.id }}">{{ s.model }}, {{ s.mode }}</h2>
<h3>Confusion matrix (cells link to their examples)</h3>
<table class=cm><tr><th class=l>gold \\ predicted</th>\
{% for column in s.confusion.columns %}<th class=rot>{{ name(column) }}</th>{% endfor %}</tr>
{% for row in s.confusion.rows %}<tr><th class=l>{{ name(row.gold) }}</th>\
{% for cell in row.cells %}<td style="background:{{ cell.color }}">\
{% if cell.link %}<a href="#{{ cell.link }}">{{ cell.count }}</a>{% elif cell.count %}{{ cell.count }}{% endif %}</td>\
{% endfor %}</tr>
{% endfor %}</table>
<h3>Per class</h3>
<table><tr><th class=l>class (worst first)</th><th>precision</th><th>recall</th><th>F1</th><th class=l></th><th>support</th></tr>
{% for c in s.per_class %}<tr><td class=l>{{ name(c.name) }}</td><td>{{ c.precision }}</td><td>{{ c.recall }}</td>\
<td>{{ c.f1 }}</td><td class=l><span class=bar style="width:{{ c.width }}px"></span></td><td>{{ c.support }}</td></tr>
{% endfor %}</table>
{% if s.calibration %}{% set cal = s.calibration %}
<h3 id="c{{ s.id }}">Calibration</h3><p>confidence: {{ cal.of }}\
{% if not cal.calibrated %} (uncalibrated: no calibration.json for this adapter){% endif %}</p>
<table><tr><th class=l>confidence</th><th>expected calibration error</th><th>ECE (adaptive)</th><th>NLL</th>\
<th>Brier</th><th>AUROC</th><th>AURC</th><th>selective accuracy 80/90/95%</th></tr>
{% for row in cal.rows %}<tr><td class=l>{{ row.kind }}</td>{% for v in row.cells %}<td>{{ v }}</td>{% endfor %}\
<td>{{ row.selective }}</td></tr>
{% endfor %}</table><div class=plots>{% for plot in cal.plots %}<img src="{{ plot.src }}" alt="{{ plot.alt }}">{% endfor %}</div>
{% endif %}
<h3>Error gallery ({{ s.gallery.shown }} of {{ s.gallery.total }} mistakes shown)</h3>
{% for group in s.gallery.groups %}<h4 id="{{ group.anchor }}">{{ name(group.gold) }} &rarr; {{ name(group.predicted) }} \
({{ group['items'] | length }})</h4>
<div class=gallery>
{% for p in group['items'] %}<div class=card>\
{% if p.image %}<img src="{{ p.image }}" alt="{{ p.id }}">{% else %}<div class=noimg>no image</div>{% endif %}\
<br><b>{{ name(p.id) }}</b><br>gold {{ name(group.gold) }}<br>predicted {{ name(group.predicted) }}\
{% if p.confidence is not none %}<br>confidence {{ p.confidence }}{% endif %}<pre>{{ p.detail }}</pre></div>
{% endfor %}</div>
{% endfor %}
{% endfor %}
</body></html>
"""


def _template():
    import jinja2

    environment = jinja2.Environment(
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, keep_trailing_newline=True
    )
    return environment.from_string(_TEMPLATE)


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
    sections = []
    for model, by_mode in results.items():
        for mode, result in by_mode.items():
            report = result["report"]
            section = len(sections) + 1
            gallery, shown = _gallery(
                predictions[(model, mode)], class_names, section, thumbnails, gallery_limit, mode
            )
            calibrated = report.confidence and "ece" in report.confidence["raw"]
            sections.append(
                {
                    "id": section,
                    "model": model,
                    "mode": mode,
                    "confusion": _confusion(report, class_names, section, shown),
                    "per_class": _per_class(report, class_names),
                    "calibration": _confidence_section(report, predictions[(model, mode)])
                    if calibrated
                    else None,
                    "gallery": gallery,
                }
            )
    return _template().render(
        style=_STYLE, facts=list((facts or {}).items()), summary=_summary(results), sections=sections
    )
