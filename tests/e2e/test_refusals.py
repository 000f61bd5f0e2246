"""Issue 25 §3-4: what a user hands over is checked at the edge and refused in one line naming the file,
through the commands a user types; nothing half-done is left behind."""

import json
import shutil

from conftest import ROOT, one_line_error, run_cli, run_command


def test_a_checkpoint_with_missing_or_truncated_weights_is_one_line(tiny_model_dir, tmp_path):
    weights = tiny_model_dir / "model.safetensors"
    truncated = shutil.copytree(tiny_model_dir, tmp_path / "truncated")
    (truncated / "model.safetensors").write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    missing = shutil.copytree(tiny_model_dir, tmp_path / "missing")
    (missing / "model.safetensors").unlink()
    sharded = shutil.copytree(tiny_model_dir, tmp_path / "sharded")  # its index names an absent shard
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"a.weight": "model-00002-of-00002.safetensors"}})
    )
    cases = {
        truncated: f"{truncated / 'model.safetensors'}: not a complete safetensors file",
        missing: "no model.safetensors or model.safetensors.index.json",
        sharded: "names model-00002-of-00002.safetensors, which is missing",
    }
    for model, named in cases.items():
        out = tmp_path / f"out-{model.name}"
        line = one_line_error(run_cli("dequantize", model, "--out", out))
        assert named in line, line
        assert not out.exists() and not list(tmp_path.glob(f".out-{model.name}*"))


def test_a_float16_export_that_would_overflow_is_one_line(tiny_model_dir, tmp_path):
    """float16 ends at 65504: a weight beyond it would be written as inf by a plain cast. The HF and
    the native export refuse it, naming the tensor; bfloat16 (the default) writes it."""
    from safetensors.torch import load_file, save_file

    model = shutil.copytree(tiny_model_dir, tmp_path / "base")
    weights = load_file(model / "model.safetensors")
    name = next(k for k in sorted(weights) if k.endswith("down_proj.weight"))
    weights[name][0, 0] = 1e6
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    script = ROOT / "scripts" / "convert_to_mistral.py"
    for form in ("hf", "mistral"):
        line = one_line_error(run_command(script, "--model", model, "--out", tmp_path / form, "--format", form,
                                          "--dtype", "float16"))  # fmt: skip
        assert "1 values are not finite as float16" in line and "--dtype" in line, line
        assert not (tmp_path / form).exists()
    assert name in line  # the checkpoint's own name of the tensor
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert run_cli("dequantize", model, "--out", tmp_path / "bf16").returncode == 0


def test_data_edges_are_named_by_file_and_line(aid_dir, tmp_path):
    """`data validate` and the loaders training uses (`data export` here): a class name holding the
    prompt's separator, an empty image file, a JSONL sample without an image, and a spreadsheet's
    CSV (byte-order mark, `;`, CRLF, blank rows) that is read as meant, or refused when not UTF-8."""
    folder = shutil.copytree(aid_dir, tmp_path / "aid")
    first = sorted((folder / "Beach").iterdir())[0]
    (folder / "Forest").rename(folder / "Forest; Park")
    result = run_cli("data", "validate", folder)
    assert result.returncode == 1
    assert "class name 'Forest; Park' contains the prompt's class separator '; '" in result.stdout
    (folder / "Forest; Park").rename(folder / "Forest")
    (folder / "Beach" / "empty.jpg").write_bytes(b"")
    result = run_cli("data", "validate", folder)
    assert f"error: {folder / 'Beach' / 'empty.jpg'}: empty file (0 bytes)" in result.stdout.splitlines()

    jsonl = tmp_path / "samples.jsonl"
    sample = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": str(first)}]},
                           {"role": "assistant", "content": '{"label": "Beach"}'}]}  # fmt: skip
    text_only = {"messages": [{"role": "user", "content": "What is it?"}, sample["messages"][1]]}
    jsonl.write_text(json.dumps(sample) + "\n" + json.dumps(text_only) + "\n")
    result = run_cli("data", "validate", jsonl, "--allow-path", aid_dir, "--classes", "Beach,Forest")
    assert f"{jsonl}:2 [messages]: no image_url chunk" in result.stdout
    line = one_line_error(run_cli("data", "export", jsonl, "--out", tmp_path / "x.jsonl", "--classes",
                                  "Beach,Forest", "--allow-path", aid_dir))  # fmt: skip
    assert f"{jsonl}:2: no image_url chunk" in line and not (tmp_path / "x.jsonl").exists()

    rows = [f"{p.relative_to(tmp_path)};;{{\"label\": \"{p.parent.name}\"}}" for p in
            [*sorted((folder / "Beach").glob("*.jpg"))[:3], *sorted((folder / "Forest").glob("*.jpg"))[:3]]]  # fmt: skip
    excel = tmp_path / "excel.csv"
    excel.write_bytes(
        "\ufeffimage_path;prompt;completion\r\n".encode() + "\r\n;;\r\n".join(rows).encode() + b"\r\n"
    )
    result = run_cli("data", "export", excel, "--out", tmp_path / "e.jsonl", "--classes", "Beach,Forest")
    assert result.returncode == 0, result.stderr[-2000:]
    exported = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert len(exported) == 6
    assert [m["messages"][-1]["content"][0]["text"] for m in exported] == [r.split(";")[2] for r in rows]
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"image_path,prompt,completion\n" + f"{first},".encode() + b"Caf\xe9,Beach\n")
    line = one_line_error(
        run_cli("data", "export", latin, "--out", tmp_path / "l.jsonl", "--classes", "Beach")
    )
    assert f"{latin}:2: not UTF-8 (byte 0xe9)" in line and not (tmp_path / "l.jsonl").exists()


