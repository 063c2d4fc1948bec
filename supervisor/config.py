"""Loading the configuration: presets, then the file, then the environment,
then CLI flags, merged into one mapping and built into the typed contract
(``cnisup.protocol.settings``), which checks every key.

What the contract cannot check without touching the host (CURVE key files)
is checked here, once, in the supervisor.

Every input is untrusted: the file is read only up to ``MAX_CONFIG_BYTES``,
must be UTF-8 (the offset of the first bad byte is reported), and is parsed
without anchors or aliases (an alias expands without bound: the "billion
laughs") and at most ``MAX_CONFIG_DEPTH`` levels deep (the YAML composer
recurses). Whatever goes wrong is a ``ConfigError``: one bounded line.
"""

from __future__ import annotations

import os
import socket
import stat
import typing
from pathlib import Path
from typing import Any

from cnisup.protocol.settings import LOG_LEVELS, PRESETS, Config, ConfigError, field_docs
from cnisup.protocol.untrusted import UntrustedInputError, load_yaml, undecodable_at

#: Bytes of a configuration file; every key with its comment is about 7 KiB. (What parsing
#: the most expensive 64 KiB costs: ``make bench``, start-up rows.)
MAX_CONFIG_BYTES = 64 << 10
#: Nesting of a configuration file: its sections are two levels deep, their lists three.
MAX_CONFIG_DEPTH = 16
#: The file the package installs: the CLI's configuration when none is named.
INSTALLED_CONFIG = "/etc/cnisup/config.yaml"

#: Bytes of an environment override ($NODE_NAME, $LOG_LEVEL; $KUBECONFIG is a list of paths).
MAX_ENV_BYTES = {"NODE_NAME": 256, "LOG_LEVEL": 16, "KUBECONFIG": 4096}

__all__ = ["LOG_LEVELS", "PRESETS", "Config", "ConfigError", "field_docs", "load", "preset_values", "read_file"]


def _dev_runtime_dir() -> str:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return f"{xdg}/cnisup" if xdg else f"/tmp/cnisup-{os.getuid()}"


def preset_values(name: str) -> dict[str, Any]:
    """What a preset sets; a file's explicit keys override these."""
    if name == "production":
        # Idle costs next to nothing: an idle worker says it is alive every 5 minutes
        # (all of them at the same instant, so the supervisor wakes once for all; at
        # once when there is news), so a worker hung while idle is noticed within 15
        # minutes. That is the price of the idle goal; a worker with news beats every
        # second. Plugins are where the runtime is told to find them: /opt/cni/bin
        # (upstream's default) or /usr/lib/cni (Debian's containernetworking-plugins).
        return {"log_level": "info", "runtime_dir": "/run/cnisup",
                "workers": {"heartbeat_interval": 600.0, "heartbeat_timeout": 900.0},
                "cni": {"bin_dirs": ["/opt/cni/bin", "/usr/lib/cni"]}}
    return {  # development: runs as any user, reacts fast, talks a lot
        "log_level": "debug",
        "runtime_dir": _dev_runtime_dir(),
        "workers": {"heartbeat_timeout": 5.0, "stop_grace": 3.0},
        "restart": {"max_delay": 5.0, "stable_after": 10.0, "flap_window": 30.0,
                    "reprobe_interval": 60.0, "jitter": 0.2, "initial_delay": 0.2},
        "fallback": {"process_poll_interval": 2.0, "file_poll_interval": 5.0},
        "journal": {"path": "{runtime_dir}/journal/journal.db"},
    }


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out




def _read_bytes(path: str | os.PathLike[str]) -> bytes:
    """At most MAX_CONFIG_BYTES + 1 bytes of a regular file (a FIFO or a device never blocks us)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError("", f"config file {os.fsdecode(path)} is not a regular file")
            return f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {os.fsdecode(path)}: {exc.strerror}") from exc


def parse_yaml(data: bytes, name: str) -> Any:
    """The YAML document in ``data``; ``ConfigError`` naming ``name`` and the position."""
    try:
        return load_yaml(data, what=name, max_bytes=MAX_CONFIG_BYTES, max_depth=MAX_CONFIG_DEPTH, unique_keys=True)
    except UntrustedInputError as exc:
        raise ConfigError("", str(exc)) from None


def read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    name = os.fsdecode(path)
    raw = parse_yaml(_read_bytes(path), name)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("", f"{name}: the top level must be a mapping, got {type(raw).__name__}")
    return raw


def _expand(raw: dict[str, Any], runtime_dir: str, env: typing.Mapping[str, str]) -> None:
    """``{runtime_dir}`` in endpoints, and the node name's fallbacks."""
    publish = raw.get("publish")
    if isinstance(publish, dict) and isinstance(publish.get("endpoints"), list):
        publish["endpoints"] = [e.replace("{runtime_dir}", runtime_dir) if isinstance(e, str) else e
                                for e in publish["endpoints"]]
    control = raw.get("control")
    if isinstance(control, dict) and isinstance(control.get("endpoint"), str):
        control["endpoint"] = control["endpoint"].replace("{runtime_dir}", runtime_dir)
    if not raw.get("node_name"):
        raw["node_name"] = env.get("NODE_NAME") or socket.gethostname()


def _check_host(cfg: Config) -> None:
    curve = cfg.publish.curve
    if curve.enabled:
        if not Path(curve.server_secret_key_file).is_file():
            raise ConfigError("publish.curve.server_secret_key_file",
                              f"{curve.server_secret_key_file!r} is not a readable file")
        if not Path(curve.authorized_keys_dir).is_dir():
            raise ConfigError("publish.curve.authorized_keys_dir",
                              "must name a directory of subscriber public certificates")


def _env(env: typing.Mapping[str, str], name: str) -> str | None:
    """An environment override, checked like the file: UTF-8 and bounded."""
    value = env.get(name)
    if not value:
        return None
    try:
        raw = os.fsencode(value)  # the bytes as they came (undecodable ones survive as escapes)
    except UnicodeEncodeError as exc:
        raise ConfigError(f"${name}", f"not UTF-8 at character {exc.start}") from None
    if (at := undecodable_at(raw)) is not None:
        raise ConfigError(f"${name}", f"not UTF-8 at byte {at}")
    if len(raw) > MAX_ENV_BYTES[name]:
        raise ConfigError(f"${name}", f"{len(raw)} bytes (at most {MAX_ENV_BYTES[name]})")
    return value


def _level(source: str, value: str) -> str:
    if value.lower() not in LOG_LEVELS:
        raise ConfigError(source, f"must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return value


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
    defaults = Config().to_dict()
    merged = _merge(defaults, _merge(preset_values(name), file_values))
    merged["preset"] = name
    if (level := _env(env, "LOG_LEVEL")) is not None:
        merged["log_level"] = _level("$LOG_LEVEL", level)
    if (node := _env(env, "NODE_NAME")) is not None:
        merged["node_name"] = node
    # $KUBECONFIG is not copied into kubernetes.kubeconfig: the k8s workers try
    # the key, then in-cluster config, then $KUBECONFIG, then ~/.kube/config.
    _env(env, "KUBECONFIG")
    if log_level:
        merged["log_level"] = _level("--log-level", log_level)
    runtime_dir = merged.get("runtime_dir")
    _expand(merged, runtime_dir if isinstance(runtime_dir, str) else "", env)
    cfg = Config.from_dict(merged)
    _check_host(cfg)
    return cfg
