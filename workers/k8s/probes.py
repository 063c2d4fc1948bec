"""Can the k8s family's workers run here? (``WorkerInfo.probe``) And, for
``cnisup check`` only (``audit``), does the API server grant them every
permission they need?

Importing this module does not import the ``kubernetes`` client: the
supervisor probes with it, and the kubectl fallback runs precisely where
that client cannot be used."""

from __future__ import annotations

import base64
import http.client
import importlib.util
import json
import os
import pwd
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cnisup.protocol.settings import Config
from cnisup.workers import privileges
from cnisup.workers.errors import CapabilityMissing, NoClusterConfig
from cnisup.workers.k8s import events
from cnisup.workers.probe import Probe

#: Seconds ``kubectl version --client`` may take.
KUBECTL_VERSION_TIMEOUT_S = 5.0


def _locate(cfg: Config) -> events.Access:
    """The client configuration the workers will use, looked for as they look: with the
    environment spawn passes and the workers user's home. Raises ``CapabilityMissing``."""
    env = {k: v for k, v in os.environ.items() if k in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST",
                                                        "KUBERNETES_SERVICE_PORT")}
    env["HOME"] = _account(cfg).pw_dir
    return events.locate(cfg.kubernetes.kubeconfig, env)


def _account(cfg: Config) -> pwd.struct_passwd:
    return privileges.workers_account(cfg.workers.user)[0] if os.geteuid() == 0 else pwd.getpwuid(os.getuid())


def _readable_by(path: str, account: pwd.struct_passwd) -> bool:
    """By mode bits, as the workers (that user and its primary group, nothing else) would be."""
    st = os.stat(path)
    bit = 0o400 if st.st_uid == account.pw_uid else 0o040 if st.st_gid == account.pw_gid else 0o004
    return account.pw_uid == 0 or bool(st.st_mode & bit)


def _access(cfg: Config, details: dict[str, Any]) -> CapabilityMissing | None:
    """Where the k8s workers' client configuration comes from; why not, if nowhere."""
    details["pod_scope"] = cfg.kubernetes.pod_scope
    details["in_cluster_env"] = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    try:
        access = _locate(cfg)
    except CapabilityMissing as exc:
        return exc
    details["client_config"] = {"mode": access.mode, "path": access.path, "from": access.origin}
    if access.mode == "kubeconfig":
        try:
            events.read_kubeconfig(access)  # what neither worker could use is said here, once
        except (OSError, ValueError) as exc:
            return CapabilityMissing(str(exc) if isinstance(exc, ValueError) else f"{access.path}: {exc.strerror}")
    account = _account(cfg)
    if access.mode == "kubeconfig" and os.geteuid() == 0 and not _readable_by(access.path, account):
        details["warning"] = f"{access.path} is not readable by {account.pw_name}, whom the workers run as"
    return None


def informer(cfg: Config) -> Probe:
    details: dict[str, Any] = {}
    if importlib.util.find_spec("kubernetes") is None:
        return Probe(False, "the kubernetes Python client is not installed (python3-kubernetes)", details)
    missing = _access(cfg, details)
    if missing:
        return Probe(False, str(missing), details, idle=isinstance(missing, NoClusterConfig))
    return Probe(True, f"kubernetes client; config from {details['client_config']['from']}", details)


def kubectl(cfg: Config) -> Probe:
    details: dict[str, Any] = {}
    path = shutil.which("kubectl", path=os.environ.get("PATH", os.defpath))
    if path is None:
        return Probe(False, f"kubectl not found in PATH ({os.environ.get('PATH', '')})", details)
    details["kubectl"] = path
    # The configuration first: on a node without Kubernetes the family is re-probed every
    # restart.reprobe_interval, and ``kubectl version`` costs ~0.1 s of CPU each time.
    missing = _access(cfg, details)
    if missing:
        return Probe(False, str(missing), details, idle=isinstance(missing, NoClusterConfig))
    try:
        out = subprocess.run([path, "version", "--client", "-o", "json"], capture_output=True, text=True,
                             timeout=KUBECTL_VERSION_TIMEOUT_S, check=False)
        details["version"] = json.loads(out.stdout)["clientVersion"]["gitVersion"]
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError) as exc:
        details["version_error"] = str(exc)
    return Probe(True, f"kubectl {details.get('version', '?')}; config from {details['client_config']['from']}",
                 details)


