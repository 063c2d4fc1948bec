"""The other commands: bad configurations, check, config show, status, tail, --version."""

from __future__ import annotations

import json
import os
import pwd
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cnisup.supervisor import version

from .support import CNISUP, Cnisup


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CNISUP, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


BAD_CONFIGS = [
    ("use_inotify: [\n", "invalid YAML"),
    ("cni:\n  conf_dir: [/etc/cni/net.d]\n", "cni.conf_dir"),
    ("use_inotify: maybe\n", "use_inotify"),
    ("fallback:\n  file_poll_interval: -1\n", "fallback.file_poll_interval"),
    ("fallback:\n  process_poll_interval: fast\n", "fallback.process_poll_interval"),
    ("publish:\n  endpoints: [udp://127.0.0.1:5]\n", "publish.endpoints[0]"),
    ("publish:\n  endpoints: [tcp://0.0.0.0:5556]\n", "publish.endpoints[0]"),
    ("control:\n  endpoint: http://x\n", "control.endpoint"),
    ("preset: staging\n", "preset"),
    ("log_level: loud\n", "log_level"),
    ("cni:\n  conf_dirs: [relative/dir]\n", "cni.conf_dirs[0]"),
    ("workers: 3\n", "workers"),
    ("- a list\n", "top level"),
    ("restart:\n  flap_threshold: 2.5\n", "restart.flap_threshold"),
    ("node_name: " + "x" * 300 + "\n", "node_name: 300 characters, at most 253"),
    ("node_name: a b\n", "node_name: must be printable"),
    # values the YAML constructor refuses: with their position, in our words
    ("fallback:\n  file_poll_interval: " + "9" * 5000 + "\n", "line 3 column 23: a number of 5000 digits"),
    ("use_inotify: 2024-13-45\n", "line 2 column 14: cannot read '2024-13-45': month must be in 1..12"),
    ("node_name: a\ncni:\n  conf_dirs: [/a]\nnode_name: b\n", "line 5 column 1: the key 'node_name' is given twice"),
]


@pytest.mark.parametrize(("text", "key"), BAD_CONFIGS)
def test_bad_config_exits_78_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"runtime_dir: {tmp_path}/run\n" + text if not text.startswith("-") else text)
    out = run("start", "--config", str(cfg))
    assert out.returncode == 78, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and key in lines[0] and "configuration error" in lines[0], out.stderr
    assert len(lines[0]) <= 300, lines[0]
    assert not (tmp_path / "run" / "cnisup.lock").exists()  # nothing was started


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    out = run("start", "--config", str(tmp_path / "nope.yaml"))
    assert out.returncode == 78 and "cannot read config file" in out.stderr


def test_tcp_beyond_loopback_needs_curve_keys(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    assert run("keygen", str(keys), "--name", "server").returncode == 0
    assert run("keygen", str(keys / "clients"), "--name", "alice").returncode == 0
    (keys / "clients" / "alice.key_secret").unlink()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"publish": {"endpoints": ["tcp://0.0.0.0:45991"], "curve": {
        "server_secret_key_file": str(keys / "server.key_secret"),
        "authorized_keys_dir": str(keys / "clients")}}}))
    out = run("config", "show", "--config", str(cfg))
    assert out.returncode == 0, out.stderr


