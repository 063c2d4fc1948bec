"""k8s family, primary worker: list + watch with the ``kubernetes`` client.

One thread per watched collection (Events: one per reason) runs an informer
in four small layers (as kopf's ``watching``): reconnect forever with backoff
→ list when needed → one watch request with bookmarks, a randomised server
``timeoutSeconds`` and a client read timeout → parse lines. Any error or end
of stream reconnects from the newest resourceVersion seen (bookmarks
included), without a relist.

Lists follow client-go's reflector, so that thousands of nodes starting at
once are served from the API server's watch cache, not etcd: the first LIST
asks ``resourceVersion=0`` (the cache answers it whole, ignoring ``limit``);
after a 410 Gone (HTTP or an ERROR event) the relist asks for the last
resourceVersion seen (still the cache, no ``limit``, since a paginated list
at a resourceVersion goes to etcd), and only if that LIST is itself 410 a
consistent read with resourceVersion unset (etcd, in pages of 500).
``Tracker.replace`` then emits exactly what was missed.

Responses are read raw (``_preload_content=False``) and parsed with ``json``:
the generated models are slow, strict about fields a server may omit, and
much larger than the slim projections ``events`` caches.

Threads never touch the bus: they hand events to the main loop through a
queue and a wake-up pipe; the main loop publishes, heartbeats and watches the
stop fd, so it never blocks on the network.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import urllib3
from kubernetes import client as kclient
from kubernetes import config as kconfig

from cnisup.protocol.settings import Config
from cnisup.workers.base import Worker, WorkerContext
from cnisup.workers.errors import CapabilityMissing, WorkerConfigError
from cnisup.workers.k8s import events
from cnisup.workers.k8s.events import Access, Resource, Tracker, read_kubeconfig

log = logging.getLogger("cnisup.k8s-informer")

#: Seconds to open a TCP connection to the API server.
CONNECT_TIMEOUT_S = 10.0
#: Seconds a list page may take to arrive; a page is at most LIST_PAGE_SIZE objects.
LIST_READ_TIMEOUT_S = 60.0
#: Objects per list page of a consistent (etcd) read: 5,000 pods are 10 requests of bounded
#: size each. The watch cache ignores it (a resourceVersion=0 list comes whole).
LIST_PAGE_SIZE = 500
#: Server-side watch duration is drawn from [WATCH_TIMEOUT_S, 2 * WATCH_TIMEOUT_S]
#: (as client-go does), so many nodes' watches do not all reconnect at once.
WATCH_TIMEOUT_S = 300
#: A watch connection up this long (seconds) worked, however it ended.
HEALTHY_WATCH_S = 10.0
#: A watch line longer than this is not an event we can hold: treated as garbage.
MAX_LINE_BYTES = 64 << 20
#: Bytes of one list response read at most. A resourceVersion=0 list comes whole from the
#: watch cache: 256 MiB is ~100,000 pods at cluster scope (a node's pods are a few hundred KiB).
MAX_RESPONSE_BYTES = 256 << 20

def user_agent() -> str:
    try:
        version = importlib.metadata.version("cnisup")
    except importlib.metadata.PackageNotFoundError:
        version = "0+unknown"
    return f"cnisup/{version} (k8s-informer)"


class Gone(Exception):
    """410: the resourceVersion is too old; relist."""


class BadResponse(Exception):
    """The server sent something that is not the protocol (invalid or truncated JSON)."""


class Problem(Exception):
    """A failed round, with the monitor.warning code to report it under."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status  #: the HTTP status, when the server answered


def client_configuration(access: Access) -> kclient.Configuration:
    conf = kclient.Configuration()
    try:
        if access.mode == "in-cluster":
            kconfig.load_incluster_config(client_configuration=conf)
        else:
            read_kubeconfig(access)  # refuses what would exhaust the client's own yaml.safe_load
            kconfig.load_kube_config(config_file=access.path, client_configuration=conf, persist_config=False)
    except PermissionError as exc:
        raise CapabilityMissing(f"{access.path} ({access.origin}): {exc.strerror}") from exc
    except (kconfig.ConfigException, OSError, ValueError, TypeError) as exc:
        raise WorkerConfigError("kubernetes.kubeconfig", f"{access.path} ({access.origin}): {exc}") from exc
    # The client sends a tokenFile verbatim: one that ends in a newline (echo > token) would fail
    # every request with "Invalid header value"; kubectl, the fallback, trims it.
    conf.api_key = {k: v.strip() if isinstance(v, str) else v for k, v in conf.api_key.items()}
    conf.connection_pool_maxsize = 2  # one long watch plus a list or discovery at a time
    return conf


