"""The Debian package, end to end: build it with packaging/deb/build.sh (what
`make deb` runs), inspect it with dpkg-deb, lint it, install it on this
machine with apt, run the installed program, purge it and check that nothing
is left behind.

Root-only and slow (about 20 s once the build dependencies are there).
Installing changes the machine, so the module's fixture purges the package in
a ``finally``, and the module is skipped where it would destroy something it
did not create: an installed cnisup package or an existing cnisup user.
"""

from __future__ import annotations

import base64
import csv
import grp
import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from unitfile import UNIT_SRC, unit_settings

TOP = Path(__file__).resolve().parents[2]
DEB_DIR = TOP / "packaging" / "deb"
VENV = Path("/opt/cnisup/venv")
APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
APT_OPTS = ["-y", "-q", "-o", "DPkg::Lock::Timeout=300"]

#: Debian packages the program imports (the venv holds only cnisup and what requirements.txt pins).
DEBIAN_DEPENDS = {"python3", "python3-zmq", "python3-click", "python3-tenacity", "python3-yaml",
                  "python3-jsonschema", "python3-pyroute2", "python3-kubernetes", "python3-bpfcc",
                  "python3-nacl", "adduser"}


def _run(cmd: list[str], *, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def _package_state() -> str:
    """dpkg's status of the cnisup package ("not-installed" when unknown)."""
    out = _run(["dpkg-query", "-W", "-f=${db:Status-Status}", "cnisup"])
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "not-installed"


def _user_exists(name: str = "cnisup") -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _group_exists(name: str = "cnisup") -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _why_skip() -> str | None:
    if os.geteuid() != 0:
        return "needs root: installs and purges a package (CI runs as root)"
    for tool in ("dpkg", "dpkg-deb", "dpkg-query", "apt-get"):
        if shutil.which(tool) is None:
            return f"{tool} is not available: not a Debian system"
    if _package_state() != "not-installed":
        return "a cnisup package is installed here; this test would replace and purge it (apt-get purge cnisup)"
    if _user_exists() or _group_exists():
        return "a cnisup user or group exists that this test did not create; purging the package would delete it"
    return None


_SKIP = _why_skip()
pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.timeout(900),
              pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]


def debian_version(py_version: str) -> str:
    """pyproject's version in Debian's syntax, as build.sh spells it (1.2.0rc1 -> 1.2.0~rc1)."""
    return re.sub(r"\.?(a|b|rc|dev)(\d*)", r"~\1\2", py_version).replace("+", "+local")


