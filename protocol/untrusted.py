"""Reading what someone else wrote: a control request, a worker's status line,
a configuration value. Everything here is bounded (size, nesting) and every
complaint is one printable line of bounded length, so a hostile input can
neither exhaust the reader nor flood a log or a terminal with its error."""

from __future__ import annotations

import json
import sys
from typing import Any

import yaml

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
    try:
        text = raw.decode("utf-8")  # once: json.loads(bytes) would detect the encoding and decode again
    except UnicodeDecodeError as exc:
        raise UntrustedInputError(f"{what} is not UTF-8 at byte {exc.start}") from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise UntrustedInputError(f"{what} nested more than {max_depth} levels deep") from None
    except ValueError as exc:
        if "digits" in str(exc):  # Python's own text advises sys.set_int_max_str_digits()
            raise UntrustedInputError(f"{what} holds a number of more than {sys.get_int_max_str_digits()} "
                                      "digits") from None
        raise UntrustedInputError(f"{what} is not JSON: {exc}") from None
    # Every level of nesting opens with a bracket: with no more brackets than levels allowed (any
    # message of ours) the walk cannot fail, and it is most of the cost of a small message.
    if text.count("{") + text.count("[") > max_depth and not nested_within(value, max_depth):
        raise UntrustedInputError(f"{what} nested more than {max_depth} levels deep")
    return value


#: libyaml where PyYAML has it (Debian's does): the pure-Python parser takes seconds for 100 KiB.
_Base: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_OPEN = (yaml.SequenceStartEvent, yaml.MappingStartEvent)
_CLOSE = (yaml.SequenceEndEvent, yaml.MappingEndEvent)


class _Loader(_Base):  # type: ignore[misc,valid-type]
    """A safe loader whose value errors (a 5,000-digit int, 2024-13-45) carry
    the value's position like every other YAML error."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:
            if isinstance(node, yaml.ScalarNode) and "digits" in str(exc):
                problem = f"a number of {len(node.value)} digits"
            else:
                value = node.value if isinstance(node, yaml.ScalarNode) else node.tag
                problem = f"cannot read {str(value)[:40]!r}: {exc}"
            raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None


class _UniqueKeysLoader(_Loader):
    """Refuses a key given twice in one mapping (YAML says keys are unique; PyYAML
    keeps the last one silently, and a config whose second ``node_name`` wins is a
    mistake nobody sees)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the constructor says so below
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"the key {str(key)[:40]!r} is given twice",
                                                        key_node.start_mark)
        return super().construct_mapping(node, deep)  # type: ignore[no-any-return]


def _mark(mark: Any) -> str:
    return f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""


def load_yaml(data: bytes, *, what: str, max_bytes: int, max_depth: int, unique_keys: bool = False) -> Any:
    """The YAML document in ``data``, plain data only; ``UntrustedInputError``
    naming ``what`` and the position when it is larger than ``max_bytes``, not
    UTF-8, uses anchors or aliases (an alias expands without bound: the "billion
    laughs"), nests deeper than ``max_depth`` (the composer recurses: checked on
    the parser's events first) or is not YAML; with ``unique_keys``, also when
    a mapping repeats a key."""
    loader = _UniqueKeysLoader if unique_keys else _Loader
    if len(data) > max_bytes:
        raise UntrustedInputError(f"{what}: larger than {max_bytes} bytes")
    if (at := undecodable_at(data)) is not None:
        raise UntrustedInputError(f"{what}: not UTF-8 at byte {at}")
    text = data.decode("utf-8")
    try:
        depth = 0
        for event in yaml.parse(text, Loader=_Loader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise UntrustedInputError(f"{what}: invalid YAML{_mark(event.start_mark)}: "
                                          "anchors and aliases (& and *) are not allowed")
            if isinstance(event, _OPEN):
                depth += 1
                if depth > max_depth:
                    raise UntrustedInputError(f"{what}: invalid YAML{_mark(event.start_mark)}: "
                                              f"nested more than {max_depth} levels deep")
            elif isinstance(event, _CLOSE):
                depth -= 1
        return yaml.load(text, Loader=loader)
    except yaml.MarkedYAMLError as exc:
        where = exc.problem_mark or exc.context_mark
        raise UntrustedInputError(f"{what}: invalid YAML{_mark(where)}: {exc.problem or exc.context}") from None
    except yaml.reader.ReaderError as exc:
        code = exc.character if isinstance(exc.character, int) else ord(exc.character or "\0")
        raise UntrustedInputError(f"{what}: invalid YAML: character U+{code:04X} at character {exc.position} "
                                  "is not allowed") from None
    except yaml.YAMLError as exc:
        raise UntrustedInputError(f"{what}: invalid YAML: {exc}") from None
