"""Configuration: grouped dataclasses (the contract), presets, and loading
with the precedence defaults < preset < file < environment < CLI flags.

Every key is validated against the dataclass field types; a bad key gives a
``ConfigError`` that names it (``cnisup start`` exits 78).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import socket
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

LOG_LEVELS = ("debug", "info", "warning", "error")
PRESETS = ("development", "production")
POD_SCOPES = ("node", "cluster")


class ConfigError(Exception):
    """A configuration problem, naming the key (``cni.conf_dirs[1]``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


def _doc(text: str, **kw: Any) -> Any:
    return field(metadata={"doc": text}, **kw)


@dataclass
class Monitors:
    kernel: bool = _doc("CNI plugin runs, netns, veth, addresses (eBPF or /proc)", default=True)
    config: bool = _doc("CNI config files and plugin binaries on disk", default=True)
    k8s: bool = _doc("Pods, Services, EndpointSlices, NetworkPolicies, Nodes", default=True)


@dataclass
class Cni:
    conf_dirs: list[str] = _doc(
        "Directories of CNI network configs; the first is the one a runtime loads from",
        default_factory=lambda: ["/etc/cni/net.d", "/etc/cni/conf.d", "/opt/cni/conf"])
    bin_dirs: list[str] = _doc("Directories of CNI plugin binaries",
                               default_factory=lambda: ["/opt/cni/bin"])
    max_config_size: int = _doc("Bytes; a larger config file is reported, never read whole",
                                default=1 << 20)
    max_binary_size: int = _doc("Bytes; a larger plugin binary is reported, not hashed",
                                default=256 << 20)


@dataclass
class Curve:
    server_secret_key_file: str = _doc(
        "zmq.auth secret certificate of the publisher; setting it makes every publish "
        "endpoint a CURVE server", default="")
    authorized_keys_dir: str = _doc(
        "Directory of public certificates of the subscribers allowed in", default="")

    @property
    def enabled(self) -> bool:
        return bool(self.server_secret_key_file)


@dataclass
class Publish:
    endpoints: list[str] = _doc("XPUB endpoints subscribers connect to (ipc:// or tcp://)",
                                default_factory=lambda: ["ipc://{runtime_dir}/events.sock"])
    hwm: int = _doc("Messages queued per subscriber before that subscriber loses events",
                    default=100_000)
    curve: Curve = field(default_factory=Curve)


@dataclass
class Control:
    endpoint: str = _doc("ROUTER endpoint answering status requests",
                         default="ipc://{runtime_dir}/control.sock")


@dataclass
class Workers:
    user: str = _doc("Unprivileged workers run as this user (nobody if it does not exist)",
                     default="cnisup")
    heartbeat_interval: float = _doc("Seconds between a worker's heartbeats", default=1.0)
    heartbeat_timeout: float = _doc(
        "Seconds without a heartbeat before a worker counts as hung and is killed", default=10.0)
    ready_timeout: float = _doc("Seconds a new worker has to reach the bus", default=30.0)
    stop_grace: float = _doc("Seconds between SIGTERM and SIGKILL on stop", default=5.0)
    bus_hwm: int = _doc("Events a worker queues towards the proxy before it drops (and counts)",
                        default=10_000)


@dataclass
class Restart:
    initial_delay: float = _doc("Seconds before the first restart of a crashed worker", default=0.5)
    multiplier: float = _doc("Growth of the delay per consecutive crash", default=2.0)
    max_delay: float = _doc("Cap of the restart delay, seconds", default=30.0)
    jitter: float = _doc("Random seconds added to each delay (0..jitter)", default=0.5)
    stable_after: float = _doc(
        "A worker up this long (seconds) that then dies starts a fresh backoff episode", default=30.0)
    flap_threshold: int = _doc("Crashes of a primary within flap_window that switch to the fallback",
                               default=3)
    flap_window: float = _doc("Seconds over which crashes are counted", default=60.0)
    reprobe_interval: float = _doc(
        "Seconds after a switch to the fallback before the primary is tried again", default=300.0)


@dataclass
class Fallback:
    process_poll_interval: float = _doc("Seconds between /proc scans (kernel fallback)", default=5.0)
    file_poll_interval: float = _doc("Seconds between stat scans (config fallback)", default=30.0)


@dataclass
class Kubernetes:
    kubeconfig: str = _doc("Kubeconfig file; empty: in-cluster, then $KUBECONFIG, then ~/.kube/config",
                           default="")
    pod_scope: str = _doc("node: only pods of this node; cluster: all pods", default="node")
    read_timeout: float = _doc(
        "Seconds without a byte on a watch (servers send bookmarks about every 60 s) before the "
        "connection counts as dead and is reopened", default=90.0)


@dataclass
class Config:
    preset: str = _doc("development or production; explicit keys override it", default="development")
    node_name: str = _doc("Node name in every event; empty: $NODE_NAME, then the hostname", default="")
    log_level: str = _doc("debug, info, warning or error ($LOG_LEVEL overrides)", default="info")
    runtime_dir: str = _doc("Lock file and private sockets; {runtime_dir} in endpoints expands to it",
                            default="/run/cnisup")
    monitors: Monitors = field(default_factory=Monitors)
    use_ebpf: bool = _doc("kernel family: prefer the eBPF worker over proc-poll", default=True)
    use_inotify: bool = _doc("config family: prefer the inotify worker over file-poll", default=True)
    use_k8s_informer: bool = _doc("k8s family: prefer the informer over kubectl", default=True)
    cni: Cni = field(default_factory=Cni)
    publish: Publish = field(default_factory=Publish)
    control: Control = field(default_factory=Control)
    workers: Workers = field(default_factory=Workers)
    restart: Restart = field(default_factory=Restart)
    fallback: Fallback = field(default_factory=Fallback)
    kubernetes: Kubernetes = field(default_factory=Kubernetes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def bus_endpoint(self) -> str:
        """The private XSUB socket workers publish to."""
        return f"ipc://{self.runtime_dir}/private/bus.sock"

    @property
    def lock_path(self) -> str:
        return f"{self.runtime_dir}/cnisup.lock"


def _dev_runtime_dir() -> str:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return f"{xdg}/cnisup" if xdg else f"/tmp/cnisup-{os.getuid()}"


def preset_values(name: str) -> dict[str, Any]:
    """What a preset sets; a file's explicit keys override these."""
    if name == "production":
        return {"log_level": "info", "runtime_dir": "/run/cnisup"}
    return {  # development: runs as any user, reacts fast, talks a lot
        "log_level": "debug",
        "runtime_dir": _dev_runtime_dir(),
        "workers": {"heartbeat_timeout": 5.0, "stop_grace": 3.0},
        "restart": {"max_delay": 5.0, "stable_after": 10.0, "flap_window": 30.0,
                    "reprobe_interval": 60.0, "jitter": 0.2, "initial_delay": 0.2},
        "fallback": {"process_poll_interval": 2.0, "file_poll_interval": 5.0},
    }


# -- loading -------------------------------------------------------------------

def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _build(cls: type[Any], raw: Any, prefix: str) -> Any:
    """Turn a raw mapping into the dataclass ``cls``, checking every key and type."""
    if not isinstance(raw, dict):
        raise ConfigError(prefix, f"must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{prefix}{key}", f"unknown key{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            kwargs[f.name] = _check(hints[f.name], raw[f.name], f"{prefix}{f.name}")
    return cls(**kwargs)


def _check(tp: Any, value: Any, key: str) -> Any:
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"must be a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_check(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
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


def _is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # "*", an interface name or a DNS name: not provably loopback


def _check_endpoint(ep: str, key: str, curve: bool) -> None:
    if ep.startswith("ipc://"):
        if not ep[len("ipc://"):].startswith("/"):
            raise ConfigError(key, f"{ep!r}: ipc endpoints need an absolute path (ipc:///run/...)")
        return
    if ep.startswith("tcp://"):
        host, sep, port = ep[len("tcp://"):].rpartition(":")
        if not sep or not port.isdigit():
            raise ConfigError(key, f"{ep!r}: tcp endpoints need host:port")
        if not _is_loopback(host) and not curve:
            raise ConfigError(key, f"{ep!r} is not a loopback address; set publish.curve keys "
                                   "to publish beyond this host")
        return
    raise ConfigError(key, f"{ep!r}: only ipc:// and tcp:// endpoints are supported")


def _validate(cfg: Config) -> None:
    if cfg.preset not in PRESETS:
        raise ConfigError("preset", f"must be one of {', '.join(PRESETS)}, got {cfg.preset!r}")
    if cfg.log_level.lower() not in LOG_LEVELS:
        raise ConfigError("log_level", f"must be one of {', '.join(LOG_LEVELS)}, got {cfg.log_level!r}")
    cfg.log_level = cfg.log_level.lower()
    if not cfg.runtime_dir.startswith("/"):
        raise ConfigError("runtime_dir", "must be an absolute path")
    for section, names in (("cni", ("conf_dirs", "bin_dirs")),):
        for name in names:
            dirs = getattr(getattr(cfg, section), name)
            for i, d in enumerate(dirs):
                if not d.startswith("/"):
                    raise ConfigError(f"{section}.{name}[{i}]", f"{d!r} is not an absolute path")
    if not cfg.cni.conf_dirs:
        raise ConfigError("cni.conf_dirs", "needs at least one directory")
    positive = {
        "cni.max_config_size": cfg.cni.max_config_size, "cni.max_binary_size": cfg.cni.max_binary_size,
        "publish.hwm": cfg.publish.hwm, "workers.bus_hwm": cfg.workers.bus_hwm,
        "workers.heartbeat_interval": cfg.workers.heartbeat_interval,
        "workers.heartbeat_timeout": cfg.workers.heartbeat_timeout,
        "workers.ready_timeout": cfg.workers.ready_timeout,
        "restart.multiplier": cfg.restart.multiplier, "restart.flap_threshold": cfg.restart.flap_threshold,
        "restart.flap_window": cfg.restart.flap_window,
        "fallback.process_poll_interval": cfg.fallback.process_poll_interval,
        "fallback.file_poll_interval": cfg.fallback.file_poll_interval,
        "kubernetes.read_timeout": cfg.kubernetes.read_timeout,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(key, f"must be positive, got {value}")
    non_negative = {
        "workers.stop_grace": cfg.workers.stop_grace, "restart.initial_delay": cfg.restart.initial_delay,
        "restart.max_delay": cfg.restart.max_delay, "restart.jitter": cfg.restart.jitter,
        "restart.stable_after": cfg.restart.stable_after,
        "restart.reprobe_interval": cfg.restart.reprobe_interval,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(key, f"must not be negative, got {value}")
    if cfg.workers.heartbeat_timeout <= cfg.workers.heartbeat_interval:
        raise ConfigError("workers.heartbeat_timeout", "must be longer than workers.heartbeat_interval")
    if cfg.restart.multiplier < 1:
        raise ConfigError("restart.multiplier", "must be at least 1")
    if cfg.kubernetes.pod_scope not in POD_SCOPES:
        raise ConfigError("kubernetes.pod_scope", f"must be one of {', '.join(POD_SCOPES)}")
    if not cfg.publish.endpoints:
        raise ConfigError("publish.endpoints", "needs at least one endpoint")
    curve = cfg.publish.curve
    if curve.enabled:
        if not Path(curve.server_secret_key_file).is_file():
            raise ConfigError("publish.curve.server_secret_key_file",
                              f"{curve.server_secret_key_file!r} is not a readable file")
        if not curve.authorized_keys_dir or not Path(curve.authorized_keys_dir).is_dir():
            raise ConfigError("publish.curve.authorized_keys_dir",
                              "must name a directory of subscriber public certificates")
    for i, ep in enumerate(cfg.publish.endpoints):
        _check_endpoint(ep, f"publish.endpoints[{i}]", curve.enabled)
    if len(set(cfg.publish.endpoints)) != len(cfg.publish.endpoints):
        raise ConfigError("publish.endpoints", "lists an endpoint twice")
    _check_endpoint(cfg.control.endpoint, "control.endpoint", curve=False)
    if cfg.control.endpoint in cfg.publish.endpoints:
        raise ConfigError("control.endpoint", "is also a publish endpoint")


def _expand(cfg: Config) -> None:
    cfg.publish.endpoints = [e.replace("{runtime_dir}", cfg.runtime_dir) for e in cfg.publish.endpoints]
    cfg.control.endpoint = cfg.control.endpoint.replace("{runtime_dir}", cfg.runtime_dir)
    if not cfg.node_name:
        cfg.node_name = os.environ.get("NODE_NAME") or socket.gethostname()


def read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1} column {where.column + 1}" if where else ""
        raise ConfigError("", f"{path}: invalid YAML{at}: {getattr(exc, 'problem', exc)}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("", f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    return raw


def load(
    path: str | os.PathLike[str] | None = None,
    *,
    preset: str | None = None,
    log_level: str | None = None,
    environ: typing.Mapping[str, str] | None = None,
) -> Config:
    """The effective configuration: defaults < preset < file < env < flags."""
    env = os.environ if environ is None else environ
    file_values = read_file(path) if path else {}
    name = preset or file_values.get("preset") or "development"
    if name not in PRESETS:
        key = "preset" if preset is None else "--preset"
        raise ConfigError(key, f"must be one of {', '.join(PRESETS)}, got {name!r}")
    merged = _merge(preset_values(name), file_values)
    merged["preset"] = name
    if env.get("LOG_LEVEL"):
        merged["log_level"] = env["LOG_LEVEL"]
    if env.get("NODE_NAME"):
        merged["node_name"] = env["NODE_NAME"]
    # $KUBECONFIG is not copied into kubernetes.kubeconfig: the k8s workers try
    # the key, then in-cluster config, then $KUBECONFIG, then ~/.kube/config.
    if log_level:
        merged["log_level"] = log_level
    cfg: Config = _build(Config, merged, "")
    _expand(cfg)
    _validate(cfg)
    return cfg


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
