"""Drive the real reference CNI plugins the way a container runtime does:
CNI_* environment, the network config on stdin, the result on stdout, real
network namespaces from ``ip netns add``."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REFERENCE_DIR = Path("/usr/lib/cni")
PLUGINS = ("bridge", "host-local", "loopback", "ptp", "tuning")


def have_plugins() -> bool:
    return all((REFERENCE_DIR / p).is_file() for p in PLUGINS)


def install_plugins(bin_dir: Path) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    for p in PLUGINS:
        shutil.copy2(REFERENCE_DIR / p, bin_dir / p)


@dataclass
class Outcome:
    plugin: str
    command: str
    exit_code: int
    stdout: bytes
    stderr: bytes

    @property
    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.stdout) if self.stdout.strip() else {}
        return out


def run_plugin(bin_dir: Path, conf: dict[str, Any], *, command: str, container_id: str, netns: str,
               ifname: str = "eth0", cni_args: str = "", timeout_s: float = 30.0) -> Outcome:
    plugin = conf["type"]
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_NETNS": netns,
           "CNI_IFNAME": ifname, "CNI_PATH": str(bin_dir), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    if cni_args:
        env["CNI_ARGS"] = cni_args
    p = subprocess.run([str(bin_dir / plugin)], input=json.dumps(conf).encode(), env=env,
                       capture_output=True, timeout=timeout_s, check=False)
    return Outcome(plugin, command, p.returncode, p.stdout, p.stderr)


def run_chain(bin_dir: Path, conflist: dict[str, Any], *, command: str, container_id: str, netns: str,
              ifname: str = "eth0", cni_args: str = "") -> list[Outcome]:
    """libcni's order: ADD in list order, each with the previous result; DEL reversed."""
    plugins = conflist["plugins"] if command == "ADD" else list(reversed(conflist["plugins"]))
    outcomes: list[Outcome] = []
    prev: dict[str, Any] | None = None
    for p in plugins:
        conf = {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **p}
        if prev is not None:
            conf["prevResult"] = prev
        out = run_plugin(bin_dir, conf, command=command, container_id=container_id, netns=netns,
                         ifname=ifname, cni_args=cni_args)
        outcomes.append(out)
        if out.exit_code != 0:
            break
        if command == "ADD":
            prev = out.json
    return outcomes


@contextmanager
def netns(prefix: str = "cnisup-t") -> Iterator[str]:
    """A named network namespace; yields its path."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield f"/var/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def delete_link(name: str) -> None:
    subprocess.run(["ip", "link", "del", name], check=False, capture_output=True)
