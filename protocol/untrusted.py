"""Reading what someone else wrote: a control request, a worker's status line,
a configuration value. Everything here is bounded (size, nesting) and every
complaint is one printable line of bounded length, so a hostile input can
neither exhaust the reader nor flood a log or a terminal with its error."""

from __future__ import annotations

import json
from typing import Any

#: Characters of one error line (a key, a value's repr and a position fit easily).
MAX_ERROR = 300


class UntrustedInputError(ValueError):
    """Input refused: too big, too deep, undecodable or of the wrong shape."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


def one_line(text: str, limit: int = MAX_ERROR) -> str:
    """``text`` as one printable line of at most ``limit`` characters: control
    characters and undecodable bytes (surrogate escapes) are escaped, not printed."""
    out = text.encode("utf-8", "backslashreplace").decode("utf-8")
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in out[: limit * 4])
    return out if len(out) <= limit else out[: limit - 1] + "…"


def nested_within(value: Any, limit: int) -> bool:
    """Is ``value`` (JSON-like: dicts and lists) nested at most ``limit`` levels?
    Recurses at most ``limit`` frames whatever the input."""
    if isinstance(value, dict):
        return limit > 0 and all(nested_within(v, limit - 1) for v in value.values())
    if isinstance(value, list):
        return limit > 0 and all(nested_within(v, limit - 1) for v in value)
    return True


def undecodable_at(data: bytes) -> int | None:
    """Offset of the first byte that is not UTF-8, or None."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start
    return None


def load_json(raw: bytes, *, what: str, max_bytes: int, max_depth: int) -> Any:
    """Parse ``raw`` as UTF-8 JSON of at most ``max_bytes`` and ``max_depth``
    levels of nesting; ``UntrustedInputError`` naming ``what`` otherwise."""
    if len(raw) > max_bytes:
        raise UntrustedInputError(f"{what} of {len(raw)} bytes (at most {max_bytes})")
    if (at := undecodable_at(raw)) is not None:
        raise UntrustedInputError(f"{what} is not UTF-8 at byte {at}")
    try:
        value = json.loads(raw)
    except RecursionError:
        raise UntrustedInputError(f"{what} nested more than {max_depth} levels deep") from None
    except ValueError as exc:
        raise UntrustedInputError(f"{what} is not JSON: {exc}") from None
    if not nested_within(value, max_depth):
        raise UntrustedInputError(f"{what} nested more than {max_depth} levels deep")
    return value
