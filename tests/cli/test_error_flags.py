"""Every `--flag` a message or docstring of ours tells the user to type is a flag one of our commands
has: the flags are read from the commands' own `--help` (pixtral-lora and each subcommand, train.py,
scripts/convert_to_mistral.py), the suggestions from every string literal under src/, train.py and
that script. A flag of another program (vllm serve) is named below. Not caught: a real flag
suggested for the wrong command."""

import ast
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)")

# Flags of the programs our messages send users to, not ours (vllm serve, ray start, accelerate launch, pip).
OTHER_PROGRAMS = {
    "tokenizer-mode",
    "config-format",
    "load-format",  # vllm serve
    "enable-lora",
    "max-lora-rank",
    "lora-modules",
    "enable-tower-connector-lora",
    "max-loras",
    "head",  # ray start
    "address",
}
OPTION_LINE = re.compile(r"^\s+(?:-\w[ ,]+)?--")  # an option's own line in --help, not its prose


def _help(*command: str) -> str:
    result = subprocess.run(
        [sys.executable, *command, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _our_flags() -> set[str]:
    from pixtral_lora.cli import build_parser

    texts = [_help("train.py"), _help("scripts/convert_to_mistral.py")]
    flags = {  # an option's own line ("  -o, --out OUT   help..."), not the prose around it
        flag
        for text in texts
        for line in text.splitlines()
        if OPTION_LINE.match(line)
        for flag in FLAG.findall(line.strip().split("  ")[0])
    }
    parsers = [build_parser()]
    while parsers:  # every subcommand, at every depth, with the flags argparse itself gives it
        parser = parsers.pop()
        for action in parser._actions:
            flags.update(s[2:] for s in action.option_strings if s.startswith("--"))
            if hasattr(action, "_name_parser_map"):
                parsers.extend(action._name_parser_map.values())
    return flags


def _suggested_flags() -> dict[str, list[str]]:
    files = [*sorted((ROOT / "src").rglob("*.py")), ROOT / "train.py", ROOT / "scripts/convert_to_mistral.py"]
    found: dict[str, list[str]] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for flag in FLAG.findall(node.value):
                    found.setdefault(flag, []).append(f"{Path(path).relative_to(ROOT)}:{node.lineno}")
    return found


def test_every_flag_a_message_suggests_is_a_flag_of_a_command():
    ours = _our_flags()
    assert {"resume", "model", "out", "overwrite", "format", "tekken"} <= ours  # the reading works
    unknown = {flag: where for flag, where in _suggested_flags().items() if flag not in ours | OTHER_PROGRAMS}
    assert not unknown, f"messages suggest flags no command has: {unknown}"
