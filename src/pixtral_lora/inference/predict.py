"""Archive-scale prediction: `pixtral-lora predict SOURCE --run RUN --out FILE`.

- SOURCE: a folder (searched recursively for image files, whatever else it holds), a glob, a
  .txt/.csv list of paths, an hf://OWNER/NAME id or a .parquet file; with `--dataset`, a folder is
  read as an HF dataset instead (Parquet files, save_to_disk, imagefolder).
- Streams: images are read a batch at a time; results are written as they come (flushed per batch)
  to FILE (.jsonl or .csv, appended) or, for .parquet and for a Ray job, to a hidden journal beside
  it; at the end FILE is rewritten once, atomically, with every input exactly once in input order.
- Resumable: a rerun after a kill skips every input already predicted with the same content (path +
  sha256 of its bytes), whether in FILE or in a journal, by the same model (every row names it: the
  adapter's sha256 on its base, or the merged checkpoint) in the same mode. FILE written by another
  model or mode is refused in one line (`--overwrite` starts it afresh).
- Past one process: `--num-processes N` runs N replicas as a Ray Data job (`ray_job`; a local
  cluster, or `--ray-address` to join one), each holding one engine; the driver writes the rows.
- An unreadable file is a row with outcome `unreadable` and an `error`, never fatal.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from pixtral_lora.data.images import ImageError
from pixtral_lora.data.sources import Item, list_images
from pixtral_lora.errors import DataError
from pixtral_lora.inference.classifier import Backend
from pixtral_lora.outputs import atomic_file, check_replaceable_file, drop_torn_tail, locks_its_output

logger = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".csv", ".parquet")


@dataclasses.dataclass(frozen=True)
class PredictionRow:
    """One row of a predictions file; its fields are the file's columns, in order."""

    path: str
    label: str | None
    confidence: float | None
    calibrated: bool | None
    top3: list | None
    raw_answer: str | None
    # abstained (the label it would have had is kept), valid, or hallucinated/unparseable/unreadable
    outcome: str
    error: str | None
    sha256: str | None
    mode: str
    model: str
    backend: str  # transformers or vllm: what answered (`model` names the weights)
    warning: str | None  # what --force let through, on every row it concerns


COLUMNS = [field.name for field in dataclasses.fields(PredictionRow)]


# ---------------------------------------------------------------------------------------------------
# Result files


