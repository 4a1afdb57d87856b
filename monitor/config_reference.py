"""The configuration reference, generated from the schema in :mod:`monitor.config`.

Owns its rendering only: one Markdown table per section with every key, its type and bounds, default,
environment variable and description, exactly as the pydantic models declare them. README.md carries
the output of ``tsmon config reference`` between two markers and a test keeps the two equal, so the
reference cannot drift from the code.
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from monitor.config import ENV_PREFIX, Config, ModelRoute

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
_BOUNDS = {Ge: ("ge", "≥ {}"), Gt: ("gt", "> {}"), Le: ("le", "≤ {}"), Lt: ("lt", "< {}"),
           MinLen: ("min_length", "length ≥ {}"), MaxLen: ("max_length", "length ≤ {}")}


def _type(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type(args[0])
    if origin is Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin in (types.UnionType, typing.Union):
        kept = [a for a in args if a is not type(None)]
        return " \\| ".join(_type(a) for a in kept) + (" or none" if len(kept) < len(args) else "")
    if origin is list:
        return f"list of {_type(args[0])}"
    if annotation is SecretStr:
        return "secret string"
    if annotation is Path:
        return "path"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(field: FieldInfo) -> str:
    out = []
    for m in field.metadata:
        for kind, (attr, text) in _BOUNDS.items():
            if isinstance(m, kind):
                out.append(text.format(getattr(m, attr)))
    return ", ".join(out)


def _default(field: FieldInfo) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
    if value is None:
        return "none"
    if isinstance(value, Path):
        value = str(value)
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _table(section: str, model: type[BaseModel], env: bool = True) -> list[str]:
    lines = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        key = field.alias or name
        kind = _type(field.annotation)
        bounds = _bounds(field)
        variable = f"; env `{ENV_PREFIX}{section.upper()}__{key.upper()}`" if env else ""
        text = (field.description or "").replace("|", "\\|")
        lines.append(f"| `{key}` | {kind}{f' ({bounds})' if bounds else ''} | {_default(field)} | {text}{variable} |")
    return lines


def reference_markdown() -> str:
    """Every section of the daemon configuration as Markdown (what README.md embeds)."""
    out: list[str] = []
    for section, field in Config.model_fields.items():
        if section == "models":
            out += ["", "#### `[[models]]`", "",
                    f"{field.description}; the environment has `{ENV_PREFIX}MODEL=ARTIFACT` for a single route.", ""]
            out += _table(section, ModelRoute, env=False)
            continue
        model = field.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        out += ["", f"#### `[{section}]`", ""] + _table(section, model)
    return "\n".join(out).strip() + "\n"


def embedded(readme: str) -> str:
    """The reference README.md carries between the markers."""
    start, end = readme.index(START) + len(START), readme.index(END)
    return readme[start:end].strip() + "\n"
