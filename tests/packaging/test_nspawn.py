"""cnisup.service under a real systemd: the .deb installed into a Debian 12
system booted with ``systemd-nspawn -b``.

The rootfs comes from ``debootstrap`` (minbase, systemd, and the package's
dependencies, so installing the .deb needs no network) and is cached under
``/var/cache/cnisup-test/`` keyed by that package list: built once per
machine (in the background from the start of the session, see
``prebuild``), then only booted, on an overlay so that it stays clean. nspawn runs
with ``--capability=all`` and ``SYSTEMD_SECCOMP=0`` (its own seccomp filter
refuses ``bpf()``), with tracefs, ``/lib/modules`` and ``/usr/src`` (kernel
headers) bound in. Inside: install, every family's state, ``journalctl -p
warning``, reload, kill and restart, the watchdog, stop, purge. Each phase's
duration goes to ``build/measurements/nspawn.json``.

Root only; skipped, with the reason, where the tools are missing or the
container does not boot.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e.support import children_of

TOP = Path(__file__).resolve().parents[2]
CACHE = Path("/var/cache/cnisup-test")
SUITE = "bookworm"
#: To boot (systemd), and what debootstrap's resolver cannot find by itself
#: (python3-cffi-backend provides the virtual packages python3-zmq depends on).
BOOT_PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3-cffi-backend")
CONFIG = "/etc/cnisup/config.yaml"
MEASUREMENTS = TOP / "build" / "measurements" / "nspawn.json"


def _control_depends() -> list[str]:
    """The package's static Depends (debian/control), without substitution variables."""
    text = (TOP / "packaging" / "deb" / "debian" / "control").read_text()
    field = re.search(r"^Depends:(.*?)(?=^\S)", text, re.M | re.S)
    assert field is not None
    names = [re.split(r"[\s(]", d.strip())[0] for d in field[1].split(",")]
    return sorted(n for n in names if n and not n.startswith("$"))


def _mirror() -> str:
    """The Debian mirror this host's apt uses (deb822 .sources or one-line sources.list)."""
    for path in sorted(Path("/etc/apt").glob("sources.list.d/*.sources")):
        for stanza in path.read_text().split("\n\n"):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            if uris and suites and SUITE in suites[1].split() and "Enabled: no" not in stanza:
                return uris[1]
    sources = Path("/etc/apt/sources.list")
    if sources.exists():
        for line in sources.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[2] == SUITE:
                return parts[1] if not parts[1].startswith("[") else parts[2]
    return "http://deb.debian.org/debian"


def _why_skip() -> str | None:
    if os.geteuid() != 0:
        return "needs root: debootstrap and systemd-nspawn (CI runs as root)"
    for tool in ("debootstrap", "systemd-nspawn", "nsenter", "dpkg-deb"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/setup.sh installs debootstrap and systemd-container)"
    if not Path("/sys/kernel/tracing/events").is_dir():
        return "tracefs is not mounted at /sys/kernel/tracing (scripts/host-bpf-setup.sh mounts it)"
    return None


_SKIP = _why_skip()
pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.timeout(1500),
              pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]


