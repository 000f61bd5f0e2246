"""Scene mapping: `pixtral-lora map SCENE.tif --run RUN --out map.geojson` -> a land-use map for QGIS.

The scene (GeoTIFF/COG, any projected or geographic CRS; one without a CRS is refused) is read
window by window with rasterio, never whole. Tiles are `--tile` pixels (or `--tile-m` metres,
converted with the CRS's linear unit so the model sees ground footprints like its training scenes';
refused on a geographic CRS, whose degrees have no fixed ground size), every `--stride` pixels. A
tile is classified only when at least `--min-valid` (default half) of its pixels are valid by GDAL's
dataset mask (alpha band, internal mask, nodata) and it is not all black; the others are counted as
empty. At the right and bottom edges a partial tile is padded with nodata (`--edges pad`,
the default: the model sees the part that exists, the polygon covers only that part) or skipped
(`--edges skip`). Bands and stretch are the run's own (`data.bands`, `data.stretch`), so a tile looks
like the training tiles did. Tiles are classified in batches by the same code as `eval` and
`predict`; results go to a journal as they come, so a killed run resumes where it stopped.

Before any tile is classified the scene must have a CRS, its first and last pixels must read, and
with `--to-wgs84` its corners must reproject to finite coordinates.

Outputs: a GeoJSON FeatureCollection (or a GeoPackage for `*.gpkg`, needs pyogrio) of tile polygons
(each tile's four valid-pixel corners through the geotransform, so rotated rasters map to their true
footprint) in the raster's CRS (or EPSG:4326 with `--to-wgs84`), with label, confidence, top-3 and tile row/col;
and `<out>.png`: the scene with tiles coloured by class (a fixed colour-blind-safe palette indexed by
the run's class list), tiles under `--min-confidence` hatched, and a legend of the classes present.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from pixtral_lora.data.raster import band_options, read_rgb
from pixtral_lora.errors import DataError
from pixtral_lora.inference.classifier import Backend
from pixtral_lora.outputs import (
    PNG_SOFTWARE,
    atomic_file,
    check_replaceable_file,
    drop_torn_tail,
    is_our_png,
    locks_its_output,
)

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


# The least share of a tile's pixels that must be valid (GDAL's mask: alpha, internal mask, nodata)
# for it to be classified; tiles with less are counted as empty. `--min-valid` changes it.
MIN_VALID_SHARE = 0.5


def _check_scene(dataset, scene: Path, to_wgs84: bool) -> None:
    """What can be checked before any tile is classified: a CRS, a readable first and last block,
    and (with `to_wgs84`) a footprint that reprojects to finite coordinates."""
    import numpy as np
    from rasterio.errors import RasterioError
    from rasterio.windows import Window

    if dataset.crs is None:
        raise DataError(
            f"{scene}: the raster has no CRS (not georeferenced): a map needs one; assign it with "
            "`gdal_edit.py -a_srs EPSG:NNNN` (or classify its tiles with `pixtral-lora predict`)"
        )
    try:
        for col, row in ((0, 0), (dataset.width - 1, dataset.height - 1)):
            dataset.read(1, window=Window(col, row, 1, 1))
    except RasterioError as err:
        raise DataError(f"{scene}: the raster cannot be read ({_gdal_reason(err)})") from None
    if to_wgs84:
        from rasterio.warp import transform

        corners = [(0, 0), (dataset.width, 0), (dataset.width, dataset.height), (0, dataset.height)]
        xs, ys = zip(*(dataset.transform @ corner for corner in corners), strict=True)
        try:
            lons, lats = transform(dataset.crs, "EPSG:4326", list(xs), list(ys))
        except Exception as err:  # PROJ errors come as several types
            lons, lats = [float("nan")], [str(err)]
        if not (np.all(np.isfinite(lons)) and np.all(np.isfinite(np.asarray(lats, dtype=float)))):
            raise DataError(
                f"{scene}: the scene's corners do not reproject from {dataset.crs.to_string()} to EPSG:4326 "
                "(e.g. a geostationary view that reaches into space); write the map without --to-wgs84"
            )


def _gdal_reason(err: Exception) -> str:
    """GDAL's own words for a failed read (rasterio puts them in the exception's cause)."""
    cause = err.__cause__ or err
    return (str(cause).splitlines() or [type(cause).__name__])[0][:200]


def _tile_pixels(dataset, scene: Path, tile: int, tile_m: float | None) -> int:
    """`--tile-m` metres as pixels in the raster's linear unit (refused on a geographic CRS)."""
    if not tile_m:
        return tile
    if dataset.crs.is_geographic:
        raise DataError(
            f"{scene}: --tile-m needs a projected CRS; {dataset.crs.to_string()} is in degrees, whose "
            "ground size varies with latitude: give --tile in pixels, or reproject the scene (gdalwarp -t_srs)"
        )
    unit, metres_per_unit = dataset.crs.linear_units_factor
    pixel_m = abs(dataset.res[0]) * metres_per_unit
    pixels = round(tile_m / pixel_m)
    if pixels < 16:
        raise DataError(
            f"--tile-m {tile_m}: {pixels} pixels of {pixel_m:.3g} m ({unit}); a tile needs at least 16"
        )
    return pixels


