"""A run's data: the configured source loaded, relabelled and split (or checked against a recorded split).

Training, evaluation, live validation and inference all see a run's images through `load_run_data`,
so the split recorded in a run directory (`split.json`) names exactly the images each of them uses.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pixtral_lora.config.schema import Config
from pixtral_lora.data.loaders import Splits, class_names_of, split_dataset
from pixtral_lora.data.sources import Source, load_source
from pixtral_lora.errors import DataError, RunDirError

logger = logging.getLogger(__name__)


@dataclass
class RunData:
    class_names: list[str]
    splits: Splits
    # prompt label -> class name as the source spells it (folder name, ClassLabel name): the way back
    label_sources: dict[str, str] | None = None
    excluded: list[str] | None = None  # ids `data.exclude` left out
    leakage: dict | None = None  # held-out images with a twin in another split (`check_leakage`)


def read_exclude(path: str | Path) -> list[str]:
    """The ids of a `data.exclude` file: one per line, blank lines and `#` comments ignored."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"data.exclude: cannot read {path}: {err}") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _drop(dataset, ids: set[str]):
    keep = [i for i, row_id in enumerate(dataset["id"]) if row_id not in ids]
    return dataset if len(keep) == len(dataset) else dataset.select(keep)


def check_leakage(config: Config, splits: Splits, recorded: dict | None = None) -> dict:
    """Exact and near twins across the split (`audit.leakage`; a resume keeps what its first start
    found), handled as `data.leakage` says: warn, refuse (`error`) or leave the test ones out
    (`drop_test`, applied to `splits`)."""
    from pixtral_lora.data.audit import leakage

    data = config.data
    found = {
        **((recorded or {}).get("leakage") or leakage(splits, workers=min(8, os.cpu_count() or 1))),
        "policy": data.leakage,
    }
    tests, validations = len(found["test_ids"]), len(found["validation_ids"])
    if tests or validations:
        what = (
            f"{tests} test and {validations} validation images have an exact or near twin in another "
            f"split ({found['groups']} groups)"
        )
        hint = f"pixtral-lora data audit {data.path} --config CONFIG --out DIR lists them"
        if data.leakage == "error" and tests:
            raise DataError(f"data.leakage is 'error': {what}; {hint}, data.leakage: drop_test drops them")
        if data.leakage == "drop_test" and tests:
            splits.test = _drop(splits.test, set(found["test_ids"]))
            logger.warning(
                "%s: the %d test ones are left out of the test split (data.leakage: drop_test)", what, tests
            )
        else:
            logger.warning("%s; %s (data.leakage: error refuses, drop_test drops the test ones)", what, hint)
    found["dropped_test_ids"] = found["test_ids"] if data.leakage == "drop_test" else []
    return found


def load_run_data(config: Config, recorded_split: dict | None = None, leakage_check: bool = False) -> RunData:
    """Load the dataset and split it (or check it against a split recorded in a run directory).

    An AID-style folder takes its class names from its sub-folders; an HF dataset from its ClassLabel
    (or its string labels); Mistral JSONL and CSV data need `data.class_names` (the labels are read
    from the answers and must all be in that list). A dataset with its own train and test splits keeps
    them (`data.use_dataset_splits`); validation is carved from train.
    """
    data = config.data

    def load(path: str, field_name: str, keep_splits: bool = True) -> Source:
        if not data.class_names and Path(path).suffix in (".jsonl", ".csv"):
            raise DataError(f"{path}: JSONL/CSV data need data.class_names (the class set of the answers)")
        source = load_source(path, data, field_name, keep_splits)
        if source.dataset is not None and "image" not in source.dataset.column_names:  # JSONL/CSV
            unknown = sorted(set(source.dataset["label"]) - set(source.class_names))
            if unknown:
                raise DataError(
                    f"{path}: answers with labels outside data.class_names: {unknown[:5]} (see `pixtral-lora data validate`)"
                )
        return source

    source = load(data.path, "data.path")
    label_sources = dict(source.label_sources)
    class_names = source.class_names
    if source.splits is not None:
        dataset, test = source.splits["train"], source.splits["test"]
        test_classes = class_names_of(test)
    elif data.test_path:
        dataset = source.dataset
        test_source = load(data.test_path, "data.test_path", keep_splits=False)
        label_sources.update(test_source.label_sources)
        test = test_source.dataset
        test_classes = class_names_of(test) if "image" in test.column_names else class_names
    else:
        dataset, test = source.dataset, None
    excluded = None
    if data.exclude:
        wanted = set(read_exclude(data.exclude))
        present = set(dataset["id"]) | (set(test["id"]) if test is not None else set())
        unknown = sorted(wanted - present)
        if unknown:
            raise DataError(
                f"data.exclude: {data.exclude}: {len(unknown)} id(s) the data does not have, e.g. "
                f"{unknown[:3]} (an exclude list of another dataset?)"
            )
        excluded = sorted(wanted)
        dataset = _drop(dataset, wanted)
        test = _drop(test, wanted) if test is not None else None
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
    if problem := config.prompt.class_list_problem(class_names):
        raise DataError(f"{data.path}: {problem}")
    if data.limit_train:  # before the twins are looked for and the split compared: what training sees
        splits.train = splits.train.select(range(min(data.limit_train, len(splits.train))))
    found_leakage = check_leakage(config, splits, recorded_split) if leakage_check else None
    if recorded_split is not None:
        if recorded_split["class_names"] != class_names:
            raise RunDirError(
                f"the run directory was trained on classes {recorded_split['class_names']}, data has {class_names}"
            )
        if recorded_split["ids"] != splits.ids():
            raise RunDirError(
                "the data split differs from the one recorded in the run directory (data changed?)"
            )
    return RunData(
        class_names=class_names,
        splits=splits,
        label_sources=label_sources or None,
        excluded=excluded,
        leakage=found_leakage,
    )
