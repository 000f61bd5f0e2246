"""Datasets: the AID folder layout, Mistral's fine-tuning JSONL, a CSV, and the split.

Two shapes of `datasets.Dataset` flow through the project:

- a *classification* dataset (`id`, `image`, `label`), what an AID-style folder loads to, and
- a *conversation* dataset (`id`, `messages`, `images`, `label`), what training renders. Messages are
  HF chat messages stored as JSON text, with `{"type": "image"}` placeholders whose pixels are in
  `images` (in order). `label` is the class of a classification sample, "" when unknown.

Images stay undecoded (`Image(decode=False)`) until `images.load_image` checks them.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from datasets import ClassLabel, Dataset, Features, Image, Sequence, Value

from pixtral_lora.data.images import DATA_URI, ImageError, encode_data_uri, load_image, read_image_bytes
from pixtral_lora.errors import DataError
from pixtral_lora.task.answers import class_name_problem
from pixtral_lora.task.prompt import PromptConfig, messages_to_json

logger = logging.getLogger(__name__)

# The 30 AID scene classes, as the Kaggle archive names its folders (sorted).
AID_CLASS_NAMES = [
    "Airport",
    "BareLand",
    "BaseballField",
    "Beach",
    "Bridge",
    "Center",
    "Church",
    "Commercial",
    "DenseResidential",
    "Desert",
    "Farmland",
    "Forest",
    "Industrial",
    "Meadow",
    "MediumResidential",
    "Mountain",
    "Park",
    "Parking",
    "Playground",
    "Pond",
    "Port",
    "RailwayStation",
    "Resort",
    "River",
    "School",
    "SparseResidential",
    "Square",
    "Stadium",
    "StorageTanks",
    "Viaduct",
]

CSV_COLUMNS = {"image_path", "prompt", "completion"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif"}
# Longest JSONL/CSV line read (a sample with inlined images is ~0.5 MB; a line is never read whole
# past this, so a file without newlines cannot exhaust memory).
MAX_LINE_BYTES = 64 * 1024 * 1024

CONVERSATION_FEATURES = Features(
    {
        "id": Value("string"),
        "messages": Value("string"),
        "images": Sequence(Image(decode=False)),
        "label": Value("string"),
    }
)


@dataclass
class LoadReport:
    """What a loader kept and what it skipped, so nothing is dropped silently."""

    kept: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, what: str) -> None:
        self.skipped.setdefault(reason, []).append(what)

    def summary(self) -> str:
        parts = [f"{self.kept} kept"] + [f"{len(v)} skipped ({reason})" for reason, v in self.skipped.items()]
        return ", ".join(parts)


def discover_class_names(root: str | Path) -> list[str]:
    """Class names of an AID-style folder: its sub-folder names, sorted (never filesystem order)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory (expected <root>/<ClassName>/<image files>)")
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DataError(f"{root}: no class sub-folders found (expected <root>/<ClassName>/<image files>)")
    if problem := class_name_problem(names):
        raise DataError(f"{root}: {problem}")
    return names


def inside(path: str | Path, roots: list[Path]) -> bool:
    """Whether `path`, with every symlink resolved, lies inside one of `roots` (themselves resolved)."""
    resolved = Path(path).resolve()
    return any(resolved.is_relative_to(root.resolve()) for root in roots)


def read_lines(handle, path: Path):
    """(line number, line) of a text file, refusing a line longer than MAX_LINE_BYTES before reading it all."""
    line_no = 0
    while True:
        line = handle.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        line_no += 1
        if len(line) > MAX_LINE_BYTES:
            raise DataError(f"{path}:{line_no}: line longer than {MAX_LINE_BYTES // 2**20} MiB")
        yield line_no, line