def test_a_suggested_flag_is_one_the_command_has(tmp_path):
    """A refusal's remedy names a flag of the command that printed it: `data generate-scene` and
    `data preview --save-image` say "pass --overwrite" over a file of someone else's, and have it."""
    mine = tmp_path / "mine.tif"
    mine.write_bytes(b"a raster of mine")
    line = one_line_error(run_cli("data", "generate-scene", "--out", mine, "--grid", "1x1"))
    assert "--overwrite" in line and mine.read_bytes() == b"a raster of mine"
    assert "--overwrite" in run_cli("data", "generate-scene", "--help").stdout
    assert run_cli("data", "generate-scene", "--out", mine, "--grid", "1x1", "--overwrite").returncode == 0
    assert "--overwrite" in run_cli("data", "preview", "--help").stdout


def test_a_command_that_fails_before_its_first_row_leaves_no_file(
    tiny_run, tiny_model_dir, aid_dir, tmp_path
):
    """predict (JSONL, CSV, Parquet) and map with a merged `--model` whose weights are truncated: the
    failure comes at the first batch, and no empty file, header-only CSV or journal is left."""
    from conftest import SYNTH_CLASSES

    from pixtral_lora.data.synth import generate_scene_mosaic

    broken = shutil.copytree(tiny_model_dir, tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    for name in ("p.jsonl", "p.csv", "p.parquet"):
        line = one_line_error(run_cli("predict", aid_dir / "Beach", "--run", tiny_run, "--out", outputs / name,
                                      "--model", broken))  # fmt: skip
        assert "not a complete safetensors file" in line
    scene = generate_scene_mosaic(tmp_path / "scene.tif", SYNTH_CLASSES, grid=(1, 2), tile=64, seed=5)
    assert scene
    line = one_line_error(run_cli("map", tmp_path / "scene.tif", "--run", tiny_run, "--out",
                                  outputs / "m.geojson", "--tile", 64, "--model", broken))  # fmt: skip
    assert "not a complete safetensors file" in line
    assert sorted(p.name for p in outputs.iterdir()) == []


def test_the_vllm_backend_options_are_checked_before_anything_loads(tiny_run, aid_dir, tmp_path):
    """`--backend vllm` needs a Mistral-format model; the two ways of giving one don't mix; the vLLM
    flags mean nothing on transformers; and without vllm installed, one line says so before anything
    loads (with --num-processes, before a Ray cluster starts). No predictions file is left behind."""
    out = tmp_path / "p.jsonl"
    predict = ("predict", aid_dir, "--run", tiny_run, "--out", out)
    line = one_line_error(run_cli(*predict, "--backend", "vllm"))
    assert "--backend vllm needs --model DIR" in line and "--vllm-lora" in line
    line = one_line_error(run_cli(*predict, "--backend", "vllm", "--model", tmp_path, "--vllm-base", tmp_path,
                                  "--vllm-lora", tmp_path))  # fmt: skip
    assert "not both" in line
    line = one_line_error(run_cli(*predict, "--vllm-lora", tmp_path))
    assert "--vllm-base and --vllm-lora are for --backend vllm" in line
    scene = tmp_path / "s.tif"
    made = run_cli("data", "generate-scene", "--out", scene, "--grid", "1x2")
    assert made.returncode == 0, made.stderr[-2000:]
    line = one_line_error(run_cli("map", scene, "--run", tiny_run, "--out", tmp_path / "m.geojson",
                                  "--tile", "64", "--backend", "vllm"))  # fmt: skip
    assert "--backend vllm needs --model DIR" in line
    try:
        import vllm  # noqa: F401
    except ImportError:
        line = one_line_error(run_cli(*predict, "--backend", "vllm", "--model", tmp_path))
        assert "needs vllm" in line
        line = one_line_error(
            run_cli(*predict, "--backend", "vllm", "--model", tmp_path, "--num-processes", "2")
        )
        assert "needs vllm" in line  # said by the driver, before a Ray cluster or replica starts
    assert not out.exists()
