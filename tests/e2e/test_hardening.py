"""Hostile input, kills, full disks and concurrent runs: no lost work, no reads outside the dataset,
one-line errors. One test (or more) per class of failure found in the hardening run."""

import base64
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SYNTH_CLASSES, one_line_error, run_cli, run_command, tiny_config
from PIL import Image

from pixtral_lora.cli import main
from pixtral_lora.errors import DataError, RunDirError
from pixtral_lora.outputs import OutputError

ROOT = Path(__file__).resolve().parents[2]


def _png(path: Path, color=(10, 120, 30), size=32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return path


def _run(*args, **kwargs):
    return subprocess.run(
        [sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT, **kwargs
    )


def _one_line_error(result) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


def _quick(model_dir, data_dir, out, *extra):
    return tiny_config(
        model_dir,
        data_dir,
        out,
        "training.max_steps=2",
        "training.save_steps=1",
        "training.eval_steps=null",
        "data.validation_size=0",
        "training.logging_steps=1",
        *extra,
    )


# ---------------------------------------------------------------------------------------------------
# 1. A kill while a checkpoint is written


def test_resume_skips_a_checkpoint_killed_while_being_saved(tiny_model_dir, aid_dir, tmp_path, caplog):
    from pixtral_lora.training.recipe import train

    config = _quick(tiny_model_dir, aid_dir, tmp_path / "run")
    run = train(config)
    # What a SIGKILL between the adapter and trainer_state.json leaves: the adapter, no state.
    newest = run / "checkpoints" / "checkpoint-2"
    (newest / "trainer_state.json").unlink()
    shutil.rmtree(run / "adapter")
    with caplog.at_level("WARNING"):
        train(config)  # before: FileNotFoundError trainer_state.json, on every rerun
    assert "incomplete checkpoint" in caplog.text and "checkpoint-2" in caplog.text
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (newest / "trainer_state.json").is_file()  # step 2 was trained again and saved whole
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["step"] for r in records if "loss" in r]
    assert sorted(losses) == sorted(set(losses)) == [1, 2]  # no step logged twice


def test_last_checkpoint_is_the_newest_complete_one(tmp_path):
    from pixtral_lora.run.writer import last_checkpoint

    for step, state in ((5, "{}"), (10, "{}"), (15, None), (20, '{"trunc')):
        folder = tmp_path / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"x")
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    assert last_checkpoint(tmp_path).name == "checkpoint-10"  # numeric order: 10 is newer than 5
    assert (tmp_path / "checkpoints" / "checkpoint-20").exists()
    assert last_checkpoint(tmp_path, remove_incomplete=True).name == "checkpoint-10"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-10", "checkpoint-5"]


def test_resume_from_a_missing_or_incomplete_checkpoint_is_one_line(tiny_model_dir, aid_dir, tmp_path):
    sets = [
        f"model.name_or_path={tiny_model_dir}",
        f"data.path={aid_dir}",
        f"training.output_dir={tmp_path / 'run'}",
    ]
    args = [a for s in sets for a in ("--set", s)]
    line = _one_line_error(_run("train.py", "configs/tiny.yaml", *args, "--resume", tmp_path / "nowhere"))
    assert "--resume" in line and "no such checkpoint" in line
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------
# 2. Outputs never replace what is not ours


def test_export_refuses_to_replace_a_folder_that_is_not_an_export(tiny_model_dir, tmp_path):
    from pixtral_lora.export.mistral import export_mistral

    notes = tmp_path / "out"
    notes.mkdir()
    (notes / "notes.txt").write_text("my notes")
    with pytest.raises(OutputError, match="notes.txt"):
        export_mistral(str(tiny_model_dir), notes, dtype="float32")
    assert (notes / "notes.txt").read_text() == "my notes" and len(list(notes.iterdir())) == 1
    a_file = tmp_path / "model.bin"
    a_file.write_text("keep")
    with pytest.raises(OutputError, match="not an output directory"):
        export_mistral(str(tiny_model_dir), a_file, dtype="float32")
    assert a_file.read_text() == "keep" and not list(tmp_path.glob(".model.bin*"))
    # a previous export of its own is replaced; --overwrite replaces anything
    fresh = export_mistral(str(tiny_model_dir), tmp_path / "export", dtype="float32")
    export_mistral(str(tiny_model_dir), fresh, dtype="float32")
    export_mistral(str(tiny_model_dir), notes, dtype="float32", overwrite=True)
    assert not (notes / "notes.txt").exists() and (notes / "params.json").is_file()


