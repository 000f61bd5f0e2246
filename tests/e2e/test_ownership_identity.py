"""Issue 25 §1-2: outputs never replace what they were made from; a run is opened only as trained.

Through the commands a user types: the marker every output directory carries, outputs inside/above
their inputs, and a run whose base, config.yaml or held-out images changed since training.
"""

import hashlib
import json
import shutil

from conftest import ROOT, one_line_error, run_cli, run_command, set_args


def _digest(folder):
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".pixtral-lora-output.json"]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_an_output_never_replaces_its_input_or_another_commands_output(tiny_model_dir, tmp_path):
    model = tmp_path / "base"
    shutil.copytree(tiny_model_dir, model)
    before = _digest(model)
    line = one_line_error(run_cli("dequantize", model, "--out", model))
    assert "is the --model checkpoint itself" in line
    line = one_line_error(run_cli("dequantize", model, "--out", model / "copy", "--overwrite"))
    assert "lies inside the --model checkpoint" in line
    line = one_line_error(run_cli("dequantize", model, "--out", tmp_path, "--overwrite"))
    assert "holds the --model checkpoint" in line
    assert _digest(model) == before and not (model / "copy").exists()

    copy = tmp_path / "copy"
    assert run_cli("dequantize", model, "--out", copy, "--dtype", "float32").returncode == 0
    marker = json.loads((copy / ".pixtral-lora-output.json").read_text())
    assert marker["kind"] == "HF checkpoint" and "dequantize" in marker["command"]
    copied = _digest(copy)
    line = one_line_error(run_cli("tiny-model", "--out", copy))  # another command's output
    assert "kind: HF checkpoint" in line and "--overwrite" in line
    (model / ".pixtral-lora-output.json").unlink(missing_ok=True)  # a checkpoint of someone else's
    line = one_line_error(run_cli("tiny-model", "--out", model))
    assert "not written by pixtral-lora" in line
    assert _digest(copy) == copied and _digest(model) == before


def test_an_export_refuses_to_write_over_the_runs_own_adapter(tiny_run, tiny_model_dir):
    adapter = tiny_run / "adapter"
    before = _digest(adapter)
    script = ROOT / "scripts" / "convert_to_mistral.py"
    line = one_line_error(
        run_command(script, "--adapter", adapter, "--adapter-only", "--out", adapter, "--overwrite")
    )
    assert "is the --adapter itself" in line
    line = one_line_error(
        run_command(script, "--model", tiny_model_dir, "--format", "hf", "--out", tiny_model_dir)
    )
    assert "is the --model checkpoint itself" in line
    assert _digest(adapter) == before


def _eval(run, *extra):
    return run_cli("eval", run, "--limit", "2", "--models", "finetuned", "--modes", "score", *extra)


def test_a_run_whose_config_or_data_changed_is_refused_or_forced(tiny_run, learn_data_dir, tmp_path):
    run, data = tmp_path / "run", tmp_path / "data"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("eval*", "checkpoints"))
    shutil.copytree(learn_data_dir, data)
    config = run / "config.yaml"
    text = config.read_text()
    config.write_text(text.replace(str(learn_data_dir), str(data)))  # data moved: not a change
    test_id = json.loads((run / "split.json").read_text())["ids"]["test"][0]
    assert _eval(run, "--out", tmp_path / "ok").returncode == 0

    config.write_text(config.read_text().replace("dtype: float32", "dtype: bfloat16"))
    line = one_line_error(_eval(run))
    assert "model.dtype" in line and "--force" in line
    config.write_text(text.replace(str(learn_data_dir), str(data)))

    other = next(p for p in (data).rglob("*.jpg") if p.parent.name != test_id.split("/")[0])
    shutil.copyfile(other, data / test_id)  # a test image replaced under the run
    line = one_line_error(_eval(run))
    assert "test split's images" in line and "--force" in line
    result = _eval(run, "--force", "--out", tmp_path / "forced")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "forced" / "report.json").read_text())
    assert any("test split's images" in w for w in report["warnings"])
    assert "**Warning:**" in (tmp_path / "forced" / "report.md").read_text()


