"""The kubectl fallback exists for hosts where the ``kubernetes`` client cannot
be used: it must run there, importing nothing of that client."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import WorkerRun

from . import objects as o
from .apiserver import ApiServer
from .support import identity

NODE = "test-node"
pytestmark = pytest.mark.skipif(not any(os.access(os.path.join(d, "kubectl"), os.X_OK)
                                        for d in os.environ.get("PATH", "").split(":")),
                                reason="kubectl is not installed")


@pytest.fixture
def blocked_client(k8s_tmp: Path) -> Path:
    """A PYTHONPATH entry whose ``kubernetes`` package fails to import."""
    shim = k8s_tmp / "no-kubernetes"
    (shim / "kubernetes").mkdir(parents=True)
    (shim / "kubernetes" / "__init__.py").write_text('raise ImportError("the kubernetes client is blocked here")\n')
    shim.chmod(0o755)
    (shim / "kubernetes").chmod(0o755)
    return shim


@pytest.fixture
def worker(api: ApiServer, kubeconfig: Path, k8s_tmp: Path, blocked_client: Path) -> Iterator[WorkerRun]:
    pythonpath = ":".join(filter(None, [str(blocked_client), os.environ.get("PYTHONPATH", "")]))
    run = WorkerRun("kubectl", {"kubernetes": {"kubeconfig": str(kubeconfig), "read_timeout": 30.0}},
                    tmp=k8s_tmp, identity=identity(), heartbeat_interval_s=0.5, env={"PYTHONPATH": pythonpath})
    try:
        yield run
        if run.proc is not None and run.proc.poll() is None:
            assert run.stop() == 0, run.stderr()
        assert not run.problems, run.problems[:5]
    finally:
        run.close()


def test_the_shim_really_blocks_the_client(blocked_client: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(blocked_client)}
    out = subprocess.run([sys.executable, "-c", "import kubernetes"], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "blocked here" in out.stderr


def test_kubectl_fallback_runs_without_the_kubernetes_client(api: ApiServer, worker: WorkerRun) -> None:
    api.put("pods", o.pod("web-0", NODE, ["10.22.0.5"]))
    worker.start(ready_timeout_s=20)
    assert worker.exit_status() is None, worker.stderr()
    got = worker.wait_for("k8s.pod.ip_allocated", name="web-0", timeout_s=20)
    assert got.data["ips"] == ["10.22.0.5"] and got.data["initial"] is True
    api.put("pods", o.pod("web-1", NODE, ["10.22.0.6"]))
    worker.wait_for("k8s.pod.ip_allocated", name="web-1", timeout_s=20)
