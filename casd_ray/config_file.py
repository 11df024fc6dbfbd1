"""Reading and writing configs: YAML files, ``--set`` overrides, one-line errors.

Unknown keys and bad values are errors that name the field (``search.max_epochs: ...``), so a
typo never silently falls back to a default. The resolved config is written into the run
folder, making every run reproducible from its own outputs.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

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


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping.

    PyYAML keeps the last of two equal keys, so a second ``search:`` block silently replaced
    the first (D8); the line of the second one is named instead.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _field_type(dotted: str) -> Any:
    """The annotation of the config field ``dotted`` names, or None for an unknown key."""
    model: Any = ExperimentConfig
    annotation = None
    for key in dotted.split("."):
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        info = model.model_fields.get(key)
        if info is None:
            return None
        annotation = model = info.annotation
    return annotation


def _is_container(annotation: Any) -> bool:
    """Whether a field holds a list, dict or section (written as YAML), not a scalar."""
    kinds = typing.get_args(annotation) if typing.get_origin(annotation) else (annotation,)
    if typing.get_origin(annotation) in (list, dict):
        return True
    return any(
        typing.get_origin(k) in (list, dict) or k in (list, dict)
        or (isinstance(k, type) and issubclass(k, BaseModel))
        for k in kinds
    )  # fmt: skip


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """``["search.max_epochs=2", "data.root=/x"]`` -> pairs.

    A scalar field gets the text itself and pydantic reads it by the field's type, so
    ``name=42`` is the name "42" and ``search.num_samples=true`` is refused (YAML's guess
    made them an int and a 1, D15); ``null`` (or nothing) is None. Lists, mappings and
    unknown keys are read as YAML (the items of a list of names as text).
    """
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value")
        annotation = _field_type(key)
        if raw in ("", "null", "~"):
            out.append((key, None))
            continue
        if annotation is not None and not _is_container(annotation):
            out.append((key, raw))
            continue
        # a list of names (space.ignore=[0, fc]) keeps every item as text, as a name field does
        names = typing.get_origin(annotation) is list and typing.get_args(annotation) == (str,)
        try:
            value = yaml.load(raw, Loader=yaml.BaseLoader if names else yaml.SafeLoader)  # noqa: S506
        except yaml.YAMLError as err:
            first = str(err).splitlines()[0]
            raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({first})") from None
        out.append((key, value))
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
            raw = yaml.load(p.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{p}: cannot read the config ({type(err).__name__})") from None
        except ConfigError as err:
            raise ConfigError(f"{p}: {err}") from None
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
