"""Conversion recipes: one JSON file per supported model alias, beside this module."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any


def recipes() -> dict[str, dict[str, Any]]:
    """Every recipe, by alias."""
    out = {}
    for entry in resources.files("moepack.recipes").iterdir():
        if entry.name.endswith(".json"):
            recipe = json.loads(entry.read_text(encoding="utf-8"))
            out[recipe["alias"]] = recipe
    return out


def resolve_alias(name: str) -> dict[str, Any] | None:
    return recipes().get(name)
