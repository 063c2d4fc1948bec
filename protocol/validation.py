"""Validate envelopes against the JSON Schema (and list the kinds it knows)."""

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


@cache
def _validator() -> Any:
    # Built once: jsonschema.validate() re-checks the schema itself on every call.
    import jsonschema

    return jsonschema.Draft202012Validator(envelope_schema())


def known_kinds() -> list[str]:
    """Kinds whose ``data`` the schema describes."""
    return [rule["if"]["properties"]["kind"]["const"] for rule in envelope_schema()["allOf"]]


def validate(env: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError when ``env`` breaks the contract."""
    _validator().validate(env)
