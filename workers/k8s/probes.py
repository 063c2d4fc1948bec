"""Can the k8s family's workers run here? (``WorkerInfo.probe``)

Importing this module does not import the ``kubernetes`` client: the
supervisor probes with it, and the kubectl fallback runs precisely where
that client cannot be used."""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import shutil
import subprocess
from typing import Any

from cnisup.protocol.settings import Config
from cnisup.workers import privileges
from cnisup.workers.errors import CapabilityMissing, NoClusterConfig
from cnisup.workers.k8s import events
from cnisup.workers.probe import Probe

#: Seconds ``kubectl version --client`` may take.
KUBECTL_VERSION_TIMEOUT_S = 5.0


def _access(cfg: Config, details: dict[str, Any]) -> CapabilityMissing | None:
    """Where the k8s workers' client configuration comes from; why not, if nowhere."""
    details["pod_scope"] = cfg.kubernetes.pod_scope
    details["in_cluster_env"] = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    # As the worker looks: with the environment spawn passes and the workers user's home.
    env = {k: v for k, v in os.environ.items() if k in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST",
                                                        "KUBERNETES_SERVICE_PORT")}
    account = privileges.workers_account(cfg.workers.user)[0] if os.geteuid() == 0 else pwd.getpwuid(os.getuid())
    env["HOME"] = account.pw_dir
    try:
        access = events.locate(cfg.kubernetes.kubeconfig, env)
    except CapabilityMissing as exc:
        return exc
    details["client_config"] = {"mode": access.mode, "path": access.path, "from": access.origin}
    if access.mode == "kubeconfig" and os.geteuid() == 0 and not os.stat(access.path).st_mode & 0o004:
        details["warning"] = f"{access.path} is not world-readable: the workers user may not read it"
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
    try:
        out = subprocess.run([path, "version", "--client", "-o", "json"], capture_output=True, text=True,
                             timeout=KUBECTL_VERSION_TIMEOUT_S, check=False)
        details["version"] = json.loads(out.stdout)["clientVersion"]["gitVersion"]
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError) as exc:
        details["version_error"] = str(exc)
    missing = _access(cfg, details)
    if missing:
        return Probe(False, str(missing), details, idle=isinstance(missing, NoClusterConfig))
    return Probe(True, f"kubectl {details.get('version', '?')}; config from {details['client_config']['from']}",
                 details)
