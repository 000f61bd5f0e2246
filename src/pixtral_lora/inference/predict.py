"""Archive-scale prediction: `pixtral-lora predict SOURCE --run RUN --out FILE`.

- SOURCE: a folder (searched recursively for image files, whatever else it holds), a glob, a
  .txt/.csv list of paths, an hf://OWNER/NAME id or a .parquet file; with `--dataset`, a folder is
  read as an HF dataset instead (Parquet files, save_to_disk, imagefolder).
- Streams: images are read a batch at a time; results are written as they come (flushed per batch)
  to FILE (.jsonl or .csv, appended) or, for .parquet and for several processes, to hidden journals
  beside it; at the end FILE is rewritten once, atomically, with every input exactly once in input
  order.
- Resumable: a rerun after a kill skips every input already predicted with the same content (path +
  sha256 of its bytes), whether in FILE or in a journal, by the same model (every row names it: the
  adapter's sha256 on its base, or the merged checkpoint) in the same mode. FILE written by another
  model or mode is refused in one line (`--overwrite` starts it afresh).
- Data parallel: `--num-processes N` (or `accelerate launch -m pixtral_lora.cli predict ...`) splits the
  inputs deterministically (input i goes to process i mod N); each writes its journal, and process 0
  merges after a barrier.
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
import socket
import subprocess
import sys
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


def _journal(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f".{out.name}.journal-{rank}of{world}.jsonl")


def _journals(out: Path) -> list[Path]:
    """The journals beside FILE, of this launch and of earlier ones (any process count)."""
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

    Under a multi-process launch (WORLD_SIZE > 1) this process handles its share, and process 0
    merges. Process 0 holds a lock on FILE: a second command on it fails at once. See the module
    docstring.
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
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():  # a gloo group only for the final barrier (any device)
            dist.init_process_group("gloo")
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
    if rank == 0 and out.exists() and (not ours or other is not None):
        out.unlink()  # --overwrite: start afresh
    if other is not None:
        for journal in _journals(out) if rank == 0 else []:
            journal.unlink(missing_ok=True)
        previous = []
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # process 0 has cleared what --overwrite replaces before anyone appends
    done_sha = {row["path"]: row.get("sha256") for row in previous}
    if options.ray_address is not None:
        from pixtral_lora.inference.ray_job import RayOptions, run_on_ray

        batch_size = batch_size or classify.config.eval.batch_size
        work = functools.partial(
            predict_batch, done_sha=done_sha, mode=mode, batch_size=batch_size, model=model, warning=warning
        )
        ray_options = RayOptions(options.ray_address, options.replicas, batch_size)
        skipped, elapsed = run_on_ray(
            classifier_args, items, work, _Appender(_journal(out, 0, 1)), ray_options, f"predicting ({mode})"
        )
        return _finalise(out, items, overwrite, len(items) / elapsed if elapsed > 0 else 0.0, skipped)
    mine = items[rank::world]
    logger.info("process %d of %d: %d of %d inputs", rank, world, len(mine), len(items))
    direct = world == 1 and out.suffix in (".jsonl", ".csv")
    writer = _Appender(out if direct else _journal(out, rank, world))
    batch_size = batch_size or classify.config.eval.batch_size
    skipped = 0
    started = time.perf_counter()
    progress = tqdm(total=len(mine), desc=f"predicting ({mode})", unit="img", disable=None)
    try:
        for begin in range(0, len(mine), batch_size):
            batch = mine[begin : begin + batch_size]
            rows, batch_skipped = predict_batch(classify, batch, done_sha, mode, batch_size, model, warning)
            writer.write(rows)
            skipped += batch_skipped
            progress.update(len(batch))
    finally:
        progress.close()
        writer.close()
    elapsed = time.perf_counter() - started
    if skipped:
        logger.info("process %d: %d inputs already predicted (same path and content), skipped", rank, skipped)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # every journal is complete before process 0 merges them
        dist.destroy_process_group()
    if rank != 0:
        return {}
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


def launch_processes(argv: list[str], num_processes: int) -> int:
    """Run `pixtral-lora predict` in `num_processes` local processes (gloo on CPU) and wait for them.

    A SIGTERM or SIGINT to this launcher is passed on to every process (none is left running with
    the output's lock), and when one process fails the others are stopped: they would wait for it
    at the final barrier forever.
    """
    import signal

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    children: list[subprocess.Popen] = []

    def stop(signum, _frame) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)
        for child in children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for rank in range(num_processes):
            env = {
                **os.environ,
                "WORLD_SIZE": str(num_processes),
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": str(num_processes),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            }
            # one share of the cores each: N processes with all cores' threads each would oversubscribe
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
            children.append(subprocess.Popen([sys.executable, "-m", "pixtral_lora.cli", *argv], env=env))
        while any(child.poll() is None for child in children):
            failed = [child for child in children if child.poll()]
            if failed:
                for child in children:
                    if child.poll() is None:
                        child.terminate()
                for child in children:
                    child.wait()
                break
            time.sleep(0.2)
        codes = [child.returncode for child in children]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return next((code for code in codes if code), 0)
