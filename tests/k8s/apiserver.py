"""A Kubernetes API-server emulator that speaks the real HTTP protocol well
enough for the unmodified ``kubernetes`` Python client and a real ``kubectl``.

What it implements (the parts list/watch clients use):

* discovery: ``/version``, ``/api``, ``/apis``, ``/api/v1`` and the group
  versions' resource lists. Aggregated discovery (``Accept: ...;as=
  APIGroupDiscoveryList``) is answered with the plain lists and a plain
  ``application/json`` content type, which clients take as "not supported".
* collections of pods, services, endpoints, endpointslices, networkpolicies,
  nodes, namespaces and events, all-namespaces and per-namespace, and single
  objects; discovery also names the kinds ``kubectl apply --dry-run=client``
  maps (serviceaccounts, secrets, RBAC), whose objects are never found.
* list, with ``resourceVersion`` as kube-apiserver's watch cache answers it:
  ``0`` is served from the cache (everything at once: ``limit`` is ignored),
  unset is a consistent read (paginated by ``limit``/``continue``, a snapshot
  per list; a continue token older than the compaction point is HTTP 410),
  ``N`` is "not older than N" (the current state) unless N is older than the
  compaction point: 410 Expired, as a read of a compacted revision is. With
  ``watch_cache = False`` (a server run without one) every list is read
  from etcd and paginated. Each request records where it was served from
  (``Request.served_from``).
  ``fieldSelector``: metadata.name and metadata.namespace everywhere,
  spec.nodeName on pods, and on events the fields kube-apiserver supports
  (involvedObject.*, reason, type, source, reportingComponent; not
  source.host); others are a 400 as on a real server. ``labelSelector``.
* SelfSubjectAccessReview (POST ``/apis/authorization.k8s.io/v1/
  selfsubjectaccessreviews``): allowed unless the (verb, group, resource) is
  in ``denied``; ``tokens``, when set, are the only bearer tokens accepted
  (401 otherwise, on every request).
* watch: chunked ``{"type","object"}`` lines from a history of changes; an
  object entering or leaving a watch's selectors is ADDED/DELETED for it;
  BOOKMARKs every ``bookmark_interval_s`` with ``allowWatchBookmarks``;
  ``timeoutSeconds`` (multiplied by ``watch_time_scale``, so that a test can
  run an hour of watch reconnects in seconds); a resourceVersion older than
  the compaction point is 410 Gone, as an ERROR event with a Status (what kube-apiserver does) or as
  HTTP 410 (``gone_as_http``).
* HTTPS with a self-signed certificate (``tls_dir``, made with openssl) for
  clients that send credentials only over TLS (kubectl, client-go).
* hooks for tests: change state (``put``/``delete``), ``compact``,
  ``drop_watches`` (reset the TCP connections), ``hang_watches`` (keep the
  connection, send nothing, not even bookmarks), ``expire_watches`` (an
  ERROR 410 event, as when a watcher falls out of the watch cache), per-
  resource ``forbidden`` (403) and ``garbage`` (invalid or truncated JSON),
  and a request log.
"""

from __future__ import annotations

import base64
import copy
import json
import socket
import ssl
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

Obj = dict[str, Any]

VERSION = {"major": "1", "minor": "32", "gitVersion": "v1.32.4", "gitCommit": "emulator",
           "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.23",
           "compiler": "gc", "platform": "linux/amd64"}


@dataclass(frozen=True)
class Kind:
    plural: str
    singular: str
    kind: str
    group: str
    version: str
    namespaced: bool
    short: tuple[str, ...] = ()
    verbs: tuple[str, ...] = ("get", "list", "watch")

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def resource(self) -> dict[str, Any]:
        r: dict[str, Any] = {"name": self.plural, "singularName": self.singular, "namespaced": self.namespaced,
                             "kind": self.kind, "verbs": list(self.verbs),
                             "storageVersionHash": self.plural[:8]}
        if self.short:
            r["shortNames"] = list(self.short)
        return r


