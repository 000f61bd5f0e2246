"""`pixtral-lora data audit`: exact and near-duplicate images, grouped, with their labels and splits.

Every image of a run's split (`splits.load_run_data`, so the audit sees the ids training uses) gets
fingerprints: the SHA-256 of its decoded RGB pixels (exact duplicates, whatever the file encoding) and
64-bit perceptual hashes (`imagehash.phash`, the DCT of a 32x32 greyscale copy: robust to re-encoding,
resizing and brightness) of the whole frame and of nine views cropped by up to `CROP` of each side. A
phash moves 12-16 bits under a 3% crop, more than it tells distinct scenes apart; a cropped copy's whole
frame is within a few bits of one of its original's views instead. Near neighbours are found with a
multi-index of the whole-frame hashes in `max_distance + 1` bands, queried with every view, not all
pairs: two hashes within `max_distance` bits agree exactly on at least one band (pigeonhole), so only
images sharing a band value are compared. Linked images form groups (union-find); a group is
`redundant` (one label, one split), `conflicting` (more than one label) and/or `leak` (more than one
split).

`exclude.txt` lists the ids a user may drop: in a leaking group, its training and validation members
(the test image stays, the twin it would be remembered from goes); in a conflicting group, every
member but the first of its majority label (all of them when no label has a majority).
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

from pixtral_lora.data.images import ImageError, load_image
from pixtral_lora.data.loaders import Splits, image_source

HASH_BITS = 64


@dataclass
class Entry:
    id: str
    label: str
    split: str


@dataclass
class Group:
    kind: list[str]  # "exact" or "near", then "redundant" | "conflicting" and "leak"
    members: list[Entry]
    max_distance: int  # largest Hamming distance between linked members (0: exact)


def split_entries(splits: Splits) -> tuple[list[Entry], list]:
    """Every image of the split with its sample's id, label and split name, and its loadable source.

    Image datasets (folders, Parquet, the Hub) have one image a row; JSONL/CSV conversations may have
    several, each an entry under its row's id (excluding the id drops the row).
    """
    entries, sources = [], []
    for name in ("train", "validation", "test"):
        dataset = getattr(splits, name)
        if dataset is None:
            continue
        feature = dataset.features.get("label")
        names = getattr(feature, "names", None)  # a ClassLabel's; conversations carry the label string
        column = "image" if "image" in dataset.column_names else "images"
        for row in dataset:
            label = names[row["label"]] if names is not None else str(row.get("label"))
            refs = row[column] if column == "images" else [row[column]]
            for ref in refs:
                entries.append(Entry(row["id"], label, name))
                sources.append(ref)
    return entries, sources


CROP = 0.04  # each view drops up to this fraction of the width and height (at 0, CROP / 2 or CROP)
VIEW_EDGE = 256  # views are cut from a copy this size: phash looks at 32x32 of it anyway


@dataclass
class Fingerprints:
    exact: list[str | None]  # SHA-256 of the decoded pixels; None: unreadable
    whole: list[int | None]  # phash of the whole frame
    views: list[list[int]]  # phash of the cropped views (empty for an unreadable image)
    unreadable: list[tuple[int, str]]  # (index, why)
    sizes: list[str | None] = field(default_factory=list)  # "WxH" of the decoded image
    modes: list[str] = field(default_factory=list)  # the file's mode as PIL reads its header


def view_hashes(image) -> tuple[int, list[int]]:
    """The whole frame's phash and the nine cropped views' (see the module docstring)."""
    import imagehash

    small = image.copy()
    small.thumbnail((VIEW_EDGE, VIEW_EDGE))
    w, h = small.size
    dx, dy = round(w * CROP), round(h * CROP)
    boxes = [(x, y, x + w - dx, y + h - dy) for x in (0, dx // 2, dx) for y in (0, dy // 2, dy)]
    return int(str(imagehash.phash(image)), 16), [int(str(imagehash.phash(small.crop(b))), 16) for b in boxes]


def file_mode(source: str | bytes) -> str:
    """The image's mode as PIL reads it from the header ("RGB", "L", "I;16", "RGBA", ...), or
    "other" for what PIL cannot open (a multi-band raster is read by rasterio)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            return image.mode
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return "other"


