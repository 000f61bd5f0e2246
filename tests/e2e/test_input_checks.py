"""Bad configs, numbers, adapters and generator options: one line naming what is wrong, before any
model loads, through the commands users type (train.py, convert_to_mistral.py, pixtral-lora)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from conftest import SYNTH_CLASSES, one_line_error, run_command, set_args

ROOT = Path(__file__).resolve().parents[2]


def _train(tmp_path: Path, model: Path, data: Path, *sets: str, config: Path | None = None):
    overrides = set_args(
        f"model.name_or_path={model}", f"data.path={data}", f"training.output_dir={tmp_path / 'run'}", *sets
    )
    return run_command("train.py", config or ROOT / "configs" / "tiny.yaml", *overrides)


@pytest.mark.parametrize(
    "override, says",
    [
        ("training.max_steps=0", "max_steps 0 would still train a step"),
        ("lora.target_modules=[qproj]", "lora.target_modules.0"),
        ("lora.target_modules=[]", "lora.target_modules"),
        ("training.per_device_train_batch_size=100000", "less than or equal to 1024"),
        ("eval.batch_size=0", "greater than or equal to 1"),
    ],
)
def test_impossible_config_values_are_one_line_and_leave_no_run_directory(
    override, says, tmp_path, tiny_model_dir, aid_dir
):
    result = _train(tmp_path, tiny_model_dir, aid_dir, override)
    assert one_line_error(result) == "error: invalid configuration:"  # then one line per problem
    assert says in result.stderr and f"--set {override}" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override, says",
    [
        ("training.report_to=[nosuch]", "unknown reporter 'nosuch'"),
        ("training.report_to=[wandb]", "'wandb' is not installed here"),
        ("model.attn_implementation=flash_attention_2", "flash_attention_2"),
    ],
)
def test_settings_this_machine_cannot_train_are_one_line_and_leave_no_run_directory(
    override, says, tmp_path, tiny_model_dir, aid_dir
):
    result = _train(tmp_path, tiny_model_dir, aid_dir, override)
    assert one_line_error(result) == "error: this machine cannot train this config:"  # then the problems
    assert says in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path, tiny_model_dir, aid_dir):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]  # 10^9 values
    config = tmp_path / "bomb.yaml"
    config.write_text("\n".join(lines) + "\ndata:\n  path: x\n")
    started = time.time()
    line = one_line_error(run_command("train.py", config))
    assert "bomb.yaml" in line and "aliases" in line and time.time() - started < 60


def test_a_config_that_is_not_utf8_names_its_line(tmp_path):
    config = tmp_path / "latin1.yaml"
    config.write_bytes(b"# run config\ndata:\n  path: /data/caf\xe9\n")
    line = one_line_error(run_command("train.py", config))
    assert "latin1.yaml:3: not UTF-8" in line


def test_a_failed_start_does_not_block_the_corrected_rerun(tmp_path, tiny_model_dir, aid_dir):
    run = tmp_path / "run"
    run.mkdir()
    # what a start killed before its first checkpoint leaves: its config and split, nothing trained
    (run / "config.yaml").write_text("model: {}\n")
    (run / "split.json").write_text("{}")
    result = _train(tmp_path, tiny_model_dir, aid_dir, "training.max_steps=1", "training.eval_steps=null",
                    "data.validation_size=0", "training.report_to=none")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "starting afresh" in result.stderr
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


@pytest.fixture()
def adapter_copy(tiny_run, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_run / "adapter", adapter)
    return adapter


def _convert(model: Path, adapter: Path, out: Path, *extra):
    return run_command(
        "scripts/convert_to_mistral.py", "--model", model, "--adapter", adapter, "--out", out, *extra
    )


def test_an_adapter_config_that_disagrees_with_its_tensors_is_refused(adapter_copy, tiny_model_dir, tmp_path):
    config_path = adapter_copy / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["r"] = config["r"] * 2  # the scale alpha/r would silently halve every LoRA update
    config_path.write_text(json.dumps(config))
    line = one_line_error(_convert(tiny_model_dir, adapter_copy, tmp_path / "out"))
    assert "adapter_config.json: r is" in line and "does not belong to these weights" in line
    assert not (tmp_path / "out").exists()


def test_a_truncated_adapter_or_invalid_json_is_one_line(adapter_copy, tiny_model_dir, tmp_path):
    weights = adapter_copy / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    line = one_line_error(_convert(tiny_model_dir, adapter_copy, tmp_path / "out"))
    assert "not a complete safetensors file" in line
    weights.write_bytes(data)
    (adapter_copy / "adapter_config.json").write_text('{"r": 8,')
    line = one_line_error(_convert(tiny_model_dir, adapter_copy, tmp_path / "out", "--adapter-only"))
    assert "adapter_config.json: not valid JSON" in line


def test_eval_and_predict_refuse_a_tampered_adapter_before_loading(tiny_run, aid_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoints", "eval*"))
    config_path = run / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["r"] = 3
    config_path.write_text(json.dumps(config))
    for command in (
        ["eval", run],
        ["predict", aid_dir / "Beach", "--run", run, "--out", tmp_path / "p.jsonl"],
    ):
        line = one_line_error(run_command("-m", "pixtral_lora.cli", *command))
        assert "r is 3" in line


def test_a_non_finite_or_incomplete_adapter_is_refused_by_every_command_that_loads_it(
    tiny_run, tiny_model_dir, aid_dir, tmp_path
):
    """A NaN in one LoRA tensor (a diverged run), or a lora_A without its lora_B: eval, predict, map,
    calibrate, the native export and --adapter-only all refuse it in one line naming file and tensor."""
    from safetensors.torch import load_file, save_file

    from pixtral_lora.data.synth import generate_scene_mosaic

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoints", "eval*"))
    weights = run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    poisoned = sorted(tensors)[0]
    tensors[poisoned][0, 0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    scene = tmp_path / "scene.tif"
    generate_scene_mosaic(scene, SYNTH_CLASSES, grid=(1, 1), tile=64, seed=1)
    commands = [
        ["-m", "pixtral_lora.cli", "eval", run, "--limit", "2", "--out", tmp_path / "eval"],
        ["-m", "pixtral_lora.cli", "predict", aid_dir / "Beach", "--run", run, "--out", tmp_path / "p.jsonl"],
        ["-m", "pixtral_lora.cli", "map", scene, "--run", run, "--out", tmp_path / "m.geojson", "--tile", "64"],
        ["-m", "pixtral_lora.cli", "calibrate", run],
        ["scripts/convert_to_mistral.py", "--model", tiny_model_dir, "--adapter", run / "adapter", "--out", tmp_path / "o"],
        ["scripts/convert_to_mistral.py", "--model", tiny_model_dir, "--adapter", run / "adapter", "--adapter-only",
         "--out", tmp_path / "lora"],
    ]  # fmt: skip
    for command in commands:
        line = one_line_error(run_command(*command))
        assert f"{poisoned} holds 1 non-finite values" in line, (command, line)
    assert not any((tmp_path / name).exists() for name in ("eval", "p.jsonl", "m.geojson", "o", "lora"))
    del tensors[poisoned]  # now an incomplete adapter: its partner is left without it
    save_file(tensors, weights, metadata={"format": "pt"})
    line = one_line_error(run_command(*commands[0]))
    assert "an incomplete adapter" in line


def test_max_shard_gb_must_be_positive(tiny_model_dir, tmp_path):
    result = run_command("scripts/convert_to_mistral.py", "--model", tiny_model_dir, "--out", tmp_path / "o",
                  "--max-shard-gb", "-1")  # fmt: skip
    assert "--max-shard-gb" in one_line_error(result) and not (tmp_path / "o").exists()


def test_generators_name_an_unknown_class_and_keep_foreign_rasters(tmp_path):
    line = one_line_error(
        run_command(
            "-m", "pixtral_lora.cli", "data", "generate", "--out", tmp_path / "d", "--classes", "Beach,Moon"
        )
    )
    assert "unknown synthetic class 'Moon'" in line
    line = one_line_error(
        run_command(
            "-m",
            "pixtral_lora.cli",
            "data",
            "generate-scene",
            "--out",
            tmp_path / "s.tif",
            "--classes",
            "Moon",
        )
    )
    assert "Moon" in line
    assert "--grid" in one_line_error(
        run_command(
            "-m", "pixtral_lora.cli", "data", "generate-scene", "--out", tmp_path / "s.tif", "--grid", "4by4"
        )
    )
    foreign = tmp_path / "survey.tif"
    foreign.write_bytes(b"II*\x00 someone's raster")
    line = one_line_error(run_command("-m", "pixtral_lora.cli", "data", "generate-scene", "--out", foreign))
    assert "survey.tif exists" in line and foreign.read_bytes() == b"II*\x00 someone's raster"
    scene = tmp_path / "mine.tif"
    for _ in range(2):  # its own scene is replaced
        made = run_command(
            "-m", "pixtral_lora.cli", "data", "generate-scene", "--out", scene, "--grid", "2x2"
        )
        assert made.returncode == 0, made.stderr[-2000:]


def test_validate_takes_the_configs_classes(tmp_path, aid_dir):
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  path: {aid_dir}\n  class_names: [Beach, Desert]\n")
    result = run_command("-m", "pixtral_lora.cli", "data", "validate", aid_dir, "--config", config)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "the data's classes differ" in result.stdout and "Forest" in result.stdout
    plain = run_command(
        "-m", "pixtral_lora.cli", "data", "validate", aid_dir, "--classes", ",".join(SYNTH_CLASSES)
    )
    assert plain.returncode == 0, plain.stdout[-2000:]


def test_preview_save_image_never_replaces_a_picture_it_did_not_write(tmp_path, aid_dir, tiny_model_dir):
    from PIL import Image

    photo = tmp_path / "holiday.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(photo)
    before = photo.read_bytes()
    preview = [
        "-m",
        "pixtral_lora.cli",
        "data",
        "preview",
        aid_dir,
        "--processor",
        tiny_model_dir,
        "--save-image",
    ]
    line = one_line_error(run_command(*preview, photo))
    assert "holiday.png exists" in line and photo.read_bytes() == before
    shot = tmp_path / "shot.png"
    for _ in range(2):  # its own picture is replaced
        result = run_command(*preview, shot)
        assert result.returncode == 0, result.stderr[-2000:]
    assert Image.open(shot).size == (
        304,
        304,
    )  # a 64-px scene at the default longest edge 300, in 16-px patches


def test_a_run_recorded_before_a_config_field_existed_is_still_the_same_run(tiny_run, tmp_path):
    """Runs record their config as text; a field added since (here lora.train_patch_merger, at its
    default) must not make an unchanged run 'another config', while a real difference still does."""
    from pixtral_lora.config.yaml_loading import load_config
    from pixtral_lora.errors import RunDirError
    from pixtral_lora.run.writer import recorded_split

    run = shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints"))
    recorded = (run / "config.yaml").read_text().replace(str(tiny_run), str(run))
    assert "  train_patch_merger: false\n" in recorded
    (run / "config.yaml").write_text(recorded.replace("  train_patch_merger: false\n", ""))
    config = load_config(run / "config.yaml")  # today's schema: the field back at its default
    assert recorded_split(config) == json.loads((run / "split.json").read_text())
    (run / "config.yaml").write_text(recorded.replace("  r: 16\n", "  r: 8\n"))
    with pytest.raises(RunDirError, match="holds a run with a different config"):
        recorded_split(config)
