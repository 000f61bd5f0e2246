"""report.html: self-contained, numbers equal report.json, images decode, untrusted text escaped."""

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from PIL import Image

from pixtral_lora.classify.prediction import Prediction
from pixtral_lora.evaluation.metrics import summarise
from pixtral_lora.evaluation.report_html import render_html

HOSTILE = "<script>alert(1)</script>"


class _Page(HTMLParser):
    """Collects what a test needs: text, tags, img sources, link targets and ids."""

    def __init__(self):
        super().__init__()
        self.text, self.tags, self.images, self.links, self.ids = [], [], [], [], set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "a" and "href" in attrs:
            self.links.append(attrs["href"])
        if "id" in attrs:
            self.ids.add(attrs["id"])

    def handle_data(self, data):
        self.text.append(data)


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def _thumbnail() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), (200, 30, 30)).save(buffer, format="JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_untrusted_class_names_and_answers_are_escaped():
    classes = ["Forest", HOSTILE]
    predictions = [
        Prediction("a.jpg", HOSTILE, f"<b>{HOSTILE}</b>", "Forest", "Forest", 0.9),
        Prediction("b.jpg", "Forest", "", None, None, error="<img src=x onerror=alert(2)>"),
        Prediction("c.jpg", "Forest", '{"label": "Forest"}', "Forest", "Forest", 0.8),
    ]
    report = summarise(predictions, classes)
    results = {"finetuned": {"score": {"report": report, "images_per_second": 3.0}}}
    text = render_html(
        results, classes, {("finetuned", "score"): predictions}, {"a.jpg": _thumbnail()}, {"note": HOSTILE}
    )
    page = _parse(text)
    assert "script" not in page.tags and page.tags.count("img") == 3  # thumbnail, reliability, risk-coverage
    assert HOSTILE in "".join(page.text)  # shown as text
    assert "<img src=x" not in text and "&lt;img src=x onerror=alert(2)&gt;" in text
    # the off-diagonal cell gold=HOSTILE, predicted=Forest links to its gallery group, which exists
    assert page.links and all(link.lstrip("#") in page.ids for link in page.links)


def test_eval_writes_a_report_html_whose_numbers_equal_report_json(tiny_run, tmp_path):
    from pixtral_lora.evaluation.evaluate import EvalOptions, evaluate_run

    out = evaluate_run(
        tiny_run,
        EvalOptions(modes=["generate", "score"], limit=12, out_dir=tmp_path / "eval", gallery_limit=5),
    )
    report = json.loads((out / "report.json").read_text())
    text = (out / "report.html").read_text()
    page = _parse(text)
    shown = " ".join(" ".join(page.text).split())
    assert "http://" not in text and "https://" not in text and "script" not in page.tags  # self-contained
    for r in (r for by_mode in report["results"].values() for r in by_mode.values()):
        low, high = r["accuracy_ci95"]
        assert f"{r['accuracy']:.1%} ({low:.1%}-{high:.1%})" in shown
        assert f"{r['macro_f1']:.3f}" in shown
        assert sum(r["counts"].values()) == r["n"] == 12
    for source in page.images:  # every inlined image decodes
        assert source.startswith("data:image/")
        Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).load()
    mistakes = [
        p
        for p in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())
        if p["outcome"] != "correct"
    ]
    if mistakes:
        assert "Error gallery" in shown and len(page.images) >= 2
    assert "Calibration" in shown and "expected calibration error" in shown  # score mode
    assert "config sha256" in shown and str(tiny_run) in shown


def test_report_html_renders_in_a_headless_browser(tiny_run, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no headless browser installed (make browser installs Debian's chromium)")
    from pixtral_lora.evaluation.evaluate import EvalOptions, evaluate_run

    out = evaluate_run(
        tiny_run, EvalOptions(modes=["score"], models=("finetuned",), limit=8, out_dir=tmp_path / "eval")
    )
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--window-size=1200,900",
            f"--screenshot={shot}",
            (out / "report.html").as_uri(),
        ],
        capture_output=True,
        timeout=120,
    )
    image = Image.open(shot).convert("L")
    low, high = image.getextrema()
    assert high - low > 100  # not a blank page
    assert len(set(image.resize((120, 90)).tobytes())) > 10