# -- cnisup check: the permissions the workers need (SelfSubjectAccessReview) ------------------
#
# Plain urllib, not the kubernetes client (the supervisor stays small, and the kubectl fallback
# runs where that client cannot be imported) and not ``kubectl auth can-i`` (kubectl is only
# suggested by the package, and it would be one process per permission): one POST per
# permission with the credentials the workers use. Covered: bearer tokens (token, tokenFile,
# in-cluster), client certificates, the cluster's CA or insecure-skip-tls-verify. A kubeconfig
# whose user runs an exec or auth-provider plugin is not checked here; the report says so.

#: Seconds for each request of the permission check, and for all of them together.
AUDIT_REQUEST_TIMEOUT_S = 5.0
AUDIT_TIMEOUT_S = 15.0
#: Bytes of a response the check reads (a review is a few hundred).
AUDIT_MAX_RESPONSE = 1 << 20
_SSAR_PATH = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"


@dataclass(frozen=True)
class Permission:
    verb: str
    group: str
    resource: str

    def __str__(self) -> str:  # as ``kubectl auth can-i`` names it
        return f"{self.verb} {self.resource}{'.' + self.group if self.group else ''}"


def permissions(*, endpointslices: bool) -> list[Permission]:
    """What the workers need, cluster-wide: list and watch of every collection they watch."""
    out: list[Permission] = []
    for r in events.resources(endpointslices=endpointslices):
        out += [p for p in (Permission(v, r.group, r.plural) for v in ("list", "watch")) if p not in out]
    return out


class _Unsupported(Exception):
    """Credentials this check cannot use (an exec or auth-provider plugin)."""


@dataclass
class _Endpoint:
    server: str
    context: ssl.SSLContext | None
    headers: dict[str, str]


def _data_or_file(entry: Mapping[str, Any], key: str, base: str, tmp: str) -> str | None:
    """The path of ``key`` (relative to the kubeconfig) or of ``key-data`` written to ``tmp``."""
    if entry.get(f"{key}-data"):
        path = os.path.join(tmp, key)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(base64.b64decode(str(entry[f"{key}-data"])))
        return path
    value = entry.get(key)
    return os.path.join(base, str(value)) if value else None


def _named(items: Any, name: Any, what: str) -> Mapping[str, Any]:
    for item in items if isinstance(items, list) else []:
        if isinstance(item, Mapping) and item.get("name") == name and isinstance(item.get(what), Mapping):
            return dict(item[what])
    raise ValueError(f"no {what} named {name!r}")


def _endpoint(access: events.Access, tmp: str) -> _Endpoint:
    if access.mode == "in-cluster":
        host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
        host = f"[{host}]" if ":" in host else host
        with open(os.path.join(access.path, "token")) as f:
            bearer = f.read().strip()
        return _Endpoint(f"https://{host}:{os.environ.get('KUBERNETES_SERVICE_PORT', '443')}",
                         ssl.create_default_context(cafile=os.path.join(access.path, "ca.crt")),
                         {"Authorization": f"Bearer {bearer}"})
    kc = events.read_kubeconfig(access)
    if not isinstance(kc, Mapping):
        raise ValueError("not a kubeconfig")
    context = _named(kc.get("contexts"), kc.get("current-context"), "context")
    cluster = _named(kc.get("clusters"), context.get("cluster"), "cluster")
    user = _named(kc.get("users"), context.get("user"), "user") if context.get("user") else {}
    if user.get("exec") or user.get("auth-provider"):
        raise _Unsupported("the kubeconfig's user authenticates with an "
                           f"{'exec' if user.get('exec') else 'auth-provider'} plugin")
    base = os.path.dirname(os.path.abspath(access.path))
    server = str(cluster.get("server") or "")
    ctx: ssl.SSLContext | None = None
    if server.startswith("https:"):
        ctx = ssl.create_default_context(cafile=_data_or_file(cluster, "certificate-authority", base, tmp))
        if cluster.get("insecure-skip-tls-verify"):
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        cert = _data_or_file(user, "client-certificate", base, tmp)
        if cert:
            ctx.load_cert_chain(cert, _data_or_file(user, "client-key", base, tmp))
    headers = {}
    token = str(user.get("token") or "")
    if not token and user.get("tokenFile"):
        with open(os.path.join(base, str(user["tokenFile"]))) as f:
            token = f.read().strip()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    elif user.get("username"):
        creds = f"{user['username']}:{user.get('password', '')}".encode()
        headers["Authorization"] = f"Basic {base64.b64encode(creds).decode()}"
    return _Endpoint(server.rstrip("/"), ctx, headers)