@dataclasses.dataclass(frozen=True)
class MapOptions:
    """How `map_scene` tiles and classifies a scene, built once by `pixtral-lora map`."""

    tile: int = 600  # pixels (AID's 600x600)
    stride: int | None = None  # None: the tile, no overlap
    tile_m: float | None = None  # the tile in metres, instead of pixels
    resize_to: int | None = None
    mode: str = "score"
    min_confidence: float = 0.5
    to_wgs84: bool = False
    model_path: str | None = None  # a merged checkpoint instead of the run's adapter
    edges: str = "pad"
    batch_size: int | None = None
    overwrite: bool = False
    force: bool = False  # use a run whose base/config/split changed since training
    min_valid: float = MIN_VALID_SHARE
    abstain_below: float | None = None
    target_accuracy: float | None = None
    backend: Backend = Backend()  # transformers, or vLLM on Mistral-format exports
    ray_address: str | None = None  # a Ray Data job: "local" (a cluster in-process), "auto" or HOST:PORT
    replicas: int = 1  # with ray_address: engines (Ray actors), each holding one model


@locks_its_output
def map_scene(
    scene: str | Path, run_dir: str | Path, out: str | Path, options: MapOptions = MapOptions()
) -> dict:
    """Classify the tiles of a georeferenced scene; write the map (GeoJSON/GPKG) and its PNG.

    A lock on the output (`.OUT.lock`) keeps a second command off it while this one runs. Both
    files follow the foreign-file rule: an existing one is replaced only when an earlier map wrote it.
    """
    import rasterio

    from pixtral_lora.inference.classifier import RunClassifier

    tile, stride, tile_m, resize_to, mode = (
        options.tile,
        options.stride,
        options.tile_m,
        options.resize_to,
        options.mode,
    )
    min_confidence, to_wgs84, edges, overwrite = (
        options.min_confidence,
        options.to_wgs84,
        options.edges,
        options.overwrite,
    )
    batch_size, min_valid = options.batch_size, options.min_valid
    out, scene, run_dir = Path(out), Path(scene), Path(run_dir)
    if out.suffix not in (".geojson", ".json", ".gpkg"):
        raise DataError(f"--out {out}: use a .geojson or .gpkg file name")
    png = out.with_suffix(".png")
    check_replaceable_file(out, _is_mappable, overwrite)
    check_replaceable_file(png, is_our_png, overwrite)
    classifier_args = (  # what builds the classifier: here, and in each Ray replica
        run_dir,
        options.model_path,
        resize_to,
        options.abstain_below,
        options.target_accuracy,
        options.force,
        options.backend,
    )
    classify = RunClassifier(*classifier_args)
    if not scene.is_file():
        raise DataError(f"{scene}: no such scene file")
    bands = band_options(classify.config.data)
    try:
        dataset = rasterio.open(scene)
    except rasterio.errors.RasterioIOError as err:
        raise DataError(f"{scene}: not a raster rasterio can read ({err})") from None
    with dataset:
        _check_scene(dataset, scene, to_wgs84)
        tile = _tile_pixels(dataset, scene, tile, tile_m)
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
            "min_valid": min_valid,
            "resize_to": resize_to,
            "model": classify.identity(),
        }
        done = _read_journal(journal, identity)
        windows = list(_windows(dataset.width, dataset.height, tile, stride, edges))
        batch_size = batch_size or classify.config.eval.batch_size
        if journal.exists():
            drop_torn_tail(journal)
        try:
            with open(journal, "a", encoding="utf-8") as log:
                if not done:
                    log.write(json.dumps({"identity": identity}) + "\n")
                pending = [w for w in windows if f"{w[0]},{w[1]}" not in done]
                writer = _JournalWriter(log, done)
                work = _TileWork(str(scene.absolute()), bands, min_valid, mode, batch_size)
                if options.ray_address is not None:
                    from pixtral_lora.inference.ray_job import RayOptions, run_on_ray

                    ray_options = RayOptions(options.ray_address, options.replicas, batch_size)
                    run_on_ray(classifier_args, pending, work, writer, ray_options, f"mapping ({mode})")
                else:
                    work.dataset = dataset  # this process's open raster
                    for begin in tqdm(
                        range(0, len(pending), batch_size), desc="mapping", unit="batch", disable=None
                    ):
                        writer.write(work(classify, pending[begin : begin + batch_size])[0])
        except BaseException:
            if not done:  # nothing classified yet: no journal of a header alone is left behind
                journal.unlink(missing_ok=True)
            raise
        features = _features(windows, done, dataset, to_wgs84, min_confidence)
        empty = len(windows) - len(features)
        crs = "EPSG:4326" if to_wgs84 else dataset.crs.to_string()
        legend = _plot_map(
            dataset, bands, features, classify.class_names, png, tile, min_confidence, overwrite
        )
    _write_vector(out, features, crs, overwrite=True, warnings=classify.run.warnings)
    journal.unlink(missing_ok=True)
    labels: dict[str, int] = {}  # an abstained tile is counted as abstained, not under its label
    for feature in features:
        props = feature["properties"]
        label = "(abstained)" if props.get("abstained") else props["label"] or "(no valid label)"
        labels[label] = labels.get(label, 0) + 1
    return {
        "out": str(out),
        "png": str(png),
        "tiles": len(windows),
        "classified": len(features),
        "empty": empty,
        "tile_pixels": tile,
        "crs": crs,
        "per_label": labels,
        "legend": legend,
    }