def load_aid_folder(
    root: str | Path, report: LoadReport | None = None, allowed_roots: list[str] | None = None
) -> Dataset:
    """Load `<root>/<ClassName>/*.jpg` into a classification dataset (id, image, label: ClassLabel).

    Files that are not images by suffix, and symlinks that lead outside `root` (and `allowed_roots`),
    are skipped and counted in `report`; empty class folders are an error. Ids are paths relative to
    `root`, so splits can be recorded and reproduced.
    """
    root = Path(root)
    report = report if report is not None else LoadReport()
    class_names = discover_class_names(root)
    roots = [root, *map(Path, allowed_roots or [])]
    ids, paths, labels = [], [], []
    for index, class_name in enumerate(class_names):
        files = sorted(p for p in (root / class_name).iterdir() if p.is_file() and not p.name.startswith("."))
        for outside in [p for p in files if not inside(p, roots)]:
            report.skip("links outside the dataset folder", str(outside.relative_to(root)))
            files.remove(outside)
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        for other in files:
            if other.suffix.lower() not in IMAGE_SUFFIXES:
                report.skip("not an image file", str(other.relative_to(root)))
        if not images:
            raise DataError(f"{root / class_name}: class folder has no image files")
        for path in images:
            ids.append(str(path.relative_to(root)))
            paths.append({"path": str(path.resolve()), "bytes": None})
            labels.append(index)
    report.kept += len(ids)
    if report.skipped:
        logger.warning("%s: %s", root, report.summary())
    features = Features(
        {"id": Value("string"), "image": Image(decode=False), "label": ClassLabel(names=class_names)}
    )
    return Dataset.from_dict({"id": ids, "image": paths, "label": labels}, features=features)


@dataclass
class Splits:
    """Train/validation/test datasets from one deterministic split."""

    train: Dataset
    test: Dataset
    validation: Dataset | None = None

    def ids(self) -> dict[str, list[str]]:
        """Ids per split, as recorded in a run directory."""
        out = {"train": list(self.train["id"]), "test": list(self.test["id"])}
        if self.validation is not None:
            out["validation"] = list(self.validation["id"])
        return out


def split_dataset(
    dataset: Dataset,
    test_size: float = 0.2,
    validation_size: float = 0.0,
    seed: int = 42,
    class_names: list[str] | None = None,
) -> Splits:
    """Stratified split by label (80/20 with seed 42 gives AID's 8,000/2,000); validation carved from train.

    Classification datasets stratify on their ClassLabel; conversation datasets (string labels) do
    when `class_names` is given, through a temporary ClassLabel column.
    """
    stratify = "label" if isinstance(dataset.features.get("label"), ClassLabel) else None
    if stratify is None and class_names:
        unknown = sorted(set(dataset["label"]) - set(class_names))
        if unknown:
            raise DataError(
                f"labels outside data.class_names: {unknown[:5]} (run `pixtral-lora data validate`)"
            )
        stratum = [class_names.index(label) for label in dataset["label"]]
        dataset = dataset.add_column("stratum", stratum).cast_column("stratum", ClassLabel(names=class_names))
        stratify = "stratum"
    try:
        parts = dataset.train_test_split(test_size=test_size, seed=seed, stratify_by_column=stratify)
        train, test = parts["train"], parts["test"]
        validation = None
        if validation_size > 0:
            inner = train.train_test_split(test_size=validation_size, seed=seed, stratify_by_column=stratify)
            train, validation = inner["train"], inner["test"]
    except ValueError as err:  # e.g. fewer test images than classes: a stratified split is impossible
        raise DataError(
            f"cannot split {len(dataset)} samples (test_size={test_size}, validation_size={validation_size}): {err}"
        ) from err
    if stratify == "stratum":
        train, test = train.remove_columns("stratum"), test.remove_columns("stratum")
        validation = validation.remove_columns("stratum") if validation is not None else None
    return Splits(train=train, test=test, validation=validation)


def select_ids(dataset: Dataset, ids: list[str]) -> Dataset:
    """Rows of `dataset` with these ids, in this order; an unknown id is an error."""
    position = {row_id: i for i, row_id in enumerate(dataset["id"])}
    missing = [i for i in ids if i not in position]
    if missing:
        raise DataError(f"{len(missing)} recorded ids are not in the dataset, e.g. {missing[:3]}")
    return dataset.select([position[i] for i in ids])


