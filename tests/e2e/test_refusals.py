"""Issue 25 §3-4: what a user hands over is checked at the edge and refused in one line naming the file,
through the commands a user types; nothing half-done is left behind."""

import json
import shutil

from conftest import one_line_error, run_cli


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
