"""Reading a settings file written by people: one YAML mapping, or nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class YamlFileError(ValueError):
    """The file cannot be read, is not YAML, or is not a mapping; the message names the file."""


def read_mapping(path: Path, what: str = "settings") -> dict[str, Any]:
    """The mapping in ``path``: ``{}`` when the file is missing or empty."""
    if not path.exists():
        return {}
    try:
        text = path.read_text()
    except OSError as exc:
        raise YamlFileError(f"{path}: cannot be read: {exc}") from None
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise YamlFileError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise YamlFileError(f"{path}: expected a mapping of {what}")
    return doc
