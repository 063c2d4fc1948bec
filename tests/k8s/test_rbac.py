"""The RBAC that ships in packaging/k8s, and ``cnisup check``'s verification of
every permission the workers need (SelfSubjectAccessReview), against the
emulator, the real kubectl and the real ``cnisup`` command."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e.support import CNISUP
from harness import WorkerRun

from cnisup.workers.k8s import probes

from . import objects as o
from .apiserver import ApiServer
from .support import config
from .test_k8s_supervised import NODE, k8s_cnisup

PACKAGING = Path(__file__).resolve().parents[2] / "packaging" / "k8s"
RBAC = PACKAGING / "rbac.yaml"
TOKEN = "cnisup-node-token"


@pytest.fixture
def tls_api(k8s_tmp: Path) -> Iterator[ApiServer]:
    """Over TLS: kubectl sends no bearer token to a plain-HTTP server."""
    (k8s_tmp / "tls").mkdir()
    server = ApiServer(tls_dir=k8s_tmp / "tls").start()
    server.tokens = {TOKEN}
    yield server
    server.stop()


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kubectl(kubeconfig: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["kubectl", "--kubeconfig", str(kubeconfig), "--cache-dir", str(tmp / "cache"), *args],
                          capture_output=True, text=True, timeout=30)


def test_the_cluster_role_grants_exactly_what_the_workers_watch() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _docs(RBAC)}
    role = docs[("ClusterRole", "cnisup-observer")]
    granted = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    needed = {(p.group, p.resource, p.verb) for slices in (True, False)
              for p in probes.permissions(endpointslices=slices)}
    assert granted == needed  # nothing missing, nothing more (no get, no write)
    binding = docs[("ClusterRoleBinding", "cnisup-observer")]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": "cnisup-observer"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "cnisup", "namespace": "cnisup"}]
    secret = docs[("Secret", "cnisup-token")]
    assert secret["type"] == "kubernetes.io/service-account-token"
    assert secret["metadata"]["annotations"]["kubernetes.io/service-account.name"] == "cnisup"
    assert ("ServiceAccount", "cnisup") in docs and ("Namespace", "cnisup") in docs


def test_kubectl_apply_dry_run_accepts_the_manifests(api: ApiServer, kubeconfig: Path, k8s_tmp: Path) -> None:
    out = _kubectl(kubeconfig, k8s_tmp, "apply", "--dry-run=client", "--validate=false", "-f", str(RBAC))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:5] == [
        "namespace/cnisup created (dry run)", "serviceaccount/cnisup created (dry run)",
        "secret/cnisup-token created (dry run)",
        "clusterrole.rbac.authorization.k8s.io/cnisup-observer created (dry run)",
        "clusterrolebinding.rbac.authorization.k8s.io/cnisup-observer created (dry run)"]
    broken = k8s_tmp / "broken.yaml"
    broken.write_text(RBAC.read_text().replace("kind: ClusterRoleBinding", "kind: ClusterRoleBindin"))
    out = _kubectl(kubeconfig, k8s_tmp, "apply", "--dry-run=client", "--validate=false", "-f", str(broken))
    assert out.returncode != 0 and "ClusterRoleBindin" in out.stderr


def _node_kubeconfig(api: ApiServer, tmp: Path, token: str = TOKEN) -> Path:
    """The template filled in as packaging/deb/README.md says, with the token in its file."""
    files = tmp / "etc-k8s"
    files.mkdir(exist_ok=True)
    (files / "token").write_text(token + "\n")  # a trailing newline, as `echo $TOKEN >` leaves
    shutil.copy(api.ca_file, files / "ca.crt")
    for f in files.iterdir():
        f.chmod(0o644)
    files.chmod(0o755)
    text = (PACKAGING / "kubeconfig.template").read_text()
    path = tmp / "node-kubeconfig"
    path.write_text(text.replace("@SERVER@", api.url).replace("/etc/cnisup/k8s", str(files)))
    path.chmod(0o644)
    return path


def test_the_kubeconfig_template_works_for_both_workers(run_worker: Any, tls_api: ApiServer, k8s_tmp: Path) -> None:
    api = tls_api
    api.put("pods", o.pod("web", NODE, ["10.244.1.5"]))
    kc = _node_kubeconfig(api, k8s_tmp)
    for worker in ("k8s-informer", "kubectl"):
        run: WorkerRun = run_worker(worker, config(kc))
        run.wait_for("k8s.pod.ip_allocated", name="web", timeout_s=20)
        assert run.stop() == 0
    out = _kubectl(_node_kubeconfig(api, k8s_tmp, "wrong"), k8s_tmp, "get", "pods", "-A")
    assert out.returncode != 0 and "must be logged in" in out.stderr  # the token is what lets it in


def _check(base: Path, kubeconfig: Path) -> tuple[dict[str, Any], str]:
    c = k8s_cnisup(base, "k8s-informer", kubeconfig)
    run = [CNISUP, "check", "--config", str(c.config_path)]
    as_json = subprocess.run([*run, "--json"], capture_output=True, text=True, timeout=60, check=True)
    human = subprocess.run(run, capture_output=True, text=True, timeout=60, check=True)
    fam = next(f for f in json.loads(as_json.stdout)["families"] if f["family"] == "k8s")
    return fam["audits"]["rbac"], human.stdout


def test_check_names_each_missing_permission(tls_api: ApiServer, k8s_tmp: Path) -> None:
    api = tls_api
    kc = _node_kubeconfig(api, k8s_tmp)
    rbac, human = _check(k8s_tmp, kc)
    needed = probes.permissions(endpointslices=True)
    assert rbac["ok"] is True and rbac["reason"].startswith(f"all {len(needed)} permissions granted")
    reviews = [r for r in api.log() if r.method == "POST"]  # one per permission, per check run (two)
    assert len(reviews) == 2 * len(needed) and {r.path for r in reviews} == \
        {"/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"}
    assert f"  ok   rbac: all {len(needed)} permissions granted" in human

    api.denied = {("watch", "", "events"), ("list", "networking.k8s.io", "networkpolicies")}
    rbac, human = _check(k8s_tmp, kc)
    assert rbac["ok"] is False and rbac["reason"].startswith(f"2 of {len(needed)} permissions missing")
    assert [m.split(":")[0] for m in rbac["missing"]] == [
        "list networkpolicies.networking.k8s.io (all namespaces)", "watch events (all namespaces)"]
    lines = human.splitlines()
    assert f"  FAIL rbac: 2 of {len(needed)} permissions missing" in "\n".join(lines)
    assert any(line.startswith("       missing: watch events (all namespaces)") for line in lines)
    assert any(line.startswith("       missing: list networkpolicies.networking.k8s.io") for line in lines)


def test_check_on_a_server_without_endpointslices_asks_for_endpoints(k8s_tmp: Path) -> None:
    server = ApiServer(endpointslices=False).start()
    try:
        server.denied = {("list", "", "endpoints")}
        rbac, _ = _check(k8s_tmp, server.write_kubeconfig(k8s_tmp / "kc-old"))
        assert rbac["missing"][0].startswith("list endpoints (all namespaces)") and len(rbac["missing"]) == 1
        asked = {json.dumps(r.query) for r in server.log() if r.method == "POST"}
        assert asked and not any("endpointslices" in r.path for r in server.log())
    finally:
        server.stop()


@pytest.mark.parametrize("case", ["wrong-token", "exec-plugin", "unreachable"])
def test_check_says_why_it_could_not_check(tls_api: ApiServer, k8s_tmp: Path, case: str) -> None:
    api = tls_api
    kc = _node_kubeconfig(api, k8s_tmp, "wrong" if case == "wrong-token" else TOKEN)
    if case == "exec-plugin":
        doc = yaml.safe_load(kc.read_text())
        doc["users"][0]["user"] = {"exec": {"apiVersion": "client.authentication.k8s.io/v1",
                                            "command": "aws", "args": ["eks", "get-token"]}}
        kc.write_text(yaml.safe_dump(doc))
    elif case == "unreachable":
        kc.write_text(kc.read_text().replace(api.url, "https://127.0.0.1:9"))
    rbac, human = _check(k8s_tmp, kc)
    assert rbac["ok"] is False and rbac["reason"].startswith("not checked: ")
    expected = {"wrong-token": "the credentials were refused (HTTP 401", "exec-plugin": "exec plugin",
                "unreachable": "Connection refused"}[case]
    assert expected in rbac["reason"], rbac
    assert "FAIL rbac: not checked" in human


def test_check_without_client_configuration_runs_no_review(k8s_tmp: Path) -> None:
    """No kubeconfig: the probes say so, and there is nothing to review with."""
    c = k8s_cnisup(k8s_tmp, "k8s-informer", k8s_tmp / "missing")
    out = subprocess.run([CNISUP, "check", "--json", "--config", str(c.config_path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and "no worker can run for: k8s" in out.stderr  # a configured file is missing
    fam = next(f for f in json.loads(out.stdout)["families"] if f["family"] == "k8s")
    assert fam["audits"] == {} and "no such file" in fam["reason"]  # nothing to check with