def class_names_of(dataset: Dataset) -> list[str]:
    """Class names of a classification dataset."""
    return list(dataset.features["label"].names)


def as_conversations(
    dataset: Dataset, prompt: PromptConfig, class_names: list[str], with_answer: bool = True
) -> Dataset:
    """Conversation rows for any loaded dataset: folders get the task prompt, JSONL/CSV keep their own."""
    if "image" in dataset.column_names:
        return to_conversations(dataset, prompt, class_names, with_answer)
    return dataset


def to_conversations(
    dataset: Dataset, prompt: PromptConfig, class_names: list[str], with_answer: bool = True
) -> Dataset:
    """Classification dataset -> conversation dataset using the task prompt."""
    names = dataset.features["label"].names

    def convert(row):
        label = names[row["label"]]
        messages = prompt.messages(class_names, label if with_answer else None)
        return {
            "id": row["id"],
            "messages": messages_to_json(messages),
            "images": [row["image"]],
            "label": label,
        }

    return dataset.map(
        convert, remove_columns=dataset.column_names, features=CONVERSATION_FEATURES, desc="building prompts"
    )


# ---------------------------------------------------------------------------------------------------
# Mistral fine-tuning JSONL and CSV


def image_ref(
    url: str, base_dir: Path, where: str, field_name: str, allowed_roots: list[str] | None = None
) -> dict:
    """An image reference of a JSONL/CSV sample: data-URI bytes, or a path that must resolve inside
    `base_dir` (the data file's folder) or one of `allowed_roots`; raises `DataError` naming the field."""
    if DATA_URI.match(url) or url.startswith("data:"):
        try:
            return {"path": None, "bytes": read_image_bytes(url)}
        except ImageError as err:
            raise DataError(f"{where}: {field_name}: {err}") from None
    if url.startswith(("http://", "https://")):
        raise DataError(
            f"{where}: {field_name}: remote URLs are not fetched; give a local path or a data URI"
        )
    path = Path(url)
    if not path.is_absolute():
        path = base_dir / path
    roots = [base_dir, *map(Path, allowed_roots or [])]
    if not inside(path, roots):
        raise DataError(
            f"{where}: {field_name}: {url!r} resolves to {path.resolve()}, outside the dataset folder "
            f"{base_dir.resolve()}; to allow it list its folder in data.allow_paths_outside "
            "(or --allow-path on the command line)"
        )
    return {"path": str(path), "bytes": None}


def mistral_messages_to_hf(
    messages: list[dict], base_dir: Path, where: str, allowed_roots: list[str] | None = None
) -> tuple[list[dict], list[dict]]:
    """Mistral API messages (text / image_url chunks) -> HF messages with image placeholders + image refs."""
    out, images = [], []
    for m_index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: messages[{m_index}] must be an object with 'role' and 'content'")
        content = message["content"]
        if isinstance(content, str):
            chunks = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            chunks = []
            for c_index, chunk in enumerate(content):
                field_name = f"messages[{m_index}].content[{c_index}]"
                kind = chunk.get("type") if isinstance(chunk, dict) else None
                if kind == "text" and isinstance(chunk.get("text"), str):
                    chunks.append({"type": "text", "text": chunk["text"]})
                elif kind == "image_url":
                    url = chunk.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if not isinstance(url, str) or not url:
                        raise DataError(
                            f"{where}: {field_name}.image_url must be a URL string or {{'url': ...}}"
                        )
                    chunks.append({"type": "image"})
                    images.append(image_ref(url, base_dir, where, f"{field_name}.image_url", allowed_roots))
                else:
                    raise DataError(
                        f"{where}: {field_name} must be a 'text' chunk with 'text' or an 'image_url' chunk"
                    )
        else:
            raise DataError(f"{where}: messages[{m_index}].content must be a string or a list of chunks")
        out.append({"role": message["role"], "content": chunks})
    return out, images


