"""A run's data: the configured source loaded, relabelled and split (or checked against a recorded split).

Training, evaluation, live validation and inference all see a run's images through `load_run_data`,
so the split recorded in a run directory (`split.json`) names exactly the images each of them uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pixtral_lora.config.schema import Config
from pixtral_lora.data.loaders import (
    Splits,
    check_data_path,
    class_names_of,
    load_any,
    relabel,
    split_dataset,
)
from pixtral_lora.errors import DataError, RunDirError


@dataclass
class RunData:
    class_names: list[str]
    splits: Splits
    # prompt label -> class name as the source spells it (folder name, ClassLabel name): the way back
    label_sources: dict[str, str] | None = None


def load_run_data(config: Config, recorded_split: dict | None = None) -> RunData:
    """Load the dataset and split it (or check it against a split recorded in a run directory).

    An AID-style folder takes its class names from its sub-folders; an HF dataset from its ClassLabel
    (or its string labels); Mistral JSONL and CSV data need `data.class_names` (the labels are read
    from the answers and must all be in that list). A dataset with its own train and test splits keeps
    them (`data.use_dataset_splits`); validation is carved from train.
    """
    from datasets import concatenate_datasets

    from pixtral_lora.data.hf import is_hf_source, load_hf_splits

    data = config.data

    def load(path: str, field_name: str):
        """(one dataset or None, its own splits or None, class names)."""
        if is_hf_source(check_data_path(path, field_name)):
            source_splits, names = load_hf_splits(
                path,
                data.image_column,
                data.label_column,
                data.class_names,
                data.hub_config,
                data.hub_revision,
            )
            if data.use_dataset_splits and {"train", "test"} <= set(source_splits):
                return None, source_splits, names
            return concatenate_datasets(list(source_splits.values())), None, names
        if Path(path).is_dir():
            dataset, names = load_any(path, allowed_roots=data.allow_paths_outside)
            return dataset, None, names
        if not data.class_names:
            raise DataError(f"{path}: JSONL/CSV data need data.class_names (the class set of the answers)")
        dataset, _ = load_any(path, data.class_names, data.allow_paths_outside)
        unknown = sorted(set(dataset["label"]) - set(data.class_names))
        if unknown:
            raise DataError(
                f"{path}: answers with labels outside data.class_names: {unknown[:5]} (see `pixtral-lora data validate`)"
            )
        return dataset, None, list(data.class_names)

    label_sources: dict[str, str] = {}

    def relabelled(dataset):
        if "image" not in dataset.column_names:  # JSONL/CSV: labels are the answers' own
            return dataset
        dataset, sources = relabel(dataset, data.label_style, data.class_labels)
        label_sources.update(sources)
        return dataset

    dataset, source_splits, class_names = load(data.path, "data.path")
    if source_splits is not None:
        dataset = relabelled(source_splits["train"])
        test = relabelled(source_splits["test"])
        test_classes = class_names_of(test)
    elif data.test_path:
        dataset = relabelled(dataset)
        test, test_splits, _ = load(data.test_path, "data.test_path")
        if test is None:  # an HF dataset with its own splits: all of it is test data here
            test = concatenate_datasets(list(test_splits.values()))
        test = relabelled(test)
        test_classes = class_names_of(test) if "image" in test.column_names else class_names
    else:
        dataset = relabelled(dataset)
        test = None
    if "image" in dataset.column_names:
        class_names = class_names_of(dataset)
    if test is not None:
        if test_classes != class_names:
            raise DataError(
                f"test data: classes {test_classes} differ from the training data's {class_names}"
            )
        inner = (
            split_dataset(dataset, data.validation_size, 0.0, data.split_seed, class_names)
            if data.validation_size
            else None
        )
        splits = Splits(
            train=inner.train if inner else dataset, test=test, validation=inner.test if inner else None
        )
    else:
        splits = split_dataset(dataset, data.test_size, data.validation_size, data.split_seed, class_names)
    if recorded_split is not None:
        if recorded_split["class_names"] != class_names:
            raise RunDirError(
                f"the run directory was trained on classes {recorded_split['class_names']}, data has {class_names}"
            )
        if recorded_split["ids"] != splits.ids():
            raise RunDirError(
                "the data split differs from the one recorded in the run directory (data changed?)"
            )
    if data.limit_train:
        splits.train = splits.train.select(range(min(data.limit_train, len(splits.train))))
    return RunData(class_names=class_names, splits=splits, label_sources=label_sources or None)