@dataclasses.dataclass
class _TileWork:
    """What `map` does per batch of tile windows, in this process or a Ray replica: read each tile
    (GDAL), classify those with enough valid pixels; the journal records, and 0 skipped."""

    scene: str  # absolute: a replica may run in another working directory
    bands: object
    min_valid: float
    mode: str
    batch_size: int
    dataset: object = None  # the open raster; a replica opens its own at its first batch

    def __getstate__(self) -> dict:
        return {**self.__dict__, "dataset": None}  # an open raster does not travel

    def __call__(self, classify, windows: list) -> tuple[list[dict], int]:
        if self.dataset is None:
            import rasterio

            self.dataset = rasterio.open(self.scene)
        records, rows, meta = [], [], {}
        for row, col, window, partial in windows:
            key = f"{row},{col}"
            read = _read_tile(self.dataset, self.bands, Path(self.scene), window, partial, self.min_valid)
            if read is None:
                records.append({"key": key, "empty": True})
                continue
            png_bytes, valid_window = read
            rows.append(classify.row(key, {"path": None, "bytes": png_bytes}))
            meta[key] = {"row": row, "col": col, "window": valid_window}  # the valid pixels
        for p in classify(rows, self.mode, self.batch_size) if rows else []:
            records.append({
                "key": p.id,
                **meta[p.id],
                "label": p.label,
                "confidence": p.confidence,
                "calibrated": p.calibrated,
                "abstained": p.abstained,
                "top3": p.top3(),
                "raw_answer": p.raw_answer,
            })  # fmt: skip
        return records, 0


