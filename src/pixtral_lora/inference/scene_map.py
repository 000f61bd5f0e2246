"""Scene mapping: `pixtral-lora map SCENE.tif --run RUN --out map.geojson` -> a land-use map for QGIS.

The scene (GeoTIFF/COG, any CRS) is read window by window with rasterio, never whole. Tiles are
`--tile` pixels (or `--tile-m` metres, from the raster's resolution, so the model sees ground
footprints like its training scenes'), every `--stride` pixels; tiles that are all nodata (or all
zero) are skipped; at the right and bottom edges a partial tile is padded with nodata (`--edges pad`,
the default: the model sees the part that exists, the polygon covers only that part) or skipped
(`--edges skip`). Bands and stretch are the run's own (`data.bands`, `data.stretch`), so a tile looks
like the training tiles did. Tiles are classified in batches by the same code as `eval` and
`predict`; results go to a journal as they come, so a killed run resumes where it stopped.

Outputs: a GeoJSON FeatureCollection (or a GeoPackage for `*.gpkg`, needs pyogrio) of tile polygons
in the raster's CRS (or EPSG:4326 with `--to-wgs84`), with label, confidence, top-3 and tile row/col;
and `<out>.png`: the scene with tiles coloured by class (a fixed colour-blind-safe palette indexed by
the run's class list), tiles under `--min-confidence` hatched, and a legend of the classes present.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from pixtral_lora.errors import DataError
from pixtral_lora.io import atomic_file, check_replaceable_file, drop_torn_tail, locks_its_output
from pixtral_lora.raster import read_rgb

logger = logging.getLogger(__name__)

# Okabe-Ito, then Paul Tol's muted and light schemes: distinguishable with the common colour-vision
# deficiencies; a class's colour is fixed by its position in the run's class list.
PALETTE = [
    "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000",
    "#332288", "#88CCEE", "#44AA99", "#117733", "#999933", "#DDCC77", "#CC6677", "#882255",
    "#AA4499", "#77AADD", "#EE8866", "#EEDD88", "#FFAABB", "#99DDFF", "#BBCC33", "#AAAA00",
    "#DDDDDD", "#44BB99",
]  # fmt: skip


def class_colour(class_names: list[str], name: str) -> str:
    """The fixed colour of a class: its index in the run's class list, in PALETTE (cycling)."""
    return PALETTE[class_names.index(name) % len(PALETTE)]


def _windows(width: int, height: int, tile: int, stride: int, edges: str):
    """(tile row, tile col, window, partial) row by row; partial tiles at the edges unless skipped."""
    from rasterio.windows import Window

    for row_off in range(0, height, stride):
        for col_off in range(0, width, stride):
            partial = row_off + tile > height or col_off + tile > width
            if partial and edges == "skip":
                continue
            yield row_off // stride, col_off // stride, Window(col_off, row_off, tile, tile), partial


def _is_mappable(out: Path) -> bool:
    """A map an earlier `pixtral-lora map` wrote (so a rerun may replace it)."""
    if out.suffix == ".gpkg":
        return out.with_name(f".{out.name}.pixtral-lora").exists()
    try:
        return json.loads(out.read_text(encoding="utf-8")).get("pixtral_lora") == "map"
    except (ValueError, OSError, AttributeError):
        return False


