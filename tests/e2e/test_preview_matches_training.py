"""`data preview --config` shows exactly the sample `train.py` trains on, for every label style."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from conftest import ROOT, run_cli, run_command


@pytest.mark.parametrize("label_style, labels", [("folder", ["pine_forest", "sandy_beach"]),
                                                 ("readable", ["Pine Forest", "Sandy Beach"])])  # fmt: skip
def test_preview_shows_the_labels_and_ids_training_uses(
    label_style, labels, aid_dir, tiny_model_dir, tmp_path
):
    from pixtral_lora.config.yaml_loading import load_config
    from pixtral_lora.data.loaders import as_conversations
    from pixtral_lora.data.splits import load_run_data
    from pixtral_lora.model.loading import load_processor
    from pixtral_lora.model.render import Renderer

    data = tmp_path / "data"
    shutil.copytree(aid_dir / "Beach", data / "sandy_beach")
    shutil.copytree(aid_dir / "Forest", data / "pine_forest")
    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    config["model"]["name_or_path"] = str(tiny_model_dir)
    config["data"].update(path=str(data), label_style=label_style, image_longest_edge=64)
    config["training"].update(output_dir=str(tmp_path / "run"), max_steps=1, report_to="none")
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))

    shown = run_cli("data", "preview", data, "--index", 0, "--ids", "--config", config_path,
                    "--processor", tiny_model_dir)  # fmt: skip
    assert shown.returncode == 0, shown.stderr[-2000:]
    view = json.loads(shown.stdout.strip().splitlines()[-1])

    trained = run_command("train.py", config_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split["class_names"] == labels and view["label"] in labels

    run_config = load_config(config_path)
    run_data = load_run_data(run_config, split)  # the recorded split: what train.py used
    renderer = Renderer(load_processor(tiny_model_dir), run_config.data.image_longest_edge)
    for part in (run_data.splits.train, run_data.splits.validation, run_data.splits.test):
        for row in as_conversations(part, run_config.prompt, run_data.class_names) if part else []:
            if row["id"] == view["id"]:
                sample = renderer.render_row(row)
                assert view["input_ids"] == sample["input_ids"] and view["labels"] == sample["labels"]
                assert row["label"] == view["label"]
                return
    pytest.fail(f"{view['id']} is in none of the run's splits")