def test_compare_two_runs_with_a_mcnemar_test(tiny_run, tiny_model_dir, learn_data_dir, tmp_path, capsys):
    from conftest import tiny_config
    from scipy.stats import binom

    from pixtral_lora.cli import main
    from pixtral_lora.evaluation.evaluate import EvalOptions, evaluate_run
    from pixtral_lora.training.recipe import train

    barely = train(
        tiny_config(
            tiny_model_dir,
            learn_data_dir,
            tmp_path / "barely",
            "training.max_steps=2",
            "training.learning_rate=1e-5",
            "training.eval_steps=null",
            "training.save_steps=2",
        )
    )
    for run in (tiny_run, barely):
        evaluate_run(run, EvalOptions(modes=["score"], models=("finetuned",), out_dir=run / "eval-compare"))
    out = tmp_path / "compare.html"
    args = ["compare", str(tiny_run), str(barely), "--eval", "eval-compare", "--out", str(out)]
    assert main(args) == 0
    shown = capsys.readouterr().out
    # only the config keys that differ are shown
    assert "training.learning_rate" in shown and "training.max_steps" in shown and "lora.r" not in shown
    outcomes = {}
    for run in (tiny_run, barely):
        rows = map(json.loads, (run / "eval-compare" / "predictions.jsonl").read_text().splitlines())
        outcomes[run] = {p["id"]: p["outcome"] == "correct" for p in rows}
    b = sum(outcomes[tiny_run][i] and not outcomes[barely][i] for i in outcomes[tiny_run])
    c = sum(outcomes[barely][i] and not outcomes[tiny_run][i] for i in outcomes[tiny_run])
    expected = min(1.0, 2 * binom.cdf(min(b, c), b + c, 0.5))  # exact two-sided McNemar, written out
    assert f"only the first right on {b}, only the second on {c}" in shown
    assert f"p = {expected:.3g}" in shown and expected < 0.05
    page = _parse(out.read_text())
    assert "table" in page.tags and "script" not in page.tags


_MEASURE = """<script>
const out = {overflowing: [], isolated: 0, names: 0};
for (const card of document.querySelectorAll('.card, td.l, th.l, h4')) {
  const box = card.getBoundingClientRect();
  for (const inner of card.querySelectorAll('*')) {
    if (inner.getBoundingClientRect().right > box.right + 1) { out.overflowing.push(card.className || card.tagName); break; }
  }
}
for (const name of document.querySelectorAll('bdi')) {
  out.names += 1;
  if (getComputedStyle(name).unicodeBidi === 'isolate') out.isolated += 1;
}
out.pageWidth = document.documentElement.scrollWidth;
document.title = JSON.stringify(out);
</script>"""


def test_long_and_right_to_left_class_names_stay_inside_their_boxes(tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no headless browser installed (make browser installs Debian's chromium)")
    import re

    long_name = "IndustrialAndCommercialUnitsWithAssociatedInfrastructureAndParkingAreas" * 2
    hebrew, arabic = "שדה תעופה", "منطقة سكنية كثيفة"
    classes = [long_name, hebrew, arabic]
    predictions = [
        Prediction(f"{i}-{'x' * 90}.jpg", gold, "", predicted, predicted, 0.5)
        for i, (gold, predicted) in enumerate(
            [(long_name, hebrew), (hebrew, arabic), (arabic, long_name)] * 2
        )
    ]
    report = summarise(predictions, classes)
    results = {"finetuned": {"score": {"report": report, "images_per_second": 1.0}}}
    text = render_html(results, classes, {("finetuned", "score"): predictions}, {})
    for name in classes:
        assert f"<bdi>{name}</bdi>" in text  # every class name isolated from the text around it
    page = tmp_path / "report.html"
    page.write_text(text.replace("</body>", _MEASURE + "</body>"), encoding="utf-8")
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,900", "--dump-dom",
         page.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    found = re.search(r"<title>(\{.*?\})</title>", dom)
    assert found, dom[:500]
    measured = json.loads(found.group(1).replace("&quot;", '"'))
    assert measured["overflowing"] == []
    assert measured["names"] > 0 and measured["isolated"] == measured["names"]
    assert measured["pageWidth"] <= 1200
