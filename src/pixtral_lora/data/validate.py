"""`pixtral-lora data validate`: find every problem in a dataset before GPU time is spent.

Unlike the loaders, which stop at the first error, the validator walks the whole file and reports
each problem with its file, line and field.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pixtral_lora.data.images import ImageError, load_image
from pixtral_lora.data.loaders import (
    CSV_COLUMNS,
    IMAGE_SUFFIXES,
    DataError,
    check_data_path,
    check_has_image,
    check_roles,
    discover_class_names,
    image_ref,
    image_source,
    inside,
    mistral_messages_to_hf,
    read_lines,
)
from pixtral_lora.data.spreadsheet import csv_records
from pixtral_lora.task.answers import AnswerParser, class_name_problem
from pixtral_lora.task.prompt import PromptConfig


@dataclass(frozen=True)
class Problem:
    """One finding: `where` is file[:line], `field` the JSON path or column, `severity` error|warning."""

    where: str
    field: str
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        field = f" [{self.field}]" if self.field else ""
        return f"{self.severity}: {self.where}{field}: {self.message}"


@dataclass
class _Sample:
    where: str
    images: list[tuple[str, dict]]  # (field, image ref)
    answer: str | None
    label: str | None = None


def _jsonl_samples(path: Path, problems: list[Problem], allowed_roots: list[str]) -> list[_Sample]:
    samples = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in read_lines(handle, path):
            where = f"{path}:{line_no}"
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                problems.append(Problem(where, "", f"invalid JSON: {err.msg} at column {err.colno}"))
                continue
            if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
                problems.append(Problem(where, "messages", "expected an object with a 'messages' list"))
                continue
            try:
                messages, refs = mistral_messages_to_hf(record["messages"], path.parent, where, allowed_roots)
            except DataError as err:
                text = str(err).removeprefix(f"{where}: ")
                field_name, _, message = text.partition(": ")
                if not message or " " in field_name:
                    field_name, message = "messages", text
                problems.append(Problem(where, field_name, message))
                continue
            try:
                check_roles(messages, where)
            except DataError as err:
                problems.append(Problem(where, "messages[].role", str(err).removeprefix(f"{where}: ")))
            try:
                check_has_image(refs, where)
            except DataError as err:
                problems.append(Problem(where, "messages", str(err).removeprefix(f"{where}: ")))
            fields = [
                f"messages[{m}].content[{c}].image_url"
                for m, message in enumerate(messages)
                for c, chunk in enumerate(message["content"])
                if chunk["type"] == "image"
            ]
            answer = None
            if messages and messages[-1]["role"] == "assistant":
                answer = "".join(c.get("text", "") for c in messages[-1]["content"])
            samples.append(_Sample(where, list(zip(fields, refs, strict=True)), answer))
    return samples


def _csv_samples(path: Path, problems: list[Problem], allowed_roots: list[str]) -> list[_Sample]:
    samples = []
    try:
        for line_no, record in csv_records(path, CSV_COLUMNS):
            where = f"{path}:{line_no}"
            if not record["image_path"].strip():
                problems.append(Problem(where, "image_path", "empty"))
                continue
            try:
                ref = image_ref(record["image_path"].strip(), path.parent, where, "image_path", allowed_roots)
            except DataError as err:
                problems.append(Problem(where, "image_path", str(err).removeprefix(f"{where}: image_path: ")))
                continue
            if not record["completion"].strip():
                problems.append(Problem(where, "completion", "empty answer"))
            samples.append(_Sample(where, [("image_path", ref)], record["completion"]))
    except DataError as err:  # the file itself: its header, encoding or a malformed row
        where, _, message = str(err).partition(": ")
        problems.append(Problem(where, "", message))
    return samples


def _folder_samples(
    root: Path, problems: list[Problem], allowed_roots: list[str]
) -> tuple[list[_Sample], list[str]]:
    class_names = discover_class_names(root)
    roots = [root, *map(Path, allowed_roots)]
    samples = []
    for class_name in class_names:
        files = sorted(p for p in (root / class_name).iterdir() if p.is_file() and not p.name.startswith("."))
        for outside in [p for p in files if not inside(p, roots)]:
            problems.append(
                Problem(
                    str(outside), "", f"links to {outside.resolve()}, outside the dataset folder; skipped"
                )
            )
            files.remove(outside)
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            problems.append(Problem(str(root / class_name), "", "class folder has no image files"))
        for other in files:
            if other.suffix.lower() not in IMAGE_SUFFIXES:
                problems.append(Problem(str(other), "", "not an image file; it will be skipped", "warning"))
        for image in images:
            samples.append(
                _Sample(str(image), [("", {"path": str(image), "bytes": None})], None, label=class_name)
            )
    return samples, class_names


def _hf_samples(path: str, settings: dict, problems: list[Problem]) -> tuple[list[_Sample], list[str]]:
    """One sample per row of every split, its image read only when checked (the source streams); a
    row whose label names no class is a problem, not a sample."""
    from pixtral_lora.data.hf import load_hf_splits

    bad_labels: list[tuple[str, int, str]] = []
    splits, class_names = load_hf_splits(path, **settings, bad_labels=bad_labels)
    for split_name, row, why in bad_labels:
        problems.append(Problem(f"{path} [{split_name}:{row}]", "label", why))
    samples = []
    for split_name, split in splits.items():
        names = split.features["label"].names
        for position, (row_id, label) in enumerate(zip(split["id"], split["label"], strict=True)):

            def ref(split=split, position=position):
                return image_source(split[position]["image"])

            row = row_id.split("/", 1)[1]
            samples.append(
                _Sample(f"{path} [{split_name}:{row}]", [("image", ref)], None, label=names[label])
            )
    return samples, class_names


def _collect(
    path: str | Path, problems: list[Problem], allowed_roots: list[str], hf_settings: dict | None = None
) -> tuple[list[_Sample], list[str] | None]:
    from pixtral_lora.data.hf import is_hf_source

    path = check_data_path(path, "data")
    if is_hf_source(path):
        return _hf_samples(str(path), hf_settings or {}, problems)
    path = Path(path)
    if path.is_dir():
        return _folder_samples(path, problems, allowed_roots)
    if path.suffix == ".jsonl":
        return _jsonl_samples(path, problems, allowed_roots), None
    return _csv_samples(path, problems, allowed_roots), None


def _check_images(samples: list[_Sample], problems: list[Problem]) -> dict[str, list[str]]:
    """Decode every image; returns content hash -> where it appears."""
    hashes: dict[str, list[str]] = {}
    for sample in tqdm(samples, desc="checking images", unit="sample", disable=len(samples) < 500):
        for field_name, ref in sample.images:
            try:
                source = ref() if callable(ref) else image_source(ref)
                load_image(source)
            except ImageError as err:  # a folder sample's `where` is the path the error starts with
                problems.append(Problem(sample.where, field_name, str(err).removeprefix(f"{sample.where}: ")))
                continue
            data = source if isinstance(source, bytes) else Path(source).read_bytes()
            hashes.setdefault(hashlib.sha256(data).hexdigest(), []).append(sample.where)
    return hashes


def validate(
    path: str | Path,
    class_names: list[str] | None = None,
    test_path: str | Path | None = None,
    allowed_roots: list[str] | None = None,
    hf_settings: dict | None = None,
    prompt: PromptConfig | None = None,
) -> list[Problem]:
    """All problems in a dataset (and, with `test_path`, images shared between it and a test set).

    The class names are checked against `prompt` (the config's; default the default prompt): a name
    holding its class separator would read as two classes in the prompt.

    Image paths of JSONL/CSV data must resolve inside the data file's folder or `allowed_roots`. HF
    datasets (`data.hf`) are read with `hf_settings` (image_column, label_column, hub_config, ...) and
    their problems named by split and row.
    """
    problems: list[Problem] = []
    allowed_roots = list(allowed_roots or [])
    hf_settings = dict(hf_settings or {})
    if class_names:
        hf_settings.setdefault("class_names", class_names)  # string labels are checked row by row
    samples, source_classes = _collect(path, problems, allowed_roots, hf_settings)
    if class_names and source_classes and sorted(source_classes) != sorted(class_names):
        outside = [name for name in source_classes if name not in class_names]
        problems.append(
            Problem(
                str(path),
                "class_names",
                f"the data's classes differ from --classes / data.class_names: {outside[:5] or 'fewer classes'} "
                f"not in {class_names[:5]}{'...' if len(class_names) > 5 else ''}",
            )
        )
    class_names = class_names or source_classes
    if not samples and not problems:
        problems.append(Problem(str(path), "", "no samples"))
    if class_names and (problem := class_name_problem(class_names)):
        problems.append(Problem(str(path), "class_names", problem))
        class_names = None
    if class_names and (problem := (prompt or PromptConfig()).class_list_problem(class_names)):
        problems.append(Problem(str(path), "class_names", problem))
    if class_names:
        parser = AnswerParser(class_names)
        strict_parser = AnswerParser(class_names, strict=True)
        for sample in samples:
            if sample.answer is None:
                continue
            parsed = parser.parse(sample.answer)
            if parsed.label is not None:
                sample.label = parsed.label
                if strict_parser.parse(sample.answer).label is None:
                    problems.append(
                        Problem(
                            sample.where,
                            "answer",
                            f"{sample.answer[:80]!r} is read as {parsed.label!r} only leniently (not a JSON "
                            '{"label": ...} with the exact class name); the model will learn to answer '
                            "exactly this text",
                            "warning",
                        )
                    )
            if not parsed.parsed:
                problems.append(
                    Problem(
                        sample.where, "answer", f"no label can be read from the answer {sample.answer[:80]!r}"
                    )
                )
            elif parsed.label is None:
                problems.append(
                    Problem(
                        sample.where,
                        "answer",
                        f"label {parsed.raw_label!r} is not one of the {len(class_names)} classes",
                    )
                )
        counts: dict[str, int] = {}
        for sample in samples:
            if sample.label is not None:
                counts[sample.label] = counts.get(sample.label, 0) + 1
        for name in class_names:
            if 0 < counts.get(name, 0) < 2:
                problems.append(
                    Problem(
                        str(path),
                        name,
                        f"class {name!r} has a single sample; a stratified train/test split needs at least "
                        "2 per class (more for a validation split)",
                    )
                )
    hashes = _check_images(samples, problems)
    for where_list in hashes.values():
        if len(where_list) > 1:
            problems.append(
                Problem(
                    where_list[0],
                    "",
                    f"same image content also at {', '.join(where_list[1:4])} (leaks across a random split)",
                    "warning",
                )
            )
    if test_path is not None:
        test_problems: list[Problem] = []
        test_samples, _ = _collect(test_path, test_problems, allowed_roots, hf_settings)
        problems += test_problems
        test_hashes = _check_images(test_samples, problems)
        for digest, where_list in hashes.items():
            if digest in test_hashes:
                problems.append(
                    Problem(where_list[0], "", f"image also in the test set at {test_hashes[digest][0]}")
                )
    return problems
