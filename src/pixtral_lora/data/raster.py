"""Multi-band and georeferenced rasters (GeoTIFF, COG): three bands picked, stretched to 8-bit RGB, what Pixtral sees.

Reads GeoTIFF / multi-band TIFF tiles (uint8, uint16, float) with rasterio (`pip install -e '.[geo]'`).
`BandOptions.bands` picks three bands, 1-based as GDAL numbers them (EuroSAT-MS true colour: 4, 3, 2);
`stretch` maps each band to 0..255, either per image between percentiles (2-98 by default: robust to
a few saturated or dark pixels) or between fixed ranges (the same mapping for every tile, for
reproducibility across tiles and runs). Nodata pixels are left out of the percentiles and drawn black.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pixtral_lora.errors import UserError

TIFF_SUFFIXES = (".tif", ".tiff")


class GeoError(UserError):
    """A raster that cannot be read as asked (missing rasterio, band out of range, ...)."""


@dataclass(frozen=True)
class BandOptions:
    """How a multi-band raster becomes an RGB image (see the module docstring)."""

    bands: tuple[int, ...] | None = None  # 1-based; None: the first three bands (or the only one)
    stretch: str | tuple[tuple[float, float], ...] = "percentile"  # or one (low, high) per band
    percentiles: tuple[float, float] = (2.0, 98.0)


def band_options(data) -> BandOptions:
    """The `BandOptions` a config's `data` section (`config.schema.DataSection`) reads images with."""
    stretch = data.stretch if data.stretch == "percentile" else tuple(tuple(r) for r in data.stretch)
    return BandOptions(
        bands=tuple(data.bands) if data.bands else None,
        stretch=stretch,
        percentiles=tuple(data.stretch_percentiles),
    )


def _rasterio():
    try:
        import rasterio
    except ImportError as err:
        raise GeoError("reading multi-band/GeoTIFF rasters needs rasterio: pip install -e '.[geo]'") from err
    return rasterio


def stretch_to_uint8(array: np.ndarray, options: BandOptions, valid: np.ndarray | None = None) -> np.ndarray:
    """(bands, height, width) numbers -> (height, width, bands) uint8, per `options.stretch`.

    `valid` marks the pixels that are data (not nodata); the others become 0.
    """
    array = array.astype(np.float64)
    valid = np.ones(array.shape[1:], dtype=bool) if valid is None else valid
    out = np.zeros(array.shape, dtype=np.uint8)
    for index, band in enumerate(array):
        if options.stretch == "percentile":
            data = band[valid]
            low, high = np.percentile(data, options.percentiles) if data.size else (0.0, 1.0)
        else:
            low, high = options.stretch[index]
        scale = 255.0 / (high - low) if high > low else 0.0
        scaled = np.clip((band - low) * scale + 0.5, 0, 255)
        out[index] = np.where(valid, scaled, 0).astype(np.uint8)
    return np.transpose(out, (1, 2, 0))


def read_raster(data: bytes, options: BandOptions, name: str = "raster") -> Image.Image:
    """Decode raster bytes with rasterio and return the RGB image the model sees."""
    rasterio = _rasterio()
    with rasterio.MemoryFile(data) as memory, memory.open() as dataset:
        return _to_rgb(dataset, options, name, window=None)


def _to_rgb(dataset, options: BandOptions, name: str, window=None, out_shape=None) -> Image.Image:
    rgb, _ = read_rgb(dataset, options, name, window, out_shape)
    return Image.fromarray(rgb, "RGB")


def read_rgb(
    dataset, options: BandOptions, name: str = "raster", window=None, out_shape=None, boundless=False
):
    """(height, width, 3) uint8 of a window of an open rasterio dataset, and its valid-pixel mask.

    Valid pixels are those GDAL's dataset mask keeps (alpha band, internal mask, nodata); outside the
    raster (`boundless` windows at its edges) counts as invalid.
    """
    count = dataset.count
    bands = options.bands or ((1, 2, 3) if count >= 3 else (1,))
    if any(b < 1 or b > count for b in bands):
        raise GeoError(f"{name}: bands {list(bands)} asked, the raster has bands 1..{count}")
    if options.stretch != "percentile" and len(options.stretch) != len(bands):
        raise GeoError(f"{name}: data.stretch has {len(options.stretch)} ranges for {len(bands)} bands")
    shape = None if out_shape is None else (len(bands), *out_shape)
    kwargs = (
        {"boundless": True, "fill_value": dataset.nodata if dataset.nodata is not None else 0}
        if boundless
        else {}
    )
    array = dataset.read(list(bands), window=window, out_shape=shape, **kwargs)
    # GDAL's dataset mask: an alpha band, an internal or sidecar mask, else nodata; all valid otherwise
    mask = dataset.dataset_mask(window=window, out_shape=out_shape, boundless=boundless)
    valid = mask > 0
    if dataset.nodata is not None:
        valid &= ~np.all(array == dataset.nodata, axis=0)
    if boundless and window is not None:
        rows = np.arange(array.shape[1])[:, None] + int(window.row_off)
        cols = np.arange(array.shape[2])[None, :] + int(window.col_off)
        valid &= (rows >= 0) & (rows < dataset.height) & (cols >= 0) & (cols < dataset.width)
    if array.dtype == np.uint8 and options.bands is None and len(bands) == 3 and dataset.nodata is None:
        rgb = np.transpose(array, (1, 2, 0)) * valid[..., None]  # plain 8-bit RGB: no stretch
    else:
        rgb = stretch_to_uint8(array, options, valid)
    if rgb.shape[2] == 1:
        rgb = np.repeat(rgb, 3, axis=2)
    return np.ascontiguousarray(rgb, dtype=np.uint8), valid


def needs_raster_reader(data: bytes, options: BandOptions | None) -> bool:
    """Whether these bytes are a TIFF that PIL cannot show as the model should see it.

    Bands or a stretch were configured, or the TIFF is not 8-bit with 1, 3 or 4 bands.
    """
    if data[:4] not in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return False
    if options is not None and (options.bands is not None or options.stretch != "percentile"):
        return True
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.mode not in ("RGB", "RGBA", "L", "P", "1")
    except Exception:  # PIL cannot open multi-band/float TIFFs at all
        return True


def write_geotiff(
    path,
    array: np.ndarray,
    crs: str = "EPSG:32633",
    transform=None,
    nodata: float | None = None,
    tags: dict | None = None,
    **creation_options,
) -> None:
    """Write (bands, height, width) as a GeoTIFF with a CRS (None: none) and geotransform (synthetic
    data, tests); `creation_options` go to GDAL's GTiff driver (tiled, compress, alpha, ...)."""
    rasterio = _rasterio()
    from rasterio.transform import from_origin

    transform = transform or from_origin(500000.0, 5000000.0, 1.0, 1.0)
    profile = {
        "driver": "GTiff",
        "width": array.shape[2],
        "height": array.shape[1],
        "count": array.shape[0],
        "dtype": array.dtype.name,
        "transform": transform,
        **creation_options,
    }
    if crs is not None:
        profile["crs"] = crs
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as dataset:
        dataset.write(array)
        if tags:
            dataset.update_tags(**tags)
