"""The data audit's files: audit.json (every finding), audit.md, audit.html (self-contained: the
duplicate groups side by side as thumbnails with labels and splits, likely label errors as a gallery,
most likely first) and exclude.txt, written whole or not at all."""

from __future__ import annotations

import json
from pathlib import Path

from pixtral_lora.data.audit import split_entries
from pixtral_lora.data.images import ImageError, encode_data_uri, load_image
from pixtral_lora.data.loaders import Splits, image_source

AUDIT_FILES = ("audit.json", "audit.md", "audit.html", "exclude.txt")
KIND = "data audit"
SHOWN_GROUPS = 150  # groups drawn in audit.html (all of them are in audit.json)
SHOWN_CANDIDATES = 120  # label-error candidates drawn per ranking
THUMBNAIL = 128


def _label_error_lines(errors: dict) -> list[str]:
    lines = [
        "",
        "## Likely label errors",
        "",
        f"{errors['method']}; model {errors['model']}; {errors['temperature_note']}.",
    ]
    for key, title in (
        ("out_of_sample", "Validation and test (out of sample)"),
        ("in_sample", "Train (in sample)"),
    ):
        found = errors[key]
        lines += [
            "",
            f"### {title}: {len(found['candidates'])} of {found['scored']} scored images "
            f"({found['unreadable']} unreadable)",
            "",
        ]
        if found["candidates"]:
            lines += [
                "| id | split | given | model | confidence | label quality |",
                "|---|---|---|---|---|---|",
            ]
            lines += [
                f"| `{c['id']}` | {c['split']} | {c['given']} | {c['model']} | {c['confidence']:.3f} | "
                f"{c['label_quality']:.3f} |"
                for c in found["candidates"]
            ]
    return lines


def _problem_line(problem: dict) -> str:
    field = f" [{problem['field']}]" if problem["field"] else ""
    return f"- {problem['severity']}: {problem['where']}{field}: {problem['message']}"


def markdown(findings: dict, dataset: str) -> str:
    counts = findings["counts"]
    splits = list(findings["class_balance"]["per_split"])
    lines = [
        f"# Data audit of {dataset}",
        "",
        f"{findings['images']} images ({', '.join(f'{k} {v}' for k, v in findings['splits'].items())}), "
        f"{len(findings['classes'])} classes.",
        f"Exact: {findings['method']['exact']}. Near: {findings['method']['near']}.",
        "",
        "| finding | groups |",
        "|---|---|",
        *[f"| {k} | {counts[k]} |" for k in ("exact", "near", "redundant", "conflicting", "leak")],
        "",
        f"Test images with a twin in train or validation: {counts['leaked_test_images']}. "
        f"Unreadable images: {counts['unreadable']} (named in the validator's findings below). Ids in exclude.txt: {len(findings['exclude'])}.",
        "",
        "## Classes",
        "",
        f"Largest class over smallest: {findings['class_balance']['imbalance']}.",
        "",
        f"| class | images | {' | '.join(splits)} |",
        f"|---|---|{'---|' * len(splits)}",
        *[
            f"| {name} | {count} | "
            + " | ".join(str(findings["class_balance"]["per_split"][k].get(name, 0)) for k in splits)
            + " |"
            for name, count in findings["classes"].items()
        ],
        "",
        "Sizes: " + ", ".join(f"{k} ({v})" for k, v in findings["sizes"].items()) + ".",
        "Modes (file headers): " + ", ".join(f"{k} ({v})" for k, v in findings["modes"].items()) + ".",
        "",
        "## Groups",
        "",
    ]
    for number, found in enumerate(findings["groups"], 1):
        members = ", ".join(f"`{m['id']}` ({m['label']}, {m['split']})" for m in found["members"])
        lines.append(f"{number}. {' '.join(found['kind'])} (distance <= {found['max_distance']}): {members}")
    if findings.get("label_errors"):
        lines += _label_error_lines(findings["label_errors"])
    validator = findings.get("validator")
    if validator:
        lines += [
            "",
            f"## Validator (`pixtral-lora data validate`): {validator['errors']} error(s), "
            f"{validator['warnings']} warning(s)",
            "",
        ]
        lines += [_problem_line(p) for p in validator["problems"]]
    return "\n".join(lines) + "\n"


