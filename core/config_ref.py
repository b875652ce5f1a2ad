"""The configuration reference (``docs/configuration.md``), generated from ``Settings``.

Each field becomes a row: its environment variable, type and constraints, default and
meaning. Sections are the comment headers that group fields in ``core/settings.py``,
so the reference reads in the same order as the code. ``gengui config docs`` prints
it; a test fails when the committed file differs from what the code generates.
"""

from __future__ import annotations

import enum
import inspect
import json
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types as at
from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "configuration.md"

# Meanings for fields declared without ``description=`` in ``core/settings.py``. Move
# each into its ``Field(description=...)`` there; a test fails for an entry here whose
# field has since been described (or removed), so this list only shrinks.
MISSING_DESCRIPTIONS: dict[str, str] = {}


def env_var(name: str) -> str:
    return f"{Settings.model_config.get('env_prefix', '')}{name}".upper()


def description(name: str, info: FieldInfo) -> str:
    return info.description or MISSING_DESCRIPTIONS.get(name, "")


def is_secret(info: FieldInfo) -> bool:
    return _contains(info.annotation, SecretStr)


def _contains(annotation: Any, target: type) -> bool:
    if annotation is target:
        return True
    return any(_contains(arg, target) for arg in get_args(annotation))


def _is_union(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType)


def type_text(annotation: Any) -> str:
    """A person's name for a field type; lists and maps are read as JSON."""
    if _is_union(annotation):
        parts = [a for a in get_args(annotation) if a is not type(None)]
        return " or ".join(type_text(a) for a in parts)
    origin = get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(f"`{v}`" for v in get_args(annotation))
    if origin in (tuple, list, set, frozenset):
        args = [a for a in get_args(annotation) if a is not Ellipsis]
        return f"JSON list of {type_text(args[0]) if args else 'values'}s"
    if origin is dict:
        key, value = get_args(annotation)
        return f"JSON object ({type_text(key)} → {type_text(value)})"
    if annotation is SecretStr:
        return "secret"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(f"`{m.value}`" for m in annotation)
    names = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}
    if annotation in names:
        return names[annotation]
    return getattr(annotation, "__name__", str(annotation))


def constraints_text(info: FieldInfo) -> str:
    out: list[str] = []
    for m in info.metadata:
        if isinstance(m, at.Ge):
            out.append(f"≥ {m.ge}")
        elif isinstance(m, at.Gt):
            out.append(f"> {m.gt}")
        elif isinstance(m, at.Le):
            out.append(f"≤ {m.le}")
        elif isinstance(m, at.Lt):
            out.append(f"< {m.lt}")
        elif isinstance(m, at.MultipleOf):
            out.append(f"multiple of {m.multiple_of}")
        elif getattr(m, "pattern", None):
            out.append(f"matches `{m.pattern}`")
    return ", ".join(out)


def default_text(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
    elif info.default is PydanticUndefined:
        return "required"
    else:
        value = info.default
    if value is None:
        return "unset"
    if is_secret(info) or isinstance(value, SecretStr):
        return "(set; hidden)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, dict | list | tuple):
        return f"`{json.dumps(list(value) if isinstance(value, tuple) else value)}`"
    return f"`{value}`"


@dataclass
class Section:
    title: str
    intro: str = ""
    fields: list[str] = field(default_factory=list)


_FIELD_LINE = re.compile(r"^    ([a-z_][a-z0-9_]*)\s*:")
_COMMENT_LINE = re.compile(r"^    # ?(.*)$")


def sections() -> list[Section]:
    """Fields grouped under the comment that heads their block in ``Settings``."""
    lines, _ = inspect.getsourcelines(Settings)
    found: list[Section] = []
    current = Section("General")
    comment: list[str] = []
    previous_blank = True
    for line in lines:
        if not line.strip():
            previous_blank, comment = True, []
            continue
        m = _COMMENT_LINE.match(line)
        if m and (previous_blank or comment):
            comment.append(m.group(1).strip())
            previous_blank = False
            continue
        f = _FIELD_LINE.match(line)
        if f and f.group(1) in Settings.model_fields:
            if comment:
                title, intro = _split_title(" ".join(comment))
                current = Section(title, intro)
                found.append(current)
                comment = []
            elif not found:
                found.append(current)
            current.fields.append(f.group(1))
        previous_blank = False
    listed = {name for s in found for name in s.fields}
    rest = [name for name in Settings.model_fields if name not in listed]
    if rest:  # fields declared on one line with others, or in a base class
        found.append(Section("Other", "", rest))
    return found


def _split_title(text: str) -> tuple[str, str]:
    m = re.match(r"^(.*?)[.:](?:\s+(.*))?$", text)
    if m is None:
        return text, ""
    intro = (m.group(2) or "").strip()
    return m.group(1).strip(), intro[:1].upper() + intro[1:]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    """The reference as Markdown."""
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated from core/settings.py by `gengui config docs > docs/configuration.md`;",
        "     do not edit by hand: tests/unit/test_config_ref.py fails when it is stale. -->",
        "",
        "Every gengui process reads the same settings from environment variables: "
        f"`{env_var('')}` followed by the setting's name in upper case. A blank value "
        "means unset. Lists and maps are JSON (`GENGUI_DOWNLOAD_HOSTS='[\"a.example\"]'`). "
        "Durations carry their unit in the name (`_s`, `_ms`).",
        "",
        "`gengui config check` validates the environment, checks that Postgres and Redis "
        "answer and that migrations are applied, and prints the effective configuration "
        "with secrets hidden.",
        "",
        "Process options that are not settings: `gengui consumers|reconciler|worker "
        "--metrics-port PORT [--metrics-host HOST]` serves `/metrics` and `/healthz` for "
        "that process (the API serves `/metrics` on its own port).",
    ]
    fields = Settings.model_fields
    for section in sections():
        out += ["", f"## {section.title}", ""]
        if section.intro:
            out += [section.intro, ""]
        out += ["| Variable | Type | Default | Description |", "|---|---|---|---|"]
        for name in section.fields:
            info = fields[name]
            kind = type_text(info.annotation)
            limits = constraints_text(info)
            if limits:
                kind = f"{kind} ({limits})"
            row = [f"`{env_var(name)}`", kind, default_text(info), description(name, info)]
            out.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(out) + "\n"
