"""Scene mapping on a synthetic georeferenced mosaic: true classes, exact polygons, CRS kept, legend."""

import json

import pytest
from conftest import SYNTH_CLASSES

from pixtral_lora.errors import DataError


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory):
    from pixtral_lora.data.synth import generate_scene_mosaic

    path = tmp_path_factory.mktemp("scene") / "scene.tif"
    layout = generate_scene_mosaic(path, SYNTH_CLASSES, grid=(4, 5), tile=64, seed=1)
    return path, layout


def test_map_finds_the_true_classes_with_exact_polygons_in_the_scenes_crs(tiny_run, mosaic, tmp_path):
    import rasterio
    from rasterio.windows import Window
    from rasterio.windows import bounds as window_bounds

    from pixtral_lora.inference.scene_map import MapOptions, map_scene

    scene, layout = mosaic
    out = tmp_path / "map.geojson"
    summary = map_scene(scene, tiny_run, out, MapOptions(tile=64))
    collection = json.loads(out.read_text())
    assert collection["crs"]["properties"]["name"] == "EPSG:32633"
    features = collection["features"]
    assert len(features) == 20 == summary["classified"]
    assert summary["tile_pixels"] == 64
    correct = sum(
        f["properties"]["label"] == layout[f["properties"]["row"]][f["properties"]["col"]] for f in features
    )
    assert correct / len(features) >= 0.9, (correct, layout)
    with rasterio.open(scene) as dataset:
        for feature in features:
            props = feature["properties"]
            window = Window(props["col"] * 64, props["row"] * 64, 64, 64)
            left, bottom, right, top = window_bounds(window, dataset.transform)
            assert feature["geometry"]["coordinates"][0] == [
                [left, bottom], [right, bottom], [right, top], [left, top], [left, bottom]
            ]  # fmt: skip
            assert len(props["top3"]) == 3 and props["top3"][0][0] == props["label"]
    present = {f["properties"]["label"] for f in features}
    assert sorted(summary["legend"]) == sorted(present)  # the PNG's legend: exactly the classes present
    assert (tmp_path / "map.png").stat().st_size > 10_000


def test_map_in_wgs84_and_as_a_geopackage(tiny_run, mosaic, tmp_path):
    from pixtral_lora.inference.scene_map import MapOptions, map_scene

    scene, _ = mosaic
    map_scene(scene, tiny_run, tmp_path / "wgs84.geojson", MapOptions(tile=64, to_wgs84=True))
    collection = json.loads((tmp_path / "wgs84.geojson").read_text())
    for x, y in collection["features"][0]["geometry"]["coordinates"][0]:
        assert 14 < x < 16 and 45 < y < 46  # UTM 33N, 500 km east, 5,000 km north: near 15 E, 45.1 N
    pyogrio = pytest.importorskip("pyogrio", reason="GeoPackage output needs pyogrio")
    summary = map_scene(
        scene, tiny_run, tmp_path / "map.gpkg", MapOptions(tile_m=640.0)
    )  # 10 m pixels: 64 px
    assert summary["tile_pixels"] == 64
    frame = pyogrio.raw.read(tmp_path / "map.gpkg")
    assert len(frame[2]) == 20 and "32633" in frame[0]["crs"]


def test_map_resumes_skips_empty_tiles_and_refuses_a_scene_smaller_than_a_tile(
    tiny_run, tmp_path, monkeypatch
):
    import numpy as np

    import pixtral_lora.inference.scene_map as scene_map
    from pixtral_lora.data.raster import write_geotiff

    array = np.zeros((3, 96, 96), dtype=np.uint8)
    array[:, :48, :48] = 200  # one tile with content, three empty (0 = no data here)
    write_geotiff(tmp_path / "s.tif", array)
    out = tmp_path / "m.geojson"
    summary = scene_map.map_scene(tmp_path / "s.tif", tiny_run, out, scene_map.MapOptions(tile=48))
    assert summary["classified"] == 1 and summary["empty"] == 3 and summary["tile_pixels"] == 48
    with pytest.raises(DataError, match="smaller than one 128-pixel tile"):
        scene_map.map_scene(
            tmp_path / "s.tif", tiny_run, tmp_path / "x.geojson", scene_map.MapOptions(tile=128)
        )