def test_convert_script_refuses_a_run_directory_as_out(tiny_run, tiny_model_dir):
    before = {p.name for p in tiny_run.iterdir()}
    script = ROOT / "scripts" / "convert_to_mistral.py"
    line = _one_line_error(
        _run(script, "--model", tiny_model_dir, "--adapter", tiny_run / "adapter", "--out", tiny_run)
    )
    assert "holds the --adapter" in line  # an output may never hold its own input
    # nothing removed, nothing of an export added (other tests may add their eval folders meanwhile)
    after = {p.name for p in tiny_run.iterdir()}
    assert before <= after and not {n for n in after - before if not n.startswith("eval")}


def test_eval_predict_and_data_export_refuse_foreign_outputs(tiny_run, aid_dir, tmp_path, capsys):
    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("\\section{}")
    assert main(["eval", str(tiny_run), "--limit", "2", "--out", str(foreign)]) == 2
    assert "thesis.tex" in capsys.readouterr().err
    table = tmp_path / "table.csv"
    table.write_text("a,b\n1,2\n")
    image = next((aid_dir / "Beach").iterdir())
    assert main(["predict", str(image), "--run", str(tiny_run), "--out", str(table)]) == 2
    assert main(["predict", str(image), "--run", str(tiny_run), "--out", str(tmp_path / "x.txt")]) == 2
    assert ".jsonl, .csv or .parquet" in capsys.readouterr().err and not (tmp_path / "x.txt").exists()
    assert main(["data", "export", str(aid_dir), "--out", str(table)]) == 2
    assert table.read_text() == "a,b\n1,2\n"
    # its own previous output is replaced without asking
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(image), "--run", str(tiny_run), "--out", str(out)]) == 0
    assert main(["predict", str(image), "--run", str(tiny_run), "--out", str(out)]) == 0


# ---------------------------------------------------------------------------------------------------
# 3. One training per run directory


def test_a_second_training_on_a_locked_run_directory_fails_at_once(tiny_model_dir, aid_dir, tmp_path):
    from pixtral_lora.outputs import run_lock

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("the first run's config\n")
    sets = [f"model.name_or_path={tiny_model_dir}", f"data.path={aid_dir}", f"training.output_dir={run}"]
    with run_lock(run):
        started = time.perf_counter()
        result = _run("train.py", "configs/tiny.yaml", *[a for s in sets for a in ("--set", s)])
        line = _one_line_error(result)
    assert "in use by another run" in line and f"pid {os.getpid()}" in line
    assert time.perf_counter() - started < 60  # before any data is rendered or a model loads
    assert (run / "config.yaml").read_text() == "the first run's config\n"


def test_the_run_lock_is_released_when_its_holder_is_killed(tmp_path):
    from pixtral_lora.outputs import RunLockedError, run_lock

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pixtral_lora.outputs import run_lock\n"
            f"with run_lock({str(tmp_path)!r}):\n    print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
        with run_lock(tmp_path):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with run_lock(tmp_path):  # no PID file left to clean by hand
        pass


# ---------------------------------------------------------------------------------------------------
# 4. Unreadable images are an outcome, never a crash


def test_predict_over_a_folder_with_bad_files_classifies_the_rest(tiny_run, aid_dir, tmp_path):
    folder = tmp_path / "tiles"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):
        shutil.copy(next((aid_dir / "Forest").iterdir()), folder / name)
    (folder / "fake.jpg").write_text("not a jpeg")
    (folder / "dir.jpg").mkdir()
    out = tmp_path / "predictions.jsonl"
    assert main(["predict", str(folder), "--run", str(tiny_run), "--out", str(out), "--mode", "score"]) == 0
    rows = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"a.jpg", "b.jpg", "fake.jpg", "dir.jpg"}
    assert rows["fake.jpg"]["outcome"] == rows["dir.jpg"]["outcome"] == "unreadable"
    assert "cannot decode" in rows["fake.jpg"]["error"] and "directory" in rows["dir.jpg"]["error"]
    assert rows["a.jpg"]["label"] in SYNTH_CLASSES and rows["a.jpg"]["error"] is None