_RBAC = "rbac.authorization.k8s.io"
KINDS = {k.plural: k for k in (
    Kind("pods", "pod", "Pod", "", "v1", True, ("po",)),
    Kind("services", "service", "Service", "", "v1", True, ("svc",)),
    Kind("endpoints", "endpoints", "Endpoints", "", "v1", True, ("ep",)),
    Kind("nodes", "node", "Node", "", "v1", False, ("no",)),
    Kind("namespaces", "namespace", "Namespace", "", "v1", False, ("ns",)),
    Kind("events", "event", "Event", "", "v1", True, ("ev",)),
    Kind("serviceaccounts", "serviceaccount", "ServiceAccount", "", "v1", True, ("sa",)),
    Kind("secrets", "secret", "Secret", "", "v1", True),
    Kind("endpointslices", "endpointslice", "EndpointSlice", "discovery.k8s.io", "v1", True),
    Kind("networkpolicies", "networkpolicy", "NetworkPolicy", "networking.k8s.io", "v1", True, ("netpol",)),
    Kind("clusterroles", "clusterrole", "ClusterRole", _RBAC, "v1", False),
    Kind("clusterrolebindings", "clusterrolebinding", "ClusterRoleBinding", _RBAC, "v1", False),
    Kind("selfsubjectaccessreviews", "selfsubjectaccessreview", "SelfSubjectAccessReview",
         "authorization.k8s.io", "v1", False, verbs=("create",)),
)}
GROUPS = {"discovery.k8s.io": "v1", "networking.k8s.io": "v1", _RBAC: "v1", "authorization.k8s.io": "v1"}


#: What Go's strconv.ParseBool takes as true (the Python client sends "True").
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})


def status(code: int, reason: str, message: str) -> Obj:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


# -- selectors ---------------------------------------------------------------------------

def _at(*path: str) -> Callable[[Obj], str]:
    def get(o: Obj) -> str:
        cur: Any = o
        for key in path:
            cur = cur.get(key) if isinstance(cur, dict) else None
        return cur if isinstance(cur, str) else ""
    return get


_FIELDS: dict[str, Callable[[Obj], str]] = {"metadata.name": _at("metadata", "name"),
                                            "metadata.namespace": _at("metadata", "namespace")}
#: The extra field labels kube-apiserver supports per resource (pkg/apis/core/v1/conversion.go);
#: events have no source.host selector.
_RESOURCE_FIELDS: dict[str, dict[str, Callable[[Obj], str]]] = {
    "pods": {"spec.nodeName": _at("spec", "nodeName")},
    "events": {**{f"involvedObject.{f}": _at("involvedObject", f) for f in ("kind", "namespace", "name", "uid")},
               "reason": _at("reason"), "type": _at("type"), "source": _at("source", "component"),
               "reportingComponent": _at("reportingComponent")},
}


class BadSelector(ValueError):
    pass


def field_matcher(sel: str, plural: str) -> Callable[[Obj], bool]:
    fields = {**_FIELDS, **_RESOURCE_FIELDS.get(plural, {})}
    terms = []
    for term in filter(None, (t.strip() for t in sel.split(","))):
        for op in ("!=", "==", "="):
            if op in term:
                key, _, value = term.partition(op)
                break
        else:
            raise BadSelector(f"invalid field selector term {term!r}")
        key = key.strip()
        if key not in fields:
            raise BadSelector(f'field label not supported: {key}')
        terms.append((fields[key], op == "!=", value.strip()))
    return lambda o: all((get(o) == v) != neg for get, neg, v in terms)