class Outbox:
    """Thread → main loop: events and warnings, plus a pipe that wakes ``select``."""

    def __init__(self) -> None:
        self.q: queue.SimpleQueue[tuple[str, str, dict[str, Any]]] = queue.SimpleQueue()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def put(self, what: str, kind: str, data: dict[str, Any]) -> None:
        self.q.put((what, kind, data))
        with contextlib.suppress(BlockingIOError):  # full pipe: a wake-up is pending anyway
            os.write(self.wake_w, b"\0")

    def event(self, kind: str, data: dict[str, Any]) -> None:
        self.put("event", kind, data)

    def warn(self, code: str, message: str, **fields: Any) -> None:
        self.put("warn", code, {"message": message, **fields})

    def drain(self) -> Iterator[tuple[str, str, dict[str, Any]]]:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wake_r, 4096):
                pass
        while True:
            try:
                yield self.q.get_nowait()
            except queue.Empty:
                return


class Informer:
    """List + watch of one resource, in its own thread."""

    def __init__(self, *, conf: kclient.Configuration, resource: Resource, cfg: Config,
                 out: Outbox, stop: threading.Event, discover_endpointslices: bool = False,
                 admit: events.Admit | None = None) -> None:
        self.api = kclient.ApiClient(conf)
        self.api.user_agent = user_agent()
        self.resource = resource
        self.cfg = cfg
        self.out = out
        self.stop = stop
        self.discover = discover_endpointslices
        self.tracker = Tracker(resource, out.event, admit)
        self.rv: str | None = None  #: the newest resourceVersion seen (list, event or bookmark)
        self.need_list = True  #: first round, or the watch answered 410
        self.rv_unavailable = False  #: a LIST at ``rv`` answered 410: list consistently (unset)
        self.paginated = False  #: an rv=0 list came in pages: no watch cache, keep paging (as client-go)
        self.state = "starting"
        self.lists = 0
        self.watches = 0
        self.problem: str | None = None  #: code of the current error streak, reported once
        self.round_lines = 0  #: lines the current round's watch delivered
        self.round_connected = 0.0  #: when its watch connected (monotonic), 0 if it did not

    @property
    def field_selector(self) -> str:
        return events.field_selector(self.resource, self.cfg)

    @property
    def label(self) -> str:
        return self.resource.label

    def info(self) -> dict[str, Any]:
        return {"state": self.state, "resource_version": self.rv, "cached": len(self.tracker.cache),
                "lists": self.lists, "watches": self.watches,
                "api": f"{self.resource.group or 'core'}/{self.resource.version}"}

    # -- layer 1: reconnect forever ---------------------------------------------------------
    def run(self) -> None:
        attempt = gone = 0
        while not self.stop.is_set():
            self.round_lines, self.round_connected = 0, 0.0
            problem: Problem | None = None
            try:
                if self.discover:
                    self._discover()
                self._round()
            except Gone as exc:
                log.info("%s: %s; relisting", self.label, exc)
                self.need_list = True
                gone += 1
                if gone == 1:
                    continue  # relist at once; a 410 on every try backs off below
                problem = Problem("k8s_gone", f"{exc} ({gone} times in a row)")
            except Problem as exc:
                problem = exc
            except Exception as exc:  # a bug or an unforeseen client error: never kill the thread
                log.exception("%s: unexpected error", self.label)
                problem = Problem("k8s_error", f"{type(exc).__name__}: {exc}")
            # A watch that delivered lines or stayed up a while worked: whatever ended
            # it starts a new streak (first backoff step, a new warning if it fails).
            ran = time.monotonic() - self.round_connected if self.round_connected else 0.0
            if self.round_lines or ran >= HEALTHY_WATCH_S:
                attempt = gone = 0
                self._recovered()
                if problem is None:
                    continue  # the server ended a stream that worked: reconnect at once
            if problem is None:
                problem = Problem("k8s_watch_closed", "the watch stream closed at once, without a line")
            attempt += 1
            delay = events.reconnect_delay_s(attempt)
            self.state = f"backoff ({problem.code})"
            self._report(problem, delay)
            self.stop.wait(delay)

    def _report(self, problem: Problem, delay: float) -> None:
        log.warning("%s: %s: %s; retry in %.2f s", self.label, problem.code, problem, delay)
        if problem.code != self.problem:  # once per streak, not once per retry
            self.problem = problem.code
            self.out.warn(problem.code, f"{self.label}: {problem}", resource=self.resource.plural)

    def _recovered(self) -> None:
        if self.problem is not None:
            log.info("%s: working again", self.label)
            self.problem = None

    # -- requests -----------------------------------------------------------------------------
    def _get(self, path: str, params: list[tuple[str, str]], read_timeout_s: float) -> urllib3.HTTPResponse:
        try:
            resp: urllib3.HTTPResponse = self.api.call_api(
                path, "GET", query_params=params, header_params={"Accept": "application/json"},
                auth_settings=["BearerToken"], _preload_content=False, _return_http_data_only=True,
                _request_timeout=(CONNECT_TIMEOUT_S, read_timeout_s))
        except kclient.ApiException as exc:
            raise self._api_error(exc) from exc
        except urllib3.exceptions.HTTPError as exc:
            raise Problem("k8s_connection", f"GET {path}: {exc}") from exc
        return resp

    def _api_error(self, exc: kclient.ApiException) -> Exception:
        message = exc.reason or ""
        with contextlib.suppress(ValueError, TypeError):
            message = json.loads(exc.body).get("message") or message
        if exc.status == 410:
            return Gone(f"410 Gone: {message}")
        code = "k8s_forbidden" if exc.status in (401, 403) else "k8s_api_error"
        return Problem(code, f"{exc.status} {exc.reason}: {message}", exc.status)

    def _read_json(self, resp: urllib3.HTTPResponse, what: str) -> dict[str, Any]:
        try:
            raw = resp.read(MAX_RESPONSE_BYTES + 1, decode_content=True)
            if len(raw) > MAX_RESPONSE_BYTES:
                raise Problem("k8s_bad_response", f"{what}: a response over {MAX_RESPONSE_BYTES} bytes")
            data = json.loads(raw)
        except urllib3.exceptions.HTTPError as exc:
            raise Problem("k8s_connection", f"{what}: {exc}") from exc
        except ValueError as exc:
            raise Problem("k8s_bad_response", f"{what}: not JSON ({exc})") from exc
        finally:
            resp.release_conn()
        if not isinstance(data, dict):
            raise Problem("k8s_bad_response", f"{what}: not a JSON object")
        return data

    def _discover(self) -> None:
        """EndpointSlices where the server has them, else core/v1 Endpoints."""
        path = "/apis/discovery.k8s.io/v1"
        try:
            found = self._read_json(self._get(path, [], LIST_READ_TIMEOUT_S), path)
            has = any(r.get("name") == "endpointslices" for r in found.get("resources") or [])
        except Problem as exc:
            if exc.status != 404:
                raise
            has = False
        self.resource = events.ENDPOINTSLICES if has else events.ENDPOINTS
        self.tracker.resource = self.resource
        self.discover = False
        if not has:
            log.info("the server has no discovery.k8s.io/v1 EndpointSlices: watching core/v1 Endpoints")

    # -- layer 2: list, then watch ---------------------------------------------------------------
    def _round(self) -> None:
        if self.need_list:
            self._list()
        self._watch()

    def _list(self) -> None:
        self.state = "listing"
        self.lists += 1
        rv = "" if self.rv_unavailable else self.rv or "0"
        try:
            pages = self._pages(rv)
            self.tracker.replace(obj for page in pages for obj in page)
        except Gone as exc:
            self.rv_unavailable = True
            if rv == "":
                raise
            log.info("%s: list at resourceVersion %s: %s; a consistent list", self.label, rv, exc)
            self._list()
            return
        self.need_list = self.rv_unavailable = False

    def _pages(self, rv: str) -> Iterator[list[dict[str, Any]]]:
        """Pages of one consistent listing at ``rv`` ("0", "" or the last seen); sets ``self.rv``
        to the listing's resourceVersion."""
        token = ""
        list_rv = None
        # client-go: a list at a resourceVersion other than 0 asks no limit, or it would go to etcd.
        limit = rv in ("", "0") or self.paginated
        while True:
            params = [("resourceVersion", rv)] if rv and not token else []
            if limit:
                params.append(("limit", str(LIST_PAGE_SIZE)))
            if self.field_selector:
                params.append(("fieldSelector", self.field_selector))
            if token:
                params.append(("continue", token))
            page = self._read_json(self._get(self.resource.path, params, LIST_READ_TIMEOUT_S),
                                   f"list {self.label}")
            meta = page.get("metadata") or {}
            list_rv = list_rv or meta.get("resourceVersion")
            items = page.get("items")
            if not isinstance(items, list) or not list_rv:
                raise Problem("k8s_bad_response", f"list {self.label}: no items or resourceVersion")
            yield items
            token = meta.get("continue") or ""
            if not token:
                break
            self.paginated = self.paginated or rv == "0"
        self.rv = str(list_rv)

    # -- layers 3 and 4: one watch request, its lines ---------------------------------------------
    def _watch(self) -> None:
        """One watch request, until the server ends it (or an error does)."""
        assert self.rv is not None
        params = [("watch", "true"), ("resourceVersion", self.rv), ("allowWatchBookmarks", "true"),
                  ("timeoutSeconds", str(random.randint(WATCH_TIMEOUT_S, 2 * WATCH_TIMEOUT_S)))]
        if self.field_selector:
            params.append(("fieldSelector", self.field_selector))
        resp = self._get(self.resource.path, params, self.cfg.kubernetes.read_timeout)
        self.state = "watching"
        self.watches += 1
        self.round_connected = time.monotonic()
        try:
            for line in self._lines(resp):
                self.round_lines += 1
                self._handle(line)
                if self.stop.is_set():
                    break
        finally:
            resp.release_conn()

    def _lines(self, resp: urllib3.HTTPResponse) -> Iterator[bytes]:
        buf = b""
        try:
            for chunk in resp.stream(65536, decode_content=True):
                buf += chunk
                if b"\n" not in chunk:
                    if len(buf) > MAX_LINE_BYTES:
                        raise Problem("k8s_bad_response", f"watch {self.label}: a line over "
                                                          f"{MAX_LINE_BYTES} bytes")
                    continue
                *lines, buf = buf.split(b"\n")
                yield from (line for line in lines if line.strip())
        except urllib3.exceptions.ReadTimeoutError as exc:
            raise Problem("k8s_watch_timeout", f"watch {self.label}: nothing received for "
                                               f"{self.cfg.kubernetes.read_timeout:g} s (read timeout); "
                                               "reconnecting") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise Problem("k8s_connection", f"watch {self.label}: connection lost: {exc}") from exc
        if buf.strip():
            raise Problem("k8s_bad_response", f"watch {self.label}: stream ended inside an event "
                                              f"({len(buf)} bytes of truncated JSON)")

    def _handle(self, line: bytes) -> None:
        try:
            ev = json.loads(line)
            etype, obj = ev["type"], ev["object"]
            if not isinstance(obj, dict):
                raise TypeError("object is not a JSON object")
        except (ValueError, KeyError, TypeError) as exc:
            raise Problem("k8s_bad_response", f"watch {self.label}: not a watch event "
                                              f"({exc}): {line[:120]!r}") from exc
        if etype == "ERROR":
            code, message = obj.get("code"), obj.get("message", "")
            if code == 410:
                raise Gone(f"ERROR event 410: {message}")
            raise Problem("k8s_forbidden" if code in (401, 403) else "k8s_api_error",
                          f"watch {self.label}: ERROR event {code}: {message}")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if etype in ("ADDED", "MODIFIED", "DELETED"):
            self.tracker.apply(etype, obj)
        elif etype != "BOOKMARK":
            raise Problem("k8s_bad_response", f"watch {self.label}: unknown event type {etype!r}")
        if rv:
            self.rv = str(rv)


