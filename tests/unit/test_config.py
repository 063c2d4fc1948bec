from __future__ import annotations

from pathlib import Path

import pytest

from cnisup.supervisor import config


def load_text(tmp_path: Path, text: str, **kw):  # type: ignore[no-untyped-def]
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return config.load(p, environ={}, **kw)


def test_defaults_are_valid_for_both_presets(tmp_path: Path) -> None:
    dev = config.load(None, environ={})
    prod = config.load(None, preset="production", environ={})
    assert prod.runtime_dir == "/run/cnisup" and prod.log_level == "info"
    assert prod.control.endpoint == "ipc:///run/cnisup/control.sock"
    assert prod.fallback.file_poll_interval == 30 and prod.fallback.process_poll_interval == 5
    assert dev.fallback.file_poll_interval < prod.fallback.file_poll_interval
    assert dev.publish.endpoints == [f"ipc://{dev.runtime_dir}/events.sock"]


def test_unknown_key_suggests_the_right_one(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError) as e:
        load_text(tmp_path, "fallback:\n  file_pol_interval: 3\n")
    assert e.value.key == "fallback.file_pol_interval" and "file_poll_interval" in str(e.value)


def test_ints_are_numbers_but_bools_are_not(tmp_path: Path) -> None:
    assert load_text(tmp_path, "fallback:\n  file_poll_interval: 3\n").fallback.file_poll_interval == 3.0
    with pytest.raises(config.ConfigError, match=r"workers\.heartbeat_interval"):
        load_text(tmp_path, "workers:\n  heartbeat_interval: true\n")


def test_loopback_tcp_is_fine(tmp_path: Path) -> None:
    for ep in ("tcp://127.0.0.1:5556", "tcp://[::1]:5556", "tcp://localhost:5556"):
        cfg = load_text(tmp_path, f"publish:\n  endpoints: ['{ep}']\n")
        assert cfg.publish.endpoints == [ep]
    for ep in ("tcp://*:5556", "tcp://10.0.0.1:5556", "tcp://eth0:5556"):
        with pytest.raises(config.ConfigError, match=r"publish.endpoints\[0\]"):
            load_text(tmp_path, f"publish:\n  endpoints: ['{ep}']\n")


def test_heartbeat_timeout_must_exceed_interval(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match=r"workers\.heartbeat_timeout"):
        load_text(tmp_path, "workers:\n  heartbeat_interval: 2\n  heartbeat_timeout: 1\n")


def test_runtime_dir_placeholder(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, f"runtime_dir: {tmp_path}\npublish:\n  endpoints: ['ipc://{{runtime_dir}}/x.sock']\n")
    assert cfg.publish.endpoints == [f"ipc://{tmp_path}/x.sock"]
    assert cfg.bus_endpoint == f"ipc://{tmp_path}/private/bus.sock"


def test_units_in_the_type_accept_numbers_and_strings_with_units(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "restart:\n  reprobe_interval: 5m\n  initial_delay: 250ms\n"
                              "cni:\n  max_config_size: 2MiB\n  max_binary_size: 1GB\n")
    assert cfg.restart.reprobe_interval == 300.0 and cfg.restart.initial_delay == 0.25
    assert cfg.cni.max_config_size == 2 << 20 and cfg.cni.max_binary_size == 10**9
    assert isinstance(cfg.cni.max_config_size, int)
    for bad, key in (("restart:\n  max_delay: 5 parsecs\n", r"restart\.max_delay"),
                     ("cni:\n  max_config_size: 1.5B\n", r"cni\.max_config_size"),
                     ("cni:\n  max_config_size: 10s\n", r"cni\.max_config_size"),
                     ("restart:\n  jitter: true\n", r"restart\.jitter")):
        with pytest.raises(config.ConfigError, match=key):
            load_text(tmp_path, bad)


def test_constraints_live_with_their_fields(tmp_path: Path) -> None:
    for text, key in (("restart:\n  multiplier: 0.5\n", "restart.multiplier"),
                      ("workers:\n  bus_hwm: 0\n", "workers.bus_hwm"),
                      ("workers:\n  stop_grace: -1\n", "workers.stop_grace"),
                      ("cni:\n  conf_dirs: []\n", "cni.conf_dirs"),
                      ("cni:\n  bin_dirs: ['/ok', 'relative']\n", "cni.bin_dirs[1]"),
                      ("kubernetes:\n  pod_scope: galaxy\n", "kubernetes.pod_scope"),
                      ("log_level: chatty\n", "log_level"),
                      ("runtime_dir: run/cnisup\n", "runtime_dir"),
                      ("publish:\n  endpoints: ['ipc:///a', 'ipc:///a']\n", "publish.endpoints"),
                      ("control:\n  endpoint: 'udp://x'\n", "control.endpoint")):
        with pytest.raises(config.ConfigError) as e:
            load_text(tmp_path, text)
        assert e.value.key == key, (text, e.value)


def test_workers_rebuild_the_same_config_from_its_dict() -> None:
    cfg = config.load(None, preset="production", environ={"NODE_NAME": "n1"})
    again = config.Config.from_dict(cfg.to_dict())
    assert again == cfg and again.to_dict() == cfg.to_dict()
    assert config.Config.from_dict(config.Config().to_dict()) == config.Config()
