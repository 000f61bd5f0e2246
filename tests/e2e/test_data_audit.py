"""`pixtral-lora data audit` on a generated dataset with injected copies: re-encoded, resized, cropped
and brightened twins of one image, an exact copy filed under another class (a conflicting label) and a
copy of a test image in train (leakage). Each is found, through the command a user types."""

import io
import json
import shutil
import subprocess

import pytest
from conftest import ROOT, SYNTH_CLASSES, one_line_error, run_cli, run_command, set_args
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
    Image.effect_noise((64, 64), 60).save(data / "Desert" / "grey.png")  # a one-band image
    (data / "Desert" / "broken.jpg").write_bytes(b"not a jpeg")

    out = tmp_path / "audit"
    result = run_cli("data", "audit", data, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "conflicting labels" in result.stdout and str(out / "exclude.txt") in result.stdout
    findings = json.loads((out / "audit.json").read_text())
    assert findings["images"] == 10 * len(SYNTH_CLASSES) + len(twins) + 3
    # balance, sizes and modes; the unreadable file as the validator names it
    assert findings["modes"]["L"] == 1 and findings["modes"]["other"] == 1 and "64x64" in findings["sizes"]
    per_split = findings["class_balance"]["per_split"]
    assert sum(n for counts in per_split.values() for n in counts.values()) == findings["images"]
    assert findings["counts"]["unreadable"] == 1 and findings["validator"]["errors"] == 1
    (problem,) = [p for p in findings["validator"]["problems"] if p["severity"] == "error"]
    assert problem["where"].endswith("broken.jpg") and "cannot decode" in problem["message"]
    assert "broken.jpg" in (out / "audit.md").read_text() and "broken.jpg" in (out / "audit.html").read_text()

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

    # A second audit into the same folder replaces it (it is an audit), hashing in one process this
    # time (the first used one per CPU): the same findings; a foreign folder is refused.
    assert run_cli("data", "audit", data, "--out", out, "--workers", "1").returncode == 0
    again = json.loads((out / "audit.json").read_text())
    assert again["groups"] == findings["groups"] and again["exclude"] == findings["exclude"]
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


def test_exclude_txt_round_trips_through_training_and_eval(aid_dir, tiny_model_dir, tmp_path):
    data = shutil.copytree(aid_dir, tmp_path / "data")
    original = sorted((data / "Port").iterdir())[0]
    shutil.copyfile(original, data / "Beach" / "moved_port.jpg")  # a conflicting duplicate
    audit = tmp_path / "audit"
    assert run_cli("data", "audit", data, "--out", audit).returncode == 0
    exclude = (audit / "exclude.txt").read_text().split()
    assert {"Beach/moved_port.jpg", original.relative_to(data).as_posix()} <= set(exclude)  # a 1:1 tie

    run = tmp_path / "run"
    sets = set_args(
        f"model.name_or_path={tiny_model_dir}",
        f"data.path={data}",
        f"data.exclude={audit / 'exclude.txt'}",
        f"training.output_dir={run}",
        "training.max_steps=1",
        "training.eval_steps=null",
        "data.validation_size=0",
        "data.test_size=0.3",
    )
    trained = run_command("train.py", ROOT / "configs" / "tiny.yaml", *sets)
    assert trained.returncode == 0, trained.stderr[-3000:]
    report = json.loads((run / "data_report.json").read_text())
    assert report["excluded"]["ids"] == sorted(exclude) and report["excluded"]["count"] == len(exclude)
    split = json.loads((run / "split.json").read_text())
    assert not set(exclude) & {i for ids in split["ids"].values() for i in ids}
    assert sum(map(len, split["ids"].values())) == 10 * len(SYNTH_CLASSES) + 1 - len(exclude)

    evaluated = run_cli("eval", run, "--limit", "2", "--modes", "score", "--models", "finetuned")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert f"{len(exclude)} ids left out by data.exclude" in (run / "eval" / "report.html").read_text()

    # An exclude list naming ids this data does not have is refused in one line.
    (tmp_path / "other.txt").write_text("Forest/not_here.jpg\n")
    refused = run_command(
        "train.py",
        ROOT / "configs" / "tiny.yaml",
        *sets,
        *set_args(f"data.exclude={tmp_path / 'other.txt'}", f"training.output_dir={tmp_path / 'run2'}"),
    )
    assert "data.exclude" in one_line_error(refused) and "not_here.jpg" in refused.stderr
    assert not (tmp_path / "run2").exists()


def test_equal_perceptual_hashes_of_different_pixels_are_near_not_exact():
    from pixtral_lora.data.audit import Entry, group

    entries = [Entry("a", "Forest", "train"), Entry("b", "Forest", "test"), Entry("c", "Forest", "train")]
    found = group(entries, ["sha-a", "sha-b", "sha-a"], [(0, 1, 0)])  # a, b: same phash, other pixels
    assert [g.kind for g in found] == [["near", "redundant", "leak"]]
    assert group(entries, ["sha-a", "sha-b", "sha-a"], [])[0].kind == ["exact", "redundant"]


def test_a_few_percent_of_crop_is_near_and_a_distinct_scene_is_not():
    """A phash alone moves 12-16 bits under a 3% crop; the cropped views keep such a copy within reach."""
    import imagehash

    from pixtral_lora.data.audit import Fingerprints, near_pairs, view_hashes
    from pixtral_lora.data.synth import draw_scene

    scene = draw_scene("DenseResidential", 0, 256)
    images = [
        scene,
        scene.crop((13, 13, 256, 256)),  # 5% off two sides
        scene.crop((0, 8, 248, 256)),  # 3% off two others
        draw_scene("DenseResidential", 1, 256),  # another scene of the same class
    ]
    assert imagehash.phash(images[1]) - imagehash.phash(scene) > 8  # the whole frame alone misses it
    hashes = [view_hashes(image) for image in images]
    prints = Fingerprints(["a", "b", "c", "d"], [w for w, _ in hashes], [v for _, v in hashes], [])
    assert {(i, j) for i, j, _ in near_pairs(prints, 8)} == {(0, 1), (0, 2), (1, 2)}


def test_training_warns_of_refuses_or_drops_test_images_with_a_twin_in_train(
    aid_dir, tiny_model_dir, tmp_path
):
    data = shutil.copytree(aid_dir, tmp_path / "train")
    test = tmp_path / "test"
    for name in SYNTH_CLASSES:  # a separate test set: two images of each class
        (test / name).mkdir(parents=True)
        for path in sorted((data / name).iterdir())[:2]:
            shutil.move(path, test / name / path.name)
    leaked = sorted((test / "Forest").iterdir())[0]
    _save(
        ImageEnhance.Brightness(Image.open(leaked).convert("RGB")).enhance(1.1), data / "Forest" / "copy.jpg"
    )
    leaked_id = leaked.relative_to(test).as_posix()

    def train(run, *extra):
        sets = set_args(
            f"model.name_or_path={tiny_model_dir}",
            f"data.path={data}",
            f"data.test_path={test}",
            f"training.output_dir={run}",
            "training.max_steps=1",
            "training.eval_steps=null",
            "data.validation_size=0",
            *extra,
        )
        return run_command("train.py", ROOT / "configs" / "tiny.yaml", *sets)

    refused = train(tmp_path / "refused", "data.leakage=error")
    assert (
        "data.leakage is 'error'" in one_line_error(refused) and "pixtral-lora data audit" in refused.stderr
    )
    assert not (tmp_path / "refused" / "adapter").exists()

    run = tmp_path / "run"
    trained = train(run, "data.leakage=drop_test")
    assert trained.returncode == 0, trained.stderr[-3000:]
    warned = [line for line in trained.stderr.splitlines() if "exact or near twin" in line]
    assert len(warned) == 1 and "left out of the test split" in warned[0]
    leakage = json.loads((run / "data_report.json").read_text())["leakage"]
    assert leaked_id in leakage["test_ids"] and leakage["dropped_test_ids"] == leakage["test_ids"]
    kept = json.loads((run / "split.json").read_text())["ids"]["test"]
    assert sorted(kept) == sorted(
        set(p.relative_to(test).as_posix() for p in test.rglob("*.jpg")) - set(leakage["test_ids"])
    )
    evaluated = run_cli("eval", run, "--modes", "score", "--models", "finetuned")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    rows = (run / "eval" / "predictions.jsonl").read_text().splitlines()
    assert sorted(json.loads(row)["id"] for row in rows) == sorted(kept)

    # warn (the default): the same one line, the test split whole, the audit command to list them
    warned_run = train(tmp_path / "warned")
    assert warned_run.returncode == 0, warned_run.stderr[-3000:]
    assert [line for line in warned_run.stderr.splitlines() if "exact or near twin" in line][0].count(
        "data audit"
    ) == 1
    assert len(json.loads((tmp_path / "warned" / "split.json").read_text())["ids"]["test"]) == 2 * len(
        SYNTH_CLASSES
    )

    # data.limit_train trims the training split before the twins are looked for and the split is
    # recorded, so a rerun finds the same split (the run complete) instead of "the data split differs"
    for _ in range(2):
        limited = train(tmp_path / "limited", "data.limit_train=4")
        assert limited.returncode == 0, limited.stderr[-3000:]
    assert len(json.loads((tmp_path / "limited" / "split.json").read_text())["ids"]["train"]) == 4


def test_audit_reads_jsonl_conversations(aid_dir, tmp_path):
    exported = tmp_path / "data.jsonl"
    assert run_cli("data", "export", aid_dir, "--out", exported).returncode == 0
    lines = exported.read_text().splitlines()
    moved = json.loads(lines[-1])  # the last image again, answered with another class
    answer = moved["messages"][-1]["content"][0]
    first_label = json.loads(answer["text"].strip("`\njson"))["label"]
    other = next(c for c in SYNTH_CLASSES if c != first_label)
    answer["text"] = answer["text"].replace(first_label, other)
    exported.write_text("\n".join([*lines, json.dumps(moved)]) + "\n")

    out = tmp_path / "audit"
    result = run_cli("data", "audit", exported, "--classes", ",".join(SYNTH_CLASSES), "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    findings = json.loads((out / "audit.json").read_text())
    assert findings["images"] == len(lines) + 1
    conflict = next(g for g in findings["groups"] if "conflicting" in g["kind"])
    assert {first_label, other} <= {m["label"] for m in conflict["members"]}


def _screenshot_is_not_blank(page, shot) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no headless browser installed (make browser installs Debian's chromium)")
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,900",
         f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        timeout=120,
    )  # fmt: skip
    image = Image.open(shot).convert("L")
    low, high = image.getextrema()
    assert high - low > 100 and len(set(image.resize((120, 90)).tobytes())) > 10  # not a blank page


def test_audit_of_a_run_ranks_moved_files_and_eval_gives_accuracy_without_twins(
    learn_data_dir, tiny_model_dir, tmp_path
):
    """Files moved into the wrong class folder are ranked as likely label errors by the run's model
    (out of sample in the test split, in sample in train); a test image's brightened copy in train
    makes eval report the accuracy with and without it; audit.html renders."""
    data = shutil.copytree(learn_data_dir, tmp_path / "train")
    test = tmp_path / "test"
    for name in SYNTH_CLASSES:  # a separate test set: 8 images of each class
        (test / name).mkdir(parents=True)
        for path in sorted((data / name).iterdir())[:8]:
            shutil.move(path, test / name / path.name)
    moved = {}  # id -> the class the image really shows
    for root, source, target in (
        (test, "Forest", "Desert"),
        (test, "Port", "Beach"),
        (data, "Desert", "Forest"),
    ):
        for path in sorted((root / source).iterdir())[-2:]:
            shutil.move(path, root / target / f"moved_{path.name}")
            moved[f"{target}/moved_{path.name}"] = source
    leaked = sorted((test / "Forest").iterdir())[0]
    _save(
        ImageEnhance.Brightness(Image.open(leaked).convert("RGB")).enhance(1.1), data / "Forest" / "copy.jpg"
    )
    leaked_id = leaked.relative_to(test).as_posix()

    run = tmp_path / "run"
    sets = set_args(
        f"model.name_or_path={tiny_model_dir}",
        f"data.path={data}",
        f"data.test_path={test}",
        f"training.output_dir={run}",
        "training.report_to=none",
    )
    trained = run_command("train.py", ROOT / "configs" / "tiny.yaml", *sets)
    assert trained.returncode == 0, trained.stderr[-3000:]

    out = run / "audit"
    result = run_cli("data", "audit", data, "--run", run, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "likely label errors" in result.stdout
    errors = json.loads((out / "audit.json").read_text())["label_errors"]
    held_out = errors["out_of_sample"]
    assert held_out["scored"] == 4 * 8 + len(
        json.loads((run / "split.json").read_text())["ids"]["validation"]
    )
    flagged = {c["id"]: c for c in held_out["candidates"]}
    moved_test = {i: c for i, c in moved.items() if not i.startswith("Forest/")}
    found = [i for i in moved_test if i in flagged]
    recall, precision = len(found) / len(moved_test), len(found) / max(len(flagged), 1)
    assert recall >= 0.75 and precision >= 0.5, (recall, precision, sorted(flagged))
    for image_id in found:  # given the folder's class, the model names the class the image shows
        assert flagged[image_id]["given"] == image_id.split("/")[0]
        assert flagged[image_id]["model"] == moved_test[image_id] and not flagged[image_id]["in_sample"]
    qualities = [c["label_quality"] for c in held_out["candidates"]]
    assert qualities == sorted(qualities)  # most likely first
    assert all(c["split"] == "train" and c["in_sample"] for c in errors["in_sample"]["candidates"])

    page = (out / "audit.html").read_text()
    assert "Likely label errors" in page and page.count("data:image/jpeg;base64,") >= len(flagged)
    assert "moved_" in page and "http://" not in page and "https://" not in page  # self-contained
    _screenshot_is_not_blank(out / "audit.html", tmp_path / "shot.png")

    evaluated = run_cli("eval", run, "--models", "finetuned", "--modes", "score")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    twins = json.loads((run / "eval" / "report.json").read_text())["test_twins"]
    assert leaked_id in twins["ids"] and len(twins["sources"]) == 2  # split.json's check and the audit
    rows = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    kept = [r for r in rows if r["id"] not in twins["ids"]]
    without = sum(r["outcome"] == "correct" for r in kept) / len(kept)
    assert twins["accuracy"]["finetuned"]["score"]["without"] == pytest.approx(without)
    assert "without" in (run / "eval" / "report.md").read_text().split("**Leakage:**")[1].splitlines()[0]
    assert "twin in training" in (run / "eval" / "report.html").read_text()

    # --run audits the data the run was trained on: another folder is refused in one line
    refused = run_cli("data", "audit", test, "--run", run, "--out", tmp_path / "other")
    assert "not the data" in one_line_error(refused) and not (tmp_path / "other").exists()
