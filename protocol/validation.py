"""The JSON Schema of the envelope (and of each known kind's ``data``)."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

SCHEMA_FILE = "envelope.schema.json"


@cache
def envelope_schema() -> dict[str, Any]:
    text = resources.files(__package__).joinpath("schema", SCHEMA_FILE).read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


def known_kinds() -> list[str]:
    """Kinds whose ``data`` the schema describes."""
    return [rule["if"]["properties"]["kind"]["const"] for rule in envelope_schema()["allOf"]]


def validate(env: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError when ``env`` breaks the contract."""
    import jsonschema

    jsonschema.validate(env, envelope_schema(), cls=jsonschema.Draft202012Validator)
