"""A run opens on any machine: settings that ask for a GPU box's packages (flash attention, a
reporter) are training's business, not eval's, predict's, map's or calibrate's."""

from __future__ import annotations

import json
import shutil

import yaml
from conftest import SYNTH_CLASSES, run_cli


def test_a_run_trained_with_flash_attention_and_wandb_evaluates_predicts_maps_and_calibrates_here(
    tiny_run, aid_dir, tmp_path
):
    import importlib.util

    from pixtral_lora.data.synth import generate_scene_mosaic

    assert importlib.util.find_spec("flash_attn") is None and importlib.util.find_spec("wandb") is None
    run = shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints", "eval*"))
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    recorded["model"]["attn_implementation"] = "flash_attention_2"  # as a GPU box's run records them
    recorded["training"]["report_to"] = ["wandb", "tensorboard"]
    (run / "config.yaml").write_text(yaml.safe_dump(recorded, sort_keys=False))

    evaluated = run_cli("eval", run, "--modes", "score", "--models", "finetuned", "--limit", "4")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "flash_attention_2 cannot run here" in evaluated.stderr  # and it says which kernel it used
    assert json.loads((run / "eval" / "report.json").read_text())

    calibrated = run_cli("calibrate", run, "--limit", "4")
    assert calibrated.returncode == 0, calibrated.stderr[-3000:]

    predicted = run_cli("predict", aid_dir / "Beach", "--run", run, "--out", tmp_path / "p.jsonl")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == len(list((aid_dir / "Beach").iterdir()))

    scene = tmp_path / "scene.tif"
    generate_scene_mosaic(scene, SYNTH_CLASSES, grid=(2, 2), tile=64, seed=3)
    mapped = run_cli("map", scene, "--run", run, "--out", tmp_path / "m.geojson", "--tile", 64)
    assert mapped.returncode == 0, mapped.stderr[-3000:]
    assert len(json.loads((tmp_path / "m.geojson").read_text())["features"]) >= 1