class Phases:
    """How long each phase took, written where the other measurements go."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = round(time.monotonic() - start, 1)

    def save(self) -> None:
        MEASUREMENTS.parent.mkdir(parents=True, exist_ok=True)
        MEASUREMENTS.write_text(json.dumps(self.seconds, indent=1) + "\n")
        print(f"\nnspawn phases (s): {self.seconds}")


@pytest.fixture(scope="module")
def phases() -> Iterator[Phases]:
    p = Phases()
    yield p
    p.save()


def _build_rootfs() -> tuple[Path, float | None, str | None]:
    """The cached Debian rootfs, built (once, under a lock, atomically) if missing:
    (its path, the seconds the build took or None when it was there, why it could not be built)."""
    packages = sorted({*BOOT_PACKAGES, *_control_depends()})
    mirror = _mirror()
    key = hashlib.sha256(json.dumps([SUITE, packages]).encode()).hexdigest()[:12]
    target = CACHE / f"rootfs-{SUITE}-{key}"
    CACHE.mkdir(parents=True, exist_ok=True, mode=0o755)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run on this machine may be building it
        if (target / "usr" / "bin" / "systemctl").exists():
            return target, None, None
        for stale in CACHE.glob("rootfs-*.*"):  # an interrupted build's (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        start = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=CACHE))
        debs = CACHE / "debs"  # downloaded packages, kept for the next build
        debs.mkdir(exist_ok=True)
        out = subprocess.run(["debootstrap", "--variant=minbase", f"--cache-dir={debs}",
                              f"--include={','.join(packages)}", SUITE, str(tmp), mirror],
                             capture_output=True, text=True, timeout=1200, check=False)
        if out.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            return target, time.monotonic() - start, f"debootstrap from {mirror} failed: {out.stderr.strip()[-500:]}"
        tmp.chmod(0o755)
        tmp.rename(target)
        return target, time.monotonic() - start, None


#: A build started when the session was collected: its thread, then its result.
_PREBUILD: dict[str, Any] = {}


def prebuild() -> None:
    """Build the rootfs in the background while the tests before this one run
    (tests/packaging/conftest.py calls this once the session knows it runs here):
    a cold cache then costs this test little more than a warm one."""
    if _SKIP is None and "thread" not in _PREBUILD:
        thread = threading.Thread(target=lambda: _PREBUILD.update(result=_build_rootfs()), daemon=True,
                                  name="cnisup-nspawn-rootfs")
        _PREBUILD["thread"] = thread
        thread.start()


def rootfs(phases: Phases) -> Path:
    if (thread := _PREBUILD.get("thread")) is not None:
        with phases("waiting for the rootfs built in the background"):
            thread.join()
    target, seconds, error = _PREBUILD.get("result") or _build_rootfs()
    if seconds is not None:
        phases.seconds["debootstrap"] = round(seconds, 1)
    if error is not None:
        pytest.skip(error)
    return target


class Container:
    """One booted container on an overlay of the cached rootfs."""

    def __init__(self, lower: Path, dist: Path, work: Path) -> None:
        self.work = work
        self.merged = work / "merged"
        for d in ("upper", "work", "merged"):
            (work / d).mkdir()
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={lower},upperdir={work / 'upper'},workdir={work / 'work'}", str(self.merged)],
                       check=True)
        self.console = open(work / "console.log", "wb")  # noqa: SIM115 - closed in stop()
        cmd = ["systemd-nspawn", "-D", str(self.merged), "-b", "--capability=all", "--register=no",
               "--keep-unit", f"--machine=cnisup-test-{os.getpid()}", "--console=pipe",
               "--bind=/sys/kernel/tracing", "--bind-ro=/lib/modules", "--bind-ro=/usr/src",
               f"--bind-ro={dist}:/mnt/dist"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.console, stderr=subprocess.STDOUT,
                                     env={**os.environ, "SYSTEMD_SECCOMP": "0"})
        self.init = 0

    def boot(self, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            kids = children_of(self.proc.pid)
            if kids:
                self.init = kids[0]
                state = self.sh("systemctl is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.5)
        log = (self.work / "console.log").read_text(errors="replace")[-2000:]
        pytest.skip(f"the container did not boot within {timeout_s:g} s (nspawn exit {self.proc.poll()}): {log}")

    def sh(self, script: str, *, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``script`` with /bin/sh inside the container (every namespace of its init)."""
        out = subprocess.run(["nsenter", f"--target={self.init}", "--all", "--", "/bin/sh", "-c", script],
                             capture_output=True, text=True, timeout=timeout, check=False,
                             env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"})
        if check:
            assert out.returncode == 0, f"{script}\n--- exit {out.returncode}\n{out.stdout[-3000:]}{out.stderr[-3000:]}"
        return out

    def status(self) -> dict[str, Any] | None:
        out = self.sh(f"cnisup status --json --config {CONFIG}", check=False, timeout=30)
        return json.loads(out.stdout) if out.returncode == 0 else None

    def wait_families(self, want: dict[str, str], timeout_s: float = 90) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        workers: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            status = self.status()
            if status:
                workers = {w["family"]: w for w in status["workers"]}
                if {f: workers[f]["state"] for f in want} == want:
                    return workers
            time.sleep(0.5)
        raise AssertionError(f"never reached {want}: {workers}\n{self.journal()[-4000:]}")

    def show(self, *props: str) -> dict[str, str]:
        out = self.sh(f"systemctl show cnisup -p {','.join(props)}").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *args: str) -> str:
        return self.sh(f"journalctl -u cnisup --no-pager -o cat {' '.join(args)}", check=False).stdout

    def wait(self, what: str, cond: Any, timeout_s: float = 60) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if got := cond():
                return got
            time.sleep(0.3)
        raise AssertionError(f"{what}: not within {timeout_s} s\n{self.journal()[-4000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # nspawn asks systemd for a clean poweroff
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.console.close()
        subprocess.run(["umount", str(self.merged)], check=False)


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    out = subprocess.run(["bash", str(TOP / "packaging" / "deb" / "build.sh")], cwd=TOP, capture_output=True,
                         text=True, timeout=900, env={**os.environ, "DIST": str(dist), "LINTIAN": "0"})
    assert out.returncode == 0, out.stderr[-4000:]
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def container(deb: Path, phases: Phases) -> Iterator[Container]:
    lower = rootfs(phases)
    work = Path(tempfile.mkdtemp(prefix="cnisup-nspawn-"))
    c = Container(lower, deb.parent, work)
    try:
        with phases("boot"):
            c.boot()
        yield c
    finally:
        with phases("poweroff"):
            c.stop()
        shutil.rmtree(work, ignore_errors=True)


def test_the_unit_under_systemd(container: Container, deb: Path, phases: Phases) -> None:
    c = container
    with phases("install"):
        c.sh(f"DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends /mnt/dist/{deb.name}",
             timeout=300)
    with phases("every family in its state"):
        assert c.sh("systemctl is-enabled cnisup").stdout.strip() == "enabled"
        # No cluster in here: the k8s family is idle, not failed.
        workers = c.wait_families({"config": "running", "kernel": "running", "k8s": "idle"})
        assert c.show("ActiveState")["ActiveState"] == "active"
        assert workers["kernel"]["worker"] == "ebpf", c.journal()[-3000:]
        assert workers["config"]["worker"] == "inotify"
        log = c.journal()
        assert "not ready within" not in log and "Traceback" not in log
        assert "k8s is idle" in log and "exit 77" not in log
    with phases("journal priorities"):
        main = int(c.show("MainPID")["MainPID"])
        c.sh(f"kill -KILL {workers['config']['pid']}")
        c.wait_families({"config": "running"})
        warnings = c.wait("a warning in journalctl -p warning", lambda: c.journal("-p", "warning"))
        assert re.search(r"inotify \(pid \d+\) exited after .*SIGKILL", warnings), warnings
        assert "supervising on node" not in warnings and "supervising on node" in c.journal()  # info: not shown
    with phases("reload"):
        pids = {f: w["pid"] for f, w in c.wait_families({"config": "running", "kernel": "running"}).items()}
        c.sh(f"printf 'restart:\\n  max_delay: 10\\n' >> {CONFIG} && systemctl reload cnisup")
        c.wait("the reload", lambda: "configuration reloaded; changed: restart.max_delay; restarted: nothing"
               in c.journal())
        after = c.wait_families({"config": "running", "kernel": "running"})
        assert {f: after[f]["pid"] for f in ("config", "kernel")} == {f: pids[f] for f in ("config", "kernel")}
    with phases("kill and restart"):
        c.sh(f"kill -KILL {main}")
        c.wait("a new main pid", lambda: c.show("MainPID")["MainPID"] not in ("0", str(main)))
        c.wait_families({"config": "running", "kernel": "running", "k8s": "idle"})
        assert int(c.show("NRestarts")["NRestarts"]) == 1
        assert not c.sh(f"ps -o pid= --ppid {main}", check=False).stdout.strip()  # the old workers went with it
    with phases("watchdog"):
        # Short limits, so that this takes seconds: 3 s without WATCHDOG=1, then SIGABRT, 2 s later SIGKILL.
        dropin = "/run/systemd/system/cnisup.service.d"
        c.sh(f"mkdir -p {dropin} && printf '[Service]\\nWatchdogSec=3s\\nTimeoutAbortSec=2s\\n' > "
             f"{dropin}/watchdog.conf && systemctl daemon-reload && systemctl restart cnisup")
        c.wait_families({"config": "running", "kernel": "running"})
        time.sleep(4)  # more than WatchdogSec: the pings keep it alive
        restarts = int(c.show("NRestarts")["NRestarts"])
        assert c.show("ActiveState")["ActiveState"] == "active"
        main = int(c.show("MainPID")["MainPID"])
        c.sh(f"kill -STOP {main}")
        c.wait("the watchdog", lambda: "Watchdog timeout" in c.sh("journalctl --no-pager -o cat -u cnisup").stdout)
        c.wait("a restart after the watchdog", lambda: int(c.show("NRestarts")["NRestarts"]) > restarts)
        c.sh(f"rm {dropin}/watchdog.conf && systemctl daemon-reload")
        c.wait_families({"config": "running", "kernel": "running"})
    with phases("stop"):
        c.sh("systemctl stop cnisup", timeout=60)
        assert c.show("ActiveState")["ActiveState"] == "inactive"
        assert "did not stop within" not in c.journal()
    with phases("purge"):
        c.sh("DEBIAN_FRONTEND=noninteractive apt-get purge -y -q cnisup", timeout=300)
        left = c.sh("ls -d /opt/cnisup /etc/cnisup /run/cnisup /usr/bin/cnisup /lib/systemd/system/cnisup.service "
                    "2>/dev/null; getent passwd cnisup; getent group cnisup", check=False).stdout
        assert left.strip() == "", left
