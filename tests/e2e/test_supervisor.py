"""The supervisor through ``cnisup start``: lifecycle events, restarts,
backoff, fallback, watchdog, signals, privilege drop, backpressure."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from cnisup.workers import privileges

from .support import CNISUP, Cnisup, children_of, cpu_seconds, pid_alive, proc_state, worker_user


def _running(c: Cnisup, worker: str = "inotify") -> dict[str, Any]:
    return c.wait_worker(worker=worker, state="running")


def test_start_ready_and_clean_stop(cnisup: Cnisup) -> None:
    ev = cnisup.subscribe()
    cnisup.start()
    # (supervisor.started and worker.started may go out before this subscriber is connected)
    ready = ev.wait("supervisor.worker.ready", worker="inotify")
    ev.wait("supervisor.ready")
    w = _running(cnisup)
    assert ready["data"]["incarnation"] == w["incarnation"] and ready["data"]["pid"] == w["pid"]
    pid = w["pid"]
    assert cnisup.stop() == 0
    exited = ev.wait("supervisor.worker.exited", pid=pid)
    assert exited["data"]["exit_code"] == 0 and exited["data"]["signal"] is None
    ev.wait("supervisor.stopped")
    assert not pid_alive(pid) and proc_state(pid) is None  # reaped, no zombie
    assert not (cnisup.runtime_dir / "events.sock").exists()
    assert not (cnisup.runtime_dir / "control.sock").exists()


def test_kill9_worker_is_restarted_with_new_incarnation(cnisup: Cnisup) -> None:
    ev = cnisup.subscribe()
    cnisup.start()
    first = _running(cnisup)
    os.kill(first["pid"], signal.SIGKILL)
    exited = ev.wait("supervisor.worker.exited", pid=first["pid"])
    assert exited["data"]["signal"] == "SIGKILL" and exited["data"]["exit_code"] is None
    restarting = ev.wait("supervisor.worker.restarting", worker="inotify")
    assert restarting["data"]["attempt"] == 1 and restarting["data"]["delay_s"] > 0
    started = ev.wait("supervisor.worker.started", worker="inotify")
    assert started["data"]["incarnation"] != first["incarnation"]
    ev.wait("supervisor.worker.ready", incarnation=started["data"]["incarnation"])
    # The new incarnation starts over at seq 1 and re-discovers what is on disk.
    again = ev.wait("cni.config.active_changed", where=lambda e: e["incarnation"] == started["data"]["incarnation"])
    assert again["data"]["initial"] is True
    w = _running(cnisup)
    assert w["restarts"] == 1 and w["incarnation"] == started["data"]["incarnation"]
    assert "SIGKILL" in w["last_exit"]["reason"]
    assert proc_state(first["pid"]) is None  # no zombie
    assert cnisup.stop() == 0


def test_crash_loop_backs_off_then_falls_back_then_restores(base: Path) -> None:
    c = Cnisup(base, restart={"initial_delay": 0.3, "multiplier": 2.0, "max_delay": 5.0, "jitter": 0.01,
                              "flap_threshold": 3, "flap_window": 30.0, "reprobe_interval": 3.0})
    ev = c.subscribe()
    c.start()
    try:
        delays: list[float] = []
        pid = _running(c)["pid"]
        for i in range(3):
            if i:
                started = ev.wait("supervisor.worker.started", worker="inotify")
                ev.wait("supervisor.worker.ready", incarnation=started["data"]["incarnation"])
                pid = started["data"]["pid"]
            os.kill(pid, signal.SIGKILL)
            ev.wait("supervisor.worker.exited", pid=pid)
            if len(delays) < 2:
                delays.append(ev.wait("supervisor.worker.restarting", worker="inotify")["data"]["delay_s"])
        assert delays[0] >= 0.3 and delays[1] >= 2 * 0.3 and delays[1] > delays[0]
        fb = ev.wait("supervisor.worker.fallback")
        assert (fb["data"]["from"], fb["data"]["to"]) == ("inotify", "file-poll")
        assert "flapping" in fb["data"]["reason"]
        ev.wait("supervisor.worker.started", worker="file-poll")
        w = c.wait_worker(worker="file-poll", state="running")
        assert "flapping" in w["fallback_reason"]
        # Re-probed after reprobe_interval: the primary comes back.
        restored = ev.wait("supervisor.worker.restored", timeout_s=15)
        assert (restored["data"]["from"], restored["data"]["to"]) == ("file-poll", "inotify")
        c.wait_worker(worker="inotify", state="running")
        (c.conf_dir / "99-after.conf").write_text('{"name":"n","type":"bridge"}')
        created = ev.wait("cni.config.created", path=str(c.conf_dir / "99-after.conf"))
        assert created["source"] == "inotify"
    finally:
        assert c.stop() == 0


def test_sigstopped_worker_is_killed_and_restarted(cnisup: Cnisup) -> None:
    ev = cnisup.subscribe()
    cnisup.start()
    w = _running(cnisup)
    os.kill(w["pid"], signal.SIGSTOP)
    t0 = time.monotonic()
    un = ev.wait("supervisor.worker.unresponsive", pid=w["pid"], timeout_s=10)
    assert un["data"]["heartbeat_age_s"] >= 3.0  # workers.heartbeat_timeout
    exited = ev.wait("supervisor.worker.exited", pid=w["pid"])
    assert "no heartbeat" in exited["data"]["killed_by_supervisor"]
    assert exited["data"]["signal"] == "SIGKILL"
    ev.wait("supervisor.worker.ready", where=lambda e: e["data"]["pid"] != w["pid"])
    assert time.monotonic() - t0 < 10
    assert proc_state(w["pid"]) is None
    assert cnisup.stop() == 0


def test_sigkill_supervisor_leaves_no_worker(cnisup: Cnisup) -> None:
    cnisup.start()
    pid = _running(cnisup)["pid"]
    assert cnisup.proc is not None
    kids = children_of(cnisup.proc.pid)
    assert pid in kids
    cnisup.proc.kill()
    cnisup.proc.wait()
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and any(pid_alive(k) for k in kids):
        time.sleep(0.02)
    assert not any(pid_alive(k) for k in kids), "a worker outlived the supervisor by 1 s"
    cnisup.log.close()


def test_sigterm_stops_workers_even_if_they_ignore_it(cnisup: Cnisup) -> None:
    """SIGTERM, grace period, then SIGKILL of the process group; exit 0."""
    ev = cnisup.subscribe()
    cnisup.start()
    w = _running(cnisup)
    os.kill(w["pid"], signal.SIGSTOP)  # a stopped worker cannot act on SIGTERM
    t0 = time.monotonic()
    assert cnisup.stop() == 0
    took = time.monotonic() - t0
    exited = ev.wait("supervisor.worker.exited", pid=w["pid"])
    assert exited["data"]["signal"] == "SIGKILL"
    assert "did not stop" in exited["data"]["killed_by_supervisor"]
    assert took < 2.0 + 3.0  # stop_grace plus slack; no restart while stopping
    assert not [e for e in ev.drain(0.2) if e["kind"] == "supervisor.worker.started"]


def test_second_instance_is_refused(cnisup: Cnisup) -> None:
    cnisup.start()
    _running(cnisup)
    out = subprocess.run([CNISUP, "start", "--config", str(cnisup.config_path)],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode != 0
    assert "another cnisup instance" in out.stderr and str(cnisup.proc.pid) in out.stderr  # type: ignore[union-attr]
    assert cnisup.stop() == 0


@pytest.mark.root
def test_unprivileged_worker_credentials(cnisup: Cnisup) -> None:
    cnisup.start()
    pid = _running(cnisup)["pid"]
    st = privileges.read_status(pid)
    nobody = worker_user()
    assert st["Uid"].split() == [str(nobody.pw_uid)] * 4
    assert st["Gid"].split() == [str(nobody.pw_gid)] * 4
    assert st["Groups"] == ""
    for capset in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(st[capset], 16) == 0, capset
    assert st["NoNewPrivs"] == "1"
    assert privileges.audit(privileges.Identity(nobody.pw_uid, nobody.pw_gid), pid) == []
    # Only the workers' user reaches the private bus; its group (subscribers) reaches the public one.
    private = cnisup.runtime_dir / "private"
    assert (private.stat().st_uid, private.stat().st_mode & 0o777) == (0, 0o711)
    # ...and the journal's and the export's subscriptions to every event: not the subscribers' group
    for name in ("bus.sock", "events.sock", "live.sock"):
        sock = private / name
        assert (sock.stat().st_uid, sock.stat().st_mode & 0o777) == (nobody.pw_uid, 0o600), name
    public = cnisup.runtime_dir / "events.sock"
    assert (public.stat().st_gid, public.stat().st_mode & 0o777) == (nobody.pw_gid, 0o660)
    assert cnisup.stop() == 0


def test_use_inotify_false_runs_file_poll_and_says_why(base: Path) -> None:
    c = Cnisup(base, use_inotify=False)
    ev = c.subscribe()
    c.start()
    try:
        w = c.wait_worker(worker="file-poll", state="running")
        assert w["reason"] == "use_inotify: false" and w["role"] == "fallback"
        (c.conf_dir / "10-a.conflist").write_text('{"name":"a","cniVersion":"1.0.0","plugins":[{"type":"ptp"}]}')
        created = ev.wait("cni.config.created", path=str(c.conf_dir / "10-a.conflist"))
        assert created["source"] == "file-poll"
        out = subprocess.run([CNISUP, "status", "--config", str(c.config_path)], capture_output=True, text=True)
        assert "file-poll" in out.stdout and "running" in out.stdout
    finally:
        assert c.stop() == 0


@pytest.mark.root
def test_missing_inotify_means_fallback_with_reason(base: Path) -> None:
    """Exit 77 from the primary: the fallback starts at once, the reason is published."""
    nobody = worker_user()
    # Use up the workers' user's inotify instances from a process running as that user.
    hog = subprocess.Popen(
        ["python3", "-c", "import ctypes,sys,time\nl=ctypes.CDLL(None)\n"
         "n=0\nwhile l.inotify_init()>=0: n+=1\nprint(n,flush=True)\ntime.sleep(60)"],
        user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[], stdout=subprocess.PIPE, text=True)
    try:
        assert hog.stdout is not None and int(hog.stdout.readline()) >= 0
        c = Cnisup(base)
        ev = c.subscribe()
        c.start()
        try:
            exited = ev.wait("supervisor.worker.exited", worker="inotify")
            assert exited["data"]["exit_code"] == 77
            fb = ev.wait("supervisor.worker.fallback")
            assert fb["data"]["to"] == "file-poll" and "inotify" in fb["data"]["reason"]
            restarting = [e for e in ev.seen if e["kind"] == "supervisor.worker.restarting"]
            assert not restarting  # 77 is not a crash
            w = c.wait_worker(worker="file-poll", state="running")
            assert "max_user_instances" in w["fallback_reason"] or "instances" in w["fallback_reason"]
        finally:
            assert c.stop() == 0
    finally:
        hog.kill()
        hog.wait()


def test_sighup_reloads_and_switches_worker(cnisup: Cnisup) -> None:
    ev = cnisup.subscribe()
    cnisup.start()
    _running(cnisup)
    cnisup.config["use_inotify"] = False
    cnisup.write_config()
    assert cnisup.proc is not None
    cnisup.proc.send_signal(signal.SIGHUP)
    reloaded = ev.wait("supervisor.config.reloaded")
    assert "use_inotify" in reloaded["data"]["changed"]
    sw = ev.wait("supervisor.worker.switched")
    assert (sw["data"]["from"], sw["data"]["to"]) == ("inotify", "file-poll")
    cnisup.wait_worker(worker="file-poll", state="running")
    # A broken file on reload changes nothing.
    cnisup.config_path.write_text("use_inotify: [\n")
    cnisup.proc.send_signal(signal.SIGHUP)
    failed = ev.wait("supervisor.config.reload_failed")
    assert "invalid YAML" in failed["data"]["error"]
    cnisup.write_config()  # so that `cnisup status` itself can read it
    assert cnisup.worker()["worker"] == "file-poll"
    assert cnisup.stop() == 0


def test_sighup_restarts_only_the_workers_whose_settings_changed(base: Path) -> None:
    """Two families (config: inotify, kernel: proc-poll); each reload says which
    workers it restarted and why, and the others keep running (not blind)."""
    c = Cnisup(base, monitors={"kernel": True, "config": True, "k8s": False}, use_ebpf=False,
               fallback={"process_poll_interval": 0.5, "file_poll_interval": 0.5})
    ev = c.subscribe()
    c.start()
    try:
        pids = {f: c.wait_worker(f, state="running")["pid"] for f in ("config", "kernel")}
        ev.wait("supervisor.ready")
        mark = len(ev.seen)
        assert c.proc is not None

        def reload(**changes: Any) -> dict[str, Any]:
            for section, values in changes.items():
                c.config[section].update(values)
            c.write_config()
            c.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
            data: dict[str, Any] = ev.wait("supervisor.config.reloaded")["data"]
            return data

        data = reload(restart={"max_delay": 3.0}, workers={"heartbeat_timeout": 4.0})
        assert data["restarted"] == {} and data["changed"] == ["restart.max_delay", "workers.heartbeat_timeout"]
        data = reload(cni={"conf_dirs": [str(c.conf_dir)]})
        assert data["restarted"] == {"config": "cni.conf_dirs changed"}
        started = ev.wait("supervisor.worker.started", worker="inotify")
        assert started["data"]["reason"] == "configuration reloaded: cni.conf_dirs changed"
        assert c.wait_worker("config", state="running")["pid"] == started["data"]["pid"] != pids["config"]
        data = reload(fallback={"process_poll_interval": 0.4})
        assert data["restarted"] == {"kernel": "fallback.process_poll_interval changed"}
        started = ev.wait("supervisor.worker.started", worker="proc-poll")
        pids = {"config": c.worker("config")["pid"],
                "kernel": c.wait_worker("kernel", state="running")["pid"]}
        data = reload(restart={"max_delay": 4.0})
        assert data["restarted"] == {}
        ev.collect(1.0)
        assert {f: c.worker(f)["pid"] for f in ("config", "kernel")} == pids
        kinds = [(e["kind"], e["data"].get("worker")) for e in ev.seen[mark:]]
        assert not [k for k in kinds if k[0] == "supervisor.worker.switched"]  # same workers: no switch
        assert kinds.count(("supervisor.worker.started", "inotify")) == 1
        assert kinds.count(("supervisor.worker.started", "proc-poll")) == 1
    finally:
        assert c.stop() == 0


def test_slow_subscriber_loses_only_its_own_events(base: Path) -> None:
    # publish.hwm is per subscriber: big enough for the fast one's bursts, small
    # enough that n events overflow what the slow one's queues can hold.
    n = 4000
    c = Cnisup(base, publish={"hwm": 1000})
    fast = c.subscribe()
    slow = c.subscribe(rcvhwm=10)  # never reads until the end
    c.start()
    try:
        w = _running(c)
        fast.wait("supervisor.worker.ready")
        for i in range(n):
            (c.conf_dir / f"f{i:05}.conf").write_text(f'{{"name":"n{i}","type":"bridge"}}')
        got: set[str] = set()
        deadline = time.monotonic() + 60
        while len(got) < n and time.monotonic() < deadline:
            env = fast._recv(5)
            if env and env["kind"] == "cni.config.created":
                got.add(env["data"]["path"])
        assert len(got) == n  # the fast subscriber lost nothing (Events asserts no seq holes)
        assert not [e for e in fast.seen if e["kind"] in ("supervisor.worker.unresponsive", "supervisor.loss")]
        assert c.worker()["pid"] == w["pid"] and c.worker()["events_dropped"] == 0
        slow.allow_gaps = True
        slow.drain(0.5)  # what its queues held
        late = c.conf_dir / "zz-late.conf"
        late.write_text('{"name":"late","type":"bridge"}')  # the next event reveals the hole
        slow.wait("cni.config.created", path=str(late))
        lost = sum(b - a - 1 for _, a, b in slow.gaps)
        created = [e for e in slow.seen if e["kind"] == "cni.config.created"]
        assert lost > 0 and len(created) < n  # it lost, and it can tell by the holes
    finally:
        assert c.stop() == 0


def test_worker_side_drops_are_counted_and_reported(base: Path) -> None:
    """Stall the proxy (SIGSTOP the supervisor): the worker must not block;
    it drops at its high-water mark, counts, and the loss is published."""
    c = Cnisup(base, workers={"bus_hwm": 20, "heartbeat_timeout": 20.0})
    ev = c.subscribe()
    c.start()
    try:
        w = _running(c)
        ev.wait("supervisor.ready")
        assert c.proc is not None
        os.kill(c.proc.pid, signal.SIGSTOP)
        try:
            for i in range(2000):
                (c.conf_dir / f"d{i:05}.conf").write_text('{"name":"n","type":"bridge"}')
            # Keep the proxy stalled until the worker has handled every file
            # (its CPU time stops growing), however loaded this machine is.
            last, still, deadline = -1.0, 0, time.monotonic() + 20
            while still < 3 and time.monotonic() < deadline:
                time.sleep(0.3)
                now_cpu = cpu_seconds(w["pid"])
                still = still + 1 if now_cpu == last else 0
                last = now_cpu
            assert proc_state(w["pid"]) in ("S", "R")  # the worker is not blocked
        finally:
            os.kill(c.proc.pid, signal.SIGCONT)
        ev.allow_gaps = True
        loss = ev.wait("supervisor.loss", timeout_s=15)
        assert loss["data"]["worker"] == "inotify" and loss["data"]["dropped"] > 0
        assert loss["data"]["incarnation"] == w["incarnation"]
        after = c.conf_dir / "zz-after.conf"
        after.write_text('{"name":"after","type":"bridge"}')  # a later event reveals the holes
        ev.wait("cni.config.created", path=str(after))
        holes = sum(b - a - 1 for inc, a, b in ev.gaps if inc == w["incarnation"])
        st = c.worker()
        assert st["events_dropped"] >= holes > 0
    finally:
        assert c.stop() == 0
