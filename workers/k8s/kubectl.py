"""k8s family, fallback worker: one ``kubectl get --watch`` subprocess per watched
collection (Events: one per reason, with the same field selectors as the informer).

``kubectl get <resource> --all-namespaces --watch --output-watch-events -o
json`` lists, prints every object as an ADDED event, then prints the watch's
events. Its output is a stream of concatenated JSON documents (compact or
pretty-printed, depending on the version), decoded incrementally with
``json.JSONDecoder.raw_decode``. A listing that took several pages comes as
one ADDED event whose object is a ``List``; its items are taken one by one.

kubectl does not mark where its listing ends, so it runs with ``-v=6``: the
request log on stderr shows the watch request (``...&watch=true 200 OK``)
once the listing has been printed. Everything read from stdout up to then is
one listing, fed to ``Tracker.replace`` (which emits only differences from
what this worker already knew); afterwards each document is one watch event.

kubectl cannot resume a watch: every restart is a full listing, and it exits
when its watch ends (server timeout, dropped connection, 410). A hung
connection is noticed only through ``--request-timeout``, which caps each
kubectl run at two to three times ``kubernetes.read_timeout``. Exits are
restarted with tenacity backoff; the children are terminated when the worker
stops (they also die with the worker's process group).
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
from typing import Any

from cnisup.workers.base import Worker, WorkerContext
from cnisup.workers.errors import CapabilityMissing
from cnisup.workers.k8s import events
from cnisup.workers.k8s.events import Access, Resource, Tracker

log = logging.getLogger("cnisup.kubectl")

#: Seconds a kubectl gets between SIGTERM and SIGKILL when the worker stops.
KUBECTL_STOP_GRACE_S = 1.0
#: Bytes of stdout kept undecoded before the stream counts as garbage. A
#: listing of many pages comes as one document: 256 MiB is ~500,000 pods.
MAX_PENDING_BYTES = 256 << 20
#: Seconds a discovery request (``kubectl api-resources``) may take.
DISCOVERY_TIMEOUT_S = 10.0
#: Seconds between discovery attempts while the server does not answer.
DISCOVERY_RETRY_S = 2.0
#: kubectl's -v=6 log line of its watch request: the listing has been printed.
_WATCH_LINE = re.compile(r"\bGET \S+[?&]watch=true\S* (\d{3})\b")
#: stderr lines that are kubectl's own messages, not its -v=6 request log.
_ERROR_LINE = re.compile(r"^(error|Error from server|E\d{4} )")


_CACHE_PREFIX = "cnisup-kubectl-"


def _remove_stale_cache_dirs() -> None:
    """Cache dirs left by workers of this user that were killed (SIGKILL skips cleanup)."""
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        pid = name[len(_CACHE_PREFIX):].split("-", 1)[0]
        if not name.startswith(_CACHE_PREFIX) or not pid.isdigit():
            continue
        path = os.path.join(tmp, name)
        try:
            if os.lstat(path).st_uid != os.getuid() or os.path.exists(f"/proc/{pid}"):
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)


def find_kubectl(environ: dict[str, str] | None = None) -> str | None:
    env = os.environ if environ is None else environ
    return shutil.which("kubectl", path=env.get("PATH", os.defpath))


class Documents:
    """Concatenated JSON documents (compact or pretty-printed), decoded as they arrive."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.buf = ""

    @property
    def pending(self) -> int:
        return len(self.buf)

    def feed(self, data: bytes) -> tuple[list[Any], list[str]]:
        """The documents completed by ``data``, and what could not be decoded."""
        self.buf += self._utf8.decode(data)
        docs: list[Any] = []
        problems: list[str] = []
        # kubectl flushes whole documents, each ending in "}\n": only then is a
        # decode worth trying (a multi-megabyte listing is not re-parsed per read).
        if not self.buf.rstrip(" \t\r").endswith("}\n") and not self.buf.endswith("}"):
            if self.buf.isspace():
                self.buf = ""
            return docs, problems
        dec = json.JSONDecoder()
        pos, n = 0, len(self.buf)
        while True:
            while pos < n and self.buf[pos].isspace():
                pos += 1
            if pos >= n:
                break
            try:
                doc, end = dec.raw_decode(self.buf, pos)
            except json.JSONDecodeError as exc:
                if exc.pos >= len(self.buf.rstrip()) or exc.msg.startswith("Unterminated string"):
                    break  # incomplete: the rest comes with the next read
                problems.append(f"output is not JSON ({exc.msg}): {self.buf[pos:pos + 120]!r}")
                nl = self.buf.find("\n", exc.pos)
                pos = n if nl < 0 else nl + 1  # skip the bad line
                continue
            pos = end
            docs.append(doc)
        self.buf = self.buf[pos:]
        return docs, problems