def _shown(findings: dict) -> tuple[list[dict], dict[str, list[dict]]]:
    errors = findings.get("label_errors") or {}
    return findings["groups"][:SHOWN_GROUPS], {
        key: errors[key]["candidates"][:SHOWN_CANDIDATES]
        for key in ("out_of_sample", "in_sample")
        if key in errors
    }


def thumbnails(findings: dict, splits: Splits, edge: int = THUMBNAIL) -> dict[str, str]:
    """Image id -> JPEG data URI of a small copy, for every image audit.html shows."""
    groups, candidates = _shown(findings)
    wanted = {m["id"] for g in groups for m in g["members"]}
    wanted |= {c["id"] for found in candidates.values() for c in found}
    entries, sources = split_entries(splits)
    found: dict[str, str] = {}
    for entry, source in zip(entries, sources, strict=True):
        if entry.id in wanted and entry.id not in found:
            try:
                image = load_image(image_source(source))
            except ImageError:
                continue
            image.thumbnail((edge, edge))
            found[entry.id] = encode_data_uri(image)
    return found


_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1b1b1b;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}
.group{border:1px solid #ddd;margin:10px 0;padding:6px}.group h3{font-size:13px;margin:0 0 6px}
.row{display:flex;flex-wrap:wrap;gap:8px}.card{width:140px;font-size:11px;overflow-wrap:anywhere}
.card img{width:128px;height:auto}.noimg{width:128px;height:80px;background:#eee;display:flex;
align-items:center;justify-content:center;color:#777}.tag{display:inline-block;padding:0 5px;margin-right:3px;
border-radius:3px;background:#eef;font-size:11px}.tag.leak,.tag.conflicting{background:#fdd}.bad{color:#b42318}
"""

_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Data audit of {{ dataset }}</title>
<style>{{ style }}</style></head><body>
<h1>Data audit of <bdi>{{ dataset }}</bdi></h1>
<p>{{ findings.images }} images ({% for k, v in findings.splits.items() %}{{ k }} {{ v }}{{ ", " if not loop.last }}{% endfor %}),
{{ findings.classes|length }} classes. Exact: {{ findings.method.exact }}. Near: {{ findings.method.near }}.</p>
<table><tr><th class="l">finding</th><th>count</th></tr>
{% for name, value in counts %}<tr><td class="l">{{ name }}</td><td>{{ value }}</td></tr>
{% endfor %}</table>
<h2>Classes</h2>
<p>Largest class over smallest: {{ findings.class_balance.imbalance }}. Sizes: {% for k, v in findings.sizes.items() %}{{ k }} ({{ v }}){{ ", " if not loop.last }}{% endfor %}.
Modes (file headers): {% for k, v in findings.modes.items() %}{{ k }} ({{ v }}){{ ", " if not loop.last }}{% endfor %}.</p>
<table><tr><th class="l">class</th><th>images</th>{% for k in findings.class_balance.per_split %}<th>{{ k }}</th>{% endfor %}<th class="l"></th></tr>
{% for name, count in findings.classes.items() %}<tr><td class="l">{{ name }}</td><td>{{ count }}</td>
{% for k, per in findings.class_balance.per_split.items() %}<td>{{ per.get(name, 0) }}</td>{% endfor %}
<td class="l"><span style="display:inline-block;height:9px;background:#4c78a8;width:{{ (200 * count / most)|round(1) }}px"></span></td></tr>
{% endfor %}</table>
<h2 id="groups">Duplicate groups ({{ findings.groups|length }}{% if findings.groups|length > groups|length %}, the first {{ groups|length }} shown; all in audit.json{% endif %})</h2>
{% for g in groups %}<div class="group"><h3>{{ loop.index }}. {% for k in g.kind %}<span class="tag {{ k }}">{{ k }}</span>{% endfor %}
distance &le; {{ g.max_distance }}</h3><div class="row">
{% for m in g.members %}<div class="card">{% if m.id in thumbs %}<img src="{{ thumbs[m.id] }}" alt="{{ m.id }}">{% else %}<div class="noimg">unreadable</div>{% endif %}
<div><bdi>{{ m.id }}</bdi></div><div>{{ m.label }} &middot; {{ m.split }}</div></div>
{% endfor %}</div></div>
{% else %}<p>No exact or near-duplicate images.</p>{% endfor %}
{% if errors %}<h2 id="label-errors">Likely label errors</h2>
<p>{{ errors.method }}; model <bdi>{{ errors.model }}</bdi>; {{ errors.temperature_note }}.</p>
{% for key, title in [("out_of_sample", "Validation and test (out of sample)"), ("in_sample", "Train (in sample: the model has seen these labels)")] %}
{% set found = errors[key] %}<h3>{{ title }}: {{ found.candidates|length }} of {{ found.scored }} scored images</h3>
<div class="row">{% for c in candidates[key] %}<div class="card">{% if c.id in thumbs %}<img src="{{ thumbs[c.id] }}" alt="{{ c.id }}">{% else %}<div class="noimg">unreadable</div>{% endif %}
<div>{{ loop.index }}. <bdi>{{ c.id }}</bdi> ({{ c.split }})</div><div>given <b>{{ c.given }}</b>, model <b class="bad">{{ c.model }}</b> {{ "%.0f"|format(100 * c.confidence) }}%</div><div>{{ c.flagged_by|join(", ") }}</div></div>
{% else %}<p>None flagged.</p>{% endfor %}</div>
{% endfor %}{% endif %}
{% if findings.validator %}<h2>Validator: {{ findings.validator.errors }} error(s), {{ findings.validator.warnings }} warning(s)</h2>
<ul>{% for p in findings.validator.problems %}<li class="{{ 'bad' if p.severity == 'error' }}">{{ p.severity }}: <bdi>{{ p.where }}</bdi>{% if p.field %} [{{ p.field }}]{% endif %}: {{ p.message }}</li>{% endfor %}</ul>{% endif %}
</body></html>
"""


def html(findings: dict, dataset: str, thumbs: dict[str, str] | None = None) -> str:
    """audit.html: one self-contained document (images as data URIs)."""
    import jinja2

    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True)
    groups, candidates = _shown(findings)
    counts = findings["counts"]
    return environment.from_string(_TEMPLATE).render(
        style=_STYLE,
        dataset=dataset,
        findings=findings,
        counts=[*counts.items(), ("ids in exclude.txt", len(findings["exclude"]))],
        most=max(findings["classes"].values(), default=1),
        groups=groups,
        errors=findings.get("label_errors"),
        candidates=candidates,
        thumbs=thumbs or {},
    )


def check_audit_out(out: str | Path, overwrite: bool = False) -> None:
    """Refuse, before any work, an --out the audit may not replace."""
    from pixtral_lora.outputs import check_replaceable

    check_replaceable(Path(out), AUDIT_FILES, overwrite, KIND)


def write_audit(
    findings: dict, dataset: str, out: str | Path, overwrite: bool = False, splits: Splits | None = None
) -> Path:
    """audit.json, audit.md, audit.html (thumbnails from `splits`) and exclude.txt in `out`."""
    from pixtral_lora.outputs import atomic_directory

    thumbs = thumbnails(findings, splits) if splits is not None else {}
    with atomic_directory(out, AUDIT_FILES, overwrite, kind=KIND) as tmp:
        (tmp / "audit.json").write_text(json.dumps(findings, indent=1), encoding="utf-8")
        (tmp / "audit.md").write_text(markdown(findings, dataset), encoding="utf-8")
        (tmp / "audit.html").write_text(html(findings, dataset, thumbs), encoding="utf-8")
        (tmp / "exclude.txt").write_text("".join(f"{i}\n" for i in findings["exclude"]), encoding="utf-8")
    return Path(out)