def _pyproject() -> dict[str, Any]:
    with open(TOP / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


@dataclass
class Build:
    deb: Path
    seconds: float
    log: str
    unpacked: Path  #: dpkg-deb -x
    control: Path  #: dpkg-deb -e


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Build:
    """One build per session, into a temp dist dir (the checkout's dist/ is left alone)."""
    dist = tmp_path_factory.mktemp("dist")
    start = time.monotonic()
    out = _run(["bash", str(DEB_DIR / "build.sh")], cwd=TOP, timeout=900, env={**os.environ, "DIST": str(dist)})
    seconds = time.monotonic() - start
    assert out.returncode == 0, f"build.sh failed:\n{out.stderr[-6000:]}"
    deb = Path(out.stdout.strip().splitlines()[-1])
    assert deb.is_file() and deb.parent == dist
    unpacked, control = tmp_path_factory.mktemp("unpacked"), tmp_path_factory.mktemp("control")
    assert _run(["dpkg-deb", "-x", str(deb), str(unpacked)]).returncode == 0
    assert _run(["dpkg-deb", "-e", str(deb), str(control)]).returncode == 0
    return Build(deb, seconds, out.stderr, unpacked, control)


def _purge() -> subprocess.CompletedProcess[str]:
    return _run(["apt-get", "purge", *APT_OPTS, "cnisup"], env=APT_ENV, timeout=300)


@pytest.fixture(scope="module")
def installed(built: Build) -> Iterator[Build]:
    """The package installed on this machine; purged afterwards whatever happened."""
    try:
        out = _run(["apt-get", "install", *APT_OPTS, "--no-install-recommends", str(built.deb)],
                   env=APT_ENV, timeout=600)
        assert out.returncode == 0, f"apt-get install failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        yield built
    finally:
        if _package_state() != "not-installed":
            _purge()
        # The purge keeps the user while processes run as it (another root test
        # run on this machine may have picked the user up meanwhile): still
        # leave the machine as it was, once they are gone.
        deadline = time.monotonic() + 60
        while _user_exists() and time.monotonic() < deadline:
            if not _processes_of("cnisup"):
                _run(["userdel", "cnisup"])
            else:
                time.sleep(1)
        if _group_exists():
            _run(["groupdel", "cnisup"])


def _processes_of(user: str) -> list[str]:
    """``pid cmdline`` of every process running as ``user``."""
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:
        return []
    out = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and proc.stat().st_uid == uid:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                out.append(f"{proc.name} {cmdline}")
        except OSError:
            continue
    return out


# -- the .deb ---------------------------------------------------------------------------------

def test_named_after_the_version_and_architecture(built: Build) -> None:
    arch = _run(["dpkg", "--print-architecture"]).stdout.strip()
    version = debian_version(_pyproject()["project"]["version"])
    assert built.deb.name == f"cnisup_{version}_{arch}.deb"
    fields = _run(["dpkg-deb", "-f", str(built.deb), "Package", "Version", "Architecture"]).stdout
    assert f"Package: cnisup\nVersion: {version}\nArchitecture: {arch}\n" == fields
    print(f"\n{built.deb.name}: {built.deb.stat().st_size // 1024} KiB, built in {built.seconds:.1f} s")


def test_relations(built: Build) -> None:
    def names(field: str) -> set[str]:
        text = _run(["dpkg-deb", "-f", str(built.deb), field]).stdout
        return {re.split(r"[\s(]", alt.strip())[0] for rel in text.split(",") for alt in rel.split("|") if alt.strip()}

    depends = _run(["dpkg-deb", "-f", str(built.deb), "Depends"]).stdout
    assert names("Depends") >= DEBIAN_DEPENDS, depends
    # The venv's interpreter is /usr/bin/python3.X: pinned to that minor version.
    assert re.search(r"python3 \(<< 3\.\d+\)", depends), depends
    assert re.search(r"python3\.\d+", depends), depends
    assert any(n.startswith("linux-headers-") for n in names("Recommends"))
    assert "containernetworking-plugins" in names("Suggests")


def test_files(built: Build) -> None:
    root = built.unpacked
    cnisup = root / "usr/bin/cnisup"
    assert cnisup.is_symlink() and os.readlink(cnisup) == f"{VENV}/bin/cnisup"
    script = root / VENV.relative_to("/") / "bin/cnisup"
    assert script.read_text().splitlines()[0] == f"#!{VENV}/bin/python"
    cfg = (root / VENV.relative_to("/") / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = true" in cfg and "home = /usr/bin" in cfg
    assert (root / "lib/systemd/system/cnisup.service").read_text() == UNIT_SRC.read_text()
    assert (root / "usr/share/man/man1/cnisup.1.gz").is_file()
    assert (root / "usr/share/doc/cnisup/copyright").is_file()
    doc = root / "usr/share/doc/cnisup"
    for name in ("README.md", "PROTOCOL.md", "EXPLAIN.md", "FLEET.md", "config_example.yaml"):  # the help names them
        assert (doc / name).is_file() or (doc / f"{name}.gz").is_file(), name
    completion = (root / "usr/share/bash-completion/completions/cnisup").read_text()
    assert "_cnisup_completion()" in completion and "complete " in completion
    assert (root / "etc/cnisup/config.yaml").read_text().count("\npreset: production\n") == 1
    everything = [p for p in root.rglob("*")]
    assert not [p for p in everything if p.name == "__pycache__" or p.suffix == ".pyc"], "bytecode is postinst's job"
    leaked = [p for p in everything if p.is_file() and not p.is_symlink() and b"/cnisup-deb." in p.read_bytes()]
    assert not leaked, f"files that name the build tree: {leaked}"


def test_venv_holds_only_cnisup_and_the_pinned_requirements(built: Build) -> None:
    site = next((built.unpacked / VENV.relative_to("/")).glob("lib/python3.*/site-packages"))
    version = _pyproject()["project"]["version"]
    pins = dict(re.findall(r"^([\w-]+)==([\w.]+)", (DEB_DIR / "requirements.txt").read_text(), re.M))
    assert set(pins) == {"inotify_simple", "nats-py", "nkeys"}
    assert sorted(p.name for p in site.iterdir()) == sorted(
        ["cnisup", f"cnisup-{version}.dist-info", "inotify_simple.py",
         f"inotify_simple-{pins['inotify_simple']}.dist-info", "nats", f"nats_py-{pins['nats-py']}.dist-info",
         "nkeys", f"nkeys-{pins['nkeys']}.dist-info"])
    # Each RECORD matches the files as shipped (after the build-path fixes).
    for record in site.glob("*.dist-info/RECORD"):
        for name, digest, size in csv.reader(record.read_text().splitlines()):
            if digest:
                data = (site / name).read_bytes()
                b64 = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                assert (digest, int(size)) == (f"sha256={b64}", len(data)), f"{record.parent.name}: {name}"


def test_every_package_and_package_data_of_pyproject_is_in_it(built: Build) -> None:
    """What pyproject.toml lists at build time is what ships: no list to keep in step."""
    setuptools = _pyproject()["tool"]["setuptools"]
    site = next((built.unpacked / VENV.relative_to("/")).glob("lib/python3.*/site-packages"))
    for package in setuptools["packages"]:
        installed = site / package.replace(".", "/")
        parent, _, leaf = package.rpartition(".")
        mapped = setuptools.get("package-dir", {})
        source = TOP / mapped[package] if package in mapped else TOP / mapped[parent] / leaf
        wanted = {p.name for p in source.glob("*.py")}
        for pattern in setuptools.get("package-data", {}).get(package, []):
            wanted |= {str(p.relative_to(source)) for p in source.glob(pattern)}
        have = {str(p.relative_to(installed)) for p in installed.rglob("*") if p.is_file()}
        assert wanted <= have, f"{package}: missing {sorted(wanted - have)}"


def test_conffile_is_the_generated_production_config(built: Build) -> None:
    assert (built.control / "conffiles").read_text().split() == ["/etc/cnisup/config.yaml"]
    gen = _run([str(TOP / ".venv/bin/python"), str(DEB_DIR / "gen_config.py")],
               env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    if gen.returncode == 0:  # compare with the checkout's contract where its venv exists
        assert (built.unpacked / "etc/cnisup/config.yaml").read_text() == gen.stdout


def test_maintainer_scripts(built: Build) -> None:
    scripts = {name: built.control / name for name in ("postinst", "prerm", "postrm")}
    for name, path in scripts.items():
        assert os.access(path, os.X_OK), name
        assert _run(["sh", "-n", str(path)]).returncode == 0, f"{name}: syntax error"
    postinst, postrm = scripts["postinst"].read_text(), scripts["postrm"].read_text()
    assert "adduser --system --group --no-create-home --home /nonexistent" in postinst
    assert "deb-systemd-helper enable 'cnisup.service'" in postinst
    assert "compileall" in postinst and "__pycache__" in scripts["prerm"].read_text()
    purge = postrm[postrm.index("    purge)"):]
    assert "deluser --system" in purge and "delgroup --system --only-if-empty" in purge
    assert "deluser" not in postrm[:postrm.index("    purge)")], "the user must survive a plain remove"


def test_lintian_is_clean(built: Build) -> None:
    if shutil.which("lintian") is None:
        pytest.fail("lintian missing although build.sh installs it")
    out = _run(["lintian", "--info", "--display-info", "--fail-on", "error", str(built.deb)], timeout=300)
    tags = [line for line in out.stdout.splitlines() if re.match(r"[EWIPX]: ", line)]
    print("\n".join(["", "lintian:", *tags]) if tags else "\nlintian: clean")
    assert out.returncode == 0, out.stdout + out.stderr
    assert not [t for t in tags if t.startswith(("E:", "W:"))], "lintian errors or warnings"
    assert not [t for t in tags if "unused-override" in t or "mismatched-override" in t]
    # Every override says why, in the comment right above it.
    lines = (DEB_DIR / "debian" / "cnisup.lintian-overrides").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("cnisup:"):
            above = lines[i - 1] if i else ""
            assert above.startswith(("#", "cnisup:")), f"override without a reason: {line}"


# -- the unit ---------------------------------------------------------------------------------

def test_unit_verifies(installed: Build) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    cmd = ["systemd-analyze", "verify"]
    if shutil.which("man") is None:
        cmd.append("--man=no")  # Documentation=man:cnisup(1) is checked with man(1)
    out = _run([*cmd, "/lib/systemd/system/cnisup.service"], cwd="/")
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), out.stdout + out.stderr


# -- installed --------------------------------------------------------------------------------

def test_installed(installed: Build) -> None:
    assert _package_state() == "installed"
    pw = pwd.getpwnam("cnisup")
    assert pw.pw_dir == "/nonexistent" and pw.pw_uid < 1000 and grp.getgrgid(pw.pw_gid).gr_name == "cnisup"
    assert not Path("/nonexistent").exists()
    assert Path("/etc/systemd/system/multi-user.target.wants/cnisup.service").is_symlink()
    journal = Path("/var/lib/cnisup").stat()
    assert (journal.st_uid, journal.st_gid, journal.st_mode & 0o777) == (pw.pw_uid, pw.pw_gid, 0o750)
    version = _pyproject()["project"]["version"]
    out = _run(["/usr/bin/cnisup", "--version"], cwd="/")
    assert out.returncode == 0 and out.stdout.strip() == f"cnisup, version {version}", out.stdout + out.stderr
    # Without --config, the commands read the service's configuration: its sockets, its journal.
    shown = _run(["/usr/bin/cnisup", "config", "show"], cwd="/")
    assert shown.returncode == 0 and yaml.safe_load(shown.stdout)["runtime_dir"] == "/run/cnisup", shown.stderr


def test_installed_python_environment(installed: Build) -> None:
    """sys.executable is the venv's python (workers are exec'd with it); cnisup and
    the pinned requirements come from the venv, everything else from Debian's packages."""
    venv = ("inotify_simple", "nats", "nkeys", "cnisup.workers")
    names = ["bcc", "click", "jsonschema", "kubernetes", "pyroute2", "tenacity", "yaml", "zmq", "nacl", *venv]
    code = (f"import sys, json, importlib; mods = [importlib.import_module(n) for n in {names!r}]; "
            "import cnisup.supervisor.cli; "
            "print(json.dumps({'exe': sys.executable, 'files': {m.__name__: m.__file__ for m in mods}}))")
    out = _run([f"{VENV}/bin/python", "-c", code], cwd="/", env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["exe"] == f"{VENV}/bin/python"
    for name, path in info["files"].items():
        where = str(VENV) if name in venv else "/usr/lib/python3/dist-packages/"
        assert path.startswith(where), f"{name} imported from {path}"
    assert list(VENV.glob("lib/python3.*/site-packages/cnisup/supervisor/__pycache__/cli.*.pyc")), \
        "postinst compiles the bytecode"


def test_installed_check(installed: Build) -> None:
    out = _run(["/usr/bin/cnisup", "check", "--config", "/etc/cnisup/config.yaml", "--json"], cwd="/")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["runtime_dir"] == "/run/cnisup"
    assert report["workers_identity"]["user"] == "cnisup" and not report["workers_identity"]["note"]
    assert {f["family"] for f in report["families"]} >= {"config"}
    human = _run(["/usr/bin/cnisup", "check", "--config", "/etc/cnisup/config.yaml"], cwd="/")
    assert human.returncode == 0 and "unprivileged workers run as cnisup" in human.stdout
    # As root, check also judges what the installed unit's limits leave the service.
    service = report["service"]
    unit = "/lib/systemd/system/cnisup.service"
    assert os.path.realpath(service["unit"]) == os.path.realpath(unit) and service["no_new_privs"]
    assert set(service["capabilities"]) == {c for v in unit_settings()["[Service]CapabilityBoundingSet"]
                                            for c in v.split()}
    here = {f["family"]: f for f in report["families"]}
    judged = {f["family"]: f for f in service["families"]}
    assert judged["kernel"]["worker"] == here["kernel"]["worker"], "the unit takes nothing the kernel family needs"
    assert judged["k8s"]["idle"] and here["k8s"]["idle"]  # no cluster on this machine: idle, not a failure
    assert f"as cnisup.service will run ({service['unit']})" in human.stdout


def _status(config: Path) -> dict[str, Any] | None:
    out = _run(["/usr/bin/cnisup", "status", "--json", "--config", str(config)], cwd="/", timeout=15)
    return json.loads(out.stdout) if out.returncode == 0 else None


def _proc_status(pid: int) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if ":\t" in line)


class NotifySocket:
    """systemd's side of sd_notify: a datagram socket that learns each sender's pid."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.messages: list[tuple[int, str]] = []  #: (sender pid, line)

    def wait_for(self, line: str, timeout_s: float) -> list[tuple[int, str]]:
        deadline = time.monotonic() + timeout_s
        while not any(text == line for _, text in self.messages) and time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                break
            pid = next((struct.unpack("3i", d)[0] for lvl, typ, d in anc
                        if lvl == socket.SOL_SOCKET and typ == socket.SCM_CREDENTIALS), -1)
            self.messages += [(pid, text) for text in data.decode().splitlines()]
        return [m for m in self.messages if m[1] == line]

    def close(self) -> None:
        self.sock.close()


def test_installed_start(installed: Build) -> None:
    """A short `cnisup start` as the unit runs it: root, group cnisup, no_new_privs,
    the unit's capability bounding set (setpriv), $NOTIFY_SOCKET and $WATCHDOG_USEC.
    The config worker must run as cnisup, the sockets belong to the cnisup group,
    an event reaches `cnisup tail`, the main pid sends READY=1, WATCHDOG=1 and
    STOPPING=1, and SIGTERM stops it with exit 0. Every family runs: the kernel
    family's root workers reach the bus without CAP_DAC_OVERRIDE, the k8s family
    talks to the API-server emulator."""
    from k8s.apiserver import ApiServer

    base = Path(tempfile.mkdtemp(prefix="cnisup-deb-test-", dir="/tmp"))
    notify = NotifySocket(base / "notify.sock")
    api = ApiServer(bookmark_interval_s=1.0).start()
    try:
        base.chmod(0o755)
        conf_dir, bin_dir = base / "net.d", base / "bin"
        for d in (conf_dir, bin_dir):
            d.mkdir(mode=0o755)
        config = base / "cnisup.yaml"
        config.write_text(json.dumps({
            "preset": "production", "node_name": "deb-test", "runtime_dir": str(base / "run"),
            "monitors": {"kernel": True, "config": True, "k8s": True},
            "cni": {"conf_dirs": [str(conf_dir)], "bin_dirs": [str(bin_dir)]},
            "kubernetes": {"kubeconfig": str(api.write_kubeconfig(base / "kubeconfig"))},
        }))
        caps = unit_settings()["[Service]CapabilityBoundingSet"]
        bounding = ",".join("+" + c.removeprefix("CAP_").lower() for v in caps for c in v.split())
        cmd = ["setpriv", "--no-new-privs", "--regid=cnisup", "--clear-groups", f"--bounding-set=-all,{bounding}",
               "/usr/bin/cnisup", "start", "--config", str(config)]
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
               "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"}
        log = (base / "cnisup.log").open("w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd="/", env=env)
        try:
            _check_running(proc, config, base)
            # setpriv execs: proc.pid is the supervisor (the unit's MainPID).
            assert [pid for pid, _ in notify.wait_for("READY=1", 10)] == [proc.pid], notify.messages
            assert {pid for pid, _ in notify.wait_for("WATCHDOG=1", 3)} == {proc.pid}, notify.messages
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, (base / "cnisup.log").read_text()
            assert [pid for pid, _ in notify.wait_for("STOPPING=1", 1)] == [proc.pid], notify.messages
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    finally:
        api.stop()
        notify.close()
        shutil.rmtree(base, ignore_errors=True)


#: CAP_DAC_OVERRIDE's bit: what the kernel family's root workers must do without.
CAP_DAC_OVERRIDE = 1 << 1


def _check_running(proc: subprocess.Popen[bytes], config: Path, base: Path) -> None:
    deadline = time.monotonic() + 60  # the eBPF worker compiles its programs before it is ready
    workers: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"cnisup start exited {proc.returncode}:\n{(base / 'cnisup.log').read_text()}"
        status = _status(config)
        if status:
            workers = {w["family"]: w for w in status["workers"]}
            if all(w["state"] in ("running", "disabled") for w in workers.values()):
                break
        time.sleep(0.2)
    states = {f: w["state"] for f, w in workers.items()}
    assert states == {"journal": "running", "config": "running", "kernel": "running", "k8s": "running",
                      "export": "disabled"}, \
        f"{workers}\n{(base / 'cnisup.log').read_text()}"
    pw = pwd.getpwnam("cnisup")
    for family in ("journal", "config", "k8s"):
        st = _proc_status(workers[family]["pid"])
        assert st["Uid"].split() == [str(pw.pw_uid)] * 4 and st["Gid"].split() == [str(pw.pw_gid)] * 4
        assert st["CapBnd"] == "0000000000000000" and st["NoNewPrivs"] == "1"
    kernel = _proc_status(workers["kernel"]["pid"])
    assert kernel["Uid"].split()[0] == "0" and kernel["NoNewPrivs"] == "1"
    assert not int(kernel["CapEff"], 16) & CAP_DAC_OVERRIDE
    worker = workers["config"]
    argv0 = Path(f"/proc/{worker['pid']}/cmdline").read_bytes().split(b"\0")[0].decode()
    assert argv0 == f"{VENV}/bin/python"
    sup = _proc_status(proc.pid)
    assert sup["Uid"].split()[0] == "0" and sup["Gid"].split()[0] == str(pw.pw_gid)
    for sock in ("events.sock", "control.sock"):  # the cnisup group may subscribe and ask status
        info = (base / "run" / sock).stat()
        assert (info.st_gid, info.st_mode & 0o777) == (pw.pw_gid, 0o660), sock
    bus = (base / "run" / "private" / "bus.sock").stat()  # only the workers' user may publish
    assert (bus.st_uid, bus.st_mode & 0o777) == (pw.pw_uid, 0o600)
    root_bus = (base / "run" / "private" / "bus-root.sock").stat()  # ...and the root workers, on their own
    assert (root_bus.st_uid, root_bus.st_mode & 0o777) == (0, 0o600)
    tail = subprocess.Popen(["/usr/bin/cnisup", "tail", "--json", "--config", str(config),
                             "--topic", "cni.config.created", "--count", "1", "--timeout", "15"],
                            stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        time.sleep(1.0)  # the subscription reaches the publisher before the change
        (base / "net.d" / "10-deb.conflist").write_text(
            json.dumps({"cniVersion": "1.0.0", "name": "deb", "plugins": [{"type": "bridge"}]}))
        out, _ = tail.communicate(timeout=30)
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.wait()
    event = json.loads(out.splitlines()[0])
    assert event["kind"] == "cni.config.created" and event["source"] in ("inotify", "file-poll")


# -- purge ------------------------------------------------------------------------------------

def test_purge_leaves_nothing_behind(installed: Build) -> None:
    out = _purge()
    assert out.returncode == 0, out.stdout + out.stderr
    assert _package_state() == "not-installed"
    left = [p for p in ("/opt/cnisup", "/etc/cnisup", "/usr/bin/cnisup", "/lib/systemd/system/cnisup.service",
                        "/usr/share/doc/cnisup", "/usr/share/man/man1/cnisup.1.gz", "/run/cnisup", "/var/lib/cnisup",
                        "/usr/share/bash-completion/completions/cnisup",
                        "/etc/systemd/system/multi-user.target.wants/cnisup.service")
            if os.path.lexists(p)]
    left += [str(p) for p in Path("/var/lib/dpkg/info").glob("cnisup.*")]
    left += [str(p) for p in Path("/var/lib/systemd").rglob("*cnisup*")] if Path("/var/lib/systemd").is_dir() else []
    assert not left, f"left behind: {left}"
    assert not _user_exists(), f"user cnisup kept; processes run as it: {_processes_of('cnisup')}"
    assert not _group_exists()
