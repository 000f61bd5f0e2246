"""Image loading that never lets a bad file through silently.

Every image that reaches the model goes through `load_image`: EXIF orientation applied, any mode
(grayscale, RGBA, palette, 16-bit) converted to 8-bit RGB, truncated/corrupt files and decompression
bombs rejected with an `ImageError` that names the file.
"""

from __future__ import annotations

import base64
import io
import math
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pixtral_lora.errors import UserError

PATCH_SIZE = 16  # Pixtral-12B's pixels per image token (a family's own: `families.Family.image_cell`)
# Pixtral's vision encoder sees at most 1024x1024 (Mistral3's 1540x1540); anything bigger than this many pixels is not a
# photo we want to decode (PIL's own default bomb limit is ~89 Mpx and only warns below 2x that).
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
# Largest image file (or data-URI payload) read at all: checked on disk before reading, so a reference
# to a huge file is an error, not a MemoryError. AID JPEGs are ~0.1 MB; a 13-band 16-bit 1024x1024
# GeoTIFF tile is ~27 MB.
MAX_IMAGE_BYTES = 256 * 1024 * 1024

DATA_URI = re.compile(r"^data:image/[\w.+-]+;base64,(?P<payload>.*)$", re.DOTALL)


class ImageError(UserError):
    """An image that cannot be used, with the reason and where it came from."""


def describe_source(source: str | Path | bytes) -> str:
    """Short human-readable name of an image source for error messages."""
    if isinstance(source, bytes):
        return f"an image inlined in the data ({len(source)} bytes)"
    text = str(source)
    if text.startswith("data:"):
        return f"a data URI ({len(text)} characters)"
    return text


def read_image_bytes(source: str | Path | bytes, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """Raw bytes of an image given as bytes, a data URI or a local path; sizes checked before reading."""
    if isinstance(source, bytes):
        if len(source) > max_bytes:
            raise ImageError(f"{describe_source(source)}: larger than the {_mib(max_bytes)} image limit")
        return source
    text = str(source)
    match = DATA_URI.match(text)
    if match:
        payload = match.group("payload")
        if len(payload) * 3 // 4 > max_bytes:
            raise ImageError(
                f"{describe_source(source)}: payload of ~{_mib(len(payload) * 3 // 4)} exceeds the "
                f"{_mib(max_bytes)} image limit"
            )
        try:
            return base64.b64decode(payload, validate=True)
        except ValueError as err:
            raise ImageError(f"{describe_source(source)}: invalid base64 payload ({err})") from err
    if text.startswith("data:"):
        raise ImageError(f"{describe_source(source)}: data URI is not 'data:image/<type>;base64,...'")
    if text.startswith(("http://", "https://")):
        raise ImageError(f"{text}: remote URLs are not fetched; download the image and give a local path")
    path = Path(text)
    if path.is_dir():
        raise ImageError(f"{text}: is a directory, not an image file")
    if not path.is_file():
        raise ImageError(f"{text}: no such image file")
    size = path.stat().st_size
    if size > max_bytes:
        raise ImageError(f"{text}: {_mib(size)} on disk exceeds the {_mib(max_bytes)} image limit")
    try:
        return path.read_bytes()
    except OSError as err:
        raise ImageError(f"{text}: cannot read ({err.strerror})") from err


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit integer grayscale: PIL's convert("L") clips instead of scaling.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        gray = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        return Image.fromarray(scaled.astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite on white: transparent satellite tiles are no-data areas, black would read as water.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(
    source: str | Path | bytes, max_pixels: int = MAX_IMAGE_PIXELS, bands=None, name: str | None = None
) -> Image.Image:
    """Decode an image file, data URI or bytes into an upright 8-bit RGB PIL image.

    Multi-band, 16-bit and float TIFFs (and any TIFF when `bands`, a `raster.BandOptions`, asks for a
    band selection or a fixed stretch) are read with rasterio and stretched to 8 bits (`raster`).
    Raises `ImageError` for missing, empty, truncated, corrupt or oversized images, naming `name`
    (default: the path, or what the bytes are).
    """
    from pixtral_lora.data import raster

    name = name or describe_source(source)
    data = read_image_bytes(source)
    if not data:
        raise ImageError(f"{name}: empty file (0 bytes)")
    if raster.needs_raster_reader(data, bands):
        try:
            image = raster.read_raster(data, bands or raster.BandOptions(), name)
        except raster.GeoError as err:
            raise ImageError(str(err)) from err
        except Exception as err:  # rasterio raises its own error types for unreadable rasters
            raise ImageError(f"{name}: cannot read raster ({err})") from err
        if image.width * image.height > max_pixels:
            raise ImageError(f"{name}: {image.width}x{image.height} pixels exceeds the limit of {max_pixels}")
        return image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(
                    f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of "
                    f"{max_pixels} (possible decompression bomb)"
                )
            image.load()  # decodes now, so truncation is caught here and not in a dataloader worker
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"{name}: rejected as a decompression bomb ({err})") from err
    except UnidentifiedImageError:
        raise ImageError(
            f"{name}: cannot decode image (no format PIL knows starts its {len(data)} bytes)"
        ) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{name}: cannot decode image ({err})") from err
    image = ImageOps.exif_transpose(image)
    return _to_rgb(image)


def patch_aligned_size(
    width: int, height: int, longest_edge: int | None, cell: int = PATCH_SIZE
) -> tuple[int, int]:
    """Target (width, height): scaled so the longest side is `longest_edge`, both sides multiples of
    `cell`, the pixels one image token covers (16 for Pixtral-12B; 28 for Mistral3: 14-px patches
    merged 2x2).

    The HF Pixtral processor and mistral_common round non-multiples of the cell differently (ceil vs.
    their own resize), so images are made cell-aligned before either sees them; then both (and vLLM)
    produce identical image tokens.
    """
    if longest_edge is not None:
        scale = longest_edge / max(width, height)
        width, height = width * scale, height * scale
    return (
        max(cell, int(round(width / cell)) * cell),
        max(cell, int(round(height / cell)) * cell),
    )


def prepare_image(image: Image.Image, longest_edge: int | None, cell: int = PATCH_SIZE) -> Image.Image:
    """Resize to cell-aligned sides (see `patch_aligned_size`); a no-op when already aligned."""
    target = patch_aligned_size(image.width, image.height, longest_edge, cell)
    if target == image.size:
        return image
    return image.resize(target, Image.Resampling.BICUBIC)


def image_token_count(width: int, height: int, cell: int = PATCH_SIZE) -> int:
    """Tokens an aligned image costs: one per cell, one [IMG_BREAK] per row (the last is [IMG_END])."""
    columns, rows = math.ceil(width / cell), math.ceil(height / cell)
    return rows * (columns + 1)


def processor_cell(processor) -> int:
    """Pixels per image token of a Pixtral-style processor (patch size times spatial merge)."""
    patch = processor.patch_size
    patch = patch["height"] if isinstance(patch, dict) else patch
    return int(patch) * int(getattr(processor, "spatial_merge_size", 1) or 1)


def encode_data_uri(image: Image.Image, fmt: str = "JPEG") -> str:
    """Encode a PIL image as a `data:image/...;base64,` URI (what Mistral's fine-tuning API expects)."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=95) if fmt == "JPEG" else image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"