class K8sInformerWorker(Worker):
    def __init__(self, ctx: WorkerContext) -> None:
        super().__init__(ctx)
        self.cfg = ctx.config
        self.access = events.locate(self.cfg.kubernetes.kubeconfig)
        self.conf = client_configuration(self.access)
        self.out = Outbox()
        self.stop = threading.Event()

        def informer(r: Resource, admit: events.Admit | None = None) -> Informer:
            return Informer(conf=self.conf, resource=r, cfg=self.cfg, out=self.out, stop=self.stop,
                            discover_endpointslices=r is events.ENDPOINTSLICES, admit=admit)

        self.informers = [informer(r) for r in events.resources(endpointslices=True) if r not in events.EVENTS]
        pods = next(i for i in self.informers if i.resource is events.PODS).tracker.cache
        self.informers += [informer(r, events.NodeEvents(self.cfg.node_name, pods)) for r in events.EVENTS]

    def run(self) -> None:
        ctx = self.ctx
        log.info("API server %s (%s from %s); pods: %s", self.conf.host, self.access.path, self.access.origin,
                 events.pod_field_selector(self.cfg) or "all nodes")
        for inf in self.informers:
            threading.Thread(target=inf.run, name=f"informer-{inf.label}", daemon=True).start()
        ctx.describe(lambda: {"server": self.conf.host, "kubeconfig": self.access.path,
                              "pod_scope": self.cfg.kubernetes.pod_scope,
                              "resources": {i.label: i.info() for i in self.informers}})
        try:
            while not ctx.stopping:
                ctx.wait([self.out.wake_r])
                self._publish()
            self._publish()
        finally:
            self.stop.set()

    def _publish(self) -> None:
        for n, (what, kind, data) in enumerate(self.out.drain()):
            if what == "event":
                self.ctx.publish(kind, data)
            else:
                self.ctx.warn(kind, data.pop("message"), **data)
            if n % 256 == 255:  # a relist of thousands of objects: keep beating
                self.ctx.heartbeat()
