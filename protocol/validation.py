"""Validate envelopes against the JSON Schema (and list the kinds it knows)."""

from __future__ import annotations

import json
from functools import cache, lru_cache
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


@lru_cache(maxsize=256)
def _validator_for(kind: str) -> Any:
    """The schema with only the rules about ``kind``. The same verdict as the whole schema: its
    other rules are ``if kind == X then ...``, and an ``if`` that fails passes. Without the 50-odd
    conditions per event that make the whole schema cost about a millisecond an event."""
    import jsonschema

    schema = envelope_schema()
    return jsonschema.Draft202012Validator(
        {**schema, "allOf": [rule for rule in schema["allOf"] if rule["if"]["properties"]["kind"]["const"] == kind]})


def validator(env: Any) -> Any:
    """A validator for ``env``: the one of its kind when it names one."""
    kind = env.get("kind") if isinstance(env, dict) else None
    return _validator_for(kind) if isinstance(kind, str) else _validator()


def known_kinds() -> list[str]:
    """Kinds whose ``data`` the schema describes."""
    return [rule["if"]["properties"]["kind"]["const"] for rule in envelope_schema()["allOf"]]


def validate(env: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError when ``env`` breaks the contract."""
    validator(env).validate(env)
