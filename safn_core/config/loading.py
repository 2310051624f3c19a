"""From a YAML file and ``--set`` overrides to a validated `SafnConfig`, with one-line errors
naming the file and the dotted key; relative paths resolved; the configuration dumped back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from safn_core.config.base import Section
from safn_core.config.schema import SafnConfig
from safn_core.errors import ConfigError


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file; save the config as UTF-8") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections "
                          f"(e.g. 'data:'), not a {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``dotted.key=value``; the value is read as YAML (``3``, ``true``, ``[a, b]``)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value, e.g. data.min_cell=10")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: the key is empty; write e.g. data.min_cell=10")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_override(tree: dict[str, Any], parts: list[str], value: Any, origin: str) -> None:
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _format_validation_error(exc: ValidationError, origin: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'; check its spelling against configs/ or docs")
        elif err["type"] == "missing":
            lines.append(f"missing required key '{key}'")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
            lines.append(f"'{key}': {msg}{shown}" if key != "(top level)" else msg)
    return f"{origin}: " + "; ".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                model: type[Section] = SafnConfig) -> SafnConfig:
    """Read ``path`` (or the defaults), apply ``--set`` overrides, validate, return the schema."""
    tree: dict[str, Any] = _read_yaml(Path(path)) if path is not None else {}
    origin = str(path) if path is not None else "configuration"
    for text in overrides or []:
        parts, value = parse_override(text)
        apply_override(tree, parts, value, f"--set {text}")
    if overrides:
        origin += " (with --set overrides)"
    try:
        cfg = model.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, origin)) from None
    base = Path(path).resolve().parent if path is not None else Path.cwd()
    return _resolve_paths(cfg, base)


def _resolve_paths(cfg: SafnConfig, base: Path) -> SafnConfig:
    """Relative paths written in a config file are relative to that file's folder.

    A relative path that exists from the current folder (e.g. given with ``--set``) is kept.
    """
    def fix(value):
        if isinstance(value, Path) and not value.is_absolute() and not value.exists():
            return base / value
        return value

    for section in (cfg.data, cfg.site, cfg.server, cfg.simulation):
        if section is None:
            continue
        for name in type(section).model_fields:
            value = getattr(section, name)
            if isinstance(value, Path):
                setattr(section, name, fix(value))
            elif isinstance(value, dict) and any(isinstance(v, Path) for v in value.values()):
                setattr(section, name, {k: fix(v) for k, v in value.items()})
    return cfg


def dump_config(cfg: Section) -> str:
    """The configuration as YAML, for the run folder (paths as strings)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