def fingerprint(source) -> tuple:
    """(mode, size, pixel SHA-256, whole-frame phash, view phashes, error) of one image; the middle
    four None (views empty) and `error` the reason when it cannot be decoded."""
    source = image_source(source)
    mode = file_mode(source)
    try:
        image = load_image(source)
    except ImageError as err:
        return mode, None, None, None, [], str(err)
    digest = hashlib.sha256(image.tobytes() + repr(image.size).encode()).hexdigest()
    whole, views = view_hashes(image)
    return mode, f"{image.width}x{image.height}", digest, whole, views, None


def fingerprints(sources: list, progress: bool = True, workers: int = 1) -> Fingerprints:
    """Pixel SHA-256 and perceptual hashes of each image (in `workers` processes, in order);
    unreadable ones are None and listed."""
    from tqdm.auto import tqdm

    found = Fingerprints([], [], [], [])
    bar = dict(total=len(sources), desc="hashing images", unit="img", disable=not progress)
    if workers > 1 and len(sources) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            results = list(tqdm(pool.map(fingerprint, sources, chunksize=32), **bar))
    else:
        results = [fingerprint(source) for source in tqdm(sources, **bar)]
    for index, (mode, size, digest, whole, views, error) in enumerate(results):
        found.modes.append(mode)
        found.sizes.append(size)
        found.exact.append(digest)
        found.whole.append(whole)
        found.views.append(views)
        if error is not None:
            found.unreadable.append((index, error))
    return found