def test_corrupt_images_are_recorded_by_training_and_counted_by_eval(tiny_model_dir, aid_dir, tmp_path):
    from pixtral_lora.evaluation.evaluate import EvalOptions, evaluate_run
    from pixtral_lora.training.recipe import train

    data = shutil.copytree(aid_dir, tmp_path / "data")
    corrupt = sorted(
        str(p.relative_to(data)) for c in SYNTH_CLASSES for p in sorted((data / c).iterdir())[:2]
    )
    for image_id in corrupt:
        (data / image_id).write_bytes((data / image_id).read_bytes()[:40])  # truncated JPEG
    run = train(_quick(tiny_model_dir, data, tmp_path / "run", "training.max_steps=1"))
    split = json.loads((run / "split.json").read_text())
    recorded = split["unreadable"]["train"] + split["unreadable"]["test"]
    assert sorted(recorded) == corrupt and split["unreadable"]["test"]
    # one more test image goes bad after training: the run refuses the changed split unless forced,
    # and then it is found at eval time, not a crash either
    late = next(i for i in split["ids"]["test"] if i not in corrupt)
    (data / late).write_text("gone bad")
    options = {"modes": ["generate", "score"], "models": ("finetuned",)}
    with pytest.raises(RunDirError, match="differ from those the run was trained with"):
        evaluate_run(run, EvalOptions(**options))
    out = evaluate_run(run, EvalOptions(**options, force=True))
    written = json.loads((out / "report.json").read_text())
    assert any("differ" in warning for warning in written["warnings"])
    report = written["results"]["finetuned"]
    for mode in ("generate", "score"):
        assert report[mode]["counts"]["unreadable"] == len(split["unreadable"]["test"]) + 1
        assert sum(report[mode]["counts"].values()) == report[mode]["n"] == len(split["ids"]["test"])
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert {p["id"] for p in predictions if p["outcome"] == "unreadable"} == {
        *split["unreadable"]["test"],
        late,
    }
    assert late in (out / "report.md").read_text()


# ---------------------------------------------------------------------------------------------------
# 5-6. References outside the dataset, huge files


@pytest.fixture()
def hostile_jsonl(tmp_path):
    data = tmp_path / "data"
    _png(data / "inside.png")
    outside = _png(tmp_path / "secret" / "outside.png")
    (data / "link.png").symlink_to(outside)

    def line(url):
        return json.dumps(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": url}]},
                    {"role": "assistant", "content": '```json\n{"label": "Forest"}\n```'},
                ]
            }
        )

    path = data / "train.jsonl"
    path.write_text(
        "\n".join([line("inside.png"), line("../secret/outside.png"), line(str(outside)), line("link.png")])
        + "\n"
    )
    return path, outside.parent


def test_jsonl_image_paths_outside_the_dataset_folder_are_refused(hostile_jsonl):
    from pixtral_lora.data.loaders import load_mistral_jsonl
    from pixtral_lora.data.validate import validate

    path, secret = hostile_jsonl
    with pytest.raises(DataError, match=r"train.jsonl:2: .*image_url: .*outside the dataset folder"):
        load_mistral_jsonl(path, ["Forest"])
    problems = [p for p in validate(path, ["Forest"]) if "outside the dataset folder" in p.message]
    assert [p.where.rsplit(":", 1)[1] for p in problems] == ["2", "3", "4"]  # relative, absolute, symlink
    assert all(p.field == "messages[0].content[0].image_url" for p in problems)
    assert len(load_mistral_jsonl(path, ["Forest"], allowed_roots=[str(secret)])) == 4


def test_data_export_does_not_inline_files_from_outside(hostile_jsonl, tmp_path, capsys):
    path, _ = hostile_jsonl
    out = tmp_path / "exported.jsonl"
    assert main(["data", "export", str(path), "--out", str(out)]) == 2
    assert "outside the dataset folder" in capsys.readouterr().err and not out.exists()


def test_csv_and_folder_symlinks_outside_are_refused(tmp_path):
    from pixtral_lora.data.loaders import LoadReport, load_aid_folder, load_csv

    outside = _png(tmp_path / "elsewhere" / "x.png")
    data = tmp_path / "csv"
    data.mkdir()
    (data / "d.csv").write_text(f"image_path,prompt,completion\n{outside},,Forest\n")
    with pytest.raises(DataError, match=r"d.csv:2: image_path: .*outside the dataset folder"):
        load_csv(data / "d.csv")
    folder = tmp_path / "aid"
    for name in ("Forest", "Port"):
        _png(folder / name / "a.png")
        _png(folder / name / "b.png")
    (folder / "Forest" / "c.png").symlink_to(outside)
    report = LoadReport()
    assert len(load_aid_folder(folder, report)) == 4
    assert report.skipped == {"links outside the dataset folder": ["Forest/c.png"]}


