"""``cnisup start`` under the conditions of cnisup.service: the unit's
capability bounding set (no CAP_DAC_OVERRIDE) and no_new_privs, its journal
stream on stderr; and a worker that cannot reach the bus."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import WorkerRun

from cnisup.protocol import exitcodes
from cnisup.workers.privileges import Identity

from .support import CNISUP, Cnisup

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packaging"))
from unitfile import UNIT_SRC, unit_settings


def unit_bounding_set() -> str:
    """The unit's CapabilityBoundingSet in setpriv's syntax (-all,+bpf,...)."""
    caps = unit_settings()["[Service]CapabilityBoundingSet"]
    return ",".join(["-all", *("+" + c.removeprefix("CAP_").lower() for v in caps for c in v.split())])


@pytest.mark.root
def test_every_family_runs_under_the_units_capability_set(base: Path) -> None:
    """Root workers (the kernel family) reach the private bus without
    CAP_DAC_OVERRIDE: they have a socket of their own, owned by root."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    c = Cnisup(base, monitors={"kernel": True, "config": True, "k8s": False}, fallback={"process_poll_interval": 1})
    c.config["workers"]["ready_timeout"] = 60.0
    c.write_config()
    cmd = ["setpriv", "--no-new-privs", f"--bounding-set={unit_bounding_set()}", "--inh-caps=-all", CNISUP,
           "start", "--config", str(c.config_path)]
    c.log = open(c.log_path, "ab")  # noqa: SIM115 - closed by stop()
    c.proc = subprocess.Popen(cmd, stdout=c.log, stderr=subprocess.STDOUT)
    try:
        kernel = c.wait_worker("kernel", timeout_s=90, state="running")
        config = c.wait_worker("config", state="running")
        status = (Path("/proc") / str(c.proc.pid) / "status").read_text()
        cap_eff = int(re.search(r"CapEff:\s+(\w+)", status)[1], 16)  # type: ignore[index]
        assert not cap_eff & (1 << 1), "CAP_DAC_OVERRIDE must not be in the supervisor's set"
        root_bus = c.runtime_dir / "private" / "bus-root.sock"
        assert (root_bus.stat().st_uid, root_bus.stat().st_mode & 0o777) == (0, 0o600)
        assert kernel["worker"] in ("ebpf", "proc-poll") and config["worker"] == "inotify"
        assert "not ready within" not in c.read_log()
    finally:
        assert c.stop() == 0


@pytest.mark.root
def test_a_worker_that_cannot_reach_the_bus_says_why_at_once(start_worker: Callable[..., WorkerRun]) -> None:
    pw = pwd.getpwnam("nobody")
    run = start_worker("inotify", {"cni": {"conf_dirs": ["/nonexistent"], "bin_dirs": []}},
                       identity=Identity(pw.pw_uid, pw.pw_gid), bus_mode=0o600)
    assert run.wait_exit(5) == exitcodes.EX_NOPERM
    said = run.exit_status()
    assert said is not None and said["code"] == exitcodes.EX_NOPERM
    assert re.fullmatch(r"the bus: cannot connect to ipc:///\S+\.sock: Permission denied \(EACCES\) as uid \d+",
                        said["reason"]), said
    assert said["reason"] in run.stderr()  # its own error line, not only the supervisor's
    assert run.status[-1][1]["t"] == "exit" and not [s for _, s in run.status if s["t"] == "ready"]


def test_under_systemd_log_lines_carry_their_priority(cnisup: Cnisup) -> None:
    """$JOURNAL_STREAM names our stderr: every line, the supervisor's and the
    workers', starts with <N> (journalctl -p works) and has no timestamp."""
    cnisup.conf_dir2.mkdir(mode=0)  # the worker cannot watch it: a WARNING from the worker
    cnisup.log_path.touch()
    st = cnisup.log_path.stat()
    cnisup.start(env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    first = cnisup.wait_worker(worker="inotify", state="running")
    os.kill(first["pid"], signal.SIGKILL)  # a WARNING from the supervisor
    cnisup.wait_worker(worker="inotify", state="running", restarts=1)
    assert cnisup.stop() == 0
    lines = [ln for ln in cnisup.read_log().splitlines() if ln]
    bad = [ln for ln in lines if not re.match(r"<[2-7]>", ln) or re.match(r"<\d>\d{4}-\d\d-\d\d", ln)]
    assert not bad, bad[:5]
    assert any(re.match(r"<4>cnisup\.supervisor: inotify \(pid \d+\) exited .*SIGKILL", ln) for ln in lines), lines
    assert any(re.match(r"<4>inotify\[\d+\]: inotify_watch_failed: cannot watch ", ln) for ln in lines), lines


def test_stderr_redirected_away_from_the_journal_keeps_timestamps(cnisup: Cnisup) -> None:
    cnisup.start(env={"JOURNAL_STREAM": "1:1"})  # systemd's stream, but our stderr is a file now
    cnisup.wait_worker(worker="inotify", state="running")
    assert cnisup.stop() == 0
    lines = [ln for ln in cnisup.read_log().splitlines() if ln]
    assert lines and all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ", ln) for ln in lines), lines[:5]


@pytest.mark.root
def test_check_judges_what_the_installed_unit_allows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From a root shell every probe passes; `cnisup check` also runs them under
    the installed unit's limits, drop-ins included (here one that takes BPF away)."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    from cnisup.supervisor import config, probes, service

    system = tmp_path / "lib"
    (system / "cnisup.service.d").mkdir(parents=True)
    shutil.copy(UNIT_SRC, system / "cnisup.service")
    (system / "cnisup.service.d" / "50-no-bpf.conf").write_text(
        "[Service]\nCapabilityBoundingSet=~CAP_BPF CAP_PERFMON CAP_SYS_ADMIN\n")
    monkeypatch.setattr(service, "UNIT_DIRS", (str(tmp_path / "etc"), str(system)))
    cfg = config.load(None, environ={})
    unit = service.find_unit()
    assert unit is not None and unit.no_new_privs and "CAP_BPF" not in (unit.capabilities or ())
    assert unit.capabilities == {c for v in unit_settings()["[Service]CapabilityBoundingSet"] for c in v.split()} \
        - {"CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN"}
    report = probes.check(cfg)
    here = next(f for f in report["families"] if f["family"] == "kernel")
    assert "families" in report["service"], report["service"]
    judged = next(f for f in report["service"]["families"] if f["family"] == "kernel")
    assert report["service"]["unit"] == str(system / "cnisup.service")
    assert "CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN) are not in the effective set" in \
        judged["probes"]["ebpf"]["reason"]
    assert judged["worker"] == "proc-poll" and judged["runnable"]
    if here["probes"]["ebpf"]["ok"]:  # where BPF works at all, only the unit's limits take it away
        assert here["worker"] == "ebpf"
