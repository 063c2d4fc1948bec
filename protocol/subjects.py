"""The fleet's subject layout in NATS: ``<prefix>.<node>.<kind>``.

Most general first, like the kinds themselves, so one wildcard answers each
question a fleet consumer asks: ``cnisup.node-a.>`` (one node),
``cnisup.*.cni.plugin.>`` (one family of kinds on every node),
``cnisup.*.cni.plugin.finished`` (one kind). The node comes before the kind
so a node's credentials can be limited to its own subjects with one
permission (``cnisup.node-a.>``). See docs/FLEET.md.
"""

from __future__ import annotations

import functools
import re

#: Characters a subject token cannot hold: the separator, the wildcards, whitespace.
_NOT_IN_TOKEN = re.compile(r"[.*>\s]")


@functools.lru_cache(maxsize=1024)  # a regex per event otherwise; a node has one name
def node_token(node: str) -> str:
    """A node name as one subject token: dots (FQDN node names) and anything a
    token cannot hold become ``_``. Kubernetes node names are DNS names and
    never contain ``_``, so two nodes of one cluster never share a token."""
    return _NOT_IN_TOKEN.sub("_", node) or "_"


def subject(prefix: str, node: str, kind: str) -> str:
    return f"{prefix}.{node_token(node)}.{kind}"


def node_filter(prefix: str, node: str | None) -> str:
    """Every subject of one node (or of all nodes)."""
    return f"{prefix}.{node_token(node) if node else '*'}.>"


def split(prefix: str, subj: str) -> tuple[str, str] | None:
    """``(node token, kind)`` of a subject under ``prefix``, None if it is not one of ours."""
    head = prefix + "."
    if not subj.startswith(head):
        return None
    node, dot, kind = subj[len(head):].partition(".")
    if not dot or not node or not kind:
        return None
    return node, kind


def matches(pattern: str, subj: str) -> bool:
    """NATS wildcard matching: ``*`` is one token, a final ``>`` one or more."""
    p, s = pattern.split("."), subj.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return i == len(p) - 1 and len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)
