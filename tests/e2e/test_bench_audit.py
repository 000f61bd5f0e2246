"""scripts/bench_audit.py, small: the held-out transformations are audited through the CLI and the
figures land in the results file it names."""

from __future__ import annotations

import json

from conftest import run_command


def test_bench_audit_measures_recall_and_precision_on_held_out_copies(tmp_path):
    out = tmp_path / "results.json"
    result = run_command(
        "scripts/bench_audit.py", "--bases-per-class", "2", "--timing-images", "48", "--out", out
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    held_out = figures["held_out"]
    assert held_out["bases"] == 16 and held_out["images"] == 16 * 13  # 8 classes, 12 copies each
    designed = [r for r in held_out["recall"].values() if r["designed"]]
    assert all(r["of"] == 16 for r in held_out["recall"].values())
    assert sum(r["found"] for r in designed) / sum(r["of"] for r in designed) == held_out["recall_designed"]
    assert held_out["recall_designed"] >= 0.9  # what the audit is built to catch, on copies it never saw
    assert held_out["recall"]["mirror"]["found"] == 0  # a phash is not mirror-invariant: reported, not hidden
    timing = figures["timing"]
    assert timing["images"] == 48 and all(r["peak_rss_mb"] > 0 for r in timing["by_workers"].values())
    assert len({r["groups"] for r in timing["by_workers"].values()}) == 1  # workers change the time only
    assert not list(tmp_path.glob(".*partial*"))