def _call(ep: _Endpoint, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(ep.server + path, data=data, method=method,
                                 headers={**ep.headers, "Accept": "application/json",
                                          **({"Content-Type": "application/json"} if data else {})})
    try:
        with urllib.request.urlopen(req, timeout=AUDIT_REQUEST_TIMEOUT_S, context=ep.context) as resp:
            status, raw = resp.status, resp.read(AUDIT_MAX_RESPONSE)
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read(AUDIT_MAX_RESPONSE)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None


def _review(ep: _Endpoint, p: Permission) -> tuple[bool, str]:
    """(allowed, why not) from one SelfSubjectAccessReview; no namespace: all namespaces."""
    status, body = _call(ep, "POST", _SSAR_PATH, {
        "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": {"verb": p.verb, "group": p.group, "resource": p.resource}}})
    result = body.get("status") if isinstance(body, Mapping) else None
    if status not in (200, 201) or not isinstance(result, Mapping):
        message = body.get("message") if isinstance(body, Mapping) else None
        raise _Refused(status, str(message or "not a SelfSubjectAccessReview")[:300])
    reason = " ".join(str(result.get(k)) for k in ("reason", "evaluationError") if result.get(k))
    return result.get("allowed") is True, reason[:300]


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def _has_endpointslices(ep: _Endpoint) -> bool:
    status, body = _call(ep, "GET", "/apis/discovery.k8s.io/v1")
    if status == 404:
        return False
    resources = body.get("resources") if isinstance(body, Mapping) else None
    return not isinstance(resources, list) or any(
        isinstance(r, Mapping) and r.get("name") == "endpointslices" for r in resources)


def rbac(cfg: Config) -> Probe:
    """Does the API server grant every permission the workers need? Names each one missing."""
    try:
        access = _locate(cfg)
    except CapabilityMissing as exc:
        return Probe(False, f"not checked: {exc}")
    details: dict[str, Any] = {"credentials": f"{access.path} ({access.origin})"}
    deadline = time.monotonic() + AUDIT_TIMEOUT_S
    try:
        with tempfile.TemporaryDirectory(prefix="cnisup-check-") as tmp:
            ep = _endpoint(access, tmp)
            details["server"] = ep.server
            needed = permissions(endpointslices=_has_endpointslices(ep))
            missing: list[str] = []
            for p in needed:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no answer for every permission within {AUDIT_TIMEOUT_S:g} s")
                allowed, why = _review(ep, p)
                if not allowed:
                    missing.append(f"{p} (all namespaces){': ' + why if why else ''}")
    except _Unsupported as exc:
        return Probe(False, f"not checked: {exc}; try `kubectl auth can-i --list`", details)
    except _Refused as exc:
        what = "the credentials were refused" if exc.status == 401 else "the review was refused"
        return Probe(False, f"not checked: {what} ({exc})", details)
    except (OSError, ValueError, ssl.SSLError, urllib.error.URLError, http.client.HTTPException) as exc:
        return Probe(False, f"not checked: {type(exc).__name__}: {exc}"[:400], details)
    if missing:
        details["missing"] = missing
        return Probe(False, f"{len(missing)} of {len(needed)} permissions missing: list/watch are needed on "
                            "every watched collection (packaging/k8s/rbac.yaml grants them)", details)
    return Probe(True, f"all {len(needed)} permissions granted ({', '.join(sorted({p.resource for p in needed}))}: "
                       "list, watch)", details)


def audit(cfg: Config) -> dict[str, Probe]:
    """The checks only ``cnisup check`` runs (they ask the API server): see supervisor/probes.py."""
    return {"rbac": rbac(cfg)}