class Stream:
    """One resource's kubectl subprocess and the decoding of its output."""

    def __init__(self, worker: KubectlWorker, resource: Resource, admit: events.Admit | None = None) -> None:
        self.w = worker
        self.resource = resource
        self.tracker = Tracker(resource, worker.ctx.publish, admit)
        self.proc: subprocess.Popen[bytes] | None = None
        self.restart_at = 0.0
        self.attempt = 0
        self.runs = 0
        self.problem: str | None = None
        self._reset()

    def _reset(self) -> None:
        self.decoder = Documents()
        self.err = b""
        self.errors: list[str] = []
        #: (key, slim projection) of each listed object; None once the listing was applied
        self.listing: list[tuple[str, events.Slim]] | None = []
        self.started = time.monotonic()

    # -- the subprocess ------------------------------------------------------------------------
    def argv(self) -> list[str]:
        w = self.w
        lifetime = random.uniform(2, 3) * w.cfg.kubernetes.read_timeout
        argv = [*w.wrapper, w.kubectl]
        if w.access.mode == "kubeconfig":
            argv += ["--kubeconfig", w.access.path]
        argv += ["--cache-dir", w.cache_dir, f"--request-timeout={lifetime:.0f}s", "-v=6",
                 "get", self.resource.kubectl_name, "--all-namespaces", "--watch", "--output-watch-events",
                 "-o", "json"]
        if selector := events.field_selector(self.resource, w.cfg):
            argv += ["--field-selector", selector]
        return argv

    def start(self) -> None:
        self._reset()
        self.runs += 1
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=self.w.env, cwd=self.w.cache_dir)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        os.set_blocking(self.proc.stderr.fileno(), False)

    def fds(self) -> list[int]:
        if self.proc is None:
            return []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        return [f.fileno() for f in (self.proc.stdout, self.proc.stderr) if not f.closed]

    def _is(self, f: Any, fd: int) -> bool:
        return f is not None and not f.closed and f.fileno() == fd

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()

    # -- reading -----------------------------------------------------------------------------------
    def readable(self, fd: int) -> None:
        proc = self.proc
        assert proc is not None
        if self._is(proc.stderr, fd):
            self._read_stderr()
        elif self._is(proc.stdout, fd):  # may have been drained and closed by _read_stderr
            self._read_stdout()

    def _read(self, f: Any) -> bytes | None:
        """What is in the pipe now; b"" at EOF (and the pipe is closed), None if nothing."""
        if f is None or f.closed:
            return None
        chunks: list[bytes] = []
        while True:
            try:
                data = os.read(f.fileno(), 1 << 16)
            except BlockingIOError:
                return b"".join(chunks) if chunks else None
            if not data:
                f.close()
                return b"".join(chunks)
            chunks.append(data)
            self.w.ctx.heartbeat()

    def _read_stdout(self) -> None:
        assert self.proc is not None
        data = self._read(self.proc.stdout)
        if data:
            self._decode(*self.decoder.feed(data))

    def _read_stderr(self) -> None:
        assert self.proc is not None
        data = self._read(self.proc.stderr)
        if not data:
            return
        self.err += data
        *lines, rest = self.err.split(b"\n")
        self.err = rest[-65536:]
        for raw in lines:
            line = raw.decode(errors="replace").strip()
            m = _WATCH_LINE.search(line)
            if m and self.listing is not None:
                # Everything the listing printed is in the stdout pipe by now.
                self._read_stdout()
                self._end_listing()
            elif _ERROR_LINE.match(line) or (line and not line.startswith("I")):
                self.errors = [*self.errors[-4:], line[:500]]

    def _decode(self, docs: list[Any], problems: list[str]) -> None:
        for p in problems:
            self.w.report(self, "k8s_bad_response", f"kubectl get {self.resource.label}: {p}")
        for doc in docs:
            self._document(doc)
        if self.decoder.pending > MAX_PENDING_BYTES:
            self.w.report(self, "k8s_bad_response", f"kubectl get {self.resource.label}: "
                                                    f"{self.decoder.pending} bytes that do not decode as JSON")
            self.decoder = Documents()
            self.stop()

    def _document(self, doc: Any) -> None:
        if not isinstance(doc, dict) or not isinstance(doc.get("object"), dict):
            self.w.report(self, "k8s_bad_response",
                          f"kubectl get {self.resource.label}: not a watch event: {str(doc)[:120]}")
            return
        etype, obj = doc.get("type"), doc["object"]
        if etype == "ERROR":  # kubectl prints it, then exits (and is restarted: a relist)
            log.info("kubectl get %s: ERROR event %s: %s", self.resource.label, obj.get("code"), obj.get("message"))
            return
        if isinstance(obj.get("items"), list):
            # A listing that took several pages is printed as one ADDED "List" object.
            for item in obj["items"]:
                if isinstance(item, dict):
                    self._document({"type": etype, "object": item})
            return
        if self.listing is not None:
            if etype == "ADDED":
                # Only the slim projection is held until the listing ends.
                self.listing.append((events.object_key(obj), self.resource.project(obj)))
                return
            self._end_listing()
        if etype in ("ADDED", "MODIFIED", "DELETED"):
            self.tracker.apply(str(etype), obj)

    def _end_listing(self) -> None:
        if self.listing is None:
            return
        listing, self.listing = self.listing, None
        self.tracker.replace_projected(listing)
        self.w.recovered(self)

    # -- exits --------------------------------------------------------------------------------------
    def exited(self, now: float) -> None:
        """The subprocess ended: report why (once per streak) and schedule a restart."""
        assert self.proc is not None
        code = self.proc.wait()
        self._read_stderr()
        if self.err.strip():  # a last line without a newline
            self.errors = [*self.errors[-4:], self.err.decode(errors="replace").strip()[:500]]
            self.err = b""
        ran = now - self.started
        healthy = self.listing is None
        reason = "; ".join(self.errors[-2:]) or f"exit code {code}"
        self.proc = None
        # A kubectl that printed its listing was healthy: restart at the first backoff step.
        self.attempt = 1 if healthy else self.attempt + 1
        delay = events.reconnect_delay_s(self.attempt)
        self.restart_at = now + delay
        log.info("kubectl get %s exited %s after %.1f s (%s); restart in %.2f s",
                 self.resource.label, code, ran, reason, delay)
        if re.search(r"Forbidden|forbidden|Unauthorized", reason):
            self.w.report(self, "k8s_forbidden", f"kubectl get {self.resource.label}: {reason}")
        elif code != 0 and not healthy:
            self.w.report(self, "k8s_kubectl_exited",
                          f"kubectl get {self.resource.label} exited {code}: {reason}")