def _split_label_terms(sel: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in sel:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [t.strip() for t in [*out, cur] if t.strip()]


def label_matcher(sel: str) -> Callable[[Obj], bool]:
    """Equality (=, ==, !=), set (in, notin) and existence (k, !k) terms, all ANDed."""
    terms: list[tuple[str, str, set[str]]] = []  # (op, key, values)
    for term in _split_label_terms(sel):
        if " notin " in term or " in " in term:
            op = "notin" if " notin " in term else "in"
            key, _, vals = term.partition(f" {op} ")
            terms.append((op, key.strip(), {v.strip() for v in vals.strip().strip("()").split(",")}))
        elif "!=" in term:
            key, _, value = term.partition("!=")
            terms.append(("!=", key.strip(), {value.strip()}))
        elif "=" in term:
            key, _, value = term.replace("==", "=").partition("=")
            terms.append(("=", key.strip(), {value.strip()}))
        elif term.startswith("!"):
            terms.append(("!", term[1:].strip(), set()))
        else:
            terms.append(("exists", term, set()))

    def holds(op: str, key: str, values: set[str], labels: dict[str, str]) -> bool:
        if op in ("=", "in"):
            return labels.get(key) in values
        if op in ("!=", "notin"):
            return labels.get(key) not in values
        return (key in labels) == (op == "exists")

    return lambda o: all(holds(op, k, vs, o["metadata"].get("labels") or {}) for op, k, vs in terms)


# -- the store -----------------------------------------------------------------------------

@dataclass
class Change:
    rv: int
    plural: str
    type: str  #: ADDED, MODIFIED, DELETED
    obj: Obj
    old: Obj | None


@dataclass
class Watch:
    plural: str
    handler: BaseHTTPRequestHandler
    hung: bool = False
    expire: bool = False


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    user_agent: str
    at: float = field(default_factory=time.monotonic)
    #: a list's source: "cache" (resourceVersion 0 or N), "etcd" (a consistent read), "gone" (410)
    served_from: str = ""

    @property
    def watch(self) -> bool:
        return self.query.get("watch", "") in _TRUE


class ApiServer:
    def __init__(self, *, endpointslices: bool = True, bookmark_interval_s: float = 1.0,
                 default_watch_timeout_s: float = 1800.0, gone_as_http: bool = False,
                 watch_time_scale: float = 1.0, tls_dir: Path | None = None) -> None:
        self.endpointslices = endpointslices
        self.tls_dir = tls_dir
        self.watch_time_scale = watch_time_scale
        self.watch_cache = True
        self.bookmark_interval_s = bookmark_interval_s
        self.default_watch_timeout_s = default_watch_timeout_s
        self.gone_as_http = gone_as_http
        self.cond = threading.Condition()
        self.rv = 100
        self.objects: dict[str, dict[str, Obj]] = {p: {} for p in KINDS}
        self.history: list[Change] = []
        self.compacted_rv = 0
        self.watches: list[Watch] = []
        self.requests: list[Request] = []
        self.forbidden: set[str] = set()
        #: (verb, group, resource) a SelfSubjectAccessReview answers "denied" for
        self.denied: set[tuple[str, str, str]] = set()
        #: bearer tokens accepted; None: any request is accepted
        self.tokens: set[str] | None = None
        self.garbage: dict[str, str] = {}  #: plural -> "list" | "watch" (one-shot)
        self._snapshots: dict[str, tuple[int, list[Obj]]] = {}
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> ApiServer:
        server = self

        class Handler(_Handler):
            api = server

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        if self.tls_dir is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*self._certificate(self.tls_dir))
            self._httpd.socket = ctx.wrap_socket(self._httpd.socket, server_side=True)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="apiserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self.drop_watches()
            self._httpd.server_close()
            self._httpd = None

    @staticmethod
    def _certificate(d: Path) -> tuple[str, str]:
        cert, key = d / "apiserver.crt", d / "apiserver.key"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                        "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
                        "-out", str(cert)], check=True, capture_output=True, timeout=60)
        cert.chmod(0o644)
        return str(cert), str(key)

    @property
    def ca_file(self) -> Path:
        """The certificate a client must trust (it is its own CA)."""
        assert self.tls_dir is not None
        return self.tls_dir / "apiserver.crt"

    @property
    def port(self) -> int:
        assert self._httpd is not None
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_dir else 'http'}://127.0.0.1:{self.port}"

    def write_kubeconfig(self, path: Path) -> Path:
        cluster = {"server": self.url, **({"certificate-authority": str(self.ca_file)} if self.tls_dir else {})}
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": cluster}],
            "users": [{"name": "tester", "user": {"token": "emulator-token"}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester"}}],
        }, indent=1))
        path.chmod(0o644)
        return path

    # -- state (tests) ----------------------------------------------------------------------
    def put(self, plural: str, obj: Obj) -> Obj:
        """Create or replace an object; returns the stored copy (with uid, resourceVersion)."""
        k = KINDS[plural]
        obj = copy.deepcopy(obj)
        obj.setdefault("apiVersion", k.api_version)
        obj.setdefault("kind", k.kind)
        meta = obj.setdefault("metadata", {})
        if k.namespaced:
            meta.setdefault("namespace", "default")
        key = self._key(meta)
        with self.cond:
            old = self.objects[plural].get(key)
            if old is not None:
                meta.setdefault("uid", old["metadata"]["uid"])
                meta.setdefault("creationTimestamp", old["metadata"]["creationTimestamp"])
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", "2025-01-01T00:00:00Z")
            self.rv += 1
            meta["resourceVersion"] = str(self.rv)
            self.objects[plural][key] = obj
            self.history.append(Change(self.rv, plural, "MODIFIED" if old else "ADDED", obj, old))
            self.cond.notify_all()
        return copy.deepcopy(obj)

    def put_many(self, plural: str, objs: list[Obj]) -> None:
        for o in objs:
            self.put(plural, o)

    def delete(self, plural: str, name: str, namespace: str | None = "default") -> None:
        key = f"{namespace}/{name}" if KINDS[plural].namespaced else name
        with self.cond:
            old = self.objects[plural].pop(key)
            self.rv += 1
            gone = copy.deepcopy(old)
            gone["metadata"]["resourceVersion"] = str(self.rv)
            self.history.append(Change(self.rv, plural, "DELETED", gone, old))
            self.cond.notify_all()

    def get(self, plural: str, name: str, namespace: str | None = "default") -> Obj:
        key = f"{namespace}/{name}" if KINDS[plural].namespaced else name
        with self.cond:
            return copy.deepcopy(self.objects[plural][key])

    def compact(self) -> int:
        """Forget the history up to now: older resourceVersions are 410 Gone."""
        with self.cond:
            self.compacted_rv = self.rv
            self.history.clear()
            return self.rv

    def _select(self, plural: str | None) -> list[Watch]:
        return [w for w in self.watches if plural is None or w.plural == plural]

    def drop_watches(self, plural: str | None = None) -> int:
        """Reset the TCP connection of every open watch (of ``plural``)."""
        with self.cond:
            ws = self._select(plural)
        for w in ws:
            try:  # RST rather than FIN: the client sees a broken connection mid-chunk
                w.handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                w.handler.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return len(ws)

    def hang_watches(self, plural: str | None = None) -> int:
        """Open watches stop sending anything (events, bookmarks) but stay connected."""
        with self.cond:
            ws = self._select(plural)
            for w in ws:
                w.hung = True
            self.cond.notify_all()
        return len(ws)

    def expire_watches(self, plural: str | None = None) -> int:
        """Open watches get an ERROR event with a 410 Status and end (even hung ones)."""
        with self.cond:
            ws = self._select(plural)
            for w in ws:
                w.expire = True
            self.cond.notify_all()
        return len(ws)

    def set_time_scale(self, scale: float, bookmark_interval_s: float) -> None:
        """Watch durations (``timeoutSeconds``) times ``scale`` from now on, open watches included."""
        with self.cond:
            self.watch_time_scale = scale
            self.bookmark_interval_s = bookmark_interval_s
            self.cond.notify_all()

    def open_watches(self, plural: str | None = None) -> int:
        with self.cond:
            return len([w for w in self._select(plural) if not w.hung])

    def wait_watches(self, plural: str, n: int = 1, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.open_watches(plural) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"fewer than {n} open watches of {plural} after {timeout_s} s")
            time.sleep(0.02)

    def log(self, plural: str | None = None, *, watch: bool | None = None) -> list[Request]:
        with self.cond:
            reqs = list(self.requests)
        return [r for r in reqs if (plural is None or r.path.rstrip("/").endswith("/" + plural))
                and (watch is None or r.watch == watch)]

    # -- internals ------------------------------------------------------------------------
    @staticmethod
    def _key(meta: dict[str, Any]) -> str:
        return f"{meta['namespace']}/{meta['name']}" if meta.get("namespace") else str(meta["name"])

    def served(self, plural: str) -> bool:
        return plural != "endpointslices" or self.endpointslices

    def list_page(self, plural: str, match: Callable[[Obj], bool], limit: int, cont: str, rv: str,
                  req: Request) -> Obj:
        k = KINDS[plural]
        with self.cond:
            if cont:
                try:
                    snap_rv_s, token = base64.urlsafe_b64decode(cont.encode()).decode().split(":", 1)
                    snap_rv = int(snap_rv_s)
                except (ValueError, UnicodeDecodeError) as exc:
                    raise _HttpError(400, "BadRequest", f"invalid continue token: {exc}") from exc
                if snap_rv <= self.compacted_rv or token not in self._snapshots:
                    req.served_from = "gone"
                    raise _HttpError(410, "Expired", "The provided continue parameter is too old to display a "
                                                     "consistent list result. You can start a new list "
                                                     "without the continue parameter.")
                snap_rv, items = self._snapshots.pop(token)
                req.served_from = "etcd"
            else:
                if rv not in ("", "0"):
                    try:
                        min_rv = int(rv)
                    except ValueError as exc:
                        raise _HttpError(400, "BadRequest", f"invalid resourceVersion {rv!r}") from exc
                    if min_rv < self.compacted_rv:
                        req.served_from = "gone"
                        raise _HttpError(410, "Expired", f"too old resource version: {min_rv} "
                                                         f"({self.compacted_rv})")
                # The watch cache answers resourceVersion 0 and N whole, ignoring limit.
                req.served_from = "cache" if rv and self.watch_cache else "etcd"
                if req.served_from == "cache":
                    limit = 0
                snap_rv = self.rv
                items = [copy.deepcopy(o) for _, o in sorted(self.objects[plural].items()) if match(o)]
            meta: dict[str, Any] = {"resourceVersion": str(snap_rv)}
            if limit and len(items) > limit:
                items, rest = items[:limit], items[limit:]
                token = uuid.uuid4().hex
                self._snapshots[token] = (snap_rv, rest)
                meta["continue"] = base64.urlsafe_b64encode(f"{snap_rv}:{token}".encode()).decode()
                meta["remainingItemCount"] = len(rest)
        return {"kind": f"{k.kind}List", "apiVersion": k.api_version, "metadata": meta, "items": items}

    def changes_after(self, rv: int, plural: str) -> list[Change]:
        return [c for c in self.history if c.rv > rv and c.plural == plural]


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # dropped connections (our own test hook) are not errors worth a traceback