def test_huge_files_are_refused_before_they_are_read(tmp_path):
    from pixtral_lora.data.images import ImageError, load_image, read_image_bytes

    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as handle:
        handle.truncate(16 * 2**30)  # sparse: 16 GB on paper, nothing on disk
    with pytest.raises(ImageError, match="exceeds the .* image limit"):
        load_image(huge)
    payload = base64.b64encode(b"\xff" * 3000).decode()
    with pytest.raises(ImageError, match="exceeds the .* image limit"):
        read_image_bytes(f"data:image/png;base64,{payload}", max_bytes=1000)


def test_a_jsonl_without_newlines_is_not_read_whole(tmp_path, monkeypatch):
    import pixtral_lora.data.loaders as data

    monkeypatch.setattr(data, "MAX_LINE_BYTES", 1000)
    path = tmp_path / "one-line.jsonl"
    path.write_text("x" * 5000)
    with pytest.raises(DataError, match="one-line.jsonl:1: line longer than"):
        data.load_mistral_jsonl(path, ["Forest"])


# ---------------------------------------------------------------------------------------------------
# 7-8. Labels that are not plain ASCII words


def test_a_class_name_with_quotes_trains_on_valid_json_and_round_trips():
    from pixtral_lora.task.answers import AnswerParser
    from pixtral_lora.task.prompt import PromptConfig

    classes = ['Say "Hi"', "Back\\slash", "Forest", "森林"]
    prompt = PromptConfig()
    for name in classes:
        answer = prompt.answer(name)
        assert json.loads(answer.removeprefix("```json\n").removesuffix("\n```")) == {"label": name}
        assert AnswerParser(classes, strict=True).parse(answer).label == name
        assert AnswerParser(classes).parse(answer).label == name
    # ordinary names train on exactly the text they always did
    assert prompt.answer("Forest") == '```json\n{"label": "Forest"}\n```'
    assert prompt.answer("森林") == '```json\n{"label": "森林"}\n```'


def test_non_ascii_class_names_stay_apart_and_nonsense_is_a_hallucination():
    from pixtral_lora.task.answers import AnswerParser, class_name_problem

    parser = AnswerParser(["森林", "沙漠", "Forest"])  # before: ValueError, same key
    assert class_name_problem(["森林", "沙漠"]) is None
    assert parser.parse('{"label": "沙漠"}').label == "沙漠"
    for nonsense in ('{"label": "???"}', '{"label": "海"}', "???"):
        parsed = parser.parse(nonsense)
        assert parsed.label is None and parsed.hallucinated, nonsense


def test_colliding_class_names_are_a_one_line_error_before_any_model_loads(tmp_path, aid_dir, tiny_model_dir):
    from pixtral_lora.config.schema import ConfigError

    with pytest.raises(ConfigError, match=r"--set .*: data.class_names: .*differ only in case"):
        tiny_config(
            tiny_model_dir, aid_dir, tmp_path / "r", "data.class_names=[Dense Residential, DenseResidential]"
        )
    folder = tmp_path / "aid"
    for name in ("Dense Residential", "dense_residential"):
        _png(folder / name / "a.png")
        _png(folder / name / "b.png")
    line = _one_line_error(_run("-m", "pixtral_lora.cli", "data", "validate", folder))
    assert "differ only in case" in line


# ---------------------------------------------------------------------------------------------------
# 9-11. Bad paths: one line, checked first, nothing left behind


def _train_with(tmp_path, **values):
    sets = [f"{key.replace('__', '.')}={value}" for key, value in values.items()]
    return _run("train.py", "configs/tiny.yaml", *[a for s in sets for a in ("--set", s)])


def test_missing_model_path_is_named_before_anything_is_rendered(tmp_path, aid_dir):
    line = _one_line_error(
        _train_with(
            tmp_path,
            model__name_or_path=tmp_path / "no-model",
            data__path=aid_dir,
            training__output_dir=tmp_path / "run",
        )
    )
    assert "model.name_or_path" in line and "not a local directory" in line
    line = _one_line_error(
        _train_with(
            tmp_path,
            model__name_or_path="someone/not-cached-model",
            data__path=aid_dir,
            training__output_dir=tmp_path / "run",
        )
    )
    assert "not in the HF cache" in line and "HF_HUB_OFFLINE" in line
    assert not (tmp_path / "run").exists()


