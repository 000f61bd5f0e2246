"""Data from the HF ecosystem, through `datasets`: hub ids, Parquet, save_to_disk folders, imagefolders.

`data.path` may be
- `hf://OWNER/NAME` (with `data.hub_config`, `data.hub_revision`): a Hub dataset, from the HF cache
  when offline;
- a folder or glob of Parquet files (the Hub's own layout, `data/train-00000-of-00001.parquet`, images
  as `{"bytes", "path"}` structs);
- a `Dataset.save_to_disk` / `DatasetDict.save_to_disk` folder;
- an imagefolder with `metadata.csv` or `metadata.jsonl`.

Every split becomes a classification dataset like an AID folder's (`id`, `image` undecoded, `label`
ClassLabel), with ids `SPLIT/ROW`, so the split recorded in a run directory names the source split of
every image. Labels are a `ClassLabel` (names from its features) or strings (names from
`data.class_names`, else their sorted distinct values, stated in the log). Images stay undecoded and
memory-mapped until a batch needs them.
"""

from __future__ import annotations

import glob
import logging
import re
from pathlib import Path

from datasets import ClassLabel, Dataset, Features, Image, Value

from pixtral_lora.errors import DataError

logger = logging.getLogger(__name__)

HUB_PREFIX = "hf://"
_METADATA = ("metadata.csv", "metadata.jsonl")
_HUB_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def is_hf_source(path: str | Path) -> bool:
    """Whether `path` names a source this module loads (rather than an AID folder, JSONL or CSV)."""
    text = str(path)
    if text.startswith(HUB_PREFIX):
        return True
    if any(ch in text for ch in "*?["):
        return text.endswith(".parquet")  # a glob of Parquet files (a glob of images is a predict source)
    path = Path(text)
    if path.suffix == ".parquet":
        return True
    if not path.is_dir():
        return False
    markers = ("dataset_dict.json", "dataset_info.json", "state.json", *_METADATA)
    return (
        any((path / marker).is_file() for marker in markers)
        or next(path.rglob("*.parquet"), None) is not None
    )


def _load_hub(repo: str, hub_config: str | None, hub_revision: str | None):
    """A Hub dataset through `datasets`; without network, the snapshot the Hub client cached
    (`HF_HUB_CACHE/datasets--OWNER--NAME/snapshots/...`), which `load_dataset` does not look in offline."""
    from datasets import load_dataset
    from huggingface_hub import constants, snapshot_download

    if not _HUB_REPO.fullmatch(repo):
        raise DataError(f"data.path: hf://{repo}: a Hub dataset id is hf://OWNER/NAME")
    try:
        return load_dataset(repo, hub_config, revision=hub_revision)
    except Exception as err:  # offline, unreachable, unknown: datasets raises many types
        first = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
    try:
        snapshot = snapshot_download(repo, repo_type="dataset", revision=hub_revision, local_files_only=True)
    except Exception:  # not in the Hub client's cache either (LocalEntryNotFoundError and kin)
        from datasets import config as datasets_config

        raise DataError(
            f"data.path: hf://{repo}: cannot load the Hub dataset ({first}); it is not in the HF hub cache "
            f"{constants.HF_HUB_CACHE} nor the datasets cache {datasets_config.HF_DATASETS_CACHE} "
            "(download it once online, or set data.path to a local copy)"
        ) from None
    logger.info("hf://%s: loading the cached snapshot %s", repo, snapshot)
    return load_dataset(snapshot, hub_config)


def _load_raw(path: str, hub_config: str | None, hub_revision: str | None) -> dict[str, Dataset]:
    from datasets import DatasetDict, load_dataset, load_from_disk

    if path.startswith(HUB_PREFIX):
        loaded = _load_hub(path[len(HUB_PREFIX) :], hub_config, hub_revision)
    elif any(ch in path for ch in "*?[") or Path(path).suffix == ".parquet":
        files = sorted(glob.glob(path))
        if not files:
            raise DataError(f"data.path: {path} matches no Parquet file")
        loaded = load_dataset("parquet", data_files={"train": files})
    elif (Path(path) / "dataset_dict.json").is_file() or (Path(path) / "state.json").is_file():
        loaded = load_from_disk(path)
    elif any((Path(path) / name).is_file() for name in _METADATA):
        loaded = load_dataset("imagefolder", data_dir=path)
    else:
        loaded = load_dataset(path)  # a local copy of a Hub repository: Parquet files, splits by name
    if isinstance(loaded, Dataset):
        loaded = DatasetDict({"train": loaded})
    return dict(loaded)