def near_pairs(prints: Fingerprints, max_distance: int) -> list[tuple[int, int, int]]:
    """(i, j, distance) for every pair whose whole frame is within `max_distance` bits of the other's
    whole frame or one of its views, through a band index of the whole frames."""
    bands = max_distance + 1
    widths = [HASH_BITS // bands + (b < HASH_BITS % bands) for b in range(bands)]

    def keys(value: int):
        shift = 0
        for band, width in enumerate(widths):
            yield band, (value >> shift) & ((1 << width) - 1)
            shift += width

    index: list[dict[int, list[int]]] = [defaultdict(list) for _ in range(bands)]
    for i, value in enumerate(prints.whole):
        if value is not None:
            for band, key in keys(value):
                index[band][key].append(i)
    pairs: dict[tuple[int, int], int] = {}
    for i, value in enumerate(prints.whole):
        if value is None:
            continue
        for query in [value, *prints.views[i]]:
            for band, key in keys(query):
                for j in index[band][key]:
                    if j == i:
                        continue
                    distance = (query ^ prints.whole[j]).bit_count()
                    pair = (min(i, j), max(i, j))
                    if distance <= max_distance and distance < pairs.get(pair, HASH_BITS + 1):
                        pairs[pair] = distance
    return [(i, j, d) for (i, j), d in pairs.items()]


def group(entries: list[Entry], exact: list, pairs: list[tuple[int, int, int]]) -> list[Group]:
    """Union-find over exact matches and near pairs; groups of two or more, largest first."""
    parent = list(range(len(entries)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    links = list(pairs)
    first: dict[str, int] = {}
    for i, digest in enumerate(exact):
        if digest is not None:
            links.append((first.setdefault(digest, i), i, 0))
    worst: dict[int, int] = defaultdict(int)
    for i, j, _ in links:
        parent[root(i)] = root(j)
    for i, _, d in links:
        worst[root(i)] = max(worst[root(i)], d)
    members: dict[int, list[int]] = defaultdict(list)
    for i in range(len(entries)):
        members[root(i)].append(i)
    groups = []
    for top, indices in members.items():
        if len(indices) < 2:
            continue
        found = [entries[i] for i in indices]
        # exact only when every member has the same pixels: equal perceptual hashes are still "near"
        same_pixels = exact[indices[0]] is not None and len({exact[i] for i in indices}) == 1
        kind = ["exact" if same_pixels else "near"]
        kind.append("conflicting" if len({e.label for e in found}) > 1 else "redundant")
        if len({e.split for e in found}) > 1:
            kind.append("leak")
        groups.append(Group(kind, found, worst[top]))
    return sorted(groups, key=lambda g: (-len(g.members), g.members[0].id))


def excluded_ids(groups: list[Group]) -> list[str]:
    """The ids a user may drop (see the module docstring)."""
    drop: set[str] = set()
    for found in groups:
        if "leak" in found.kind and any(e.split == "test" for e in found.members):
            drop.update(e.id for e in found.members if e.split != "test")
        if "conflicting" in found.kind:
            (label, top), *rest = Counter(e.label for e in found.members).most_common()
            keeper = next(e for e in found.members if e.label == label) if top > rest[0][1] else None
            drop.update(e.id for e in found.members if e is not keeper)  # a tie: no label to trust
    return sorted(drop)


def _grouped(
    splits: Splits, max_distance: int, progress: bool, workers: int = 1
) -> tuple[list[Entry], Fingerprints, list[Group]]:
    """Every image of the split, its fingerprints and the groups they link into."""
    entries, sources = split_entries(splits)
    prints = fingerprints(sources, progress, workers)
    return entries, prints, group(entries, prints.exact, near_pairs(prints, max_distance))


def _twinned(groups: list[Group], max_distance: int) -> dict:
    """The held-out images with an exact or near twin in another split (test: in train or validation;
    validation: in train)."""
    leaks = [g for g in groups if "leak" in g.kind]

    def ids(split: str, others: set[str]) -> list[str]:
        return sorted(
            {
                e.id
                for g in leaks
                if {m.split for m in g.members} & others
                for e in g.members
                if e.split == split
            }
        )

    return {
        "max_distance": max_distance,
        "groups": len(leaks),
        "test_ids": ids("test", {"train", "validation"}),
        "validation_ids": ids("validation", {"train"}),
    }


def _balance(entries: list[Entry]) -> dict:
    """Images per class in each split, and the largest class over the smallest (the imbalance)."""
    per_split: dict[str, Counter] = defaultdict(Counter)
    for e in entries:
        per_split[e.split][e.label] += 1
    totals = Counter(e.label for e in entries)
    return {
        "per_split": {name: dict(sorted(counts.items())) for name, counts in per_split.items()},
        "imbalance": round(max(totals.values()) / min(totals.values()), 3) if totals else None,
    }


def audit(splits: Splits, max_distance: int = 8, progress: bool = True, workers: int = 1) -> dict:
    """The audit's findings for a run's split, as audit.json holds them (hashed in `workers`
    processes)."""
    entries, prints, groups = _grouped(splits, max_distance, progress, workers)
    twinned = _twinned(groups, max_distance)
    unreadable = prints.unreadable
    counts = Counter(kind for found in groups for kind in found.kind)
    return {
        "images": len(entries),
        "splits": dict(Counter(e.split for e in entries)),
        "classes": dict(sorted(Counter(e.label for e in entries).items())),
        "class_balance": _balance(entries),
        "sizes": dict(Counter(s for s in prints.sizes if s is not None).most_common(20)),
        "modes": dict(Counter(prints.modes).most_common()),
        "method": {
            "exact": "SHA-256 of decoded RGB pixels",
            "near": f"imagehash.phash (64 bits) of the whole frame against the whole frame and nine "
            f"views cropped by up to {CROP:.0%} of another, Hamming distance <= {max_distance}, "
            f"multi-index of {max_distance + 1} hash bands",
        },
        "counts": {
            "groups": len(groups),
            **{kind: counts.get(kind, 0) for kind in ("exact", "near", "redundant", "conflicting", "leak")},
            "leaked_test_images": len(twinned["test_ids"]),
            "unreadable": len(unreadable),
        },
        "leakage": twinned,
        "groups": [asdict(found) for found in groups],
        "unreadable": [{"id": entries[i].id, "error": error} for i, error in unreadable],
        "exclude": excluded_ids(groups),
    }


def leakage(splits: Splits, max_distance: int = 8, progress: bool = True, workers: int = 1) -> dict:
    """The part of the audit training runs before its model loads: `audit(...)["leakage"]`."""
    return _twinned(_grouped(splits, max_distance, progress, workers)[2], max_distance)
