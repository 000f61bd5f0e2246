"""`pixtral-lora map` on rasters that are not a plain north-up UTM GeoTIFF: rotated geotransforms,
geographic CRSs, alpha masks, no CRS, corrupt files, scenes that do not reproject, and the files a map
writes beside its output. Every case through the command users type."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SYNTH_CLASSES, one_line_error

ROOT = Path(__file__).resolve().parents[2]
TILE = 64


def _map(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pixtral_lora.cli", "map", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )


@pytest.fixture(scope="module")
def mosaic_pixels(tmp_path_factory):
    """The pixels of a 2x3 synthetic mosaic (bands, height, width) and its class layout."""
    import rasterio

    from pixtral_lora.data.synth import generate_scene_mosaic

    path = tmp_path_factory.mktemp("pixels") / "scene.tif"
    layout = generate_scene_mosaic(path, SYNTH_CLASSES, grid=(2, 3), tile=TILE, seed=3)
    with rasterio.open(path) as dataset:
        return dataset.read(), layout


def _write(path: Path, pixels: np.ndarray, crs, transform, **creation_options) -> Path:
    from pixtral_lora.data.raster import write_geotiff

    write_geotiff(path, pixels, crs=crs, transform=transform, **creation_options)
    return path


def _ring_area(ring: list[list[float]]) -> float:
    """Signed shoelace area of a closed ring (positive: counter-clockwise)."""
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:], strict=False))


def test_a_rotated_raster_maps_to_its_true_footprint(tiny_run, mosaic_pixels, tmp_path):
    from rasterio.transform import Affine

    pixels, layout = mosaic_pixels
    transform = Affine.translation(500000, 5000000) @ Affine.rotation(30) @ Affine.scale(2, -2)
    scene = _write(tmp_path / "rotated.tif", pixels, "EPSG:32633", transform)
    result = _map(scene, "--run", tiny_run, "--out", tmp_path / "map.geojson", "--tile", TILE)
    assert result.returncode == 0, result.stderr[-3000:]
    features = json.loads((tmp_path / "map.geojson").read_text())["features"]
    assert len(features) == 6
    for feature in features:
        props = feature["properties"]
        ring = feature["geometry"]["coordinates"][0]
        col, row = props["col"] * TILE, props["row"] * TILE
        expected_corners = {
            tuple(np.round(transform @ (c, r), 6))
            for c, r in [(col, row), (col + TILE, row), (col, row + TILE)]
        }
        assert expected_corners <= {tuple(np.round(point, 6)) for point in ring}
        assert _ring_area(ring) == pytest.approx((TILE * 2) ** 2)  # the whole tile, counter-clockwise
    # GDAL reads the map back with the same footprints
    pyogrio = pytest.importorskip("pyogrio")
    info = pyogrio.read_info(tmp_path / "map.geojson")
    assert info["features"] == 6 and "32633" in info["crs"]


def test_tile_m_on_a_geographic_crs_is_refused_and_tile_works(tiny_run, mosaic_pixels, tmp_path):
    from rasterio.transform import from_origin

    pixels, _ = mosaic_pixels
    scene = _write(tmp_path / "wgs84.tif", pixels, "EPSG:4326", from_origin(15.0, 45.0, 0.0001, 0.0001))
    line = one_line_error(_map(scene, "--run", tiny_run, "--out", tmp_path / "m.geojson", "--tile-m", 300))
    assert "--tile-m needs a projected CRS" in line and "EPSG:4326" in line and "--tile" in line
    assert not (tmp_path / "m.geojson").exists() and not (tmp_path / ".m.geojson.lock").exists()
    ok = _map(scene, "--run", tiny_run, "--out", tmp_path / "m.geojson", "--tile", TILE)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert len(json.loads((tmp_path / "m.geojson").read_text())["features"]) == 6


def test_tile_m_converts_the_crs_unit_to_metres(tiny_run, mosaic_pixels, tmp_path):
    from rasterio.transform import from_origin

    pixels, _ = mosaic_pixels
    # EPSG:2263 is in US survey feet: a 1-foot pixel is 0.3048 m, so 19.5 m is 64 pixels
    scene = _write(tmp_path / "feet.tif", pixels, "EPSG:2263", from_origin(980000, 200000, 1.0, 1.0))
    result = _map(scene, "--run", tiny_run, "--out", tmp_path / "f.geojson", "--tile-m", 19.5)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tiles of 64 px" in result.stdout


def test_an_alpha_band_masks_tiles_out(tiny_run, mosaic_pixels, tmp_path):
    from rasterio.transform import from_origin

    pixels, _ = mosaic_pixels
    alpha = np.full(pixels.shape[1:], 255, dtype=np.uint8)
    alpha[:TILE, :TILE] = 0  # tile (0, 0): transparent except a 12-pixel strip (19% valid)
    alpha[:12, :TILE] = 255
    rgba = np.concatenate([pixels, alpha[None]], axis=0)
    scene = _write(
        tmp_path / "rgba.tif",
        rgba,
        "EPSG:32633",
        from_origin(500000, 5000000, 1, 1),
        photometric="RGB",
        alpha="YES",
    )
    import rasterio

    with rasterio.open(scene) as dataset:  # GDAL sees the fourth band as alpha
        assert dataset.colorinterp[3].name == "alpha"
    result = _map(scene, "--run", tiny_run, "--out", tmp_path / "a.geojson", "--tile", TILE)
    assert result.returncode == 0, result.stderr[-3000:]
    features = json.loads((tmp_path / "a.geojson").read_text())["features"]
    assert sorted((f["properties"]["row"], f["properties"]["col"]) for f in features) == [
        (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)
    ]  # fmt: skip
    # with a lower documented minimum the strip is enough
    low = _map(scene, "--run", tiny_run, "--out", tmp_path / "b.geojson", "--tile", TILE, "--min-valid", 0.1)
    assert low.returncode == 0, low.stderr[-3000:]
    assert len(json.loads((tmp_path / "b.geojson").read_text())["features"]) == 6


def test_no_crs_corrupt_file_and_unprojectable_scene_are_one_line_before_the_model(
    tiny_run, mosaic_pixels, tmp_path
):
    from rasterio.transform import from_origin

    pixels, _ = mosaic_pixels
    plain = _write(tmp_path / "nocrs.tif", pixels, None, from_origin(0, 0, 1, 1))
    assert "no CRS" in one_line_error(
        _map(plain, "--run", tiny_run, "--out", tmp_path / "x.geojson", "--tile", TILE)
    )

    whole = _write(tmp_path / "whole.tif", pixels, "EPSG:32633", from_origin(500000, 5000000, 1, 1), tiled=True,
                   blockxsize=16, blockysize=16, compress="deflate")  # fmt: skip
    data = whole.read_bytes()
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(data[: len(data) * 2 // 3])
    line = one_line_error(_map(corrupt, "--run", tiny_run, "--out", tmp_path / "y.geojson", "--tile", TILE))
    assert "corrupt.tif" in line

    geos = "+proj=geos +h=35785831 +lon_0=0 +sweep=y +datum=WGS84 +units=m +no_defs"
    disk = _write(tmp_path / "geos.tif", pixels, geos, from_origin(-5_500_000, 5_500_000, 60_000, 60_000))
    line = one_line_error(
        _map(disk, "--run", tiny_run, "--out", tmp_path / "z.geojson", "--tile", TILE, "--to-wgs84")
    )
    assert "do not reproject" in line and "--to-wgs84" in line
    for name in ("x", "y", "z"):
        assert not list(tmp_path.glob(f"*{name}.geojson*")), name  # no map, journal or lock left


def test_map_never_replaces_a_picture_it_did_not_write(tiny_run, mosaic_pixels, tmp_path):
    from PIL import Image
    from rasterio.transform import from_origin

    pixels, _ = mosaic_pixels
    scene = _write(tmp_path / "s.tif", pixels, "EPSG:32633", from_origin(500000, 5000000, 1, 1))
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "scene.png")
    before = (tmp_path / "scene.png").read_bytes()
    line = one_line_error(_map(scene, "--run", tiny_run, "--out", tmp_path / "scene.geojson", "--tile", TILE))
    assert "scene.png" in line and (tmp_path / "scene.png").read_bytes() == before
    forced = _map(
        scene, "--run", tiny_run, "--out", tmp_path / "scene.geojson", "--tile", TILE, "--overwrite"
    )
    assert forced.returncode == 0, forced.stderr[-3000:]
    again = _map(scene, "--run", tiny_run, "--out", tmp_path / "scene.geojson", "--tile", TILE)
    assert again.returncode == 0, again.stderr[-3000:]  # its own picture is replaced without --overwrite
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no lock left


@pytest.mark.parametrize(
    "option, value, says",
    [
        ("--tile", "0", "greater than or equal to 16"),
        ("--tile", "-64", "greater than or equal to 16"),
        ("--stride", "-1", "greater than or equal to 16"),
        ("--tile-m", "-300", "greater than 0"),
        ("--tile-m", "nan", "finite"),
        ("--min-confidence", "1.5", "less than or equal to 1"),
        ("--min-valid", "-0.1", "greater than or equal to 0"),
        ("--batch-size", "100000", "less than or equal to 1024"),
    ],
)
def test_numeric_options_are_checked_before_anything_runs(option, value, says, tmp_path):
    result = _map(tmp_path / "absent.tif", "--run", tmp_path, "--out", tmp_path / "m.geojson", option, value)
    line = one_line_error(result)
    assert option in line and says in line
