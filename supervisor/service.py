"""What cnisup.service will have, for ``cnisup check`` run from a root shell.

A root shell holds every capability; the service holds only the unit's
``CapabilityBoundingSet`` under ``NoNewPrivileges``. Rather than predict what
each probe would say with fewer capabilities, ``judge`` reads the installed
unit (its file and drop-ins, as systemd merges them) and runs the very same
probes again in a child started under exactly those limits (``setpriv``):
what the child reports is what the service's supervisor will decide.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnisup.protocol.settings import Config

UNIT = "cnisup.service"
#: Where systemd looks for a unit and its drop-ins, most important first.
UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system",
             "/usr/lib/systemd/system", "/lib/systemd/system")
#: Set in the child, so that it does not judge again.
UNDER_UNIT_ENV = "CNISUP_CHECK_UNDER_UNIT"
#: Seconds the probes may take in the child (the eBPF one imports BCC).
PROBE_TIMEOUT_S = 60.0


@dataclass
class Unit:
    path: str
    dropins: list[str] = field(default_factory=list)
    capabilities: set[str] | None = None  #: the bounding set (CAP_* names); None: not limited
    no_new_privs: bool = False
    user: str = ""
    group: str = ""


def _bounding(current: set[str] | None, value: str) -> set[str] | None:
    """systemd's merge of one CapabilityBoundingSet= line (systemd.exec(5))."""
    value = value.strip()
    if not value:
        return set()  # the empty assignment: no capabilities at all
    if value.startswith("~"):
        names = set(value[1:].split())
        return (_all_caps() if current is None else current) - names
    return set(value.split()) | (current or set())


def _all_caps() -> set[str]:
    return {f"CAP_{n.upper()}" for n in subprocess.run(["setpriv", "--list-caps"], capture_output=True,
                                                         text=True, check=False).stdout.split()}


def find_unit(dirs: tuple[str, ...] | None = None) -> Unit | None:
    """The installed unit (in ``dirs``, default UNIT_DIRS) with its drop-ins applied, or None."""
    dirs = UNIT_DIRS if dirs is None else dirs
    fragment = next((f"{d}/{UNIT}" for d in dirs if os.path.isfile(f"{d}/{UNIT}")), None)
    if fragment is None:
        return None
    dropins: dict[str, str] = {}
    for d in reversed(dirs):  # a drop-in of the same name in a more important dir wins
        for conf in sorted(Path(f"{d}/{UNIT}.d").glob("*.conf")):
            dropins[conf.name] = str(conf)
    unit = Unit(fragment, [dropins[n] for n in sorted(dropins)])
    for path in [fragment, *unit.dropins]:
        section = ""
        for raw in Path(path).read_text(errors="replace").splitlines():
            line = raw.strip()
            if line.startswith("["):
                section = line
            elif section == "[Service]" and "=" in line and not line.startswith(("#", ";")):
                key, _, value = line.partition("=")
                key = key.strip()
                if key == "CapabilityBoundingSet":
                    unit.capabilities = _bounding(unit.capabilities, value)
                elif key == "NoNewPrivileges":
                    unit.no_new_privs = value.strip().lower() in ("yes", "true", "1", "on")
                elif key in ("User", "Group"):
                    setattr(unit, key.lower(), value.strip())
    return unit


def _setpriv(unit: Unit) -> list[str]:
    caps = "" if unit.capabilities is None else "".join(
        f",+{c.removeprefix('CAP_').lower()}" for c in sorted(unit.capabilities))
    cmd = ["setpriv", "--inh-caps=-all"]
    if unit.capabilities is not None:
        cmd.append(f"--bounding-set=-all{caps}")
    if unit.no_new_privs:
        cmd.append("--no-new-privs")
    user = unit.user and _exists(pwd.getpwnam, unit.user)
    if user:
        cmd += [f"--reuid={unit.user}", "--init-groups"]
    if unit.group and _exists(grp.getgrnam, unit.group):  # the package creates it; a bare checkout may not
        cmd.append(f"--regid={unit.group}")
        if not user:
            cmd.append("--clear-groups")  # systemd gives a root service no supplementary groups
    return cmd


def _exists(lookup: Any, name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True


def judge(cfg: Config) -> dict[str, Any] | None:
    """Each family's choice as the installed unit's supervisor would make it;
    None when there is nothing to judge (no unit, not root, or already under it)."""
    if os.geteuid() != 0 or os.environ.get(UNDER_UNIT_ENV) or shutil.which("setpriv") is None:
        return None
    unit = find_unit()
    if unit is None:
        return None
    report: dict[str, Any] = {
        "unit": unit.path, "dropins": unit.dropins, "no_new_privs": unit.no_new_privs, "user": unit.user or "root",
        "capabilities": None if unit.capabilities is None else sorted(unit.capabilities)}
    cmd = [*_setpriv(unit), sys.executable, "-m", "cnisup.supervisor.service"]
    try:
        out = subprocess.run(cmd, input=json.dumps(cfg.to_dict()), capture_output=True, text=True,
                             timeout=PROBE_TIMEOUT_S, env={**os.environ, UNDER_UNIT_ENV: "1"}, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        report["error"] = f"could not run the probes under the unit's limits: {exc}"
        return report
    if out.returncode != 0:
        report["error"] = f"the probes under the unit's limits failed: {out.stderr.strip()[-300:]}"
        return report
    report["families"] = json.loads(out.stdout)
    return report


def main() -> None:
    """The child: probe every family for the configuration on stdin; JSON on stdout."""
    from cnisup.supervisor import probes

    cfg = Config.from_dict(json.load(sys.stdin))
    json.dump(probes.families(cfg), sys.stdout)


if __name__ == "__main__":
    main()
