"""How well and how fast `pixtral-lora data audit` finds near-duplicates: precision and recall on a
held-out set of transformations, and the wall time of an audit of an AID-sized folder.

    python scripts/bench_audit.py                     # the figures in benchmarks/README.md
    python scripts/bench_audit.py --bases-per-class 3 --timing-images 200   # a quick look

Part 1 draws `--bases-per-class` synthetic scenes of every class and, for each, one copy per
transformation below. None of these were used to choose the audit's settings (its tests use other
strengths: JPEG q40, a 3/4 resize, a 2-pixel crop, brightness 1.15). The audit runs as a user runs it
(the CLI, a subprocess); a copy is found when it lands in one group with its original. Precision is
over the pairs of images the audit puts in one group: a pair is right when both come from one
original. Classes whose distinct originals already group together (the generator draws near-identical
scenes for some) are named, and precision is given with and without them.

Part 2 times the audit of `--timing-images` scenes at `--timing-size` pixels (AID: 10,000 at 600),
hashing in 1 process and in one per CPU (at most 8): hashing, the band index and the validator's
pass, with each process's own peak memory.
Results go to `--out` (default benchmarks/results-audit-cpu.json), written whole or not at all.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageEnhance, ImageFilter, ImageOps

ROOT = Path(__file__).resolve().parents[1]


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _crop(image: Image.Image, left: float, top: float, right: float, bottom: float) -> Image.Image:
    w, h = image.size
    return image.crop((round(w * left), round(h * top), w - round(w * right), h - round(h * bottom)))


# name -> (transformation, whether the audit is designed to catch it)
TRANSFORMS = {
    "jpeg_q25": (lambda im: _jpeg(im, 25), True),
    "downscale_50pct": (lambda im: im.resize((im.width // 2, im.height // 2), Image.LANCZOS), True),
    "down_up_60pct": (
        lambda im: im.resize((im.width * 3 // 5, im.height * 3 // 5)).resize(im.size, Image.BICUBIC),
        True,
    ),
    "crop_3pct_corner": (lambda im: _crop(im, 0, 0, 0.03, 0.03), True),
    "crop_2pct_each_side": (lambda im: _crop(im, 0.02, 0.02, 0.02, 0.02), True),
    "darker_0.8": (lambda im: ImageEnhance.Brightness(im).enhance(0.8), True),
    "contrast_1.3": (lambda im: ImageEnhance.Contrast(im).enhance(1.3), True),
    "blur_radius_1": (lambda im: im.filter(ImageFilter.GaussianBlur(1)), True),
    "resize_bright_jpeg": (
        lambda im: _jpeg(ImageEnhance.Brightness(im.resize((im.width * 4 // 5,) * 2)).enhance(1.1), 50),
        True,
    ),
    # beyond what a perceptual hash of the frame is built for: reported, not claimed
    "crop_8pct_corner": (lambda im: _crop(im, 0, 0, 0.08, 0.08), False),
    "mirror": (ImageOps.mirror, False),
    "rotate_90": (lambda im: im.rotate(90, expand=True), False),
}


def _audit(folder: Path, out: Path, *extra: str) -> tuple[dict, float, float]:
    """Run the audit CLI; (audit.json, wall seconds, its own peak RSS in MB: `peak_rss.measure`)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from peak_rss import measure

    command = [sys.executable, "-m", "pixtral_lora.cli", "data", "audit", str(folder), "--out", str(out)]
    result = measure([*command, "--overwrite", *extra], env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    if result["returncode"] != 0:
        raise SystemExit(f"data audit failed:\n{result['stderr_tail']}")
    return json.loads((out / "audit.json").read_text()), result["seconds"], result["peak_rss_mb"]


def precision_recall(work: Path, bases_per_class: int, size: int) -> dict:
    from pixtral_lora.data.synth import SCENES, draw_scene

    folder = work / "held-out"
    for class_name in SCENES:
        (folder / class_name).mkdir(parents=True, exist_ok=True)
        for index in range(bases_per_class):
            base = draw_scene(class_name, index, size, seed=7)
            stem = f"{class_name.lower()}_{index}"
            base.save(folder / class_name / f"{stem}.jpg", quality=95)
            for name, (transform, _) in TRANSFORMS.items():
                transform(base).save(folder / class_name / f"{stem}__{name}.jpg", quality=95)
    findings, wall, _ = _audit(folder, work / "held-out-audit")
    group_of = {m["id"]: n for n, g in enumerate(findings["groups"]) for m in g["members"]}

    def family(image_id: str) -> str:
        return image_id.split("__")[0].removesuffix(".jpg")

    bases = [f"{c}/{c.lower()}_{i}.jpg" for c in SCENES for i in range(bases_per_class)]
    recall = {}
    for name, (_, designed) in TRANSFORMS.items():
        found = sum(
            1
            for base in bases
            if base in group_of and group_of.get(f"{family(base)}__{name}.jpg") == group_of[base]
        )
        recall[name] = {
            "found": found,
            "of": len(bases),
            "recall": round(found / len(bases), 4),
            "designed": designed,
        }
    colliding = sorted(
        {
            a.split("/")[0]
            for a, b in itertools.combinations(bases, 2)
            if a.split("/")[0] == b.split("/")[0] and a in group_of and group_of[a] == group_of.get(b)
        }
    )

    def precision(skip: set[str]) -> dict:
        right = wrong = 0
        for found in findings["groups"]:
            ids = [m["id"] for m in found["members"] if m["id"].split("/")[0] not in skip]
            for a, b in itertools.combinations(ids, 2):
                right += family(a) == family(b)
                wrong += family(a) != family(b)
        return {
            "right_pairs": right,
            "wrong_pairs": wrong,
            "precision": round(right / max(right + wrong, 1), 4),
        }

    designed = [r for r in recall.values() if r["designed"]]
    return {
        "images": findings["images"],
        "bases": len(bases),
        "size": size,
        "audit_seconds": round(wall, 2),
        "recall": recall,
        "recall_designed": round(sum(r["found"] for r in designed) / sum(r["of"] for r in designed), 4),
        "classes_whose_distinct_originals_group": colliding,
        "precision_all_classes": precision(set()),
        "precision_without_those": precision(set(colliding)),
    }


def timing(work: Path, images: int, size: int) -> dict:
    from pixtral_lora.data.synth import SCENES, generate_aid_like

    per_class = -(-images // len(SCENES))
    folder = work / "timing"
    start = time.perf_counter()
    generate_aid_like(folder, classes=list(SCENES), per_class=per_class, size=size)
    drawn = time.perf_counter() - start
    figures = {"images": None, "size": size, "drawing_seconds": round(drawn, 1), "by_workers": {}}
    for workers in sorted({1, min(8, os.cpu_count() or 1)}):
        findings, wall, peak = _audit(folder, work / "timing-audit", "--workers", str(workers))
        figures["images"] = findings["images"]
        figures["by_workers"][workers] = {
            "audit_seconds": round(wall, 1),
            "images_per_second": round(findings["images"] / wall, 1),
            "peak_rss_mb": round(peak),
            "groups": findings["counts"]["groups"],
        }
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bases-per-class", type=int, default=25)
    parser.add_argument("--size", type=int, default=256, help="edge of the held-out scenes")
    parser.add_argument("--timing-images", type=int, default=10_000)
    parser.add_argument("--timing-size", type=int, default=600)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results-audit-cpu.json"))
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        work = Path(tmp)
        results = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "held_out": precision_recall(work, args.bases_per_class, args.size),
            "timing": timing(work, args.timing_images, args.timing_size) if args.timing_images else None,
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    partial.write_text(json.dumps(results, indent=1) + "\n")
    partial.replace(out)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
