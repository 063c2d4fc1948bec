"""Loading the configuration: presets, then the file, then the environment,
then CLI flags, merged into one mapping and built into the typed contract
(``cnisup.protocol.settings``), which checks every key.

What the contract cannot check without touching the host (CURVE key files)
is checked here, once, in the supervisor.
"""

from __future__ import annotations

import os
import socket
import typing
from pathlib import Path
from typing import Any

import yaml

from cnisup.protocol.settings import LOG_LEVELS, PRESETS, Config, ConfigError, field_docs

__all__ = ["LOG_LEVELS", "PRESETS", "Config", "ConfigError", "field_docs", "load", "preset_values", "read_file"]


def _dev_runtime_dir() -> str:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return f"{xdg}/cnisup" if xdg else f"/tmp/cnisup-{os.getuid()}"


def preset_values(name: str) -> dict[str, Any]:
    """What a preset sets; a file's explicit keys override these."""
    if name == "production":
        # Idle costs nothing: a worker says it is alive every minute when idle (at
        # once when it has news), so a hung one is noticed within 5 minutes.
        return {"log_level": "info", "runtime_dir": "/run/cnisup",
                "workers": {"heartbeat_interval": 120.0, "heartbeat_timeout": 300.0}}
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
    if env.get("LOG_LEVEL"):
        merged["log_level"] = env["LOG_LEVEL"]
    if env.get("NODE_NAME"):
        merged["node_name"] = env["NODE_NAME"]
    # $KUBECONFIG is not copied into kubernetes.kubeconfig: the k8s workers try
    # the key, then in-cluster config, then $KUBECONFIG, then ~/.kube/config.
    if log_level:
        merged["log_level"] = log_level
    runtime_dir = merged.get("runtime_dir")
    _expand(merged, runtime_dir if isinstance(runtime_dir, str) else "", env)
    cfg = Config.from_dict(merged)
    _check_host(cfg)
    return cfg