class _JournalWriter:
    """Appends a batch's records to map's journal, synced, and keeps them in `done`."""

    def __init__(self, log, done: dict):
        self.log, self.done = log, done

    def write(self, records: list[dict]) -> None:
        for record in records:
            self.done[record["key"]] = record
            self.log.write(json.dumps(record) + "\n")
        self.log.flush()
        os.fsync(self.log.fileno())

    def close(self) -> None:
        """The journal stays open: `map_scene`'s own block closes it."""


def _read_tile(dataset, bands, scene: Path, window, partial: bool, min_valid: float) -> tuple | None:
    """One tile as PNG bytes and its valid pixels' window [column, row, width, height]; None when
    fewer than `min_valid` of the tile's pixels are valid (GDAL's mask), or it is all black."""
    from rasterio.errors import RasterioError

    try:
        rgb, valid = read_rgb(dataset, bands, str(scene), window, boundless=partial)
    except RasterioError as err:
        raise DataError(
            f"{scene}: tile at pixel column {int(window.col_off)}, row {int(window.row_off)} cannot be read "
            f"({_gdal_reason(err)}); the tiles before it are kept for a rerun"
        ) from None
    if valid.mean() < min_valid or not valid.any() or not rgb.any():
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

    features = []
    for row, col, _, _ in windows:
        record = done[f"{row},{col}"]
        if record.get("empty"):
            continue
        col_off, row_off, width, height = record["window"]
        bottom, top, left, right = row_off + height, row_off, col_off, col_off + width
        pixel_ring = [(left, bottom), (right, bottom), (right, top), (left, top), (left, bottom)]
        if (
            dataset.transform.determinant > 0
        ):  # the pixel grid is not mirrored: keep the ring counter-clockwise
            pixel_ring.reverse()
        # every corner through the affine geotransform: right for rotated and sheared rasters too
        ring = [list(dataset.transform @ corner) for corner in pixel_ring]
        geometry = {"type": "Polygon", "coordinates": [ring]}
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
                    "calibrated": bool(record.get("calibrated")),
                    "abstained": bool(record.get("abstained")),
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


def _write_vector(
    out: Path, features: list[dict], crs: str, overwrite: bool, warnings: list[str] = ()
) -> None:
    """GeoJSON (with its CRS named), or a GeoPackage converted from it by pyogrio (GDAL)."""
    collection = {
        "type": "FeatureCollection",
        "pixtral_lora": "map",
        **({"warnings": list(warnings)} if warnings else {}),  # what --force let through
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
    dataset, bands, features, class_names, png: Path, tile: int, min_confidence: float, overwrite: bool
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
    present_abstained = False
    for feature in features:
        props = feature["properties"]
        label = props["label"]
        if label is None:
            continue
        if props.get("abstained"):  # left for a person to check: grey, cross-hatched
            x0, y0, w, h = props["window"]
            axes.add_patch(
                Rectangle((x0, y0), w, h, facecolor="#bbbbbb", alpha=0.7, hatch="xx", edgecolor="white")
            )
            present_abstained = True
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
    if present_abstained:
        abstained = sum(1 for f in features if f["properties"].get("abstained"))
        handles.append(Patch(facecolor="#bbbbbb", hatch="xx", label=f"abstained ({abstained}): check"))
    if any(f["properties"]["low_confidence"] for f in features):
        handles.append(
            Patch(facecolor="white", edgecolor="black", hatch="///", label=f"confidence < {min_confidence}")
        )
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    axes.set_axis_off()
    axes.set_title(f"{Path(dataset.name).name}: {len(features)} tiles of {tile} px")
    figure.tight_layout()
    with atomic_file(png, "wb", recognise=is_our_png, overwrite=overwrite) as handle:
        figure.savefig(handle, format="png", dpi=100, metadata={"Software": f"{PNG_SOFTWARE} map"})
    plt.close(figure)
    return legend
