"""Shared fixtures: the tiny Pixtral, generated AID-style data and a trained tiny run, built once per
test session, also under pytest-xdist: the first worker to ask builds each under a file lock in the
session's shared temporary folder, the others wait and reuse it. They are read by many tests: a test
that changes one works on a copy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SYNTH_CLASSES = ["Beach", "Desert", "Forest", "Port"]
# The slow tier: every end-to-end command test (tests/e2e/) and every test that needs a trained run.
# `make test-fast` leaves them out; `make test` runs everything.
SLOW_FIXTURES = {"tiny_run", "tiny_mistral3_run"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "e2e" in item.path.parts or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def shared(tmp_path_factory, worker_id: str, name: str, build) -> Path:
    """`build(folder)` once per test session into FOLDER (shared by the xdist workers of this session
    only: their base folders sit side by side in the session's), complete before anyone reads it."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        root = root.parent
    folder = root / "shared" / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        done = folder.parent / f"{name}.complete"
        if not done.exists():
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, worker_id):
    from pixtral_lora.model.tiny import build_tiny_model

    return shared(tmp_path_factory, worker_id, "tiny-pixtral", build_tiny_model)


@pytest.fixture(scope="session")
def tiny_mistral3_dir(tmp_path_factory):
    """The tiny Mistral3 (Mistral Small 3.2's config shrunk, the real vocabulary as a v11 tekken.json),
    built with the command a user types: `pixtral-lora tiny-model --family mistral3`."""
    out = tmp_path_factory.mktemp("models") / "tiny-mistral3"
    result = run_cli("tiny-model", "--family", "mistral3", "--out", out)
    assert result.returncode == 0 and "tiny mistral3 model written" in result.stdout, result.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def processor(tiny_model_dir):
    from pixtral_lora.model.loading import load_processor

    return load_processor(tiny_model_dir)


@pytest.fixture(scope="session")
def mistral_tokenizer():
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from pixtral_lora.model.loading import tekken_path

    return MistralTokenizer.from_file(str(tekken_path()))


def _scenes(tmp_path_factory, worker_id: str, name: str, per_class: int) -> Path:
    """A shared AID-style folder of the 4 synthetic classes, `per_class` 64-px scenes each."""
    from pixtral_lora.data.synth import generate_aid_like

    def build(out):
        generate_aid_like(out, classes=SYNTH_CLASSES, per_class=per_class, size=64)

    return shared(tmp_path_factory, worker_id, name, build)


@pytest.fixture(scope="session")
def aid_dir(tmp_path_factory, worker_id):
    return _scenes(tmp_path_factory, worker_id, "aid", per_class=10)


@pytest.fixture(scope="session")
def learn_data_dir(tmp_path_factory, worker_id):
    """Enough synthetic scenes for the tiny model to learn 4 classes in a CPU minute."""
    return _scenes(tmp_path_factory, worker_id, "aid-learn", per_class=40)


def tiny_config(model_dir, data_dir, output_dir, *overrides):
    """configs/tiny.yaml pointed at test fixtures, with extra `section.key=value` overrides."""
    from pathlib import Path

    from pixtral_lora.config.yaml_loading import load_config

    root = Path(__file__).resolve().parents[1]
    return load_config(
        root / "configs" / "tiny.yaml",
        [
            f"model.name_or_path={model_dir}",
            f"data.path={data_dir}",
            f"training.output_dir={output_dir}",
            "training.report_to=none",
            *overrides,
        ],
    )


@pytest.fixture(scope="session")
def tiny_run(tiny_model_dir, learn_data_dir, tmp_path_factory, worker_id):
    """One full training run of configs/tiny.yaml (the learning test and the evaluation tests share it;
    they add reports in folders of their own names, and copy it to change it)."""
    from pixtral_lora.training.recipe import train

    return shared(
        tmp_path_factory,
        worker_id,
        "run-tiny",
        lambda out: train(tiny_config(tiny_model_dir, learn_data_dir, out)),
    )


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_mistral3_run(tiny_mistral3_dir, aid_dir, tmp_path_factory):
    """configs/tiny.yaml trained on the tiny Mistral3 through `train.py`, as a user runs it."""
    run = tmp_path_factory.mktemp("runs") / "tiny-mistral3"
    result = run_command(
        ROOT / "train.py",
        ROOT / "configs" / "tiny.yaml",
        *set_args(
            f"model.name_or_path={tiny_mistral3_dir}",
            f"data.path={aid_dir}",
            f"training.output_dir={run}",
            "training.report_to=none",
            "training.num_train_epochs=3",
            "training.eval_steps=3",
            "training.save_steps=3",
            "data.test_size=0.3",
            "data.validation_size=0.2",
            "lora.train_patch_merger=true",
        ),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def run_command(*args, cwd=None, env=None, timeout: int = 900):
    """`python ARGS...` from the repository root (or `cwd`), as a user runs it: a subprocess."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env=env,
        timeout=timeout,
    )


def set_args(*values: str) -> list[str]:
    """train.py's `--set KEY=VALUE` pairs for these overrides."""
    return [arg for value in values for arg in ("--set", str(value))]


def run_cli(*args, cwd=None, env=None):
    """`pixtral-lora ARGS...` as a subprocess."""
    return run_command("-m", "pixtral_lora.cli", *args, cwd=cwd, env=env)


def one_line_error(result) -> str:
    """The one `error:` line of a command that refused its input (exit 2, no traceback)."""
    assert result.returncode == 2, (result.returncode, result.stdout[-1500:], result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


def descendants(pid: int) -> dict[int, str]:
    """Every live descendant of `pid`: its process id and command line (a Ray worker's title)."""
    parents, titles = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            titles[int(entry.name)] = (
                (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            )
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    family, grown = {pid}, True
    while grown:
        children = {child for child, parent in parents.items() if parent in family} - family
        family |= children
        grown = bool(children)
    return {p: titles.get(p, "") for p in sorted(family - {pid})}


def ray_replicas(pid: int) -> list[int]:
    """The Ray replicas (`MapWorker(MapBatches(_Replica))` actors) of the job whose driver is `pid`:
    among its descendants only, so that jobs of parallel tests are told apart."""
    return [p for p, title in descendants(pid).items() if "MapWorker(MapBatches(_Replica))" in title]


def alive(pid: int) -> bool:
    """A process that runs (not gone, not a zombie)."""
    try:
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False


def hub_like_dataset(aid_dir):
    """The synthetic scenes as a `datasets.Dataset` with image bytes and a ClassLabel, as the Hub stores them."""
    from datasets import ClassLabel, Dataset, Features, Image

    images, labels = [], []
    for index, name in enumerate(SYNTH_CLASSES):
        for path in sorted((aid_dir / name).iterdir()):
            images.append({"bytes": path.read_bytes(), "path": path.name})
            labels.append(index)
    features = Features({"image": Image(), "label": ClassLabel(names=SYNTH_CLASSES)})
    return Dataset.from_dict({"image": images, "label": labels}, features=features)