def test_the_shipped_tekken_must_be_the_checkpoints_own(tiny_mistral3_dir, tmp_path):
    """`convert_to_mistral.py --tekken`: a file that is missing or not a tekken, a tekken whose image
    settings are another family's (Pixtral-12B's v3 file in a Mistral3 export), or whose version is not
    the checkpoint's, is refused in one line and nothing is written; the checkpoint's own is taken."""
    script = ROOT / "scripts" / "convert_to_mistral.py"
    own = json.loads((tiny_mistral3_dir / "tekken.json").read_text())
    older = tmp_path / "older.json"  # the right vocabulary and image block, an older version
    older.write_text(json.dumps({**own, "config": {**own["config"], "version": "v7"}}))
    not_tekken = tmp_path / "notes.json"
    not_tekken.write_text(json.dumps({"notes": "mine"}))
    cases = {
        tmp_path / "missing.json": "no such file",
        not_tekken: "not a tekken tokenizer file",
        ROOT / "src" / "pixtral_lora" / "__init__.py": "not a tekken tokenizer file",
        older: f"tokenizer version v7, but {tiny_mistral3_dir} was released with {own['config']['version']}",
    }
    from pixtral_lora.model.loading import tekken_path

    cases[tekken_path()] = "image_patch_size 16 (config.json: 14)"
    for tekken, named in cases.items():
        out = tmp_path / "export"
        result = run_command(script, "--model", tiny_mistral3_dir, "--out", out,
                             "--tekken", tekken, "--dtype", "float32")  # fmt: skip
        line = one_line_error(result)
        assert named in line and "--tekken" in line, (tekken, line)
        assert not out.exists()
    result = run_command(script, "--model", tiny_mistral3_dir, "--out", tmp_path / "ok",
                         "--tekken", tiny_mistral3_dir / "tekken.json", "--dtype", "float32")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "ok" / "tekken.json").read_text())["config"] == own["config"]


def test_resuming_from_another_familys_checkpoint_is_one_line(
    tiny_run, tiny_model_dir, tiny_mistral3_dir, aid_dir, tmp_path
):
    """`train.py --resume` a Pixtral run's checkpoint on a Mistral3 base (its base_model.json names
    the family), or a checkpoint without one whose LoRA rank is not the config's (its tensors are
    compared with the model's): one line, before the Trainer reads the optimizer state."""
    checkpoint = sorted((tiny_run / "checkpoints").glob("checkpoint-*"))[-1]
    assert json.loads((checkpoint / "base_model.json").read_text())["family"] == "pixtral"

    def resume(model, checkpoint, *overrides):
        run = tmp_path / "run"
        result = run_command(ROOT / "train.py", ROOT / "configs" / "tiny.yaml", "--resume", checkpoint,
                             *set_args(f"model.name_or_path={model}", f"data.path={aid_dir}",
                                       f"training.output_dir={run}", "training.report_to=none",
                                       "training.max_steps=1", "data.test_size=0.3",
                                       "data.validation_size=0.2", *overrides))  # fmt: skip
        line = one_line_error(result)
        assert not run.exists()
        return line

    line = resume(tiny_mistral3_dir, checkpoint)
    assert f"--resume {checkpoint}: it trained a pixtral model and {tiny_mistral3_dir} is a mistral3" in line
    assert "--resume never" in line
    older = shutil.copytree(checkpoint, tmp_path / "checkpoint-1")  # written before checkpoints had one
    (older / "base_model.json").unlink()
    rank = json.loads((checkpoint / "adapter_config.json").read_text())["r"]
    line = resume(tiny_model_dir, older, f"lora.r={rank * 2}", f"lora.alpha={rank * 4}")
    assert f"its adapter was not trained on {tiny_model_dir} with this LoRA config" in line
    assert "of other shapes" in line