def test_curve_endpoint_lets_authorized_subscribers_in(base: Path) -> None:
    keys = base / "keys"
    run("keygen", str(keys), "--name", "server")
    run("keygen", str(keys / "clients"), "--name", "alice")
    run("keygen", str(base / "stranger"), "--name", "mallory")
    with socket.socket() as s:  # a free port: other test runs on this machine may use any fixed one
        s.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    c = Cnisup(base, publish={"endpoints": [endpoint], "curve": {
        "server_secret_key_file": str(keys / "server.key_secret"),
        "authorized_keys_dir": str(keys / "clients")}})
    c.start()
    try:
        c.wait_worker(worker="inotify", state="running")
        args = ["tail", "--endpoint", endpoint, "--json", "--count", "1", "--timeout", "3",
                "--curve-server-key", str(keys / "server.key")]
        alice = subprocess.Popen([CNISUP, *args, "--curve-key", str(keys / "clients" / "alice.key_secret")],
                                 stdout=subprocess.PIPE, text=True)
        mallory = subprocess.Popen([CNISUP, *args, "--curve-key", str(base / "stranger" / "mallory.key_secret")],
                                   stdout=subprocess.PIPE, text=True)
        import time
        time.sleep(1.0)
        (c.conf_dir / "1.conf").write_text('{"name":"x","type":"bridge"}')
        a_out, _ = alice.communicate(timeout=15)
        m_out, _ = mallory.communicate(timeout=15)
        assert json.loads(a_out)["kind"] == "cni.config.created"
        assert m_out == ""  # not authorized: nothing delivered
    finally:
        assert c.stop() == 0


def test_config_show_precedence(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("preset: production\nlog_level: warning\nnode_name: from-file\n"
                   "fallback:\n  file_poll_interval: 7\n")
    shown = yaml.safe_load(run("config", "show", "--config", str(cfg)).stdout)
    assert shown["runtime_dir"] == "/run/cnisup"  # from the production preset
    assert shown["publish"]["endpoints"] == ["ipc:///run/cnisup/events.sock"]
    assert shown["log_level"] == "warning" and shown["node_name"] == "from-file"
    assert shown["fallback"]["file_poll_interval"] == 7.0
    shown = yaml.safe_load(run("config", "show", "--config", str(cfg),
                               env={"LOG_LEVEL": "error", "NODE_NAME": "from-env"}).stdout)
    assert shown["log_level"] == "error" and shown["node_name"] == "from-env"
    shown = yaml.safe_load(run("config", "show", "--config", str(cfg), "--log-level", "debug",
                               "--preset", "development", env={"LOG_LEVEL": "error"}).stdout)
    assert shown["log_level"] == "debug"  # flag over env
    assert shown["preset"] == "development" and shown["runtime_dir"] != "/run/cnisup"
    assert shown["fallback"]["file_poll_interval"] == 7.0  # the file still overrides the preset


def test_the_file_without_config_is_cnisup_config_then_the_installed_one(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("node_name: from-env-file\n")
    shown = yaml.safe_load(run("config", "show", env={"CNISUP_CONFIG": str(cfg)}).stdout)
    assert shown["node_name"] == "from-env-file"
    shown = yaml.safe_load(run("config", "show", "--config", str(cfg), env={"CNISUP_CONFIG": "/nonexistent"}).stdout)
    assert shown["node_name"] == "from-env-file"  # the flag wins
    bad = run("status", env={"CNISUP_CONFIG": str(tmp_path / "missing.yaml")})
    assert bad.returncode == 78 and "missing.yaml" in bad.stderr, bad.stderr
    # --preset names no file: the installed one (if any) is not read behind it
    shown = yaml.safe_load(run("config", "show", "--preset", "development", env={"CNISUP_CONFIG": ""}).stdout)
    assert shown["preset"] == "development"


def test_example_config_is_valid_and_documents_every_key() -> None:
    from cnisup.supervisor import config

    example = Path(__file__).resolve().parents[2] / "config_example.yaml"
    out = run("config", "show", "--config", str(example))
    assert out.returncode == 0, out.stderr
    text = example.read_text()
    for key in config.field_docs():
        assert key.split(".")[-1] + ":" in text, f"{key} is not documented in config_example.yaml"


def test_check_reports_each_family(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"runtime_dir": str(tmp_path / "run"),
                                   "cni": {"conf_dirs": [str(tmp_path / "absent")]}}))
    out = run("check", "--config", str(cfg), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    fams = {f["family"]: f for f in report["families"]}
    assert fams["config"]["worker"] == "inotify"
    inotify = fams["config"]["probes"]["inotify"]
    assert inotify["ok"] and inotify["limits"]["max_user_watches"] > 0
    assert "missing" in inotify["conf_dirs"][str(tmp_path / "absent")]
    assert fams["kernel"]["worker"] in ("ebpf", "proc-poll") and "proc-poll" in fams["kernel"]["probes"]
    assert not (tmp_path / "run").exists()  # check changes nothing
    cfg.write_text(yaml.safe_dump({"use_inotify": False}))
    report = json.loads(run("check", "--config", str(cfg), "--json").stdout)
    config_fam = next(f for f in report["families"] if f["family"] == "config")
    assert config_fam["worker"] == "file-poll" and config_fam["reason"] == "use_inotify: false"
    human = run("check", "--config", str(cfg)).stdout
    assert "[config] -> file-poll: use_inotify: false" in human


def test_check_fails_when_a_family_can_run_neither_worker(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"runtime_dir": str(tmp_path / "run"), "monitors": {"kernel": False},
                                   "kubernetes": {"kubeconfig": str(tmp_path / "missing")}}))
    for args in ([], ["--json"]):
        out = run("check", "--config", str(cfg), *args)
        assert out.returncode == 1, out.stderr
        assert out.stderr.strip().splitlines()[-1] == "cnisup check: no worker can run for: k8s (here)", out.stderr


