"""What the supervisor tells a worker at exec time (JSON in an environment
variable), and the worker-to-supervisor status channel (JSON lines on a pipe)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

SPEC_ENV = "CNISUP_WORKER_SPEC"
STATUS_FD_ENV = "CNISUP_STATUS_FD"


@dataclass(frozen=True)
class IdentitySpec:
    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    bounding_must_be_empty: bool = True


@dataclass(frozen=True)
class WorkerSpec:
    name: str
    family: str
    role: str
    incarnation: str
    node: str
    supervisor_pid: int
    bus_endpoint: str
    log_level: str
    heartbeat_interval_s: float
    ready_timeout_s: float
    sndhwm: int
    identity: IdentitySpec | None  #: None: keep the supervisor's privileges
    config: dict[str, Any] = field(default_factory=dict)

    def to_env(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_env(cls) -> WorkerSpec:
        raw = json.loads(os.environ[SPEC_ENV])
        ident = raw.pop("identity")
        if ident is not None:
            ident["groups"] = tuple(ident["groups"])
            ident = IdentitySpec(**ident)
        return cls(identity=ident, **raw)


def status_line(kind: str, **fields: Any) -> bytes:
    return (json.dumps({"t": kind, **fields}, separators=(",", ":")) + "\n").encode()
