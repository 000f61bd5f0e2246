"""`pixtral-lora --help`, every subcommand's --help and a usage error load neither torch nor
transformers: the CLI table and the config schema are light, the heavy imports happen in the command
that runs (measured with `python -X importtime`, which lists every module a process imports)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "transformers", "datasets", "peft", "accelerate", "trl", "bitsandbytes", "vllm")
COMMANDS = [
    ["--help"],
    *[
        [command, "--help"]
        for command in ("tiny-model", "dequantize", "eval", "calibrate", "compare", "predict", "map")
    ],
    *[
        ["data", command, "--help"]
        for command in ("generate", "generate-scene", "validate", "preview", "export")
    ],
    ["data", "--help"],
    ["no-such-command"],  # a usage error
    ["eval"],  # a missing argument
]


def _console_script() -> str:
    script = Path(sys.executable).with_name("pixtral-lora")
    return str(script) if script.exists() else shutil.which("pixtral-lora")


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_help_and_usage_errors_import_no_torch(argv):
    script = _console_script()
    assert script, "the pixtral-lora console script is not installed"
    result = subprocess.run(
        [sys.executable, "-X", "importtime", script, *argv], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == (0 if "--help" in argv else 2), result.stderr[-2000:]
    if "--help" in argv:
        assert "usage: pixtral-lora" in result.stdout
    else:
        assert "usage: pixtral-lora" in result.stderr and "error:" in result.stderr
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "pixtral_lora.cli" in imported  # the measurement sees the project's own imports
    assert not imported & set(HEAVY), f"{' '.join(argv)} imported {sorted(imported & set(HEAVY))}"