def test_version() -> None:
    out = run("--version")
    assert out.returncode == 0 and out.stdout == f"cnisup, version {version()}\n"


def test_status_without_supervisor_fails_clearly(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"runtime_dir": str(tmp_path / "run")}))
    out = run("status", "--config", str(cfg), "--timeout", "0.5")
    assert out.returncode == 1
    assert out.stderr.startswith(f"cnisup status: cannot connect to ipc://{tmp_path}/run/control.sock: "
                                 "No such file or directory (ENOENT)"), out.stderr
    out = run("tail", "--config", str(cfg), "--timeout", "2")
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == (f"cnisup tail: cannot connect to ipc://{tmp_path}/run/events.sock: "
                          "No such file or directory (ENOENT)\n")


@pytest.mark.root
def test_clients_without_permission_on_the_sockets_say_so(cnisup: Cnisup) -> None:
    """A user outside the workers' group gets EACCES on the 0660 sockets: said, exit 1."""
    cnisup.start()
    cnisup.wait_worker(worker="inotify", state="running")
    outsider = pwd.getpwnam("daemon")  # neither root nor in the workers' group
    for cmd, sock in (("status", "control.sock"), ("tail", "events.sock")):
        out = subprocess.run([CNISUP, cmd, "--config", str(cnisup.config_path), "--timeout", "1"],
                             capture_output=True, text=True, timeout=30, user=outsider.pw_uid,
                             group=outsider.pw_gid, extra_groups=[], cwd="/")
        assert out.returncode == 1, (cmd, out.stderr)
        assert f"cannot connect to ipc://{cnisup.runtime_dir}/{sock}: Permission denied (EACCES)" in out.stderr
    assert cnisup.stop() == 0


def test_tail_that_receives_nothing_says_so(tmp_path: Path) -> None:
    import zmq

    pub: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.XPUB)  # up, but it never publishes
    pub.bind(f"ipc://{tmp_path}/quiet.sock")
    try:
        out = run("tail", "--endpoint", f"ipc://{tmp_path}/quiet.sock", "--timeout", "0.5")
        assert out.returncode == 1
        assert out.stderr == f"cnisup tail: no event from ipc://{tmp_path}/quiet.sock within 0.5 s\n"
    finally:
        pub.close(linger=0)


