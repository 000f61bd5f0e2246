from pathlib import Path

import pytest

from pixtral_lora.config.schema import ConfigError
from pixtral_lora.config.yaml_loading import load_config

ROOT = Path(__file__).resolve().parents[2]

GOOD = """\
# a run
model:
  name_or_path: some/model
data:
  path: data/aid
training:
  learning_rate: 1.0e-4
  output_dir: runs/x
"""


def _write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_valid_config_and_dotted_overrides(tmp_path):
    config = load_config(
        _write(tmp_path, GOOD), ["training.learning_rate=2e-4", "lora.r=8", "data.image_longest_edge=null"]
    )
    assert config.model.name_or_path == "some/model"
    assert config.training.learning_rate == 2e-4 and config.lora.r == 8
    assert config.data.image_longest_edge is None
    assert config.prompt.answer("Port") == '```json\n{"label": "Port"}\n```'


def test_misspelt_key_names_file_line_and_allowed_keys(tmp_path):
    path = _write(tmp_path, GOOD.replace("  learning_rate:", "  learning_rat:"))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert f"{path}:7: training.learning_rat: unknown key 'learning_rat'" in message
    assert "learning_rate" in message and "lr_scheduler_type" in message


def test_wrong_type_and_impossible_value(tmp_path):
    path = _write(tmp_path, GOOD + "lora:\n  r: many\n  dropout: 1.5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}:10: lora.r:" in str(err.value) and "'many'" in str(err.value)
    assert f"{path}:11: lora.dropout:" in str(err.value)


def test_bad_override_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"--set training.epochs=3: training.epochs: unknown key"):
        load_config(_write(tmp_path, GOOD), ["training.epochs=3"])
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(_write(tmp_path, GOOD), ["training.epochs"])


def test_missing_data_path_and_inconsistent_settings(tmp_path):
    with pytest.raises(ConfigError, match="data.path: required key is missing"):
        load_config(_write(tmp_path, "data: {}\n"))
    with pytest.raises(ConfigError, match="eval_steps needs a validation split"):
        load_config(_write(tmp_path, GOOD), ["training.eval_steps=5"])


def test_answer_template_needs_the_label_placeholder(tmp_path):
    with pytest.raises(ConfigError, match="prompt.answer_template"):
        load_config(_write(tmp_path, GOOD + "prompt:\n  answer_template: 'no placeholder'\n"))


MACHINE_SETTINGS = [
    "model.attn_implementation=flash_attention_2",
    "training.use_liger_kernel=true",
    "training.report_to=[tensorboard]",
    "training.report_to=[wandb]",
    "data.bands=[4,3,2]",
]


@pytest.mark.parametrize("setting", MACHINE_SETTINGS)
def test_a_config_is_valid_data_whatever_this_machine_has(setting, monkeypatch):
    """What a config asks of the machine is not part of its validation: a run trained with flash
    attention or a reporter opens on a machine without them (training's preflight checks them)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name != "yaml" else real(name, *a)
    )
    config = load_config(ROOT / "configs" / "tiny.yaml", [setting])
    assert config.model_dump()  # it loads, and nothing was asked of the machine
    assert "torch" not in _imported_by(
        f"from pixtral_lora.config.yaml_loading import load_config; load_config({str(ROOT / 'configs' / 'tiny.yaml')!r}, [{setting!r}])"
    )


def _imported_by(code: str) -> set[str]:
    import json
    import subprocess
    import sys

    probe = f"import sys, json; {code}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(json.loads(result.stdout.splitlines()[-1]))


def test_training_preflight_names_what_this_machine_lacks(monkeypatch):
    import importlib.util

    import torch

    from pixtral_lora.training.preflight import check_machine

    real = importlib.util.find_spec
    absent = {"flash_attn", "liger_kernel", "rasterio"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in absent else real(name, *a)
    )
    tiny = ROOT / "configs" / "tiny.yaml"
    for setting, says in [
        ("model.attn_implementation=flash_attention_2", "model.attn_implementation: .*flash-attn package"),
        ("training.use_liger_kernel=true", "training.use_liger_kernel .*liger-kernel package"),
        ("training.report_to=[nosuch]", "unknown reporter 'nosuch'"),
        ("data.bands=[4,3,2]", "data.bands/data.stretch .*rasterio"),
    ]:
        with pytest.raises(ConfigError, match=says):
            check_machine(load_config(tiny, [setting]))
    absent = set()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name in ("flash_attn", "liger_kernel") else real(name, *a),
    )
    with pytest.raises(ConfigError, match="CUDA GPUs only"):
        check_machine(load_config(tiny, ["model.attn_implementation=flash_attention_2"]))
    with pytest.raises(ConfigError, match="CUDA only"):
        check_machine(load_config(tiny, ["training.use_liger_kernel=true"]))
    check_machine(load_config(tiny, ["model.attn_implementation=eager"]))  # nothing asked: no error


@pytest.mark.parametrize(
    "setting",
    [
        "training.weight_decay=.inf",
        "training.num_train_epochs=.inf",
        "training.max_grad_norm=.nan",
        "data.stretch_percentiles=[2,.inf]",
        "lora.dropout=.nan",
    ],
)
def test_every_float_a_user_sets_is_finite(setting, tmp_path):
    """A non-finite number fails validation, named, before anything is created: training on
    weight_decay=inf used to save an all-NaN adapter with exit 0 (through `train.py`, as typed)."""
    from conftest import one_line_error, run_command, set_args

    field = setting.split("=")[0]
    result = run_command(
        ROOT / "train.py",
        ROOT / "configs" / "tiny.yaml",
        *set_args(setting, f"training.output_dir={tmp_path / 'run'}"),
    )
    assert result.returncode == 2 and "finite number" in result.stderr and field in result.stderr, (
        result.stderr[-2000:]
    )
    assert one_line_error(result).startswith("error: invalid configuration")
    assert not (tmp_path / "run").exists()