class KubectlWorker(Worker):
    def __init__(self, ctx: WorkerContext) -> None:
        super().__init__(ctx)
        self.cfg = ctx.config
        kubectl = find_kubectl()
        if kubectl is None:
            raise CapabilityMissing(f"kubectl not found in PATH ({os.environ.get('PATH', '')})")
        self.kubectl = kubectl
        self.access: Access = events.locate(self.cfg.kubernetes.kubeconfig)
        # kubectl needs a writable cache dir (discovery, HTTP cache); the workers
        # user has no home. Private to this incarnation, removed on exit.
        _remove_stale_cache_dirs()
        self.cache_dir = tempfile.mkdtemp(prefix=f"{_CACHE_PREFIX}{os.getpid()}-")
        self.env = {k: v for k, v in os.environ.items()
                    if k in ("PATH", "LANG", "LC_ALL", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT")}
        self.env["HOME"] = self.cache_dir
        # kubectl must not outlive this worker even when it is SIGKILLed alone:
        # setpriv sets the parent-death signal and execs it (no preexec_fn).
        setpriv = shutil.which("setpriv", path=os.environ.get("PATH", os.defpath))
        self.wrapper = [setpriv, "--pdeathsig", "SIGKILL", "--"] if setpriv else []
        self.streams: list[Stream] = []

    def report(self, stream: Stream, code: str, message: str) -> None:
        log.warning("%s", message)
        if stream.problem != code:  # once per streak, not once per restart
            stream.problem = code
            self.ctx.warn(code, message, resource=stream.resource.plural)

    def recovered(self, stream: Stream) -> None:
        stream.problem = None

    def _endpointslices(self) -> bool:
        """Does the server have discovery.k8s.io/v1? ``kubectl api-resources`` asks discovery.
        Polled, not waited for, so the main loop keeps heartbeating."""
        argv = [*self.wrapper, self.kubectl,
                *(["--kubeconfig", self.access.path] if self.access.mode == "kubeconfig" else []),
                "--cache-dir", self.cache_dir, f"--request-timeout={DISCOVERY_TIMEOUT_S:.0f}s", "api-resources",
                "--api-group=discovery.k8s.io", "-o", "name"]
        while not self.ctx.stopping:
            with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=self.env,
                                        cwd=self.cache_dir)
                deadline = time.monotonic() + 2 * DISCOVERY_TIMEOUT_S
                while proc.poll() is None and time.monotonic() < deadline and not self.ctx.sleep(0.02):
                    pass
                if proc.poll() is None:
                    proc.kill()
                code = proc.wait()
                out.seek(0)
                err.seek(0)
                if code == 0:
                    return b"endpointslices" in out.read()
                reason = err.read().decode(errors="replace").strip()[-300:] or f"exit code {code}"
            log.warning("kubectl api-resources failed: %s", reason)
            self.ctx.sleep(DISCOVERY_RETRY_S)
        return True

    def run(self) -> None:
        try:
            log.info("kubectl %s, %s from %s; pods: %s", self.kubectl, self.access.path, self.access.origin,
                     events.pod_field_selector(self.cfg) or "all nodes")
            slices = self._endpointslices()
            self.streams = [Stream(self, r) for r in events.resources(endpointslices=slices) if r not in events.EVENTS]
            pods = next(s for s in self.streams if s.resource is events.PODS).tracker.cache
            self.streams += [Stream(self, r, events.NodeEvents(self.cfg.node_name, pods)) for r in events.EVENTS]
            for s in self.streams:
                s.start()
            self._loop()
        finally:
            self._stop_all()
            shutil.rmtree(self.cache_dir, ignore_errors=True)

    def _loop(self) -> None:
        ctx = self.ctx
        ctx.describe(lambda: {"kubectl": self.kubectl, "kubeconfig": self.access.path,
                              "pod_scope": self.cfg.kubernetes.pod_scope,
                              "resources": {s.resource.label: {"pid": s.proc.pid if s.proc else None,
                                                                "runs": s.runs, "cached": len(s.tracker.cache)}
                                            for s in self.streams}})
        while not ctx.stopping:
            now = time.monotonic()
            restarts = [s.restart_at for s in self.streams if s.proc is None]
            owners = {fd: s for s in self.streams for fd in s.fds()}
            ready = ctx.wait(owners, timeout_s=min(restarts) - now if restarts else None)
            for fd in ready:
                owners[fd].readable(fd)
            now = time.monotonic()
            for s in self.streams:
                if s.proc is not None and not s.fds() and s.proc.poll() is not None:
                    s.exited(now)
                elif s.proc is None and now >= s.restart_at:
                    s.start()

    def _stop_all(self) -> None:
        for s in self.streams:
            s.stop()
        deadline = time.monotonic() + KUBECTL_STOP_GRACE_S
        for s in self.streams:
            if s.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    s.proc.wait(max(0.0, deadline - time.monotonic()))
            s.kill()

