"""Hub datasets through the commands users type: `hf://OWNER/NAME` from the HF cache while offline,
and every label checked against its class list (the Hub's -1, out-of-range ids, nulls)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import SYNTH_CLASSES, one_line_error, run_command, set_args
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _hub_cache_dataset(
    hf_home: Path,
    repo: str,
    labels: list,
    names: list[str] | None,
    holes: tuple[int, ...] = (),
    copies: dict[int, int] | None = None,
) -> Path:
    """Parquet written by `datasets` and laid out as the Hub client caches a dataset repository:
    hub/datasets--OWNER--NAME/{refs/main, snapshots/SHA/data/train-00000-of-00001.parquet}.
    `names`: a ClassLabel column; None: the labels as they are (strings or plain integers);
    `copies`: row -> the row whose image it repeats, byte for byte."""
    from datasets import ClassLabel, Dataset, Features, Value
    from datasets import Image as ImageFeature

    if names:
        label_feature = ClassLabel(names=names)
    else:
        label_feature = Value("string") if isinstance(labels[0], str) else Value("int64")
    features = Features({"image": ImageFeature(), "label": label_feature})
    rows = [{"image": {"bytes": _png(i), "path": None}, "label": label} for i, label in enumerate(labels)]
    for row in holes:
        rows[row]["image"] = None
    for row, of in (copies or {}).items():
        rows[row]["image"] = {"bytes": _png(of), "path": None}
    repo_dir = hf_home / "hub" / f"datasets--{repo.replace('/', '--')}"
    data = repo_dir / "snapshots" / SNAPSHOT / "data"
    data.mkdir(parents=True)
    Dataset.from_list(rows, features=features).to_parquet(str(data / "train-00000-of-00001.parquet"))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(SNAPSHOT)
    return repo_dir


def _run(args: list, env: dict):
    return run_command(*args, env=env)


def _offline_env(hf_home: Path) -> dict:
    return {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory):
    """An HF_HOME whose hub cache holds owner/scenes (ClassLabel) and owner/unlabelled (-1 rows)."""
    home = tmp_path_factory.mktemp("hf-home")
    labels = [i % len(SYNTH_CLASSES) for i in range(24)]
    _hub_cache_dataset(home, "owner/scenes", labels, SYNTH_CLASSES)
    _hub_cache_dataset(home, "owner/unlabelled", [0, 1, -1, 2, 3, -1, 0, 1, 2, 3], SYNTH_CLASSES)
    _hub_cache_dataset(home, "owner/numbers", [0, 1, 2, 7, 3, 0], None)
    _hub_cache_dataset(home, "owner/holes", [0, 1, 2, 3, 0, 1, 2, 3], SYNTH_CLASSES, holes=(1,))
    _hub_cache_dataset(home, "owner/strings", ["Beach", "Desert", "Beach", "Moon", "Desert", "Beach"], None)
    _hub_cache_dataset(home, "owner/copies", labels, SYNTH_CLASSES, copies={5: 0})  # 0: Beach, 5: Desert
    return home


def test_audit_reads_a_cached_hub_dataset_and_its_parquet_file(hub_home, tmp_path):
    parquet = next((hub_home / "hub" / "datasets--owner--copies").rglob("*.parquet"))
    for source in ("hf://owner/copies", parquet):
        out = tmp_path / ("hub" if str(source).startswith("hf://") else "parquet")
        result = _run(
            ["-m", "pixtral_lora.cli", "data", "audit", source, "--out", out], _offline_env(hub_home)
        )
        assert result.returncode == 0, result.stderr[-3000:]
        findings = json.loads((out / "audit.json").read_text())
        assert findings["images"] == 24 and findings["classes"] == dict.fromkeys(SYNTH_CLASSES, 6)
        (copied,) = [g for g in findings["groups"] if "exact" in g["kind"]]
        assert "conflicting" in copied["kind"] and {m["label"] for m in copied["members"]} == {
            "Beach",
            "Desert",
        }


def test_validate_reads_a_cached_hub_dataset_offline(hub_home):
    result = _run(["-m", "pixtral_lora.cli", "data", "validate", "hf://owner/scenes"], _offline_env(hub_home))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "hf://owner/scenes: 0 error(s)" in result.stdout


@pytest.mark.slow  # trains a model
def test_train_py_trains_on_a_cached_hub_dataset_offline(hub_home, tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = _run(
        [
            "train.py",
            "configs/tiny.yaml",
            *set_args(
                "data.path=hf://owner/scenes",
                f"model.name_or_path={tiny_model_dir}",
                f"training.output_dir={run_dir}",
                "training.max_steps=1",
                "training.eval_steps=null",
                "data.validation_size=0",
                "data.test_size=0.25",
                "training.report_to=none",
            ),
        ],
        _offline_env(hub_home),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    split = json.loads((run_dir / "split.json").read_text())
    assert split["class_names"] == SYNTH_CLASSES
    assert len(split["ids"]["train"]) + len(split["ids"]["test"]) == 24
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_an_uncached_hub_dataset_is_one_line_naming_the_id_and_the_cache(hub_home):
    result = _run(["-m", "pixtral_lora.cli", "data", "validate", "hf://owner/absent"], _offline_env(hub_home))
    line = one_line_error(result)
    assert "hf://owner/absent" in line and str(hub_home / "hub") in line


def test_validate_lists_every_label_that_names_no_class(hub_home):
    result = _run(
        ["-m", "pixtral_lora.cli", "data", "validate", "hf://owner/unlabelled"], _offline_env(hub_home)
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "[train:2] [label]: label: no label (-1" in result.stdout
    assert "[train:5] [label]: label: no label (-1" in result.stdout
    assert "2 error(s)" in result.stdout
    numbers = _run(
        [
            "-m",
            "pixtral_lora.cli",
            "data",
            "validate",
            "hf://owner/numbers",
            "--classes",
            ",".join(SYNTH_CLASSES),
        ],
        _offline_env(hub_home),
    )
    assert numbers.returncode == 1, numbers.stderr[-3000:]
    assert "[train:3] [label]: label: 7 is outside the 4 classes" in numbers.stdout


def test_validate_checks_string_labels_against_classes(hub_home):
    result = _run(
        ["-m", "pixtral_lora.cli", "data", "validate", "hf://owner/strings", "--classes", "Beach,Desert"],
        _offline_env(hub_home),
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "[train:3] [label]: label: 'Moon' is not one of the 2 classes" in result.stdout


@pytest.mark.slow  # trains a model
def test_training_on_unlabelled_rows_is_one_line_naming_the_row(hub_home, tiny_model_dir, tmp_path):
    result = _run(
        [
            "train.py",
            "configs/tiny.yaml",
            *set_args(
                "data.path=hf://owner/unlabelled",
                f"training.output_dir={tmp_path / 'run'}",
                f"model.name_or_path={tiny_model_dir}",
            ),
        ],
        _offline_env(hub_home),
    )
    line = one_line_error(result)
    assert "[train:2] label: no label (-1" in line and "2 row(s)" in line
    assert not (tmp_path / "run").exists()


def test_a_minus_one_label_never_becomes_the_last_class(hub_home, monkeypatch):
    from pixtral_lora.data.hf import load_hf_splits
    from pixtral_lora.errors import DataError

    for key, value in _offline_env(hub_home).items():
        monkeypatch.setenv(key, value)
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_home / "hub"))  # read when imported
    with pytest.raises(DataError, match=r"\[train:2\] label: no label \(-1"):
        load_hf_splits("hf://owner/unlabelled")
    bad: list = []
    splits, names = load_hf_splits("hf://owner/unlabelled", bad_labels=bad)
    assert [row for _, row, _ in bad] == [2, 5]
    assert splits["train"]["id"] == [f"train/{row}" for row in (0, 1, 3, 4, 6, 7, 8, 9)]
    labels = [names[i] for i in splits["train"]["label"]]
    assert labels == ["Beach", "Desert", "Forest", "Port", "Beach", "Desert", "Forest", "Port"]


def test_validate_names_a_null_image_by_split_and_row(hub_home):
    result = _run(["-m", "pixtral_lora.cli", "data", "validate", "hf://owner/holes"], _offline_env(hub_home))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "[train:1] [image]: no image (the image cell is null)" in result.stdout
    assert "1 error(s)" in result.stdout


def test_a_null_image_is_an_unreadable_image_not_a_traceback():
    from pixtral_lora.data.images import ImageError
    from pixtral_lora.data.loaders import image_source

    with pytest.raises(ImageError, match="null"):
        image_source(None)