def check_roles(messages: list[dict], where: str) -> None:
    """Roles must be [system], then user/assistant alternating from user, ending with the assistant."""
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles and roles[0] == "system" else roles
    for index, role in enumerate(body):
        expected = "user" if index % 2 == 0 else "assistant"
        if role != expected:
            position = index + (len(roles) - len(body))
            raise DataError(
                f"{where}: messages[{position}].role is {role!r}, expected {expected!r} (system?, user, assistant, ...)"
            )
    if not body or body[-1] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's answer")


def check_has_image(images: list, where: str) -> None:
    """A sample is an image to classify: one without any `image_url` chunk is a `DataError`."""
    if not images:
        raise DataError(
            f"{where}: no image_url chunk in its messages; every sample needs the image it labels"
        )


def _label_of(messages: list[dict], class_names: list[str] | None) -> str:
    if not class_names:
        return ""
    from pixtral_lora.task.answers import AnswerParser

    answer = "".join(c.get("text", "") for c in messages[-1]["content"])
    parsed = AnswerParser(class_names).parse(answer)
    return parsed.label or (parsed.raw_label or "")


def load_mistral_jsonl(
    path: str | Path, class_names: list[str] | None = None, allowed_roots: list[str] | None = None
) -> Dataset:
    """Load Mistral's fine-tuning JSONL (one {"messages": [...]} per line) as a conversation dataset.

    Image URLs may be `data:image/...;base64,` URIs or paths (relative to the JSONL file).
    Raises `DataError` naming the line and field of the first problem; `validate` lists them all.
    """
    path = Path(path)
    rows = {"id": [], "messages": [], "images": [], "label": []}
    with open(path, encoding="utf-8") as handle:
        for line_no, line in read_lines(handle, path):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from err
            if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
                raise DataError(f"{where}: expected an object with a 'messages' list")
            messages, images = mistral_messages_to_hf(record["messages"], path.parent, where, allowed_roots)
            check_roles(messages, where)
            check_has_image(images, where)
            rows["id"].append(f"{path.name}:{line_no}")
            rows["messages"].append(messages_to_json(messages))
            rows["images"].append(images)
            rows["label"].append(_label_of(messages, class_names))
    if not rows["id"]:
        raise DataError(f"{path}: no samples")
    return Dataset.from_dict(rows, features=CONVERSATION_FEATURES)


def load_csv(
    path: str | Path, class_names: list[str] | None = None, allowed_roots: list[str] | None = None
) -> Dataset:
    """Load a CSV with columns image_path,prompt,completion as a conversation dataset (user: image+prompt)."""
    from pixtral_lora.data.spreadsheet import csv_records

    path = Path(path)
    rows = {"id": [], "messages": [], "images": [], "label": []}
    for line_no, record in csv_records(path, CSV_COLUMNS):
        where = f"{path}:{line_no}"
        if not record["image_path"].strip():
            raise DataError(f"{where}: field 'image_path' is empty")
        user = [{"type": "image"}] + (
            [{"type": "text", "text": record["prompt"]}] if record["prompt"] else []
        )
        messages = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": [{"type": "text", "text": record["completion"]}]},
        ]
        rows["id"].append(f"{path.name}:{line_no}")
        rows["messages"].append(messages_to_json(messages))
        rows["images"].append(
            [image_ref(record["image_path"].strip(), path.parent, where, "image_path", allowed_roots)]
        )
        rows["label"].append(_label_of(messages, class_names))
    if not rows["id"]:
        raise DataError(f"{path}: no samples")
    return Dataset.from_dict(rows, features=CONVERSATION_FEATURES)


