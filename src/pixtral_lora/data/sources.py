"""What a data path is, decided in one place.

`load_source` reads a labelled source (an AID-style folder, a Mistral fine-tuning .jsonl, a .csv, or
an HF dataset: Parquet, save_to_disk, imagefolder, hf://OWNER/NAME) with a config's `data` settings
(columns, hub config and revision, allowed image roots, class names) and relabels it
(`data.label_style`, `data.class_labels`). Training, live validation, evaluation, `data preview` and
`data export` all start here, so each sees the labels the model is trained on.

`list_images` lists the unlabelled images `predict` classifies.
"""

from __future__ import annotations

import csv
import glob
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pixtral_lora.config.schema import DataSection
from pixtral_lora.data.images import read_image_bytes
from pixtral_lora.data.loaders import (
    IMAGE_SUFFIXES,
    check_data_path,
    class_names_of,
    image_source,
    load_aid_folder,
    load_csv,
    load_mistral_jsonl,
    relabel,
)
from pixtral_lora.errors import DataError


@dataclass
class Source:
    """A labelled source as loaded: one dataset, or the source's own train and test splits."""

    dataset: object | None  # datasets.Dataset (None when `splits` holds the data)
    splits: dict | None  # {"train": Dataset, "test": Dataset}: an HF dataset's own splits, kept
    class_names: list[str] | None  # None: the source does not define them (JSONL/CSV without a list)
    # prompt label -> class name as the source spells it (folder name, ClassLabel name): the way back
    label_sources: dict[str, str] = field(default_factory=dict)

    def all_rows(self):
        """Every row, the splits one after the other (what `data preview` and `data export` index)."""
        if self.splits is None:
            return self.dataset
        from datasets import concatenate_datasets

        return concatenate_datasets(list(self.splits.values()))


def load_source(
    path: str | Path, data: DataSection, field_name: str = "data.path", keep_splits: bool = True
) -> Source:
    """Load and relabel the labelled source at `path` with `data`'s settings.

    An HF dataset with its own train and test splits keeps them when `keep_splits` and
    `data.use_dataset_splits` (otherwise its splits are concatenated). JSONL and CSV labels are the
    answers' own and stay as written; folders and HF datasets are relabelled. Raises `DataError`.
    """
    from pixtral_lora.data.hf import is_hf_source, load_hf_splits

    path = check_data_path(path, field_name)
    label_sources: dict[str, str] = {}

    def relabelled(dataset):
        dataset, sources = relabel(dataset, data.label_style, data.class_labels)
        label_sources.update(sources)
        return dataset

    if is_hf_source(path):
        from datasets import concatenate_datasets

        splits, names = load_hf_splits(
            str(path),
            data.image_column,
            data.label_column,
            data.class_names,
            data.hub_config,
            data.hub_revision,
        )
        if keep_splits and data.use_dataset_splits and {"train", "test"} <= set(splits):
            kept = {"train": relabelled(splits["train"]), "test": relabelled(splits["test"])}
            return Source(None, kept, class_names_of(kept["train"]), label_sources)
        dataset = relabelled(concatenate_datasets(list(splits.values())))
        return Source(dataset, None, class_names_of(dataset), label_sources)
    path = Path(path)
    if path.is_dir():
        dataset = relabelled(load_aid_folder(path, allowed_roots=data.allow_paths_outside))
        return Source(dataset, None, class_names_of(dataset), label_sources)
    read = load_mistral_jsonl if path.suffix == ".jsonl" else load_csv
    dataset = read(path, data.class_names, data.allow_paths_outside)
    return Source(dataset, None, list(data.class_names) if data.class_names else None, label_sources)


@dataclass
class Item:
    """One input: its key (a path, or SPLIT/ROW of a dataset) and how to get its bytes."""

    key: str
    read: Callable[[], bytes]


def _file_item(path: Path) -> Item:
    where = path.absolute()  # read from the same file in a process with another working directory (Ray)
    return Item(str(path), lambda: read_image_bytes(where))


def list_images(source: str, as_dataset: bool = False) -> list[Item]:
    """The unlabelled images of SOURCE (what `predict` classifies), in a fixed order: a folder
    (searched recursively), a glob, a .txt/.csv list of paths, an hf:// id or .parquet file, or with
    `as_dataset` a folder read as an HF dataset."""
    from pixtral_lora.data.hf import HUB_PREFIX, load_hf_images

    path = Path(source)
    is_dataset = as_dataset or source.startswith(HUB_PREFIX) or path.suffix == ".parquet"
    if path.is_dir() and not is_dataset:
        found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        return [_file_item(p) for p in found]
    if path.suffix in (".txt", ".csv") and path.is_file():
        with open(path, encoding="utf-8", newline="") as handle:
            if path.suffix == ".txt":
                names = [line.strip() for line in handle if line.strip()]
            else:
                reader = csv.DictReader(handle)
                column = next((c for c in ("path", "image_path") if c in (reader.fieldnames or [])), None)
                if column is None:
                    raise DataError(f"{path}:1: a list of images needs a 'path' (or 'image_path') column")
                names = [row[column] for row in reader if row[column]]
        return [_file_item(p if p.is_absolute() else path.parent / p) for p in map(Path, names)]
    if is_dataset:
        splits = load_hf_images(source)
        items = []
        for split_name, split in splits.items():
            for row in range(len(split)):

                def read(split=split, row=row) -> bytes:
                    return read_image_bytes(image_source(split[row]["image"]))

                items.append(Item(f"{split_name}/{row}", read))
        return items
    if any(ch in source for ch in "*?["):
        found = sorted(
            p for p in map(Path, glob.glob(source, recursive=True)) if p.suffix.lower() in IMAGE_SUFFIXES
        )
        return [_file_item(p) for p in found]
    if path.is_file():
        return [_file_item(path)]
    raise DataError(f"{source}: no such file, folder, glob or dataset")
