"""Reading and writing configs: YAML files, ``--set`` overrides, one-line errors.

Unknown keys and bad values are errors that name the field (``search.max_epochs: ...``), so a
typo never silently falls back to a default. The resolved config is written into the run
folder, making every run reproducible from its own outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from casd_ray.config import ExperimentConfig
from casd_ray.errors import ConfigError
from casd_ray.files import write_text


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {k} is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """``["search.max_epochs=2", "data.root=/x"]`` -> pairs; values parsed as YAML scalars."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value")
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as err:
            first = str(err).splitlines()[0]
            raise ConfigError(
                f"--set {key.strip()}: value {raw!r} is not valid YAML ({first})"
            ) from None
        out.append((key.strip(), value))
    return out


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    got = repr(first.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."
    return " ".join(f"{field}: {msg} (got {got})".split())


def validate_config(raw: dict[str, Any]) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML config (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            raw = yaml.safe_load(p.read_text())
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{p}: cannot read the config ({type(err).__name__})") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML ({str(err).splitlines()[0]})") from None
        if raw is None:
            # an empty file would silently run every default (into the demo's own folder)
            raise ConfigError(f"{p}: the config file is empty; start from experiments/quick.yaml")
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
    for key, value in parse_overrides(overrides or []):
        _set_path(raw, key, value)
    return validate_config(raw)


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    """Write the resolved config (every default filled in) as YAML, atomically."""
    write_text(path, yaml.safe_dump(cfg.model_dump(), sort_keys=False))