def _is_mistral_jsonl(path: Path) -> bool:
    """A file whose first line is a {"messages": [...]} record (what `export_mistral_jsonl` writes)."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        first = handle.readline(MAX_LINE_BYTES)
    try:
        return isinstance(json.loads(first).get("messages"), list)
    except (ValueError, AttributeError):
        return False


def export_mistral_jsonl(
    conversations: Dataset, out: str | Path, longest_edge: int | None = None, overwrite: bool = False
) -> int:
    """Write a conversation dataset as Mistral fine-tuning JSONL with images inlined as data URIs.

    An existing `out` is replaced only if it is such a JSONL file (or with `overwrite`).
    """
    from pixtral_lora.data.images import prepare_image
    from pixtral_lora.outputs import atomic_file

    count = 0
    with atomic_file(out, recognise=_is_mistral_jsonl, overwrite=overwrite) as handle:
        for row in conversations:
            images = iter(row["images"])
            messages = []
            for message in json.loads(row["messages"]):
                content = []
                for chunk in message["content"]:
                    if chunk["type"] == "image":
                        image = prepare_image(load_image(image_source(next(images))), longest_edge)
                        content.append({"type": "image_url", "image_url": encode_data_uri(image)})
                    else:
                        content.append({"type": "text", "text": chunk["text"]})
                messages.append({"role": message["role"], "content": content})
            handle.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
            count += 1
    return count


def image_source(ref: dict | None) -> str | bytes:
    """The loadable source of an undecoded `Image` feature value (a null image is an `ImageError`)."""
    if ref is None:
        raise ImageError("no image (the image cell is null)")
    if ref.get("bytes") is not None:  # b"" too: an empty image is named as one when decoded
        return ref["bytes"]
    if ref.get("path"):
        return ref["path"]
    raise ImageError("image reference has neither bytes nor path")


def check_data_path(path: str | Path, field_name: str = "data.path") -> str | Path:
    """The data source must exist: a folder, a .jsonl/.csv/.parquet file, a glob or an hf:// id
    (those two are checked when loaded, and come back as the string they are: `Path` would turn
    `hf://owner/name` into `hf:/owner/name`); a one-line `DataError` otherwise."""
    if str(path).startswith("hf://") or any(ch in str(path) for ch in "*?["):
        return str(path)
    path = Path(path)
    if not path.exists():
        hint = ""
        if "synthetic" in path.name:
            hint = f" (`make train` or `pixtral-lora data generate --out {path}` makes it)"
        raise DataError(f"{field_name}: {path} does not exist{hint}")
    if not path.is_dir() and path.suffix not in (".jsonl", ".csv", ".parquet"):
        raise DataError(
            f"{field_name}: {path} is not an AID-style folder (<root>/<ClassName>/*.jpg), a .jsonl, a .csv "
            "or an HF dataset (Parquet, save_to_disk folder, imagefolder, hf://OWNER/NAME)"
        )
    return path


def readable_label(folder: str) -> str:
    """A prompt label from a folder name: words split at _, -, spaces and case changes, capitalised.

    "dense_residential", "DenseResidential", "Dense Residential" -> "Dense Residential";
    "footballField" -> "Football Field"; "SeaLake" -> "Sea Lake". Names with non-ASCII letters, and
    run-together lower case ("denseresidential"), stay as they are: name those in data.class_labels.
    """
    if not folder.isascii():
        return folder
    words = re.findall(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+", folder)
    return (
        " ".join(word if word.isupper() and len(word) > 1 else word.capitalize() for word in words) or folder
    )


def relabel(dataset: Dataset, style: str, overrides: dict[str, str]) -> tuple[Dataset, dict[str, str]]:
    """Give a classification dataset readable class names (`readable_label`, `overrides` first).

    Returns the dataset and label -> source name, the way back; the labels must stay distinct.
    """
    names = class_names_of(dataset)
    if style == "folder" and not overrides:
        return dataset, {name: name for name in names}
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise DataError(
            f"data.class_labels names {unknown[:3]}, which are not classes of the data ({names[:5]}, ...)"
        )
    labels = [overrides.get(n) or (readable_label(n) if style == "readable" else n) for n in names]
    if problem := class_name_problem(labels):
        raise DataError(f"prompt labels from the class names: {problem}; set data.class_labels")
    features = dataset.features.copy()
    features["label"] = ClassLabel(names=labels)
    return dataset.cast(features), dict(zip(labels, names, strict=True))