def test_a_map_killed_half_way_resumes_from_its_journal(tiny_run, mosaic, tmp_path, monkeypatch):
    import pixtral_lora.classify as classify
    from pixtral_lora.inference.scene_map import MapOptions, map_scene

    scene, _ = mosaic
    real, calls = classify.predict_rows, []

    def dies_on_the_third_batch(*args, **kwargs):
        calls.append(len(args[2]))
        if len(calls) == 3:
            raise KeyboardInterrupt  # what a kill looks like from here: the journal keeps two batches
        return real(*args, **kwargs)

    monkeypatch.setattr(classify, "predict_rows", dies_on_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        map_scene(scene, tiny_run, tmp_path / "m.geojson", MapOptions(tile=64, batch_size=4))
    assert not (tmp_path / "m.geojson").exists() and (tmp_path / ".m.geojson.journal.jsonl").exists()
    calls.clear()
    monkeypatch.setattr(classify, "predict_rows", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    summary = map_scene(scene, tiny_run, tmp_path / "m.geojson", MapOptions(tile=64, batch_size=4))
    assert sum(calls) == 20 - 8 and summary["classified"] == 20  # only the 12 tiles not yet done
    assert not (tmp_path / ".m.geojson.journal.jsonl").exists()


def test_a_map_killed_while_writing_its_journal_loses_only_that_tile(tiny_run, mosaic, tmp_path, monkeypatch):
    import pixtral_lora.classify as classify
    from pixtral_lora.inference.scene_map import MapOptions, map_scene

    scene, _ = mosaic
    journal = tmp_path / ".m.geojson.journal.jsonl"
    real, calls = classify.predict_rows, []

    def dies_on_batch(n):
        def predict(*args, **kwargs):
            calls.append(len(args[2]))
            if len(calls) == n:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        return predict

    monkeypatch.setattr(classify, "predict_rows", dies_on_batch(3))
    with pytest.raises(KeyboardInterrupt):
        map_scene(scene, tiny_run, tmp_path / "m.geojson", MapOptions(tile=64, batch_size=4))
    journal.write_bytes(journal.read_bytes()[:-10])  # a kill in the middle of the last record: 7 tiles kept
    calls.clear()
    monkeypatch.setattr(classify, "predict_rows", dies_on_batch(2))
    with pytest.raises(KeyboardInterrupt):  # the torn tile and 3 more, then killed again
        map_scene(scene, tiny_run, tmp_path / "m.geojson", MapOptions(tile=64, batch_size=4))
    calls.clear()
    monkeypatch.setattr(classify, "predict_rows", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    summary = map_scene(scene, tiny_run, tmp_path / "m.geojson", MapOptions(tile=64, batch_size=4))
    assert sum(calls) == 20 - 7 - 4 and summary["classified"] == 20


def test_map_on_ray_gives_the_tiles_map_gives_in_one_process(tiny_run, mosaic, tmp_path):
    """`map --num-processes 2`, a Ray job on a local cluster (the scene named relative to the working directory,
    one tile blank): the same features, empty tile included, as `map` in one process."""
    import subprocess
    import sys

    import rasterio

    from pixtral_lora.data.raster import write_geotiff

    pytest.importorskip("ray")
    with rasterio.open(mosaic[0]) as source:
        pixels, crs, transform = source.read(), source.crs, source.transform
    pixels[:, :64, :64] = 0  # tile 0,0: no data
    write_geotiff(tmp_path / "scene.tif", pixels, crs=crs, transform=transform)
    command = [
        sys.executable,
        "-m",
        "pixtral_lora.cli",
        "map",
        "scene.tif",
        "--run",
        str(tiny_run),
        "--tile",
        "64",
    ]
    maps = {}
    for name, extra in (
        ("one", []),
        ("ray", ["--num-processes", "2", "--batch-size", "4"]),
    ):
        done = subprocess.run([*command, "--out", f"{name}.geojson", *extra], capture_output=True, text=True,
                              cwd=tmp_path)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        assert "19 tiles of 64 px classified (1 empty" in done.stdout
        maps[name] = json.loads((tmp_path / f"{name}.geojson").read_text())["features"]
    assert [f["geometry"] for f in maps["ray"]] == [f["geometry"] for f in maps["one"]]
    for ours, theirs in zip(maps["one"], maps["ray"], strict=True):
        assert theirs["properties"]["label"] == ours["properties"]["label"]
        assert theirs["properties"]["confidence"] == pytest.approx(ours["properties"]["confidence"], abs=1e-5)
    assert not list(tmp_path.glob(".ray.geojson.journal*"))
