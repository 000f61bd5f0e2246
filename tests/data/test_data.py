import base64
import io
import json

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Value
from PIL import Image

from pixtral_lora.data.loaders import (
    DataError,
    export_mistral_jsonl,
    load_aid_folder,
    load_csv,
    load_mistral_jsonl,
    split_dataset,
    to_conversations,
)
from pixtral_lora.data.synth import draw_scene, generate_aid_like
from pixtral_lora.task.prompt import PromptConfig


def test_generator_writes_aid_layout_deterministically(tmp_path):
    generate_aid_like(tmp_path / "a", classes=["Forest", "DenseResidential"], per_class=2, size=32, seed=7)
    generate_aid_like(tmp_path / "b", classes=["Forest", "DenseResidential"], per_class=2, size=32, seed=7)
    files = sorted(p.relative_to(tmp_path / "a").as_posix() for p in (tmp_path / "a").rglob("*.jpg"))
    assert files == [
        "DenseResidential/denseresidential_1.jpg",
        "DenseResidential/denseresidential_2.jpg",
        "Forest/forest_1.jpg",
        "Forest/forest_2.jpg",
    ]
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert (
        np.asarray(draw_scene("Forest", 1, 32, seed=7)).tolist()
        != np.asarray(draw_scene("Forest", 1, 32, seed=8)).tolist()
    )


def test_classes_differ_in_colour_so_a_model_can_learn_them():
    means = {
        c: np.asarray(draw_scene(c, 1, 64)).reshape(-1, 3).mean(0)
        for c in ["Beach", "Desert", "Forest", "Port"]
    }
    names = list(means)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(means[a] - means[b]).max() > 20, (a, b)


def test_folder_loader_sorts_classes_and_counts_skipped_files(aid_dir, tmp_path):
    dataset = load_aid_folder(aid_dir)
    assert dataset.features["label"].names == ["Beach", "Desert", "Forest", "Port"]
    assert len(dataset) == 40 and dataset[0]["id"] == "Beach/beach_1.jpg"
    generate_aid_like(tmp_path / "aid", classes=["Port", "Beach"], per_class=1, size=16)
    (tmp_path / "aid" / "Port" / "notes.txt").write_text("x")
    from pixtral_lora.data.loaders import LoadReport

    report = LoadReport()
    dataset = load_aid_folder(tmp_path / "aid", report)
    assert dataset.features["label"].names == ["Beach", "Port"]
    assert report.kept == 2 and report.skipped == {"not an image file": ["Port/notes.txt"]}


def test_empty_class_folder_is_an_error(tmp_path):
    (tmp_path / "Forest").mkdir()
    with pytest.raises(DataError, match="Forest: class folder has no image files"):
        load_aid_folder(tmp_path)


def test_split_on_aid_sizes_gives_8000_2000_stratified():
    # AID's real class sizes: 30 classes, 220-420 images each, 10,000 in all.
    sizes = [
        360,
        310,
        220,
        400,
        360,
        260,
        240,
        350,
        410,
        300,
        370,
        250,
        390,
        280,
        290,
        340,
        350,
        390,
        370,
        420,
        380,
        260,
        290,
        410,
        300,
        300,
        330,
        290,
        360,
        420,
    ]
    assert sum(sizes) == 10_000
    labels = [c for c, n in enumerate(sizes) for _ in range(n)]
    features = Features({"id": Value("string"), "label": ClassLabel(names=[f"C{i}" for i in range(30)])})
    dataset = Dataset.from_dict({"id": [str(i) for i in range(10_000)], "label": labels}, features=features)
    splits = split_dataset(dataset, test_size=0.2, seed=42)
    assert (len(splits.train), len(splits.test)) == (8000, 2000)
    test_counts = np.bincount(splits.test["label"], minlength=30)
    assert np.all(np.abs(test_counts - np.array(sizes) * 0.2) <= 1)
    assert set(splits.train["id"]).isdisjoint(splits.test["id"])
    again = split_dataset(dataset, test_size=0.2, seed=42)
    assert again.test["id"] == splits.test["id"]
    with_val = split_dataset(dataset, test_size=0.2, validation_size=0.1, seed=42)
    assert (len(with_val.train), len(with_val.validation), len(with_val.test)) == (7200, 800, 2000)


def _data_uri(colour):
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _record(image_url, label="Forest", system=True):
    messages = []
    if system:
        messages.append({"role": "system", "content": "Classify: Forest; Port"})
    messages.append({"role": "user", "content": [{"type": "image_url", "image_url": image_url}]})
    messages.append({"role": "assistant", "content": f'```json\n{{"label": "{label}"}}\n```'})
    return {"messages": messages}


def test_mistral_jsonl_with_data_uris_and_paths(tmp_path):
    Image.new("RGB", (32, 32), (0, 90, 0)).save(tmp_path / "forest.png")
    lines = [_record(_data_uri((0, 0, 200)), "Port"), _record({"url": "forest.png"}, "Forest", system=False)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    dataset = load_mistral_jsonl(tmp_path / "train.jsonl", ["Forest", "Port"])
    assert dataset["label"] == ["Port", "Forest"]
    assert dataset[1]["images"][0]["path"] == str(tmp_path / "forest.png")
    assert json.loads(dataset[0]["messages"])[1]["content"] == [{"type": "image"}]


def test_jsonl_errors_name_line_and_field(tmp_path):
    bad = {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}
    (tmp_path / "bad.jsonl").write_text(
        json.dumps(_record(_data_uri((1, 1, 1)))) + "\n" + json.dumps(bad) + "\n"
    )
    with pytest.raises(DataError, match=r"bad.jsonl:2: messages\[0\].role is 'assistant', expected 'user'"):
        load_mistral_jsonl(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="broken.jsonl:1: invalid JSON"):
        load_mistral_jsonl(tmp_path / "broken.jsonl")


def test_csv_loader(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    (tmp_path / "d.csv").write_text(
        'image_path,prompt,completion\na.png,What is it?,"{""label"": ""Port""}"\n'
    )
    dataset = load_csv(tmp_path / "d.csv", ["Forest", "Port"])
    assert dataset["label"] == ["Port"] and dataset["id"] == ["d.csv:2"]
    messages = json.loads(dataset[0]["messages"])
    assert messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "What is it?"}]
    (tmp_path / "e.csv").write_text("path,text\n")
    with pytest.raises(DataError, match="e.csv:1: header must contain"):
        load_csv(tmp_path / "e.csv")


def test_export_to_mistral_jsonl_round_trips(aid_dir, tmp_path):
    dataset = load_aid_folder(aid_dir).select(range(0, 40, 10))
    conversations = to_conversations(dataset, PromptConfig(), dataset.features["label"].names)
    assert export_mistral_jsonl(conversations, tmp_path / "out.jsonl", longest_edge=32) == 4
    first = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])
    assert first["messages"][1]["content"][0]["image_url"].startswith("data:image/jpeg;base64,")
    back = load_mistral_jsonl(tmp_path / "out.jsonl", dataset.features["label"].names)
    assert back["label"] == ["Beach", "Desert", "Forest", "Port"]
    assert [json.loads(m)[0] for m in back["messages"]] == [
        json.loads(m)[0] for m in conversations["messages"]
    ]
