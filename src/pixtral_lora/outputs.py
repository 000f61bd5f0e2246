"""Crash-safe outputs: written under a temporary name, renamed when complete, never over foreign files.

- `atomic_directory` / `atomic_file`: the output appears under its final name only once complete. An
  output directory carries a marker (`.pixtral-lora-output.json`) naming the kind of output and the
  command that wrote it. An existing directory is replaced only when its marker names the same kind and
  its entries match the kind's file patterns; anything else is refused unless `overwrite=True`.
  A temporary left by a killed writer (`.NAME.partial-PID-*`) is removed by the next writer to that path.
- `check_not_inputs`: no output may be one of its command's inputs, lie inside one or hold one, even
  with `overwrite` (`dequantize X --out X`, an export into its own base's folder).
- A full disk becomes an `OutputError` saying how much space was needed and where, not a traceback.
- `drop_torn_tail`: a journal appended to after a kill goes on from its last complete line.
- `run_lock`: an OS-level lock on a run directory, held for the life of the process that trains in it
  (the kernel releases it when that process dies, however it dies).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from pixtral_lora.errors import UserError

logger = logging.getLogger(__name__)

# Entries a previous output of each kind may hold; a directory holding anything else is not replaced.
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "processor_config.json",
    "preprocessor_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "tekken.json",  # a Mistral3 checkpoint's own tokenizer file (its version decides the template)
)
MISTRAL_EXPORT_FILES = (
    "consolidated.safetensors",
    "consolidated-*-of-*.safetensors",
    "consolidated.safetensors.index.json",
    "params.json",
    "tekken.json",
)
HF_CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "tiny_pixtral.json",
    *PROCESSOR_FILES,
)
ADAPTER_FILES = (
    "adapter_config.json",
    "vllm_serve.sh",
    "adapter_model.safetensors",
    "README.md",
    "base_model.json",
    *PROCESSOR_FILES,
)
EVAL_REPORT_FILES = (
    "report.json",
    "report.md",
    "report.html",
    "predictions.jsonl",
    "confusion_*.csv",
    "confusion_*.png",
)


# The marker an output directory carries: {"kind": ..., "command": ..., "version": ...}.
MARKER = ".pixtral-lora-output.json"


class OutputError(UserError):
    """An output that cannot be written as asked (exists and is not ours, disk full, not writable)."""


class RunLockedError(OutputError):
    """Another process holds the run directory."""


# ---------------------------------------------------------------------------------------------------
# Checks before writing


def _foreign_entries(directory: Path, owned: Iterable[str]) -> list[str]:
    patterns = tuple(owned)
    return sorted(
        entry.name
        for entry in directory.iterdir()
        if not any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in patterns)
        or (entry.is_dir() and not entry.is_symlink())  # our outputs are flat
    )


def read_marker(directory: str | Path) -> dict | None:
    """The marker of an output directory, or None when it has none (or an unreadable one)."""
    try:
        marker = json.loads((Path(directory) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("kind"), str) else None


def check_not_inputs(final: str | Path, inputs: dict[str, str | Path | None]) -> None:
    """Raise `OutputError` if the output `final` is one of `inputs` (name -> path), lies inside one or
    holds one. Inputs that are not local paths (hub ids) are skipped. Not waived by `--overwrite`."""
    shown, final = final, Path(final).resolve()
    for name, source in inputs.items():
        if source is None or not Path(source).exists():
            continue
        given, source = source, Path(source).resolve()
        if final == source:
            problem = f"is the {name} itself"
        elif final in source.parents:
            problem = f"holds the {name} ({given})"
        elif source in final.parents:
            problem = f"lies inside the {name} ({given})"
        else:
            continue
        raise OutputError(
            f"--out {shown} {problem}: writing there would replace what this command reads; "
            "choose another --out"
        )


def check_replaceable(
    final: str | Path,
    owned: Iterable[str] = (),
    overwrite: bool = False,
    kind: str | None = None,
    inputs: dict[str, str | Path | None] | None = None,
) -> None:
    """Raise `OutputError` unless `final` is absent, empty, or a previous output of this kind.

    `owned` are the file-name patterns of this kind of output; `kind`, when given, must be the kind the
    directory's marker names. With `overwrite` anything but one of `inputs` is replaced.
    """
    final = Path(final)
    check_not_inputs(final, inputs or {})
    if not final.exists() and not final.is_symlink():
        return
    if overwrite:
        return
    if not final.is_dir() or final.is_symlink():
        raise OutputError(
            f"{final} exists and is not an output directory; choose another path or pass --overwrite"
        )
    if kind is not None and any(final.iterdir()):
        marker = read_marker(final)
        if marker is None:
            raise OutputError(
                f"{final} exists, holds {_shown(sorted(p.name for p in final.iterdir()))} and was not "
                f"written by pixtral-lora (it has no {MARKER}); choose another path or pass --overwrite"
            )
        if marker["kind"] != kind:
            raise OutputError(
                f"{final} was written by `{marker.get('command', '?')}` (kind: {marker['kind']}), not as "
                f"this command's output (kind: {kind}); choose another path or pass --overwrite"
            )
    foreign = _foreign_entries(final, (*owned, MARKER))
    if foreign:
        raise OutputError(
            f"{final} exists and holds files that are not a previous output of this command "
            f"({_shown(foreign)}); choose another path or pass --overwrite"
        )


def _shown(names: list[str], most: int = 5) -> str:
    """`a, b, c and 4 more`: the first `most` of `names`."""
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def check_replaceable_file(
    final: str | Path, recognise: Callable[[Path], bool] | None = None, overwrite: bool = False
) -> None:
    """Raise `OutputError` unless the file `final` is absent or `recognise(final)` says it is ours."""
    final = Path(final)
    if not final.exists() and not final.is_symlink():
        return
    if final.is_dir():
        raise OutputError(f"{final} is a directory; give a file path")
    if overwrite or (recognise is not None and recognise(final)):
        return
    raise OutputError(
        f"{final} exists and is not a previous output of this command; choose another path or pass --overwrite"
    )


def check_writable(directory: str | Path, what: str = "output directory") -> None:
    """Raise `OutputError` unless `directory` exists as a writable directory or can be created."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputError(f"{what} {directory} is a file, not a directory")
    probe_in = directory
    while not probe_in.exists():
        if probe_in.parent == probe_in:
            break
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise OutputError(f"{what} {directory}: {probe_in} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=probe_in):
            pass
    except OSError as err:
        raise OutputError(f"{what} {directory}: cannot write in {probe_in} ({err.strerror})") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(final: Path) -> None:
    """Remove `.NAME.partial-PID-*` temporaries whose writer is no longer running."""
    for stale in final.parent.glob(f".{final.name}.partial-*"):
        pid_text = stale.name[len(f".{final.name}.partial-") :].split("-", 1)[0]
        if pid_text.isdigit() and _pid_alive(int(pid_text)) and int(pid_text) != os.getpid():
            continue
        _remove(stale)


def _remove(path: Path) -> None:
    """Remove a file, a link or a directory tree, whichever `path` is (gone already is fine)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _disk_full(final: Path, written: int, needed: int | None) -> OutputError:
    free = shutil.disk_usage(final.parent).free
    need = f"about {_size(needed)} needed" if needed else f"{_size(written)} written before the disk filled"
    return OutputError(
        f"no space left on the device of {final.parent} while writing {final.name}: {need}, "
        f"{_size(free)} free; nothing was written (free some space and run again)"
    )


def is_disk_full(err: BaseException) -> bool:
    """A full disk, as an OSError says it or as safetensors' Rust writer does (a SafetensorError whose
    text carries the OS error: `IoError(Os { code: 28, kind: StorageFull, ... })`)."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(err)
    return "StorageFull" in text or "code: 28," in text or "No space left on device" in text


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------------
# Atomic writers


