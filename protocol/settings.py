"""The configuration contract: grouped, typed settings, each with its default,
its documentation and its constraint side by side, and the one builder that
turns a mapping (parsed YAML, or what a worker receives at exec time) into
them.

The supervisor's loader (``cnisup.supervisor.config``) merges presets, the
file, the environment and flags into one mapping and builds a ``Config``
here; every worker rebuilds the same ``Config`` from ``Config.to_dict()``
with the same builder, so both sides of the process boundary hold the same
typed, checked values. Checks here are pure (no file system): whether a file
named by a key exists is the loader's business.

Units live in the type: ``Seconds`` (a float) and ``Bytes`` (an int). In
YAML they take a bare number (seconds, bytes) or a string with a unit
(``250ms``, ``30s``, ``5m``, ``2h``, ``7d``; ``512KiB``, ``256MiB``, ``1GB``).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from .untrusted import MAX_ERROR, one_line

LOG_LEVELS = ("debug", "info", "warning", "error")
PRESETS = ("development", "production")
POD_SCOPES = ("node", "cluster")
CAPTURES = ("lean", "full")


class ConfigError(Exception):
    """A configuration problem, naming the key (``cni.conf_dirs[1]``)."""

    def __init__(self, key: str, message: str) -> None:
        # Keys and values come from the input: the whole error is one bounded line.
        key = one_line(key, 120)
        message = one_line(message, MAX_ERROR - len(key) - 2 if key else MAX_ERROR)
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message

    def under(self, prefix: str) -> ConfigError:
        """The same error with the key qualified by its section."""
        return ConfigError(f"{prefix}{self.key}" if self.key else prefix.rstrip("."), self.message)


# -- units -------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    name: str
    factors: dict[str, float]


_SECONDS = Unit("seconds", {"ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400})
_BYTES = Unit("bytes", {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 1 << 10, "MiB": 1 << 20,
                        "GiB": 1 << 30})
Seconds = Annotated[float, _SECONDS]
Bytes = Annotated[int, _BYTES]
_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([A-Za-z]+)\s*$")


def _quantity(unit: Unit, value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(key, f"must be a number of {unit.name} or a string with a unit, got {value!r}")
    if not isinstance(value, str):
        return float(value)
    m = _QUANTITY.match(value)
    if m is None or m.group(2) not in unit.factors:
        units = ", ".join(unit.factors)
        raise ConfigError(key, f"{value!r} is not a quantity of {unit.name} (a number, or one with a unit: "
                               f"{units})")
    return float(m.group(1)) * unit.factors[m.group(2)]


# -- constraints, kept next to their field ------------------------------------------

#: A constraint: None when ``value`` is fine, else why not.
Check = Callable[[Any], str | None]


def positive(value: float) -> str | None:
    return None if value > 0 else f"must be positive, got {value}"


#: Messages the export's live path may have queued on each side of its subscription (the proxy's
#: pipe to it, its own socket): it only shortens the lag, the journal path carries what it does not
#: take, so a stuck export holds at most this many events in the supervisor (the journal: journal.queue).
LIVE_QUEUE = 10_000


def non_negative(value: float) -> str | None:
    return None if value >= 0 else f"must not be negative, got {value}"


def at_least(low: float) -> Check:
    return lambda value: None if value >= low else f"must be at least {low:g}, got {value}"


def one_of(*choices: str) -> Check:
    return lambda value: (None if str(value).lower() in choices
                          else f"must be one of {', '.join(choices)}, got {value!r}")


def absolute_path(value: str) -> str | None:
    return None if value.startswith("/") else f"{value!r} is not an absolute path"


#: A Kubernetes node name is a DNS subdomain: at most 253 characters.
MAX_NODE_NAME = 253


def a_node_name(value: str) -> str | None:
    """It is in every event and every fleet subject: short, printable, one token of text."""
    if len(value) > MAX_NODE_NAME:
        return f"{len(value)} characters, at most {MAX_NODE_NAME} (a Kubernetes node name)"
    if not value.isprintable() or any(c.isspace() for c in value):
        return "must be printable, without spaces"
    return None


def not_empty(values: list[Any]) -> str | None:
    return None if values else "needs at least one entry"


def setting(default: Any, doc: str, *, check: Check | None = None, each: Check | None = None) -> Any:
    """A field of the contract: its default, its one-line documentation (shown
    in ``config_example.yaml`` and the packaged file), its constraint, and for
    a list the constraint of ``each`` item."""
    meta = {"doc": doc, "check": check, "each": each}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type[Any]) -> Any:
    return field(default_factory=cls)


# -- endpoints ------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # "*", an interface name or a DNS name: not provably loopback


def endpoint_problem(ep: str, *, curve: bool) -> str | None:
    """Why ``ep`` cannot be bound, or None. Beyond loopback only with CURVE."""
    if ep.startswith("ipc://"):
        path = ep[len("ipc://"):]
        if not path.startswith(("/", "{runtime_dir}/")):  # the loader expands the placeholder
            return f"{ep!r}: ipc endpoints need an absolute path (ipc:///run/...)"
        return None
    if ep.startswith("tcp://"):
        host, sep, port = ep[len("tcp://"):].rpartition(":")
        if not sep or not port.isdigit():
            return f"{ep!r}: tcp endpoints need host:port"
        if not _is_loopback(host) and not curve:
            return f"{ep!r} is not a loopback address; set publish.curve keys to publish beyond this host"
        return None
    return f"{ep!r}: only ipc:// and tcp:// endpoints are supported"


# -- the contract ---------------------------------------------------------------------


@dataclass
class Monitors:
    kernel: bool = setting(True, "CNI plugin runs, netns, veth, addresses (eBPF or /proc)")
    config: bool = setting(True, "CNI config files and plugin binaries on disk")
    k8s: bool = setting(True, "Pods, Services, EndpointSlices, NetworkPolicies, Nodes")


@dataclass
class Cni:
    conf_dirs: list[str] = setting(
        ["/etc/cni/net.d", "/etc/cni/conf.d", "/opt/cni/conf"],
        "Directories of CNI network configs; the first is the one a runtime loads from",
        check=not_empty, each=absolute_path)
    bin_dirs: list[str] = setting(["/opt/cni/bin"], "Directories of CNI plugin binaries", each=absolute_path)
    max_config_size: Bytes = setting(1 << 20, "Bytes; a larger config file is reported, never read whole",
                                     check=positive)
    max_binary_size: Bytes = setting(256 << 20, "Bytes; a larger plugin binary is reported, not hashed",
                                     check=positive)


@dataclass
class Curve:
    server_secret_key_file: str = setting(
        "", "zmq.auth secret certificate of the publisher; setting it makes every publish endpoint a "
            "CURVE server")
    authorized_keys_dir: str = setting("", "Directory of public certificates of the subscribers allowed in")

    @property
    def enabled(self) -> bool:
        return bool(self.server_secret_key_file)

    def validate(self) -> None:
        if self.enabled and not self.authorized_keys_dir:
            raise ConfigError("authorized_keys_dir", "must name a directory of subscriber public certificates")


@dataclass
class Publish:
    endpoints: list[str] = setting(["ipc://{runtime_dir}/events.sock"],
                                   "XPUB endpoints subscribers connect to (ipc:// or tcp://)", check=not_empty)
    hwm: int = setting(100_000, "Messages queued per subscriber before that subscriber loses events",
                       check=positive)
    progress_interval: Seconds = setting(
        30.0, "At most this often, and only after events were published, supervisor.progress tells every "
              "live incarnation's last seq: a subscriber sees loss at the end of a stream within this long",
        check=positive)
    curve: Curve = section(Curve)

    def validate(self) -> None:
        for i, ep in enumerate(self.endpoints):
            if (problem := endpoint_problem(ep, curve=self.curve.enabled)) is not None:
                raise ConfigError(f"endpoints[{i}]", problem)
        if len(set(self.endpoints)) != len(self.endpoints):
            raise ConfigError("endpoints", "lists an endpoint twice")


@dataclass
class Control:
    endpoint: str = setting("ipc://{runtime_dir}/control.sock", "ROUTER endpoint answering status requests",
                            check=lambda ep: endpoint_problem(ep, curve=False))


@dataclass
class Workers:
    user: str = setting("cnisup", "Unprivileged workers run as this user (nobody if it does not exist)")
    heartbeat_interval: Seconds = setting(
        1.0, "An idle worker heartbeats every half of this many seconds, all workers at the same "
             "instants (one supervisor wake-up); a worker with news, 1 s after it", check=positive)
    heartbeat_timeout: Seconds = setting(
        10.0, "Seconds without a heartbeat before a worker counts as hung and is killed", check=positive)
    ready_timeout: Seconds = setting(30.0, "Seconds a new worker has to reach the bus", check=positive)
    stop_grace: Seconds = setting(5.0, "Seconds between SIGTERM and SIGKILL on stop", check=non_negative)
    bus_hwm: int = setting(10_000, "Events a worker queues towards the proxy before it drops (and counts)",
                           check=positive)

    def validate(self) -> None:
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ConfigError("heartbeat_timeout", "must be longer than workers.heartbeat_interval")


@dataclass
class Restart:
    initial_delay: Seconds = setting(0.5, "Seconds before the first restart of a crashed worker", check=non_negative)
    multiplier: float = setting(2.0, "Growth of the delay per consecutive crash", check=at_least(1))
    max_delay: Seconds = setting(30.0, "Cap of the restart delay, seconds", check=non_negative)
    jitter: Seconds = setting(0.5, "Random seconds added to each delay (0..jitter)", check=non_negative)
    stable_after: Seconds = setting(
        30.0, "A worker up this long (seconds) that then dies starts a fresh backoff episode", check=non_negative)
    flap_threshold: int = setting(3, "Crashes of a primary within flap_window that switch to the fallback",
                                  check=positive)
    flap_window: Seconds = setting(60.0, "Seconds over which crashes are counted", check=positive)
    reprobe_interval: Seconds = setting(
        300.0, "Seconds after a switch to the fallback before the primary is tried again", check=non_negative)


@dataclass
class Fallback:
    process_poll_interval: Seconds = setting(5.0, "Seconds between /proc scans (kernel fallback)", check=positive)
    file_poll_interval: Seconds = setting(30.0, "Seconds between stat scans (config fallback)", check=positive)


@dataclass
class Kernel:
    capture: str = setting(
        "lean", "ebpf worker: lean attaches no syscall tracepoint in steady state (no tax on other processes); "
                "full keeps syscall tracepoints always on for stdin and netlink request payloads (taxes every "
                "syscall on the node: see the README)", check=one_of(*CAPTURES))


@dataclass
class Kubernetes:
    kubeconfig: str = setting("", "Kubeconfig file; empty: in-cluster, then $KUBECONFIG, then ~/.kube/config")
    pod_scope: str = setting("node", "node: only pods of this node; cluster: all pods", check=one_of(*POD_SCOPES))
    read_timeout: Seconds = setting(
        90.0, "Seconds without a byte on a watch (servers send bookmarks about every 60 s) before the "
              "connection counts as dead and is reopened", check=positive)


@dataclass
class Journal:
    enabled: bool = setting(True, "Record every event in a local SQLite journal (history, explain, tail --since)")
    path: str = setting("/var/lib/cnisup/journal.db",
                        "The journal file; {runtime_dir} expands. Its directory must be writable by workers.user",
                        check=lambda p: absolute_path(p.replace("{runtime_dir}", "/")))
    max_bytes: Bytes = setting(256 << 20, "The oldest events are deleted to keep the journal under this size",
                               check=positive)
    max_age: Seconds = setting(7 * 86400, "Events older than this are deleted", check=positive)
    fallback_max_bytes: Bytes = setting(
        32 << 20, "Size of the smaller journal kept in the runtime dir (memory) when path is unusable",
        check=positive)
    batch_events: int = setting(
        2000, "Events per transaction at most; a crash loses at most the last uncommitted batch", check=positive)
    batch_interval: Seconds = setting(
        0.2, "Longest an event waits before its transaction commits", check=positive)
    queue: int = setting(100_000, "Events the bus holds for the journal while it writes; beyond: lost and "
                                  "recorded as a loss", check=positive)

    @property
    def fallback_path(self) -> str:
        return "{runtime_dir}/journal/fallback.db"


_NATS_SCHEMES = ("nats://", "tls://")
#: A subject token: no dots, wildcards or whitespace.
_TOKEN = re.compile(r"^[^.*>\s]+$")


def nats_url(url: str) -> str | None:
    """Why ``url`` is not a NATS server URL we accept, or None."""
    if not url.startswith(_NATS_SCHEMES):
        return f"{url!r}: use nats://host:port or tls://host:port"
    if "@" in url:
        return f"{url!r}: no credentials in URLs (secrets stay in files: credentials_file, nkey_seed_file, " \
               "user_password_file)"
    return None


def subject_prefix(prefix: str) -> str | None:
    tokens = prefix.split(".")
    if not prefix or not all(_TOKEN.match(t) for t in tokens):
        return f"{prefix!r} is not a subject prefix (dot-separated tokens, no wildcards or spaces)"
    return None


@dataclass
class NatsTls:
    ca: str = setting("", "CA bundle (PEM) the servers' certificates must chain to; empty: the system's CAs")
    cert: str = setting("", "Client certificate (PEM) for servers that verify clients; needs key")
    key: str = setting("", "Private key (PEM) of cert")

    @property
    def configured(self) -> bool:
        return bool(self.ca or self.cert)

    def validate(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ConfigError("cert" if self.key else "key", "cert and key go together")
        for name in ("ca", "cert", "key"):
            if (value := getattr(self, name)) and (problem := absolute_path(value)):
                raise ConfigError(name, problem)


@dataclass
class Nats:
    servers: list[str] = setting([], "NATS server URLs (nats://host:4222, or tls://host:4222 to require TLS)",
                                 each=nats_url)
    credentials_file: str = setting("", "A .creds file (user JWT and nkey seed) to authenticate with")
    nkey_seed_file: str = setting("", "A file holding a user nkey seed (SU...) to authenticate with")
    user_password_file: str = setting("", "A file holding user:password on its first line")
    tls: NatsTls = section(NatsTls)
    stream: str = setting("CNISUP", "The JetStream stream the events go to", check=lambda v: (
        None if re.match(r"^[A-Za-z0-9_-]+$", v) else f"{v!r}: a stream name is letters, digits, _ and -"))
    create_stream: bool = setting(
        True, "Create the stream when it does not exist (else it must exist: how operators usually run it)")
    subject_prefix: str = setting("cnisup", "Events go to <subject_prefix>.<node>.<kind>", check=subject_prefix)
    subjects: list[str] = setting([], "Subjects of a created stream; empty: <subject_prefix>.>")
    replicas: int = setting(1, "Replicas of a created stream (3 on a 3-server cluster)", check=at_least(1))
    max_age: Seconds = setting(7 * 86400, "A created stream keeps events this long", check=positive)
    max_bytes: Bytes = setting(
        1 << 30, "A created stream keeps at most this much (must fit the servers' max_file_store)",
        check=positive)
    duplicate_window: Seconds = setting(
        120.0, "A created stream drops a resent event (same Nats-Msg-Id) within this window; longer than "
               "an outage plus ack_timeout keeps the stream free of duplicates", check=positive)
    max_in_flight: int = setting(
        1024, "Events published and not yet acknowledged at most: an R3 stream's acks take replication "
              "round trips, a deeper window keeps it busy (1024 x ~600 B is well under the client's buffer)",
        check=positive)
    batch: int = setting(1000, "Events read from the journal per query", check=positive)
    live: bool = setting(
        True, "Also publish each event as it reaches the bus, before the journal commits it (the journal "
              "still backs every event): milliseconds of lag instead of journal.batch_interval")
    live_linger: Seconds = setting(
        0.01, "Seconds live events are held after the first of them, so that a busy bus goes out in bunches: "
              "each hand-over wakes both of the export's threads. CPU against lag; at 1,000 events/s into R3 "
              "(make bench): 0.005 s ~310 ms of CPU per 1,000 events and a p99 lag of 20-31 ms, 0.01 s 250-260 "
              "and 29-34 ms, 0.02 s ~190 and 37-41 ms", check=non_negative)
    ack_timeout: Seconds = setting(
        5.0, "Seconds to wait for the stream's acknowledgement before resending from the cursor",
        check=positive)
    connect_timeout: Seconds = setting(2.0, "Seconds one connection attempt may take", check=positive)
    retry_max_delay: Seconds = setting(
        1.0, "Cap of the backoff between reconnection attempts (from 0.1 s, doubling, plus up to half the cap "
             "at random, so a fleet that lost its servers at once does not come back at once)",
        check=positive)
    commit_interval: Seconds = setting(
        0.2, "The cursor is saved at most this often: a SIGKILL resends at most this much (duplicates the "
             "server drops)", check=positive)

    @property
    def auth_key(self) -> str | None:
        """The key of the authentication in use (for errors), or None."""
        for name in ("credentials_file", "nkey_seed_file", "user_password_file"):
            if getattr(self, name):
                return f"export.nats.{name}"
        return None

    @property
    def tls_required(self) -> bool:
        return self.tls.configured or any(u.startswith("tls://") for u in self.servers)

    @property
    def stream_subjects(self) -> list[str]:
        return self.subjects or [f"{self.subject_prefix}.>"]

    def validate(self) -> None:
        auth = [n for n in ("credentials_file", "nkey_seed_file", "user_password_file") if getattr(self, n)]
        if len(auth) > 1:
            raise ConfigError(auth[1], f"only one of credentials_file, nkey_seed_file, user_password_file "
                                       f"(also set: {auth[0]})")
        for name in auth:
            if problem := absolute_path(getattr(self, name)):
                raise ConfigError(name, problem)
        if self.duplicate_window > self.max_age:
            raise ConfigError("duplicate_window", "must not be longer than max_age")


@dataclass
class Export:
    enabled: bool = setting(False, "Export every journaled event to NATS JetStream (needs journal.enabled)")
    nats: Nats = section(Nats)

    def validate(self) -> None:
        if self.enabled and not self.nats.servers:
            raise ConfigError("nats.servers", "needs at least one server when export.enabled is true")


@dataclass
class Config:
    preset: str = setting("development", "development or production; explicit keys override it",
                          check=one_of(*PRESETS))
    node_name: str = setting("", "Node name in every event; $NODE_NAME overrides it; empty and unset: the hostname",
                             check=a_node_name)
    log_level: str = setting("info", "debug, info, warning or error ($LOG_LEVEL overrides)",
                             check=one_of(*LOG_LEVELS))
    runtime_dir: str = setting("/run/cnisup", "Lock file and private sockets; {runtime_dir} in endpoints "
                                              "expands to it", check=absolute_path)
    monitors: Monitors = section(Monitors)
    use_ebpf: bool = setting(True, "kernel family: prefer the eBPF worker over proc-poll")
    use_inotify: bool = setting(True, "config family: prefer the inotify worker over file-poll")
    use_k8s_informer: bool = setting(True, "k8s family: prefer the informer over kubectl")
    cni: Cni = section(Cni)
    publish: Publish = section(Publish)
    control: Control = section(Control)
    workers: Workers = section(Workers)
    restart: Restart = section(Restart)
    fallback: Fallback = section(Fallback)
    kernel: Kernel = section(Kernel)
    kubernetes: Kubernetes = section(Kubernetes)
    journal: Journal = section(Journal)
    export: Export = section(Export)

    def __post_init__(self) -> None:
        self.log_level = self.log_level.lower()

    def validate(self) -> None:
        if self.control.endpoint in self.publish.endpoints:
            raise ConfigError("control.endpoint", "is also a publish endpoint")
        if self.export.enabled and not self.journal.enabled:
            raise ConfigError("export.enabled", "the export reads the journal: needs journal.enabled: true")

    @classmethod
    def from_dict(cls, raw: Any) -> Config:
        """Build and check: the one way a ``Config`` comes into being."""
        cfg: Config = build(cls, raw)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def bus_endpoint(self) -> str:
        """The private XSUB socket workers publish to (owned by the workers' user)."""
        return f"ipc://{self.runtime_dir}/private/bus.sock"

    @property
    def consumer_endpoint(self) -> str:
        """The private XPUB the journal subscribes to (every event, as subscribers see it)."""
        return f"ipc://{self.runtime_dir}/private/events.sock"

    @property
    def live_endpoint(self) -> str:
        """The same XPUB for the export's live path, with a queue of its own (LIVE_QUEUE)."""
        return f"ipc://{self.runtime_dir}/private/live.sock"

    @property
    def privileged_bus_endpoint(self) -> str:
        """The same XSUB's socket for workers that keep the supervisor's uid: owned
        by it, so they reach it without CAP_DAC_OVERRIDE (which the unit does not grant)."""
        return f"ipc://{self.runtime_dir}/private/bus-root.sock"

    @property
    def lock_path(self) -> str:
        return f"{self.runtime_dir}/cnisup.lock"

    @property
    def journal_path(self) -> str:
        return self.journal.path.replace("{runtime_dir}", self.runtime_dir)

    @property
    def journal_fallback_path(self) -> str:
        return self.journal.fallback_path.replace("{runtime_dir}", self.runtime_dir)

    def lookup(self, key: str) -> Any:
        """A value by its dotted key (``monitors.kernel``)."""
        value: Any = self
        for part in key.split("."):
            value = getattr(value, part)
        return value


# -- the builder ---------------------------------------------------------------------


def build(cls: type[Any], raw: Any, prefix: str = "") -> Any:
    """Turn a mapping into the dataclass ``cls``: every key known, every value
    of its field's type and within its constraint, then the section's own
    ``validate`` (constraints across fields). Errors name the full key."""
    if not isinstance(raw, dict):
        raise ConfigError(prefix.rstrip("."), f"must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{prefix}{key}", f"unknown key{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        key = f"{prefix}{name}"
        value = _convert(hints[name], raw[name], key)
        check: Check | None = f.metadata.get("check")
        if check is not None and (problem := check(value)) is not None:
            raise ConfigError(key, problem)
        each: Check | None = f.metadata.get("each")
        if each is not None:
            for i, item in enumerate(value):
                if (problem := each(item)) is not None:
                    raise ConfigError(f"{key}[{i}]", problem)
        kwargs[name] = value
    obj = cls(**kwargs)
    validate: Callable[[], None] | None = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as exc:
            raise exc.under(prefix) from None
    return obj


def _convert(tp: Any, value: Any, key: str) -> Any:
    if typing.get_origin(tp) is Annotated:
        base, unit = typing.get_args(tp)[:2]
        number = _quantity(unit, value, key)
        if base is int:
            if number != int(number):
                raise ConfigError(key, f"must be a whole number of {unit.name}, got {value!r}")
            return int(number)
        return number
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return build(tp, value, key + ".")
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"must be a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported config type at {key}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {key}")


def field_docs(cls: type[Any] = Config, prefix: str = "") -> dict[str, str]:
    """Every key with its one-line documentation (used to check the example file)."""
    out: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(field_docs(hints[f.name], f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = f.metadata.get("doc", "")
    return out