@locks_its_output
def map_scene(
    scene: str | Path,
    run_dir: str | Path,
    out: str | Path,
    tile: int = 600,
    stride: int | None = None,
    tile_m: float | None = None,
    resize_to: int | None = None,
    mode: str = "score",
    min_confidence: float = 0.5,
    to_wgs84: bool = False,
    model_path: str | None = None,
    edges: str = "pad",
    batch_size: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Classify the tiles of a georeferenced scene; write the map (GeoJSON/GPKG) and its PNG.

    A lock on the output (`.OUT.lock`) keeps a second command off it while this one runs.
    """
    import rasterio

    from pixtral_lora.evaluation.evaluate import RunClassifier

    out, scene, run_dir = Path(out), Path(scene), Path(run_dir)
    if out.suffix not in (".geojson", ".json", ".gpkg"):
        raise DataError(f"--out {out}: use a .geojson or .gpkg file name")
    check_replaceable_file(out, _is_mappable, overwrite)
    classify = RunClassifier(run_dir, model_path, resize_to)
    if not scene.is_file():
        raise DataError(f"{scene}: no such scene file")
    bands = classify.config.data.band_options()
    try:
        dataset = rasterio.open(scene)
    except rasterio.errors.RasterioIOError as err:
        raise DataError(f"{scene}: not a raster rasterio can read ({err})") from None
    with dataset:
        if tile_m:
            tile = max(16, round(tile_m / abs(dataset.res[0])))
        stride = stride or tile
        if dataset.width < tile or dataset.height < tile:
            raise DataError(
                f"{scene}: the scene is {dataset.width}x{dataset.height} pixels, smaller than one "
                f"{tile}-pixel tile; use a smaller --tile (or --tile-m)"
            )
        journal = out.with_name(f".{out.name}.journal.jsonl")
        identity = {
            "scene": str(scene.resolve()),
            "size": scene.stat().st_size,
            "mtime": scene.stat().st_mtime,
            "tile": tile,
            "stride": stride,
            "edges": edges,
            "mode": mode,
            "run": str(run_dir.resolve()),
        }
        done = _read_journal(journal, identity)
        windows = list(_windows(dataset.width, dataset.height, tile, stride, edges))
        batch_size = batch_size or classify.config.eval.batch_size
        if journal.exists():
            drop_torn_tail(journal)
        with open(journal, "a", encoding="utf-8") as log:
            if not done:
                log.write(json.dumps({"identity": identity}) + "\n")
            pending = [w for w in windows if f"{w[0]},{w[1]}" not in done]
            for begin in tqdm(range(0, len(pending), batch_size), desc="mapping", unit="batch", disable=None):
                rows, meta = [], {}
                for row, col, window, partial in pending[begin : begin + batch_size]:
                    key = f"{row},{col}"
                    read = _read_tile(dataset, bands, scene, window, partial)
                    if read is None:
                        done[key] = {"empty": True}
                        log.write(json.dumps({"key": key, "empty": True}) + "\n")
                        continue
                    png, valid_window = read
                    rows.append(classify.row(key, {"path": None, "bytes": png}))
                    meta[key] = {"row": row, "col": col, "window": valid_window}  # the valid pixels
                if rows:
                    for p in classify(rows, mode, batch_size):
                        record = {
                            "key": p.id,
                            **meta[p.id],
                            "label": p.label,
                            "confidence": p.confidence,
                            "top3": p.top3(),
                            "raw_answer": p.raw_answer,
                        }
                        done[p.id] = record
                        log.write(json.dumps(record) + "\n")
                log.flush()
                os.fsync(log.fileno())
        features = _features(windows, done, dataset, to_wgs84, min_confidence)
        empty = len(windows) - len(features)
        crs = "EPSG:4326" if to_wgs84 else dataset.crs.to_string()
        legend = _plot_map(
            dataset, bands, features, classify.class_names, out.with_suffix(".png"), tile, min_confidence
        )
    _write_vector(out, features, crs, overwrite=True)
    journal.unlink(missing_ok=True)
    labels = {}
    for feature in features:
        label = feature["properties"]["label"] or "(no valid label)"
        labels[label] = labels.get(label, 0) + 1
    return {
        "out": str(out),
        "png": str(out.with_suffix(".png")),
        "tiles": len(windows),
        "classified": len(features),
        "empty": empty,
        "tile_pixels": tile,
        "crs": crs,
        "per_label": labels,
        "legend": legend,
    }


def _read_tile(dataset, bands, scene: Path, window, partial: bool) -> tuple | None:
    """One tile as PNG bytes and its valid pixels' window [column, row, width, height]; None when
    the tile holds no data (nodata everywhere, or all black)."""
    rgb, valid = read_rgb(dataset, bands, str(scene), window, boundless=partial)
    if not valid.any() or not rgb.any():
        return None
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    valid_rows, valid_cols = valid.any(axis=1).nonzero()[0], valid.any(axis=0).nonzero()[0]
    pixels = [
        int(window.col_off) + int(valid_cols.min()),
        int(window.row_off) + int(valid_rows.min()),
        int(valid_cols.max() - valid_cols.min() + 1),
        int(valid_rows.max() - valid_rows.min() + 1),
    ]
    return buffer.getvalue(), pixels


def _features(windows, done: dict, dataset, to_wgs84: bool, min_confidence: float) -> list[dict]:
    """GeoJSON features of the classified tiles, in window order; each polygon is the tile's valid
    pixels through the scene's geotransform (reprojected to WGS84 when asked)."""
    from rasterio.warp import transform_geom
    from rasterio.windows import Window
    from rasterio.windows import bounds as window_bounds

    features = []
    for row, col, _, _ in windows:
        record = done[f"{row},{col}"]
        if record.get("empty"):
            continue
        left, bottom, right, top = window_bounds(Window(*record["window"]), dataset.transform)
        geometry = {
            "type": "Polygon",
            "coordinates": [[[left, bottom], [right, bottom], [right, top], [left, top], [left, bottom]]],
        }
        if to_wgs84:
            geometry = transform_geom(dataset.crs, "EPSG:4326", geometry)
        confidence = record["confidence"]
        features.append(
            {
                "type": "Feature",
                "geometry": geometry,
                "properties": {
                    "label": record["label"],
                    "confidence": confidence,
                    "top3": record["top3"],
                    "row": row,
                    "col": col,
                    "window": record["window"],  # pixels: column, row, width, height
                    "low_confidence": confidence is not None and confidence < min_confidence,
                },
            }
        )
    return features


def _read_journal(journal: Path, identity: dict) -> dict:
    """Tiles already classified for this same scene and settings (a journal of another run is dropped)."""
    if not journal.exists():
        return {}
    done, lines = {}, journal.read_text(encoding="utf-8").splitlines()
    try:
        if json.loads(lines[0]).get("identity") != identity:
            journal.unlink()
            return {}
    except (ValueError, IndexError):
        journal.unlink()
        return {}
    for line in lines[1:]:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill: that tile is redone
        done[record["key"]] = record
    if done:
        logger.info("resuming: %d tiles already classified", len(done))
    return done


def _write_vector(out: Path, features: list[dict], crs: str, overwrite: bool) -> None:
    """GeoJSON (with its CRS named), or a GeoPackage converted from it by pyogrio (GDAL)."""
    collection = {
        "type": "FeatureCollection",
        "pixtral_lora": "map",
        "crs": {"type": "name", "properties": {"name": crs}},  # GeoJSON 2008 member; GDAL and QGIS read it
        "features": [
            {**f, "properties": {**f["properties"], "top3": json.dumps(f["properties"]["top3"])}}
            if out.suffix == ".gpkg"
            else f
            for f in features
        ],
    }
    if out.suffix != ".gpkg":
        with atomic_file(out, recognise=_is_mappable, overwrite=overwrite) as handle:
            json.dump(collection, handle)
        return
    try:
        from pyogrio.raw import read, write
    except ImportError as err:
        raise DataError(
            "writing a GeoPackage needs pyogrio: pip install pyogrio (or use --out map.geojson)"
        ) from err
    import tempfile

    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        source = Path(scratch) / "map.geojson"
        source.write_text(json.dumps(collection))
        meta, _, geometry, field_data = read(source)
        target = Path(scratch) / out.name
        write(target, geometry, field_data, meta["fields"], crs=crs, geometry_type="Polygon", driver="GPKG")
        target.replace(out)
    out.with_name(f".{out.name}.pixtral-lora").write_text("map\n")


def _plot_map(
    dataset, bands, features, class_names, png: Path, tile: int, min_confidence: float
) -> list[str]:
    """The scene thumbnail with tiles coloured by class, low-confidence tiles hatched, and a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    scale = max(1.0, max(dataset.width, dataset.height) / 1024)
    shape = (int(dataset.height / scale), int(dataset.width / scale))
    thumbnail, _ = read_rgb(dataset, bands, "scene", out_shape=shape)
    figure, axes = plt.subplots(figsize=(9, 9 * shape[0] / shape[1] + 0.5))
    axes.imshow(thumbnail, extent=(0, dataset.width, dataset.height, 0))
    present: dict[str, int] = {}
    for feature in features:
        props = feature["properties"]
        label = props["label"]
        if label is None:
            continue
        present[label] = present.get(label, 0) + 1
        x0, y0, w, h = props["window"]
        colour = class_colour(class_names, label)
        axes.add_patch(Rectangle((x0, y0), w, h, facecolor=colour, alpha=0.6, edgecolor="none"))
        axes.add_patch(
            Rectangle(
                (x0, y0),
                w,
                h,
                fill=False,
                edgecolor="white",
                linewidth=0.6,
                hatch="///" if props["low_confidence"] else None,
            )
        )
    legend = sorted(present, key=lambda name: (-present[name], name))
    handles = [
        Patch(facecolor=class_colour(class_names, name), alpha=0.6, label=f"{name} ({present[name]})")
        for name in legend
    ]
    if any(f["properties"]["low_confidence"] for f in features):
        handles.append(
            Patch(facecolor="white", edgecolor="black", hatch="///", label=f"confidence < {min_confidence}")
        )
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    axes.set_axis_off()
    axes.set_title(f"{Path(dataset.name).name}: {len(features)} tiles of {tile} px")
    figure.tight_layout()
    with atomic_file(png, "wb") as handle:
        figure.savefig(handle, format="png", dpi=100)
    plt.close(figure)
    return legend