def test_missing_data_and_bad_output_dir_are_one_line_and_leave_nothing(tmp_path, tiny_model_dir, aid_dir):
    line = _one_line_error(
        _train_with(
            tmp_path,
            model__name_or_path=tiny_model_dir,
            data__path=tmp_path / "aid-synthetic",
            training__output_dir=tmp_path / "run",
        )
    )
    assert "does not exist" in line and "pixtral-lora data generate" in line
    assert not (tmp_path / "run").exists()
    a_file = tmp_path / "run.txt"
    a_file.write_text("x")
    line = _one_line_error(
        _train_with(
            tmp_path, model__name_or_path=tiny_model_dir, data__path=aid_dir, training__output_dir=a_file
        )
    )
    assert "is a file" in line and a_file.read_text() == "x"


def test_an_unwritable_output_dir_is_found_before_rendering(tmp_path, monkeypatch, tiny_model_dir, aid_dir):
    import tempfile

    import pixtral_lora.training.recipe as training

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", denied)
    monkeypatch.setattr(training, "render_dataset", lambda *a, **k: pytest.fail("rendered"))
    with pytest.raises(OutputError, match="training.output_dir .*cannot write.*Permission denied"):
        training.train(tiny_config(tiny_model_dir, aid_dir, tmp_path / "run"))


# ---------------------------------------------------------------------------------------------------
# 12. Full disk, and what a killed export leaves


def test_a_full_disk_during_export_is_one_line_and_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    import pixtral_lora.export.mistral as export

    def no_space(path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "write_safetensors_streaming", no_space)
    with pytest.raises(OutputError, match=r"no space left .* about \d.* needed, .* free"):
        export.export_mistral(str(tiny_model_dir), tmp_path / "out", dtype="float32")
    assert list(tmp_path.iterdir()) == []


def test_the_next_export_cleans_up_what_a_killed_one_left(tiny_model_dir, tmp_path):
    from pixtral_lora.export.mistral import export_mistral

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = tmp_path / f".out.partial-{dead.stdout.strip()}-abc"
    stale.mkdir()
    (stale / "consolidated.safetensors").write_bytes(b"half")
    export_mistral(str(tiny_model_dir), tmp_path / "out", dtype="float32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_data_export_on_a_full_disk_is_one_line(aid_dir, tmp_path, monkeypatch, capsys):
    import pixtral_lora.data.loaders as data

    def no_space(image, fmt="JPEG"):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data, "encode_data_uri", no_space)
    assert main(["data", "export", str(aid_dir), "--out", str(tmp_path / "d.jsonl")]) == 2
    assert "no space left" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


# safetensors' Rust writer on a full disk: a SafetensorError carrying the OS error, after part of the file.
_FULL_DISK_SITE = """
import safetensors, safetensors.torch

def _no_space(tensors, filename, metadata=None):
    with open(filename, "wb") as handle:
        handle.write(b"\\0" * 4096)
    raise safetensors.SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    )

safetensors.torch.save_file = _no_space
"""


@pytest.mark.parametrize("command", ["tiny-model", "dequantize", "convert --format hf"])
def test_a_full_disk_while_writing_a_checkpoint_is_one_line_and_leaves_nothing(
    command, tiny_model_dir, tmp_path
):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_FULL_DISK_SITE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    if command == "tiny-model":
        result = run_cli("tiny-model", "--out", out, env=env)
    elif command == "dequantize":
        result = run_cli("dequantize", tiny_model_dir, "--out", out, "--dtype", "float32", env=env)
    else:
        result = run_command(
            "scripts/convert_to_mistral.py",
            "--model",
            tiny_model_dir,
            "--format",
            "hf",
            "--out",
            out,
            env=env,
        )
    line = one_line_error(result)
    assert "no space left" in line and "nothing was written" in line, line
    assert list(work.iterdir()) == []  # no half-written checkpoint, no temporary folder


# ---------------------------------------------------------------------------------------------------
# 13. Adapters and bases that do not belong together