@contextlib.contextmanager
def _removed_on_failure(tmp: Path, final: Path, needed_bytes: int | None) -> Iterator[None]:
    """Remove the temporary file or directory `tmp` if the block fails; a full disk becomes one line."""
    try:
        yield
    except Exception as err:
        written = _tree_size(tmp) if tmp.exists() else 0
        _remove(tmp)
        if is_disk_full(err):
            raise _disk_full(final, written, needed_bytes) from None
        raise
    except BaseException:
        _remove(tmp)
        raise


def _command_line() -> str:
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    return " ".join([program, *sys.argv[1:]])[:300]


@contextlib.contextmanager
def atomic_directory(
    final: str | Path,
    owned: Iterable[str] = (),
    overwrite: bool = False,
    needed_bytes: int | None = None,
    kind: str | None = None,
    inputs: dict[str, str | Path | None] | None = None,
) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to `final` only if the block succeeds.

    An existing `final` is replaced only if `check_replaceable(final, owned, overwrite, kind, inputs)`
    allows it; with `kind` the finished directory carries the marker naming it and its command.
    """
    final = Path(final)
    check_writable(final.parent, "output folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    check_replaceable(final, owned, overwrite, kind, inputs)
    _remove_stale_partials(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-{os.getpid()}-", dir=final.parent))
    with _removed_on_failure(tmp, final, needed_bytes):
        yield tmp
        if kind is not None:
            from pixtral_lora import __version__

            (tmp / MARKER).write_text(
                json.dumps({"kind": kind, "command": _command_line(), "version": __version__}, indent=2)
                + "\n",
                encoding="utf-8",
            )
    # mkdtemp/mkstemp create owner-only entries; outputs are for servers and colleagues to read too.
    tmp.chmod(0o755)
    for path in tmp.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    if final.exists() or final.is_symlink():
        check_replaceable(final, owned, overwrite, kind)  # again: it may have changed while we wrote
        old = final.with_name(f".{final.name}.partial-{os.getpid()}-old")
        final.rename(old)
        tmp.rename(final)
        _remove(old)
    else:
        tmp.rename(final)


@contextlib.contextmanager
def atomic_file(
    final: str | Path,
    mode: str = "w",
    recognise: Callable[[Path], bool] | None = None,
    overwrite: bool = True,
    needed_bytes: int | None = None,
) -> Iterator:
    """Open a temporary sibling file for writing; rename it to `final` only if the block succeeds.

    With `overwrite=False` an existing `final` is replaced only when `recognise(final)` is true.
    """
    final = Path(final)
    check_writable(final.parent, "output folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    check_replaceable_file(final, recognise, overwrite)
    _remove_stale_partials(final)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.partial-{os.getpid()}-", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    with _removed_on_failure(tmp, final, needed_bytes):
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
        tmp.chmod(0o644)
        tmp.replace(final)


def drop_torn_tail(path: str | Path) -> None:
    """Cut a last line a kill left unfinished, so lines appended to a journal start on their own."""
    with open(path, "rb+") as handle:
        data = handle.read()
        if data and not data.endswith(b"\n"):
            handle.truncate(data.rfind(b"\n") + 1)


def write_json(path: str | Path, payload) -> None:
    """Write JSON atomically, pretty-printed."""
    with atomic_file(path) as handle:
        json.dump(payload, handle, indent=2, sort_keys=False, default=str)
        handle.write("\n")


# ---------------------------------------------------------------------------------------------------
# Run directory lock

LOCK_NAME = ".lock"


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold an exclusive `flock` on RUN_DIR/.lock for the block; raise `RunLockedError` naming the holder.

    An OS-level lock, not a PID file: the kernel releases it when the holder exits or is killed.
    """
    with _flock(
        Path(run_dir) / LOCK_NAME, f"{run_dir} is in use by another run", "training.output_dir"
    ) as path:
        yield path


