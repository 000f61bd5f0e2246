"""YAML -> a validated `Config`, with `--set a.b=value` overrides.

Errors name the file, the line and the key, and list what is allowed, before any model is loaded. A
document is capped in bytes and in the values its aliases expand to, before anything is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pixtral_lora.config.schema import Config, ConfigError

MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_NODES = 100_000  # a real config has a few hundred


def _check_expanded_size(node: yaml.Node | None, path: Path) -> None:
    """Refuse a document whose aliases expand past MAX_CONFIG_NODES values ("billion laughs"): the
    composed graph shares aliased nodes, so their expanded size is counted once each, not built."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(current: yaml.Node) -> int:
        key = id(current)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise ConfigError(f"{path}: an alias refers to itself (a recursive YAML structure)")
        open_nodes.add(key)
        if isinstance(current, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in current.value)
        elif isinstance(current, yaml.SequenceNode):
            total = 1 + sum(size(item) for item in current.value)
        else:
            total = 1
        open_nodes.discard(key)
        sizes[key] = min(total, MAX_CONFIG_NODES + 1)
        return sizes[key]

    if node is not None and size(node) > MAX_CONFIG_NODES:
        raise ConfigError(
            f"{path}: the YAML expands to more than {MAX_CONFIG_NODES} values through its aliases (&anchor/*alias); "
            "a run config needs a few hundred"
        )


def _line_index(node: yaml.Node, path: tuple = (), index: dict | None = None) -> dict[tuple, int]:
    """Map each key path in a composed YAML document to its 1-based line."""
    index = {} if index is None else index
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key_path = (*path, key_node.value)
            index[key_path] = key_node.start_mark.line + 1
            _line_index(value_node, key_path, index)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            index[(*path, i)] = item.start_mark.line + 1
            _line_index(item, (*path, i), index)
    return index


def _allowed_keys(loc: tuple) -> list[str]:
    model: Any = Config
    for part in loc[:-1]:
        field = (
            model.model_fields.get(part) if isinstance(part, str) and hasattr(model, "model_fields") else None
        )
        if field is None:
            return []
        model = field.annotation
    return sorted(model.model_fields) if hasattr(model, "model_fields") else []


def _same_branch(a: tuple, b: tuple) -> bool:
    """One key path lies on the other (an override of `foo.bar` explains an error at `foo`)."""
    depth = min(len(a), len(b))
    return depth > 0 and tuple(a[:depth]) == tuple(b[:depth])


def _format_errors(
    err: ValidationError, source: str, lines: dict[tuple, int], overrides: dict[tuple, str]
) -> str:
    messages = []
    for error in err.errors():
        loc = tuple(error["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        where = source
        blamed = [text for key_path, text in overrides.items() if _same_branch(key_path, loc)]
        if blamed:
            where = f"--set {blamed[-1]}"
        else:
            for depth in range(len(loc), 0, -1):
                if loc[:depth] in lines:
                    where = f"{source}:{lines[loc[:depth]]}"
                    break
        if error["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc)
            text = f"unknown key '{loc[-1]}'" + (f"; allowed here: {', '.join(allowed)}" if allowed else "")
        elif error["type"] == "missing":
            text = "required key is missing"
        else:
            text = f"{error['msg']} (got {error.get('input')!r})"
        messages.append(f"{where}: {key}: {text}")
    return "invalid configuration:\n  " + "\n  ".join(messages)


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """`training.learning_rate=2e-4` -> (("training", "learning_rate"), 0.0002); values are YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, value = text.split("=", 1)
    path = tuple(part for part in key.strip().split(".") if part)
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    return path, yaml.safe_load(value) if value.strip() else None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read, override and validate a YAML config; raises `ConfigError` naming file, line and key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    data = path.read_bytes()
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {len(data)} bytes; a config is at most {MAX_CONFIG_BYTES // 1024} KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: not UTF-8 text (byte {data[err.start]:#04x}); save it as UTF-8"
        ) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        _check_expanded_size(node, path)  # before anything is built: aliases expand only there
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    lines = _line_index(node) if node is not None else {}
    override_sources: dict[tuple, str] = {}
    for override in overrides or []:
        key_path, value = parse_override(override)
        target = raw
        for part in key_path[:-1]:
            if not isinstance(target.get(part, {}), dict):
                raise ConfigError(f"--set {override}: '{part}' is not a section")
            target = target.setdefault(part, {})
        target[key_path[-1]] = value
        override_sources[key_path] = override
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, str(path), lines, override_sources)) from None


def dump_config(config: Config) -> str:
    """The resolved config as YAML (written into every run directory)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
