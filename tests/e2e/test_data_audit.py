"""`pixtral-lora data audit` on a generated dataset with injected copies: re-encoded, resized, cropped
and brightened twins of one image, an exact copy filed under another class (a conflicting label) and a
copy of a test image in train (leakage). Each is found, through the command a user types."""

import io
import json
import shutil

from conftest import SYNTH_CLASSES, run_cli
from PIL import Image, ImageEnhance


def _save(image: Image.Image, path, quality=95):
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    path.write_bytes(buffer.getvalue())


def test_audit_finds_injected_twins_conflicts_and_leaks(aid_dir, tmp_path):
    data = shutil.copytree(aid_dir, tmp_path / "data")
    original = data / "Forest" / sorted(p.name for p in (data / "Forest").iterdir())[0]
    image = Image.open(original).convert("RGB")
    w, h = image.size
    twins = {
        "Forest/twin_reencoded.jpg": (image, 40),
        "Forest/twin_resized.jpg": (image.resize((w * 3 // 4, h * 3 // 4)), 90),
        "Forest/twin_cropped.jpg": (image.crop((2, 2, w - 2, h - 2)), 90),
        "Forest/twin_brighter.jpg": (ImageEnhance.Brightness(image).enhance(1.15), 90),
    }
    for name, (copy, quality) in twins.items():
        _save(copy, data / name, quality)
    conflicting = data / "Port" / "moved_forest.jpg"
    shutil.copyfile(original, conflicting)  # the same bytes under another class

    out = tmp_path / "audit"
    result = run_cli("data", "audit", data, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "conflicting labels" in result.stdout and str(out / "exclude.txt") in result.stdout
    findings = json.loads((out / "audit.json").read_text())
    assert findings["images"] == 10 * len(SYNTH_CLASSES) + len(twins) + 1

    forest = original.relative_to(data).as_posix()
    home = next(g for g in findings["groups"] if forest in {m["id"] for m in g["members"]})
    ids = {m["id"] for m in home["members"]}
    assert set(twins) | {forest, "Port/moved_forest.jpg"} <= ids  # every copy, whatever was done to it
    assert "conflicting" in home["kind"] and home["max_distance"] <= 8
    splits = {m["split"] for m in home["members"]}
    assert ("leak" in home["kind"]) == (len(splits) > 1)
    exclude = (out / "exclude.txt").read_text().split()
    assert exclude == findings["exclude"] and "Port/moved_forest.jpg" in exclude  # Forest is the majority
    assert "# Data audit of" in (out / "audit.md").read_text()

    # A second audit into the same folder replaces it (it is an audit); a foreign folder is refused.
    assert run_cli("data", "audit", data, "--out", out).returncode == 0
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    refused = run_cli("data", "audit", data, "--out", foreign)
    assert refused.returncode == 2 and (foreign / "notes.txt").read_text() == "keep"


def test_audit_of_a_config_split_names_a_test_image_leaked_into_train(aid_dir, tmp_path):
    data = shutil.copytree(aid_dir, tmp_path / "train")
    test = tmp_path / "test"
    for name in SYNTH_CLASSES:  # a separate test set: two images of each class moved out
        (test / name).mkdir(parents=True)
        for path in sorted((data / name).iterdir())[:2]:
            shutil.move(path, test / name / path.name)
    leaked = sorted((test / "Desert").iterdir())[0]
    _save(Image.open(leaked).convert("RGB").resize((48, 48)), data / "Desert" / "leaked.jpg")
    config = tmp_path / "audit.yaml"
    config.write_text(f"data:\n  path: {data}\n  test_path: {test}\n")

    out = tmp_path / "audit"
    result = run_cli("data", "audit", data, "--config", config, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    findings = json.loads((out / "audit.json").read_text())
    assert findings["splits"] == {"train": 10 * len(SYNTH_CLASSES) - 8 + 1, "test": 8}
    leak = next(g for g in findings["groups"] if "Desert/leaked.jpg" in {m["id"] for m in g["members"]})
    assert "leak" in leak["kind"] and {"train", "test"} <= {m["split"] for m in leak["members"]}
    assert f"Desert/{leaked.name}" in {m["id"] for m in leak["members"] if m["split"] == "test"}
    assert "Desert/leaked.jpg" in (out / "exclude.txt").read_text().split()
    assert findings["counts"]["leaked_test_images"] >= 1