def _class_names(raw: dict[str, Dataset], label_column: str, class_names: list[str] | None, path: str):
    """The class names and how labels name them: "index" (a ClassLabel, or integers with
    `data.class_names`: positions in the list) or "name" (strings)."""
    features = [split.features[label_column] for split in raw.values()]
    if all(isinstance(f, ClassLabel) for f in features):
        names = list(features[0].names)
        if any(list(f.names) != names for f in features):
            raise DataError(f"data.path: {path}: the splits' ClassLabel names differ")
        if class_names and class_names != names:
            raise DataError(
                f"data.class_names {class_names} differ from the dataset's ClassLabel names {names}"
            )
        return names, "index"
    integers = all(isinstance(f, Value) and f.dtype.startswith(("int", "uint")) for f in features)
    if class_names:
        return list(class_names), "index" if integers else "name"
    names = sorted({str(v) for split in raw.values() for v in split[label_column] if v is not None})
    logger.info("%s: string labels; class names are their sorted distinct values: %s", path, names)
    return names, "name"


def load_hf_images(path: str, image_column: str = "image") -> dict[str, Dataset]:
    """Each split's images (undecoded), labelled or not: what `predict` classifies."""
    out = {}
    for name, split in _load_raw(str(path), None, None).items():
        if image_column not in split.column_names:
            raise DataError(
                f"{path} [{name}]: no column {image_column!r} (columns: {', '.join(split.column_names)})"
            )
        out[name] = split.select_columns([image_column]).cast_column(image_column, Image(decode=False))
    return out


def _label_problems(labels: list, names: list[str], by_index: bool, column: str) -> list[tuple[int, str]]:
    """(row, why) for every label that names no class: the Hub's -1 ("no label"), an index outside
    the ClassLabel, a null, or a string that is not one of the class names."""
    problems = []
    known = set(names)
    for row, value in enumerate(labels):
        if value is None:
            problems.append((row, f"{column}: no label (null)"))
        elif by_index and value == -1:
            problems.append((row, f"{column}: no label (-1, the Hub's 'unlabelled')"))
        elif by_index and not 0 <= value < len(names):
            problems.append(
                (row, f"{column}: {value} is outside the {len(names)} classes (0..{len(names) - 1})")
            )
        elif not by_index and str(value) not in known:
            problems.append((row, f"{column}: {value!r} is not one of the {len(names)} classes"))
    return problems


def load_hf_splits(
    path: str,
    image_column: str = "image",
    label_column: str = "label",
    class_names: list[str] | None = None,
    hub_config: str | None = None,
    hub_revision: str | None = None,
    bad_labels: list[tuple[str, int, str]] | None = None,
) -> tuple[dict[str, Dataset], list[str]]:
    """Each split of the source as a classification dataset (id, image, label), and the class names.

    Every label is checked against the class list. A row whose label names no class is an error
    (`DataError` naming split, row and value), or, when `bad_labels` is given, is left out and listed
    there as (split, row, why) for the caller to report (`data validate` does).
    """
    raw = _load_raw(str(path), hub_config, hub_revision)
    for name, split in raw.items():
        missing = [c for c in (image_column, label_column) if c not in split.column_names]
        if missing:
            raise DataError(
                f"data.path: {path} [{name}]: no column {missing[0]!r} (columns: {', '.join(split.column_names)}); "
                "set data.image_column / data.label_column"
            )
    names, labelled_by = _class_names(raw, label_column, class_names, str(path))
    features = Features(
        {"id": Value("string"), "image": Image(decode=False), "label": ClassLabel(names=names)}
    )
    out = {}
    for split_name, split in raw.items():
        split = split.select_columns([image_column, label_column])
        split = split.cast_column(image_column, Image(decode=False))
        split = split.add_column("id", [f"{split_name}/{row}" for row in range(len(split))])
        problems = _label_problems(split[label_column], names, labelled_by == "index", label_column)
        if problems and bad_labels is None:
            row, why = problems[0]
            raise DataError(
                f"data.path: {path} [{split_name}:{row}] {why}; {len(problems)} row(s) of split {split_name!r} "
                "have a label outside the class list (`pixtral-lora data validate` lists them all)"
            )
        if problems:
            bad_labels += [(split_name, row, why) for row, why in problems]
            bad = {row for row, _ in problems}
            split = split.select([row for row in range(len(split)) if row not in bad])
        if labelled_by == "name":
            split = split.map(lambda v: {label_column: str(v)}, input_columns=label_column)
        renames = {old: new for old, new in ((image_column, "image"), (label_column, "label")) if old != new}
        split = split.rename_columns(renames) if renames else split
        out[split_name] = split.select_columns(["id", "image", "label"]).cast(features)
    return out, names