def test_keygen_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    assert run("keygen", str(keys), "--name", "server").returncode == 0
    first = (keys / "server.key_secret").read_bytes()
    out = run("keygen", str(keys), "--name", "server")
    assert out.returncode == 1 and out.stderr == (f"cnisup keygen: {keys}/server.key exists; not overwriting it "
                                                  "(--force replaces the pair)\n")
    assert (keys / "server.key_secret").read_bytes() == first
    assert run("keygen", str(keys), "--name", "server", "--force").returncode == 0
    assert (keys / "server.key_secret").read_bytes() != first
    assert (keys / "server.key_secret").stat().st_mode & 0o777 == 0o600


def test_status_and_tail(cnisup: Cnisup) -> None:
    import re
    import time

    cnisup.start()
    pid = cnisup.wait_worker(worker="inotify", state="running")["pid"]
    tail_json = subprocess.Popen([CNISUP, "tail", "--config", str(cnisup.config_path), "--json",
                                  "--topic", "cni.config.", "--count", "2", "--timeout", "20"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tail_human = subprocess.Popen([CNISUP, "tail", "--config", str(cnisup.config_path), "--timeout", "4"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2.0)  # both tails are up and subscribed (a subscriber only sees what comes after)
    (cnisup.conf_dir / "10-x.conflist").write_text('{"name":"x","plugins":[{"type":"bridge"}]}')
    out, err = tail_json.communicate(timeout=30)
    os.kill(pid, 9)  # and some lifecycle events
    lines = [json.loads(line) for line in out.splitlines()]
    assert [e["kind"] for e in lines] == ["cni.config.created", "cni.config.active_changed"]
    assert "lost" not in err  # a prefix subscriber counts per kind (kseq): no false loss
    human, _ = tail_human.communicate(timeout=30)
    created = next(ln for ln in human.splitlines() if "cni.config.created" in ln)
    assert re.match(r"^\d\d:\d\d:\d\d\.\d{3} inotify +cni\.config\.created +path=", created), created
    assert "path=" + str(cnisup.conf_dir / "10-x.conflist") in created and "plugins=[\"bridge\"]" in created
    for kind in ("supervisor.worker.exited", "supervisor.worker.restarting", "supervisor.worker.ready"):
        assert kind in human
    cnisup.wait_worker(worker="inotify", state="running")
    st = run("status", "--config", str(cnisup.config_path))
    assert st.returncode == 0 and "inotify" in st.stdout and "running" in st.stdout
    full = cnisup.status()
    w = next(w for w in full["workers"] if w["family"] == "config")
    for key in ("state", "pid", "source", "incarnation", "restarts", "last_exit", "fallback_reason",
                "events_sent", "events_dropped", "rss_bytes"):
        assert key in w
    assert w["events_sent"] >= 2 and w["rss_bytes"] > 1_000_000
    assert full["supervisor"]["proxy"]["from_workers"] >= 2
    assert cnisup.stop() == 0


def test_tail_reports_gaps(tmp_path: Path) -> None:
    """tail prints a loss line when seq numbers jump (a raw XPUB plays publisher)."""
    import time

    import zmq

    from cnisup.protocol import envelope
    ctx: zmq.Context[Any] = zmq.Context.instance()
    pub = ctx.socket(zmq.XPUB)
    ep = f"ipc://{tmp_path}/gap.sock"
    pub.bind(ep)
    tail = subprocess.Popen([CNISUP, "tail", "--endpoint", ep, "--count", "3", "--timeout", "5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert pub.poll(10000)
    pub.recv()  # its subscription
    stamp = envelope.Stamp("inotify", "n", "inc1")
    for seq in (1, 2, 5):
        stamp.seq = seq - 1
        pub.send_multipart(envelope.encode(stamp.build("monitor.warning", {
            "family": "config", "worker": "inotify", "code": "x", "message": "m"})))
        time.sleep(0.05)
    out, err = tail.communicate(timeout=10)
    assert "lost 2 event(s) from inotify incarnation inc1 (seq 3..4)" in err
    assert len(out.splitlines()) == 3
    pub.close(linger=0)
