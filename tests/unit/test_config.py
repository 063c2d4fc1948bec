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