def is_predictions_file(path: Path) -> bool:
    """A file an earlier `predict --out` wrote (so a rerun may resume and replace it)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return {"path", "label", "outcome"} <= set(pq.read_schema(path).names)
        except Exception:
            return False
    with open(path, encoding="utf-8", errors="replace") as handle:
        first = handle.readline(65536)
    if path.suffix == ".csv":
        return first.startswith("path,label,")
    try:
        return {"path", "label", "outcome"} <= set(json.loads(first))
    except (ValueError, TypeError):
        return False


def _read_rows(path: Path) -> list[dict]:
    """Complete rows of a results file or journal; a line cut by a kill is ignored (it is redone)."""
    if not path.exists():
        return []
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        for row in rows:
            row["top3"] = json.loads(row["top3"]) if row.get("top3") else None
        return rows
    rows = []
    with open(path, encoding="utf-8", newline="") as handle:
        if path.suffix == ".csv":
            for row in csv.DictReader(handle):
                if None in row.values() or None in row:
                    continue
                row["confidence"] = float(row["confidence"]) if row["confidence"] else None
                row["calibrated"] = {"True": True, "False": False}.get(row.get("calibrated") or "")
                row["top3"] = json.loads(row["top3"]) if row["top3"] else None
                rows.append({k: (v if v != "" else None) for k, v in row.items()})
        else:
            for line in handle:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
    return rows


def _csv_cells(row: dict) -> dict:
    return {
        k: json.dumps(v) if k == "top3" and v is not None else ("" if v is None else v)
        for k, v in row.items()
    }


def _write_final(out: Path, rows: list[dict], overwrite: bool) -> None:
    """FILE, atomically, in its format."""
    if out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrow_types = {"confidence": pa.float64(), "calibrated": pa.bool_()}
        table = pa.Table.from_pylist(
            [{**r, "top3": json.dumps(r["top3"]) if r.get("top3") else None} for r in rows],
            schema=pa.schema([(c, arrow_types.get(c, pa.string())) for c in COLUMNS]),
        )
        with atomic_file(out, "wb", recognise=is_predictions_file, overwrite=overwrite) as handle:
            pq.write_table(table, handle)
        return
    with atomic_file(out, recognise=is_predictions_file, overwrite=overwrite) as handle:
        if out.suffix == ".csv":
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(_csv_cells(r) for r in rows)
        else:
            handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


class _Appender:
    """Appends rows to a JSONL/CSV file, flushed and synced per batch. The file is opened at the
    first row: a command that fails before it leaves no empty file (nor a CSV of a header only)."""

    def __init__(self, path: Path):
        self.path = path
        self.handle = self.csv = None

    def _open(self) -> None:
        new = not self.path.exists() or self.path.stat().st_size == 0
        if self.path.exists():
            drop_torn_tail(self.path)
        self.handle = open(self.path, "a", encoding="utf-8", newline="")
        self.csv = csv.DictWriter(self.handle, fieldnames=COLUMNS) if self.path.suffix == ".csv" else None
        if self.csv and new:
            self.csv.writeheader()

    def write(self, rows: list[dict]) -> None:
        if not rows:
            return
        if self.handle is None:
            self._open()
        for row in rows:
            if self.csv:
                self.csv.writerow(_csv_cells(row))
            else:
                self.handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def _journal(out: Path) -> Path:
    return out.with_name(f".{out.name}.journal-0of1.jsonl")


def _journals(out: Path) -> list[Path]:
    """The journals beside FILE: this command's, and those of earlier multi-process versions (N of
    them, `journal-KofN`), which a rerun reads too."""
    return sorted(out.parent.glob(f".{out.name}.journal-*of*.jsonl"))


# ---------------------------------------------------------------------------------------------------
# Prediction


def _rows_of(
    predictions,
    hashes: dict[str, str | None],
    mode: str,
    model: str,
    warning: str | None = None,
    backend: str = "transformers",
) -> list[dict]:
    return [
        dataclasses.asdict(
            PredictionRow(
                path=p.id,
                label=p.label,
                confidence=p.confidence,
                calibrated=p.calibrated if p.confidence is not None else None,
                top3=p.top3(),
                raw_answer=p.raw_answer,
                outcome="abstained" if p.abstained else "valid" if p.label else p.outcome,
                error=p.error,
                sha256=hashes.get(p.id),
                mode=mode,
                model=model,
                backend=backend,
                warning=warning,
            )
        )
        for p in predictions
    ]


def predict_batch(
    classify,
    batch: list[Item],
    done_sha: dict[str, str | None],
    mode: str,
    batch_size: int,
    model: str,
    warning,
) -> tuple[list[dict], int]:
    """The rows of a batch of inputs, less those already predicted with the same content (path +
    sha256 of the bytes read here), and how many those were."""
    rows, hashes, skipped = [], {}, 0
    for item in batch:
        try:
            data = item.read()
            hashes[item.key] = hashlib.sha256(data).hexdigest()
            ref = {"path": item.key, "bytes": data}  # the bytes, read once; the path names them
        except ImageError:
            hashes[item.key], ref = None, {"path": item.key, "bytes": None}
        if item.key in done_sha and done_sha[item.key] == hashes[item.key]:
            skipped += 1
            continue
        rows.append(classify.row(item.key, ref))
    if not rows:
        return [], skipped
    predictions = classify(rows, mode, batch_size)
    return _rows_of(predictions, hashes, mode, model, warning, classify.backend.name), skipped


@dataclasses.dataclass(frozen=True)
class PredictOptions:
    """How `predict_archive` classifies, built once by `pixtral-lora predict`."""

    model_path: str | None = None  # a merged checkpoint instead of the run's adapter
    mode: str = "score"
    batch_size: int | None = None  # None: the run config's eval.batch_size
    overwrite: bool = False
    force: bool = False  # use a run whose base/config/split changed since training
    as_dataset: bool = False  # SOURCE is an HF dataset (a saved one, or a Hub id)
    abstain_below: float | None = None
    target_accuracy: float | None = None
    backend: Backend = Backend()  # transformers, or vLLM on Mistral-format exports
    ray_address: str | None = None  # a Ray Data job: "local" (a cluster in-process), "auto" or HOST:PORT
    replicas: int = 1  # with ray_address: engines (Ray actors), each holding one model


@locks_its_output
def predict_archive(
    source: str, run_dir: str | Path, out: str | Path, options: PredictOptions = PredictOptions()
) -> dict:
    """Classify every input of SOURCE with a run's model into FILE; returns the summary.

    With `options.ray_address` the inputs go through Ray replicas (`ray_job`). A lock on FILE
    keeps a second command off it. See the module docstring.
    """
    from pixtral_lora.inference.classifier import RunClassifier

    mode, batch_size, overwrite = options.mode, options.batch_size, options.overwrite
    out = Path(out)
    if out.suffix not in SUFFIXES:
        raise DataError(f"--out {out}: use a .jsonl, .csv or .parquet file name")
    check_replaceable_file(out, is_predictions_file, overwrite)
    # what builds the classifier: here, and in each Ray replica
    classifier_args = (
        run_dir,
        options.model_path,
        None,
        options.abstain_below,
        options.target_accuracy,
        options.force,
        options.backend,
    )
    classify = RunClassifier(*classifier_args)
    items = list_images(source, options.as_dataset)
    if not items:
        raise DataError(f"{source}: no images found")
    model = classify.identity()
    warning = "; ".join(classify.run.warnings) or None
    ours = out.exists() and is_predictions_file(out)
    previous = _read_rows(out) if ours else []
    for journal in _journals(out):
        previous += _read_rows(journal)
    other = next((r for r in previous if (r.get("model"), r.get("mode")) != (model, mode)), None)
    if other is not None and not overwrite:
        raise DataError(
            f"--out {out} holds predictions of another model or mode (model {other.get('model') or 'unrecorded'}, "
            f"mode {other.get('mode') or 'unrecorded'}; this is model {model}, mode {mode}): they cannot be "
            "resumed; choose another --out or pass --overwrite to start it afresh"
        )
    if out.exists() and (not ours or other is not None):
        out.unlink()  # --overwrite: start afresh
    if other is not None:
        for journal in _journals(out):
            journal.unlink(missing_ok=True)
        previous = []
    done_sha = {row["path"]: row.get("sha256") for row in previous}
    batch_size = batch_size or classify.config.eval.batch_size
    if options.ray_address is not None:
        from pixtral_lora.inference.ray_job import RayOptions, run_on_ray

        work = functools.partial(
            predict_batch, done_sha=done_sha, mode=mode, batch_size=batch_size, model=model, warning=warning
        )
        ray_options = RayOptions(options.ray_address, options.replicas, batch_size)
        skipped, elapsed = run_on_ray(
            classifier_args, items, work, _Appender(_journal(out)), ray_options, f"predicting ({mode})"
        )
        return _finalise(out, items, overwrite, len(items) / elapsed if elapsed > 0 else 0.0, skipped)
    writer = _Appender(out if out.suffix in (".jsonl", ".csv") else _journal(out))
    skipped = 0
    started = time.perf_counter()
    progress = tqdm(total=len(items), desc=f"predicting ({mode})", unit="img", disable=None)
    try:
        for begin in range(0, len(items), batch_size):
            batch = items[begin : begin + batch_size]
            rows, batch_skipped = predict_batch(classify, batch, done_sha, mode, batch_size, model, warning)
            writer.write(rows)
            skipped += batch_skipped
            progress.update(len(batch))
    finally:
        progress.close()
        writer.close()
    elapsed = time.perf_counter() - started
    if skipped:
        logger.info("%d inputs already predicted (same path and content), skipped", skipped)
    return _finalise(out, items, overwrite, len(items) / elapsed if elapsed > 0 else 0.0, skipped)


def _finalise(out: Path, items: list[Item], overwrite: bool, images_per_second: float, skipped: int) -> dict:
    """Rewrite FILE with every input exactly once, in input order; remove the journals."""
    journals = _journals(out)
    latest: dict[str, dict] = {}
    for row in _read_rows(out) if out.exists() else []:
        latest[row["path"]] = row
    for journal in journals:
        for row in _read_rows(journal):
            latest[row["path"]] = row
    missing = [item.key for item in items if item.key not in latest]
    if missing:
        raise DataError(
            f"{len(missing)} inputs have no prediction (e.g. {missing[0]}); run the command again"
        )
    rows = [latest[item.key] for item in items]
    _write_final(out, rows, overwrite=True)  # ours: checked at the start
    for journal in journals:
        journal.unlink(missing_ok=True)
    labels = Counter(row["label"] for row in rows if row["label"] and row["outcome"] != "abstained")
    unreadable = [row["path"] for row in rows if row["outcome"] == "unreadable"]
    return {
        "out": str(out),
        "inputs": len(rows),
        "skipped_as_done": skipped,
        "per_label": dict(labels.most_common()),
        "unreadable": unreadable,
        "no_label": sum(1 for row in rows if not row["label"] and row["outcome"] != "unreadable"),
        "abstained": sum(1 for row in rows if row["outcome"] == "abstained"),
        "images_per_second": images_per_second,
    }
