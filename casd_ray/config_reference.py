"""The configuration reference (``docs/configuration.md``), generated from the config models.

``python -m casd_ray.config_reference > docs/configuration.md`` rewrites it; a test fails when
the file and the models disagree, so the reference never goes stale.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from casd_ray.config import ExperimentConfig


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "")
    for raw, nice in (("<class '", ""), ("'>", ""), ("NoneType", "null"), (" | ", " or ")):
        text = text.replace(raw, nice)
    return text


def _constraints(field: Any) -> str:
    out = []
    for item in field.metadata:
        for name, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(item, name, None)
            if value is not None:
                out.append(f"{sign} {value}")
    return ", ".join(out)


def reference_markdown() -> str:
    """``docs/configuration.md``: every config key with type, default, bounds and meaning."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `casd_ray/config.py` by `python -m casd_ray.config_reference > "
        "docs/configuration.md` (a test keeps it current). Every key can be set in the YAML "
        "or with `--set section.key=value`; unknown keys and bad values are refused with a "
        "line naming the key.",
        "",
    ]

    def section(model: type[BaseModel], prefix: str) -> None:
        rows, nested = [], []
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                nested.append((ann, f"{prefix}{name}."))
                continue
            default = field.default if field.default_factory is None else field.default_factory()
            rows.append(
                f"| `{prefix}{name}` | {_type_name(ann)} | `{default!r}` | "
                f"{_constraints(field)} | {field.description or ''} |"
            )
        if rows:
            lines.extend([f"## `{prefix.rstrip('.') or 'top level'}`", ""])
            lines.extend(["| key | type | default | bounds | meaning |", "|---|---|---|---|---|"])
            lines.extend(rows)
            lines.append("")
        for sub, sub_prefix in nested:
            section(sub, sub_prefix)

    section(ExperimentConfig, "")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown(), end="")