class _HttpError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


class _Handler(BaseHTTPRequestHandler):
    api: ApiServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # -- plumbing -------------------------------------------------------------------------
    def _send_json(self, code: int, body: Any, content_type: str = "application/json") -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _begin(self, method: str) -> tuple[str, dict[str, str], Request]:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        req = Request(method, url.path, query, self.headers.get("User-Agent", ""))
        with self.api.cond:
            self.api.requests.append(req)
        return url.path.rstrip("/") or "/", query, req

    def _authorized(self) -> bool:
        tokens = self.api.tokens
        header = self.headers.get("Authorization", "")
        return tokens is None or (header.startswith("Bearer ") and header[len("Bearer "):] in tokens)

    def do_GET(self) -> None:
        path, query, req = self._begin("GET")
        try:
            if not self._authorized():
                raise _HttpError(401, "Unauthorized", "Unauthorized")
            self._route(path, query, req)
        except _HttpError as exc:
            self._send_json(exc.code, status(exc.code, exc.reason, exc.message))
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True

    def do_POST(self) -> None:
        """SelfSubjectAccessReviews only: allowed unless ``denied`` names the attributes."""
        path, _, _ = self._begin("POST")
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if 0 < length <= 1 << 20 else b""
        try:
            if not self._authorized():
                raise _HttpError(401, "Unauthorized", "Unauthorized")
            if path != "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews":
                raise _HttpError(405, "MethodNotAllowed", f"POST is not supported on {path}")
            try:
                review = json.loads(body)
                attrs = review["spec"]["resourceAttributes"]
                key = (str(attrs["verb"]), str(attrs.get("group", "")), str(attrs["resource"]))
            except (ValueError, KeyError, TypeError) as exc:
                raise _HttpError(400, "BadRequest", f"not a SelfSubjectAccessReview: {exc}") from exc
            allowed = key not in self.api.denied
            review["status"] = {"allowed": allowed, **({} if allowed else {"reason": "no RBAC policy matched"})}
            self._send_json(201, review)
        except _HttpError as exc:
            self._send_json(exc.code, status(exc.code, exc.reason, exc.message))
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True

    def _route(self, path: str, query: dict[str, str], req: Request) -> None:
        api = self.api
        if path == "/version":
            return self._send_json(200, VERSION)
        if path == "/api":
            return self._send_json(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{api.port}"}]})
        if path == "/apis":
            groups = [{"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
                       "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v}}
                      for g, v in GROUPS.items() if g != "discovery.k8s.io" or api.endpointslices]
            return self._send_json(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        parts = path.strip("/").split("/")
        if parts[0] == "api" and len(parts) >= 2:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[0] == "apis" and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
            if group not in GROUPS or GROUPS[group] != version or (group == "discovery.k8s.io"
                                                                   and not api.endpointslices):
                raise _HttpError(404, "NotFound", "the server could not find the requested resource")
        else:
            raise _HttpError(404, "NotFound", "the server could not find the requested resource")
        if version != "v1":
            raise _HttpError(404, "NotFound", "the server could not find the requested resource")
        kinds = [k for k in KINDS.values() if k.group == group and api.served(k.plural)]
        if not rest:
            return self._send_json(200, {"kind": "APIResourceList", "apiVersion": "v1",
                                         "groupVersion": f"{group}/{version}" if group else version,
                                         "resources": [k.resource() for k in kinds]})
        namespace = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        by_name = {k.plural: k for k in kinds}
        if rest[0] not in by_name or len(rest) > 2:
            raise _HttpError(404, "NotFound", "the server could not find the requested resource")
        plural = rest[0]
        if plural in api.forbidden:
            scope = f' in the namespace "{namespace}"' if namespace else " at the cluster scope"
            raise _HttpError(403, "Forbidden", f'{plural} is forbidden: User "tester" cannot list resource '
                                               f'"{plural}" in API group "{group}"{scope}')
        if len(rest) == 2:
            key = f"{namespace}/{rest[1]}" if by_name[plural].namespaced else rest[1]
            with api.cond:
                obj = api.objects[plural].get(key)
            if obj is None:
                raise _HttpError(404, "NotFound", f'{plural} "{rest[1]}" not found')
            return self._send_json(200, obj)
        try:
            fmatch = field_matcher(query.get("fieldSelector", ""), plural)
        except BadSelector as exc:
            raise _HttpError(400, "BadRequest", str(exc)) from exc
        lmatch = label_matcher(query.get("labelSelector", ""))

        def match(o: Obj) -> bool:
            return (namespace is None or o["metadata"].get("namespace") == namespace) and fmatch(o) and lmatch(o)

        if query.get("watch", "") in _TRUE:
            return self._watch(plural, match, query)
        if api.garbage.get(plural) == "list":
            del api.garbage[plural]
            data = b'{"kind": "PodList", "items": [{"metadata": {"name": "trunc'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return None
        limit = int(query.get("limit") or 0)
        return self._send_json(200, api.list_page(plural, match, limit, query.get("continue", ""),
                                                  query.get("resourceVersion", ""), req))

    # -- watch ------------------------------------------------------------------------------
    def _watch(self, plural: str, match: Callable[[Obj], bool], query: dict[str, str]) -> None:
        api = self.api
        k = KINDS[plural]
        rv_s = query.get("resourceVersion", "")
        timeout_s = float(query.get("timeoutSeconds") or api.default_watch_timeout_s)
        bookmarks = query.get("allowWatchBookmarks", "") in _TRUE
        too_old = False
        with api.cond:
            if rv_s in ("", "0"):  # "any"/"most recent": synthetic ADDED for the current state
                rv = api.rv
                initial = [Change(rv, plural, "ADDED", copy.deepcopy(o), None)
                           for _, o in sorted(api.objects[plural].items())]
            else:
                try:
                    rv = int(rv_s)
                except ValueError as exc:
                    raise _HttpError(400, "BadRequest", f"invalid resourceVersion {rv_s!r}") from exc
                initial = []
                too_old = rv < api.compacted_rv
                if too_old and api.gone_as_http:
                    raise _HttpError(410, "Expired", f"too old resource version: {rv} ({api.compacted_rv})")
            w = Watch(plural, self)
            api.watches.append(w)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            if too_old:
                self._event("ERROR", status(410, "Expired", f"too old resource version: {rv} ({api.compacted_rv})"))
            else:
                self._stream(w, k, rv, initial, match, timeout_s, bookmarks)
            self._chunk(b"")  # end of the chunked body: a clean close of the watch
        finally:
            with api.cond:
                api.watches.remove(w)

    def _event(self, type_: str, obj: Obj) -> None:
        self._chunk(json.dumps({"type": type_, "object": obj}).encode() + b"\n")

    def _stream(self, w: Watch, k: Kind, rv: int, initial: list[Change], match: Callable[[Obj], bool],
                timeout_s: float, bookmarks: bool) -> None:
        api = self.api
        opened = time.monotonic()

        def deadline() -> float:  # follows set_time_scale, like every wait below
            return opened + timeout_s * api.watch_time_scale

        next_bookmark = time.monotonic() + api.bookmark_interval_s
        for c in initial:
            if match(c.obj):
                self._event("ADDED", c.obj)
        while True:
            with api.cond:
                while True:
                    now = time.monotonic()
                    pending = [] if w.hung else api.changes_after(rv, w.plural)
                    next_bookmark = min(next_bookmark, now + api.bookmark_interval_s)
                    if w.expire or pending or now >= deadline() or (bookmarks and not w.hung
                                                                      and now >= next_bookmark):
                        break
                    wake = deadline() if w.hung or not bookmarks else min(deadline(), next_bookmark)
                    api.cond.wait(max(0.0, wake - now))
                expire, head_rv = w.expire, api.rv
            if w.hung and not expire:
                return  # the deadline passed while hung: close (the client has likely gone by now)
            for c in pending:
                rv = c.rv
                now_in, was_in = match(c.obj), c.old is not None and match(c.old)
                if c.type == "DELETED":
                    if was_in:
                        self._event("DELETED", c.obj)
                elif now_in and not was_in:
                    self._event("ADDED", c.obj)
                elif now_in:
                    self._event("MODIFIED", c.obj)
                elif was_in:  # moved out of this watch's selector
                    self._event("DELETED", c.obj)
            if expire:  # what was pending went out first, as from a watcher that falls behind
                self._event("ERROR", status(410, "Expired", "The resourceVersion for the provided watch is too old."))
                return
            if api.garbage.get(w.plural) == "watch":
                del api.garbage[w.plural]
                self._chunk(b'{"type": "MODIFIED", "object": {"metadata": {"name": "tr\n')
                self._chunk(b"this is not json\n")
                return
            if bookmarks and time.monotonic() >= next_bookmark:
                rv = max(rv, head_rv)
                self._event("BOOKMARK", {"kind": k.kind, "apiVersion": k.api_version,
                                         "metadata": {"resourceVersion": str(rv)}})
                next_bookmark = time.monotonic() + api.bookmark_interval_s
            if time.monotonic() >= deadline():
                return


def iter_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    buf = b""
    for c in chunks:
        buf += c
        *lines, buf = buf.split(b"\n")
        yield from (line for line in lines if line)
