"""Procedurally drawn AID-shaped scene folders, for tests and the demo.

Writes `<root>/<ClassName>/<classname>_<n>.jpg` exactly as the AID archive unpacks. Each class is a
distinct kind of scene (colour palette, texture and layout differ), jittered per image so a model has
to look at the picture, and every image is a pure function of (seed, class, index).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from pixtral_lora.errors import DataError

Painter = Callable[[ImageDraw.ImageDraw, int, random.Random], None]


def _jitter(rng: random.Random, colour: tuple[int, int, int], amount: int = 18) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in colour)  # type: ignore[return-value]


def _forest(draw: ImageDraw.ImageDraw, size: int, rng: random.Random) -> None:
    draw.rectangle([0, 0, size, size], fill=_jitter(rng, (24, 64, 28)))
    for _ in range(size * size // 60):
        x, y, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(size / 60, size / 25)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=_jitter(rng, (34, 96, 40), 25))


def _desert(draw: ImageDraw.ImageDraw, size: int, rng: random.Random) -> None:
    draw.rectangle([0, 0, size, size], fill=_jitter(rng, (222, 190, 130)))
    phase, period = rng.uniform(0, math.tau), rng.uniform(size / 6, size / 3)
    for y0 in range(-size, 2 * size, max(4, size // 10)):
        points = [
            (x, y0 + x * 0.4 + size / 20 * math.sin(x / period * math.tau + phase))
            for x in range(0, size + 1, 4)
        ]
        draw.line(points, fill=_jitter(rng, (190, 150, 95)), width=max(1, size // 60))


def _farmland(draw: ImageDraw.ImageDraw, size: int, rng: random.Random) -> None:
    cells = rng.randint(3, 5)
    step = size / cells
    palette = [(120, 160, 60), (180, 150, 90), (90, 130, 50), (200, 190, 120)]
    for i in range(cells):
        for j in range(cells):
            draw.rectangle(
                [i * step, j * step, (i + 1) * step, (j + 1) * step], fill=_jitter(rng, rng.choice(palette))
            )
            for k in range(0, int(step), max(2, size // 40)):  # furrows
                draw.line(
                    [i * step, j * step + k, (i + 1) * step, j * step + k], fill=_jitter(rng, (110, 100, 60))
                )


def _dense_residential(draw: ImageDraw.ImageDraw, size: int, rng: random.Random) -> None:
    draw.rectangle([0, 0, size, size], fill=_jitter(rng, (150, 150, 150)))
    block = max(3, size // 12)
    for x in range(0, size, block):
        for y in range(0, size, block):
            roof = rng.choice([(170, 60, 50), (90, 90, 100), (200, 200, 200)])
            draw.rectangle([x + 1, y + 1, x + block - 2, y + block - 2], fill=_jitter(rng, roof))


def _port(draw: ImageDraw.ImageDraw, size: int, rng: random.Random) -> None:
    shore = int(size * rng.uniform(0.3, 0.5))
    draw.rectangle([0, 0, size, size], fill=_jitter(rng, (30, 70, 130)))
    draw.rectangle([0, 0, shore, size], fill=_jitter(rng, (160, 160, 155)))
    for _ in range(rng.randint(3, 6)):
        y = rng.uniform(0, size)
        draw.rectangle([shore, y, shore + size * 0.35, y + size / 30], fill=(190, 190, 185))
        draw.rectangle(
            [shore + size * 0.05, y + size / 25, shore + size * 0.25, y + size / 12], fill=(235, 235, 235)
        )


def _beach(draw: ImageDraw.ImageDraw, size: int, rng: random.Random) -> None:
    cut = rng.uniform(0.35, 0.65) * size
    draw.rectangle([0, 0, size, size], fill=_jitter(rng, (236, 220, 170)))
    draw.polygon(
        [(cut, 0), (size, 0), (size, size), (cut - size * 0.3, size)], fill=_jitter(rng, (40, 140, 180))
    )
    for k in range(3):  # surf lines
        offset = k * size / 40
        draw.line(
            [(cut + offset, 0), (cut - size * 0.3 + offset, size)],
            fill=(245, 245, 245),
            width=max(1, size // 100),
        )


def _river(draw: ImageDraw.ImageDraw, size: int, rng: random.Random) -> None:
    draw.rectangle([0, 0, size, size], fill=_jitter(rng, (80, 130, 60)))
    phase, amplitude = rng.uniform(0, math.tau), rng.uniform(size / 10, size / 5)
    points = [
        (size / 2 + amplitude * math.sin(y / size * math.tau + phase), y) for y in range(0, size + 1, 4)
    ]
    draw.line(points, fill=_jitter(rng, (50, 90, 150)), width=max(3, size // 8))


def _parking(draw: ImageDraw.ImageDraw, size: int, rng: random.Random) -> None:
    draw.rectangle([0, 0, size, size], fill=_jitter(rng, (60, 60, 62)))
    lane = max(4, size // 8)
    for y in range(lane // 2, size, lane):
        for x in range(0, size, max(3, size // 20)):
            draw.line([x, y - lane / 3, x, y + lane / 3], fill=(230, 230, 230))
            if rng.random() < 0.6:
                draw.rectangle(
                    [x + 1, y - lane / 4, x + size / 40 + 1, y + lane / 4],
                    fill=_jitter(rng, rng.choice([(200, 30, 30), (30, 30, 200), (220, 220, 220)]), 30),
                )


SCENES: dict[str, Painter] = {
    "Beach": _beach,
    "DenseResidential": _dense_residential,
    "Desert": _desert,
    "Farmland": _farmland,
    "Forest": _forest,
    "Parking": _parking,
    "Port": _port,
    "River": _river,
}


def _image_seed(seed: int, class_name: str, index: int) -> int:
    digest = hashlib.sha256(f"{seed}/{class_name}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def draw_scene(class_name: str, index: int, size: int = 600, seed: int = 0) -> Image.Image:
    """One synthetic scene of `class_name`, deterministic in (seed, class_name, index)."""
    if class_name not in SCENES:
        raise ValueError(f"unknown synthetic class {class_name!r}; available: {', '.join(SCENES)}")
    rng = random.Random(_image_seed(seed, class_name, index))
    image = Image.new("RGB", (size, size))
    SCENES[class_name](ImageDraw.Draw(image), size, rng)
    return image


MARKER = "synthetic.json"  # what `generate_aid_like` leaves beside its class folders


def generate_aid_like(
    root: str | Path,
    classes: list[str] | None = None,
    per_class: int = 20,
    size: int = 600,
    seed: int = 0,
) -> Path:
    """Write an AID-shaped folder of synthetic scenes and return its root.

    The folder appears complete or not at all. An existing `root` is replaced only when it is empty
    or an earlier synthetic folder (it holds `synthetic.json`): the scenes are named like AID's own
    files, and drawing them into a real dataset would overwrite its images.
    """
    from pixtral_lora.outputs import OutputError, atomic_directory

    root = Path(root)
    classes = _known_classes(classes)
    for class_name in classes:
        if class_name not in SCENES:
            raise DataError(f"unknown synthetic class {class_name!r}; available: {', '.join(SCENES)}")
    if root.exists() and not (root / MARKER).is_file() and (not root.is_dir() or any(root.iterdir())):
        raise OutputError(f"{root} exists and is not a synthetic dataset (no {MARKER}); choose another --out")
    jobs = [(c, n) for c in classes for n in range(1, per_class + 1)]
    with atomic_directory(root, overwrite=True) as tmp:
        for class_name, index in tqdm(jobs, desc="drawing scenes", unit="img", disable=len(jobs) < 200):
            folder = tmp / class_name
            folder.mkdir(exist_ok=True)
            draw_scene(class_name, index, size, seed).save(
                folder / f"{class_name.lower()}_{index}.jpg", format="JPEG", quality=92
            )
        (tmp / MARKER).write_text(
            json.dumps({"classes": classes, "per_class": per_class, "size": size, "seed": seed}) + "\n"
        )
    return root


def generate_scene_mosaic(
    out: str | Path,
    classes: list[str] | None = None,
    grid: tuple[int, int] = (4, 4),
    tile: int = 64,
    seed: int = 1,
    metres_per_pixel: float = 10.0,
    overwrite: bool = False,
) -> list[list[str]]:
    """Write a georeferenced RGB GeoTIFF (EPSG:32633) whose grid cells are synthetic scenes; `out`
    replaces an earlier synthetic scene only (anything else needs `overwrite`).

    Returns the layout, row by row: the class drawn in each `tile`-pixel cell (what a map of it
    should say). Cells are scenes the tiny run never trained on (`seed` differs from the training data's).
    """
    import numpy as np
    from rasterio.transform import from_origin

    from pixtral_lora.data.raster import write_geotiff
    from pixtral_lora.outputs import atomic_file, check_replaceable_file

    classes = _known_classes(classes)
    check_replaceable_file(out, _is_synthetic_scene, overwrite)  # never over a raster someone else made
    rng = random.Random(seed)
    rows, cols = grid
    layout = [[rng.choice(classes) for _ in range(cols)] for _ in range(rows)]
    mosaic = np.zeros((3, rows * tile, cols * tile), dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            scene = np.asarray(draw_scene(layout[r][c], 1000 + r * cols + c, tile, seed))
            mosaic[:, r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = np.transpose(scene, (2, 0, 1))
    transform = from_origin(500000.0, 5000000.0, metres_per_pixel, metres_per_pixel)
    with atomic_file(out, "wb", recognise=_is_synthetic_scene, overwrite=overwrite) as handle:
        handle.close()  # rasterio writes the temporary by name; it is renamed to `out` when complete
        write_geotiff(handle.name, mosaic, crs="EPSG:32633", transform=transform, tags=SCENE_TAG)
    return layout


SCENE_TAG = {"pixtral_lora": "synthetic-scene"}


def _is_synthetic_scene(path: Path) -> bool:
    """A GeoTIFF `generate_scene_mosaic` wrote (its pixtral_lora tag), which a rerun may replace."""
    import logging

    import rasterio

    quiet = logging.getLogger("rasterio")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # GDAL's complaints about a foreign file are no news
    try:
        with rasterio.open(path) as dataset:
            return dataset.tags().get("pixtral_lora") == SCENE_TAG["pixtral_lora"]
    except Exception:  # not a raster at all: not ours
        return False
    finally:
        quiet.setLevel(level)


def _known_classes(classes: list[str] | None) -> list[str]:
    """The synthetic classes asked for (all by default); an unknown one is a one-line `DataError`."""
    unknown = [name for name in classes or [] if name not in SCENES]
    if unknown:
        raise DataError(f"unknown synthetic class {unknown[0]!r}; available: {', '.join(SCENES)}")
    return list(classes or sorted(SCENES))
