"""Real ``nats-server`` processes for the tests, on free loopback ports: one
JetStream server, or a three-server cluster with routes on loopback.

Readiness is the server's own: ``/healthz?js-enabled-only=true`` for one
server; for a cluster, a meta leader whose group has all three members
current (a leader alone is not enough: placing an R3 stream can still fail
with "no suitable peers"), and after a full restart the stream's own leader
(``/healthz`` answers 200 long before the stream accepts writes).
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


def available() -> bool:
    return Path(NATS_SERVER).exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_json(port: int, path: str, timeout_s: float = 0.5) -> tuple[int | None, Any]:
    """(status, parsed body) from a monitoring port; (None, None) while it is not up."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout_s) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read())
        except ValueError:
            return exc.code, None
    except (OSError, ValueError):
        return None, None


class Server:
    def __init__(self, name: str, workdir: Path, *, cluster_port: int | None = None,
                 routes: list[int] | None = None, extra_conf: str = "") -> None:
        self.name = name
        self.workdir = workdir
        self.port = free_port()
        self.http_port = free_port()
        self.cluster_port = cluster_port
        self.routes = routes or []
        self.extra_conf = extra_conf
        self.conf_path = workdir / f"{name}.conf"
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        (workdir / name).mkdir(parents=True, exist_ok=True)
        self.write_conf()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def write_conf(self) -> None:
        lines = [f'server_name: "{self.name}"', f"listen: 127.0.0.1:{self.port}", f"http: 127.0.0.1:{self.http_port}",
                 "jetstream {", f'  store_dir: "{self.workdir / self.name / "js"}"', "  max_memory_store: 256MB",
                 "  max_file_store: 2GB", "}"]
        if self.cluster_port:
            routes = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in self.routes)
            lines += ["cluster {", '  name: "cnisup-test"', f"  listen: 127.0.0.1:{self.cluster_port}",
                      f"  routes: [{routes}]", "}"]
        lines.append(self.extra_conf)
        self.conf_path.write_text("\n".join(lines) + "\n")

    def start(self) -> Server:
        assert not self.alive()
        self.proc = subprocess.Popen([NATS_SERVER, "-c", str(self.conf_path), "-l", str(self.log_path)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {self.log()}")
            if http_json(self.http_port, "/healthz?js-enabled-only=true")[0] == 200:
                return
            time.sleep(0.02)
        raise TimeoutError(f"{self.name} not ready within {timeout_s} s: {self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""


def single(workdir: Path, extra_conf: str = "") -> Server:
    s = Server("n1", workdir, extra_conf=extra_conf).start()
    s.wait_ready()
    return s


class Cluster:
    def __init__(self, workdir: Path, n: int = 3) -> None:
        cports = [free_port() for _ in range(n)]
        self.servers = [Server(f"n{i + 1}", workdir, cluster_port=cports[i],
                               routes=[p for j, p in enumerate(cports) if j != i]) for i in range(n)]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def start(self) -> Cluster:
        for s in self.servers:
            if not s.alive():
                s.start()
        return self

    def stop(self) -> None:
        for s in self.servers:
            s.kill()

    def _meta_ok(self) -> bool:
        n = len(self.servers)
        for s in self.servers:
            if not s.alive():
                continue
            mc = (http_json(s.http_port, "/jsz")[1] or {}).get("meta_cluster") or {}
            reps = mc.get("replicas") or []
            if mc.get("leader") and mc.get("cluster_size") == n and len(reps) == n - 1 \
                    and all(r.get("current") for r in reps):
                return True
        return False

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(http_json(s.http_port, "/healthz")[0] == 200 for s in self.servers if s.alive()) \
                    and self._meta_ok():
                return
            time.sleep(0.05)
        raise TimeoutError("cluster not ready: " + " | ".join(s.log()[-500:] for s in self.servers))

    def wait_meta(self, timeout_s: float = 60.0) -> None:
        """The meta group complete again: streams and consumers can be placed. (After a restart the
        full /healthz also waits for every stream replica to catch up, which can take much longer.)"""
        deadline = time.monotonic() + timeout_s
        while not self._meta_ok():
            if time.monotonic() > deadline:
                raise TimeoutError("no complete meta group: " + " | ".join(s.log()[-500:] for s in self.servers))
            time.sleep(0.1)

    def stream_leader(self, stream: str) -> str | None:
        for s in self.servers:
            if not s.alive():
                continue
            status, body = http_json(s.http_port, "/jsz?accounts=true&streams=true", timeout_s=1.0)
            for account in (body or {}).get("account_details") or [] if status == 200 else []:
                for sd in account.get("stream_detail") or []:
                    if sd.get("name") == stream and (sd.get("cluster") or {}).get("leader"):
                        return str(sd["cluster"]["leader"])
        return None

    def stream_states(self, stream: str) -> list[str]:
        """One line per server: what its replica of the stream holds and whom it takes for the
        leader (a failed read shows whether the replicas disagree)."""
        lines = []
        for s in self.servers:
            status, body = http_json(s.http_port, "/jsz?accounts=true&streams=true", timeout_s=2.0) \
                if s.alive() else (None, None)
            details = [sd for account in (body or {}).get("account_details") or []
                       for sd in account.get("stream_detail") or [] if sd.get("name") == stream]
            if status != 200 or not details:
                lines.append(f"{s.name}: {'down' if not s.alive() else f'no answer ({status})'}")
                continue
            st, cl = details[0].get("state") or {}, details[0].get("cluster") or {}
            lines.append(f"{s.name}: {st.get('messages')} messages, seq {st.get('first_seq')}..{st.get('last_seq')}, "
                         f"leader {cl.get('leader')}")
        return lines

    def wait_stream_leader(self, stream: str, timeout_s: float = 60.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if (leader := self.stream_leader(stream)) is not None:
                return leader
            time.sleep(0.1)
        raise TimeoutError(f"stream {stream} has no leader after {timeout_s} s")

    def server(self, name: str) -> Server:
        return next(s for s in self.servers if s.name == name)