def test_adapters_merge_only_into_their_own_base(tiny_run, tiny_model_dir, tmp_path):
    from pixtral_lora.export.checkpoint import ExportError
    from pixtral_lora.export.hf import export_hf
    from pixtral_lora.export.mistral import export_mistral
    from pixtral_lora.model.tiny import TinySizes, build_tiny_model

    narrower = build_tiny_model(tmp_path / "narrow", TinySizes(text_hidden_size=32, text_head_dim=8))
    for export in (export_hf, export_mistral):
        with pytest.raises(ExportError, match="does not fit .*trained on a base of another shape"):
            export(str(narrower), tmp_path / f"o-{export.__name__}", tiny_run / "adapter")
    sibling = build_tiny_model(tmp_path / "sibling", seed=1)  # same shapes, other weights
    with pytest.raises(ExportError, match="differ from those of the base .* --force"):
        export_mistral(str(sibling), tmp_path / "o", tiny_run / "adapter")
    assert export_mistral(str(sibling), tmp_path / "o", tiny_run / "adapter", force=True).is_dir()
    assert export_mistral(str(tiny_model_dir), tmp_path / "own", tiny_run / "adapter").is_dir()


# ---------------------------------------------------------------------------------------------------
# 14-15. Smaller one-line errors


def test_eval_and_predict_on_an_unfinished_run_say_so_before_loading(tiny_run, tmp_path, capsys, monkeypatch):
    import pixtral_lora.run.reader as reader

    unfinished = shutil.copytree(
        tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("adapter", "eval*")
    )
    monkeypatch.setattr(reader, "load_eval_model", lambda *a, **k: pytest.fail("model loaded"))
    assert main(["eval", str(unfinished)]) == 2
    assert "training has not finished" in capsys.readouterr().err
    assert main(["predict", str(tmp_path), "--run", str(unfinished)]) == 2
    assert "training has not finished" in capsys.readouterr().err


def test_validate_reports_a_bad_data_uri_with_file_line_and_field_and_goes_on(tmp_path):
    from pixtral_lora.data.validate import validate

    good = io.BytesIO()
    Image.new("RGB", (16, 16)).save(good, format="PNG")

    def line(url, label="Forest"):
        return json.dumps(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]},
                    {"role": "assistant", "content": f'{{"label": "{label}"}}'},
                ]
            }
        )

    path = tmp_path / "d.jsonl"
    uri = "data:image/png;base64," + base64.b64encode(good.getvalue()).decode()
    path.write_text(
        "\n".join([line("data:image/png;base64,@@@not base64@@@"), line(uri, "Nowhere"), line(uri)])
    )
    problems = validate(path, ["Forest", "Port"])
    text = [str(p) for p in problems]
    assert any(f"{path}:1 [messages[0].content[0].image_url]" in t and "base64" in t for t in text), text
    assert any(f"{path}:2 [answer]" in t and "Nowhere" in t for t in text), text  # the rest is still checked


def test_validate_flags_a_class_with_a_single_image(tmp_path):
    from pixtral_lora.data.validate import validate

    for name, count in (("Forest", 3), ("Port", 1)):
        for i in range(count):
            _png(tmp_path / "aid" / name / f"{i}.png", color=(i * 40, 10 * count, 0))
    problems = [p for p in validate(tmp_path / "aid") if p.severity == "error"]
    assert len(problems) == 1 and problems[0].field == "Port" and "single sample" in problems[0].message


def test_a_bad_override_is_blamed_on_the_override(tmp_path):
    from pixtral_lora.config.schema import ConfigError
    from pixtral_lora.config.yaml_loading import load_config

    with pytest.raises(ConfigError, match=r"--set foo.bar=1: foo: unknown key 'foo'"):
        load_config(ROOT / "configs" / "tiny.yaml", ["foo.bar=1"])


def test_data_generate_never_draws_over_a_real_dataset(tmp_path, capsys):
    real = _png(tmp_path / "AID" / "Forest" / "forest_1.jpg")
    before = real.read_bytes()
    args = ["data", "generate", "--classes", "Forest", "--per-class", "2", "--size", "32", "--out"]
    assert main([*args, str(tmp_path / "AID")]) == 2
    assert "not a synthetic dataset" in capsys.readouterr().err and real.read_bytes() == before
    assert main([*args, str(tmp_path / "synthetic")]) == 0
    assert main([*args, str(tmp_path / "synthetic")]) == 0  # its own earlier output is replaced
    assert len(list((tmp_path / "synthetic" / "Forest").iterdir())) == 2
