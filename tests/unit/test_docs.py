"""docs/configuration.md documents every setting the code has."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from pacs_agent.config import RoutingRule, Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def _keys(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str]]:
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _keys(ann, name)
        else:
            keys.append((prefix, name))
    return keys


def test_every_setting_is_documented_in_its_section() -> None:
    text = DOC.read_text()
    sections = {"": text.split("## `[")[0] + text.split("## Top level")[1].split("## ")[0]}
    for chunk in text.split("## `[")[1:]:
        sections[chunk.split("]")[0]] = chunk
    missing = [
        f"{sec}.{key}"
        for sec, key in _keys(Settings) + _keys(RoutingRule, "models")
        if f"| `{key}` |" not in sections.get(sec, "")
    ]
    assert missing == []