@contextlib.contextmanager
def output_lock(out: str | Path) -> Iterator[Path]:
    """The same lock for a long-running command's output file: `.OUT.lock` beside it, removed again
    when the command ends (a kill leaves it; the next command takes it over, the kernel having
    released the lock)."""
    out = Path(out)
    check_writable(out.parent, "--out")
    out.parent.mkdir(parents=True, exist_ok=True)
    with _flock(
        out.with_name(f".{out.name}.lock"),
        f"{out} is being written by another command",
        "--out",
        remove=True,
    ) as path:
        yield path


def locks_its_output(function):
    """Decorator: the call holds `output_lock` on its `out` argument (a Ray job's replicas write
    nothing: its driver, holding the lock, writes for them)."""
    import functools
    import inspect

    signature = inspect.signature(function)

    @functools.wraps(function)
    def locked(*args, **kwargs):
        with output_lock(signature.bind(*args, **kwargs).arguments["out"]):
            return function(*args, **kwargs)

    return locked


@contextlib.contextmanager
def _flock(lock_path: Path, busy: str, choose: str, remove: bool = False) -> Iterator[Path]:
    """Hold an exclusive `flock` on `lock_path`; with `remove`, unlink it before letting go.

    A lock file that is removed can be taken by two processes (one holding the unlinked file, one a
    new one), so after locking we check the path still names the file we locked, and retry if not.
    """
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = lock_path.read_text(encoding="utf-8", errors="replace").strip() or "unknown process"
            raise RunLockedError(
                f"{busy} ({holder}); wait for it to finish or choose another {choose}"
            ) from None
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed it as we opened it: lock the new one
    try:
        info = (
            f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
            + " ".join(sys.argv)[:300]
        )
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode("utf-8"), 0)
        except OSError as err:  # the holder's line is for people; the lock itself is the flock
            if not is_disk_full(err):
                raise
            logger.warning("%s: disk full, the lock holds without its holder's line", lock_path)
        yield lock_path
    finally:
        if remove:  # while still holding it: nobody can have taken this file meanwhile
            lock_path.unlink(missing_ok=True)
        os.close(fd)


# ---------------------------------------------------------------------------------------------------
# Pictures a command writes beside its output

PNG_SOFTWARE = "pixtral-lora"


def is_our_png(path: Path) -> bool:
    """A PNG an earlier command wrote (its `Software` text chunk says pixtral-lora), so it may be replaced."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.format == "PNG" and str(image.info.get("Software", "")).startswith(PNG_SOFTWARE)
    except Exception:  # not an image at all: not ours
        return False
