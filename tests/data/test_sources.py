"""Data from the HF ecosystem, the other scene benchmarks' layouts, and multi-band GeoTIFF tiles."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import SYNTH_CLASSES, hub_like_dataset, tiny_config
from PIL import Image

from pixtral_lora.errors import DataError

ROOT = Path(__file__).resolve().parents[2]


def _hub_splits(aid_dir):
    dataset = hub_like_dataset(aid_dir)
    parts = dataset.train_test_split(test_size=0.25, seed=0, stratify_by_column="label")
    return parts["train"], parts["test"]


def _train(tiny_model_dir, data_path, out, *extra):
    from pixtral_lora.training.recipe import train

    return train(
        tiny_config(
            tiny_model_dir,
            data_path,
            out,
            "training.max_steps=2",
            "training.save_steps=2",
            "training.eval_steps=null",
            "data.validation_size=0.2",
            *extra,
        )
    )


@pytest.mark.slow  # trains a model
def test_trains_from_a_parquet_dataset_in_the_hubs_layout_using_its_splits(tiny_model_dir, aid_dir, tmp_path):
    train_part, test_part = _hub_splits(aid_dir)
    (tmp_path / "hub" / "data").mkdir(parents=True)
    train_part.to_parquet(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")
    test_part.to_parquet(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet")
    run = _train(tiny_model_dir, tmp_path / "hub", tmp_path / "run")
    split = json.loads((run / "split.json").read_text())
    assert split["class_names"] == SYNTH_CLASSES
    assert sorted(split["ids"]["test"]) == sorted(
        f"test/{i}" for i in range(len(test_part))
    )  # its own test split
    assert all(i.startswith("train/") for i in split["ids"]["train"] + split["ids"]["validation"])
    assert len(split["ids"]["train"]) + len(split["ids"]["validation"]) == len(train_part)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow  # trains a model
def test_trains_from_a_save_to_disk_folder_and_an_imagefolder(tiny_model_dir, aid_dir, tmp_path):
    from datasets import DatasetDict

    train_part, test_part = _hub_splits(aid_dir)
    DatasetDict({"train": train_part, "test": test_part}).save_to_disk(tmp_path / "disk")
    run = _train(tiny_model_dir, tmp_path / "disk", tmp_path / "run-disk")
    assert len(json.loads((run / "split.json").read_text())["ids"]["test"]) == len(test_part)

    folder = tmp_path / "imagefolder"
    folder.mkdir()
    lines = ["file_name,label"]
    for name in SYNTH_CLASSES:
        for path in sorted((aid_dir / name).iterdir()):
            (folder / f"{name}_{path.name}").write_bytes(path.read_bytes())
            lines.append(f"{name}_{path.name},{name}")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    run = _train(tiny_model_dir, folder, tmp_path / "run-folder")
    split = json.loads((run / "split.json").read_text())
    assert split["class_names"] == sorted(SYNTH_CLASSES)  # string labels: their sorted distinct values
    assert sum(len(ids) for ids in split["ids"].values()) == 40  # one source split, split 75/25 as usual


def test_a_hub_id_offline_and_uncached_is_one_line_naming_id_and_cache(tmp_path):
    from pixtral_lora.data.hf import load_hf_splits

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(
        DataError,
        match=r"hf://someone/absent: cannot load the Hub dataset .*not in the HF hub cache .* nor the datasets cache",
    ):
        load_hf_splits("hf://someone/absent")


def test_validate_and_preview_read_hf_sources_and_name_split_and_row(aid_dir, tmp_path, capsys):
    from pixtral_lora.cli import main
    from pixtral_lora.data.validate import validate

    dataset = hub_like_dataset(aid_dir)
    rows = dataset.to_dict()
    rows["image"][5] = {"bytes": b"not an image", "path": "broken.jpg"}
    broken = type(dataset).from_dict(rows, features=dataset.features)
    broken.to_parquet(tmp_path / "scenes.parquet")
    problems = validate(tmp_path / "scenes.parquet")
    errors = [p for p in problems if p.severity == "error"]
    assert len(errors) == 1 and errors[0].where.endswith("[train:5]") and errors[0].field == "image"
    shot = tmp_path / "seen.png"
    assert (
        main(["data", "preview", str(tmp_path / "scenes.parquet"), "--index", "0", "--save-image", str(shot)])
        == 0
    )
    assert Image.open(shot).size == (304, 304)  # 64 px scenes resized to the default 300 -> 304


# ---------------------------------------------------------------------------------------------------
# The other scene benchmarks: miniature copies of each layout, real file formats

BENCHMARKS = {
    # config: (folders as the dataset spells them, file suffix, image size, a folder -> expected label)
    "ucm": (
        "agricultural airplane baseballdiamond beach buildings chaparral denseresidential forest freeway "
        "golfcourse harbor intersection mediumresidential mobilehomepark overpass parkinglot river runway "
        "sparseresidential storagetanks tenniscourt",
        ".tif",
        256,
        ("mobilehomepark", "Mobile Home Park"),
    ),
    "nwpu_resisc45": (
        "airplane airport baseball_diamond basketball_court beach bridge chaparral church circular_farmland "
        "cloud commercial_area dense_residential desert forest freeway golf_course ground_track_field harbor "
        "industrial_area intersection island lake meadow medium_residential mobile_home_park mountain overpass "
        "palace parking_lot railway railway_station rectangular_farmland river roundabout runway sea_ice ship "
        "snowberg sparse_residential stadium storage_tank tennis_court terrace thermal_power_station wetland",
        ".jpg",
        256,
        ("ground_track_field", "Ground Track Field"),
    ),
    "eurosat": (
        "AnnualCrop Forest HerbaceousVegetation Highway Industrial Pasture PermanentCrop Residential River SeaLake",
        ".jpg",
        64,
        ("HerbaceousVegetation", "Herbaceous Vegetation"),
    ),
    "patternnet": (
        "airplane baseball_field basketball_court beach bridge cemetery chaparral christmas_tree_farm "
        "closed_road coastal_mansion crosswalk dense_residential ferry_terminal football_field forest freeway "
        "golf_course harbor intersection mobile_home_park nursing_home oil_gas_field oil_well overpass "
        "parking_lot parking_space railway river runway runway_marking shipping_yard solar_panel "
        "sparse_residential storage_tank swimming_pool tennis_court transformer_station "
        "wastewater_treatment_plant",
        ".jpg",
        256,
        ("oil_gas_field", "Oil Gas Field"),
    ),
    "whu_rs19": (
        "Airport Beach Bridge Commercial Desert Farmland footballField Forest Industrial Meadow Mountain Park "
        "Parking Pond Port railwayStation Residential River viaduct",
        ".jpg",
        600,
        ("railwayStation", "Railway Station"),
    ),
}


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_benchmark_layouts_load_with_readable_labels_and_back(name, tmp_path, processor):
    from pixtral_lora.config.yaml_loading import load_config
    from pixtral_lora.data.splits import load_run_data
    from pixtral_lora.model.render import Renderer

    folders, suffix, size, (folder, label) = BENCHMARKS[name]
    folders = folders.split()
    per_class = 5  # NWPU tests on 80%: one training image per class needs five
    rng = np.random.default_rng(0)
    for index, class_folder in enumerate(folders):
        (tmp_path / class_folder).mkdir()
        for n in range(per_class):
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8) // 2 + index
            Image.fromarray(pixels).save(tmp_path / class_folder / f"{class_folder}_{n}{suffix}")
    config = load_config(ROOT / "configs" / f"{name}.yaml", [f"data.path={tmp_path}"])
    data = load_run_data(config)
    assert len(data.class_names) == len(folders) and label in data.class_names
    assert data.label_sources[label] == folder
    assert sorted(data.label_sources.values()) == sorted(folders)  # lossless: every label maps back
    assert all(name == name.strip() and "_" not in name for name in data.class_names)
    test_share = len(data.splits.test) / (len(folders) * per_class)
    assert test_share == pytest.approx(config.data.test_size, abs=0.05)
    renderer = Renderer(processor, config.data.image_longest_edge)
    image = renderer.load_images([data.splits.test[0]["image"]])[0]
    edge = config.data.image_longest_edge
    assert image.size == (round(edge / 16) * 16,) * 2  # e.g. EuroSAT's 64 px upscaled to 256


# ---------------------------------------------------------------------------------------------------
# Multi-band GeoTIFF tiles


def test_band_selection_and_percentile_stretch_are_exact(tmp_path):
    from pixtral_lora.data.images import load_image
    from pixtral_lora.data.raster import BandOptions, write_geotiff

    # 4 bands, uint16; band b holds the values 1000*b + 0..99 in a 10x10 ramp, plus a nodata corner
    ramp = np.arange(100, dtype=np.uint16).reshape(10, 10)
    array = np.stack([1000 * b + ramp for b in range(1, 5)])
    array[:, 0, 0] = 0
    write_geotiff(tmp_path / "tile.tif", array, nodata=0)
    image = np.asarray(load_image(tmp_path / "tile.tif", bands=BandOptions(bands=(4, 3, 2))))
    valid = ramp.astype(float)[ramp > 0]  # nodata left out of the percentiles
    low, high = np.percentile(valid, [2, 98])
    expected = np.clip((ramp - low) * 255.0 / (high - low) + 0.5, 0, 255).astype(np.uint8)
    expected[0, 0] = 0
    for channel in range(3):  # every band is a shifted copy of the same ramp: same stretched values
        assert np.array_equal(image[:, :, channel], expected)
    fixed = BandOptions(bands=(1, 2, 3), stretch=((1000, 1099), (2000, 2099), (3000, 3099)))
    image = np.asarray(load_image(tmp_path / "tile.tif", bands=fixed))
    assert image[9, 9, 0] == 255 and image[0, 1, 1] == round(1 * 255 / 99)
    with pytest.raises(Exception, match="bands 1..4"):
        load_image(tmp_path / "tile.tif", bands=BandOptions(bands=(5, 3, 2)))


@pytest.mark.slow  # trains a model
def test_trains_from_a_13_band_geotiff_folder_and_preview_shows_the_same_pixels(
    tiny_model_dir, aid_dir, tmp_path
):
    from pixtral_lora.cli import main
    from pixtral_lora.data.raster import write_geotiff

    data = tmp_path / "ms"
    for name in SYNTH_CLASSES:
        (data / name).mkdir(parents=True)
        for path in sorted((aid_dir / name).iterdir()):
            rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.uint16) * 10  # reflectance-like
            bands = np.zeros((13, *rgb.shape[:2]), dtype=np.uint16) + 500
            bands[3], bands[2], bands[1] = rgb[..., 0], rgb[..., 1], rgb[..., 2]  # B4, B3, B2 = R, G, B
            write_geotiff(data / name / f"{path.stem}.tif", bands)
    run = _train(
        tiny_model_dir,
        data,
        tmp_path / "run",
        "data.bands=[4, 3, 2]",
        "data.stretch=[[0, 2550], [0, 2550], [0, 2550]]",
    )
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    shot = tmp_path / "seen.png"
    first = sorted((data / SYNTH_CLASSES[0]).iterdir())[0]
    assert (
        main(["data", "preview", str(data), "--config", str(run / "config.yaml"), "--save-image", str(shot)])
        == 0
    )
    seen = np.asarray(Image.open(shot).convert("RGB"), dtype=int)
    original = np.asarray(
        Image.open(aid_dir / SYNTH_CLASSES[0] / f"{first.stem}.jpg").convert("RGB"), dtype=int
    )
    assert seen.shape == original.shape and np.abs(seen - original).max() <= 1  # the stretch undoes the x10


def test_rendering_an_hf_source_again_is_read_from_the_datasets_cache(
    aid_dir, tmp_path, processor, monkeypatch
):
    from pixtral_lora.data.hf import load_hf_splits
    from pixtral_lora.data.loaders import as_conversations
    from pixtral_lora.model.render import Renderer, render_dataset
    from pixtral_lora.task.prompt import PromptConfig

    hub_like_dataset(aid_dir).to_parquet(tmp_path / "scenes.parquet")

    def rendered():
        splits, names = load_hf_splits(str(tmp_path / "scenes.parquet"))
        return render_dataset(
            Renderer(processor, 64, 512), as_conversations(splits["train"], PromptConfig(), names)
        )

    first = rendered()
    monkeypatch.setattr(Renderer, "render_row", lambda *a: pytest.fail("rendered again"))
    again = rendered()  # same source, same settings: the datasets fingerprint finds the cached result
    assert again["input_ids"] == first["input_ids"] and len(again) == 40


def test_a_test_path_that_is_an_hf_dataset_with_splits_is_all_test_data(aid_dir, tmp_path):
    from datasets import DatasetDict

    from pixtral_lora.config.yaml_loading import load_config
    from pixtral_lora.data.splits import load_run_data

    train_part, test_part = _hub_splits(aid_dir)
    train_part.to_parquet(tmp_path / "train.parquet")
    DatasetDict({"train": test_part.select(range(4)), "test": test_part.select(range(4, 10))}).save_to_disk(
        tmp_path / "held-out"
    )
    config = load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            f"data.path={tmp_path / 'train.parquet'}",
            f"data.test_path={tmp_path / 'held-out'}",
            "data.validation_size=0.2",
        ],
    )
    splits = load_run_data(config).splits
    assert len(splits.test) == 10 and sorted(splits.test["id"])[:2] == ["test/0", "test/1"]
    assert len(splits.train) + len(splits.validation) == len(train_part)
