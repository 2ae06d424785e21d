"""The Helm chart: lint, render, validate against Kubernetes 1.29 and 1.33, and check the rendered objects."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.tools import ensure_helm

CHART = Path(__file__).resolve().parent.parent / "helm" / "sidecar"
VALUE_SETS = {
    "default": [],
    "upstream": ["--set", "mode=upstream", "--set", "upstream.url=http://vllm.models.svc:8000/v1"],
    "old-cluster": ["--set", "nativeSidecar=false"],
    "postgres": [
        "--set",
        "store.type=postgres",
        "--set",
        "secrets.postgresDsn=postgresql://u:p@db:5432/s",
        "--set",
        "secrets.adminToken=t",
    ],
    "pvc-existing-secret": [
        "--set",
        "store.persistence.enabled=true",
        "--set",
        "secrets.create=false",
        "--set",
        "secrets.existingSecret=mine",
        "--set",
        "sidecar.auditCapture=all",
    ],
}


@pytest.fixture(scope="module")
def helm() -> str:
    try:
        return ensure_helm()
    except (RuntimeError, subprocess.CalledProcessError, OSError) as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"helm unavailable in CI: {exc}")
        pytest.skip(f"helm unavailable: {exc}")


def render(helm: str, *args: str) -> list[dict]:
    out = subprocess.run([helm, "template", "t", str(CHART), *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_lint_strict(helm, name):
    out = subprocess.run(
        [helm, "lint", "--strict", str(CHART), *VALUE_SETS[name]], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("version", ["1.29.0", "1.33.0"])
@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_kubernetes_validate(helm, tmp_path, name, version):
    docs = render(helm, *VALUE_SETS[name])
    files = []
    for i, doc in enumerate(docs):
        path = tmp_path / f"{i}.yaml"
        path.write_text(yaml.safe_dump(doc))
        files.append(str(path))
    validator = shutil.which("kubernetes-validate") or str(Path(sys.executable).parent / "kubernetes-validate")
    out = subprocess.run([validator, "--strict", "-k", version, *files], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_native_sidecar_shape(helm):
    (deploy,) = by_kind(render(helm), "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    (sidecar,) = pod["initContainers"]
    assert sidecar["name"] == "sidecar" and sidecar["restartPolicy"] == "Always"
    assert [c["name"] for c in pod["containers"]] == ["vllm"]
    vllm = pod["containers"][0]
    assert "--host=127.0.0.1" in vllm["args"]
    assert vllm["startupProbe"]["failureThreshold"] * vllm["startupProbe"]["periodSeconds"] >= 1800
    for probe in ("startupProbe", "livenessProbe"):
        assert sidecar[probe]["httpGet"]["path"] == "/healthz"  # never vLLM: no start-up deadlock
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["terminationGracePeriodSeconds"] > 5 + 5 + 30  # preStop + drain grace + drain timeout
    assert sidecar["lifecycle"]["preStop"]["sleep"]["seconds"] == 5
    (svc,) = by_kind(render(helm), "Service")
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    assert [p["name"] for p in sidecar["ports"]] == ["http"] and "ports" not in vllm


def test_old_cluster_toggle_and_upstream_mode(helm):
    (deploy,) = by_kind(render(helm, *VALUE_SETS["old-cluster"]), "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    assert "initContainers" not in pod and [c["name"] for c in pod["containers"]] == ["sidecar", "vllm"]
    assert "restartPolicy" not in pod["containers"][0]
    docs = render(helm, *VALUE_SETS["upstream"])
    pod = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["sidecar"] and "initContainers" not in pod
    config = by_kind(docs, "ConfigMap")[0]["data"]["sidecar.toml"]
    assert 'url = "http://vllm.models.svc:8000/v1"' in config


def test_restricted_security(helm):
    pod = by_kind(render(helm), "Deployment")[0]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for container in pod["initContainers"] + pod["containers"]:
        ctx = container["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"]["drop"] == ["ALL"]
    assert pod["initContainers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False


def test_config_and_secrets_wiring(helm):
    docs = render(helm, *VALUE_SETS["postgres"])
    pod = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["initContainers"][0]["env"]}
    assert env["SIDECAR_STORE_URL"]["valueFrom"]["secretKeyRef"]["key"] == "postgres-dsn"
    annotations = by_kind(docs, "Deployment")[0]["spec"]["template"]["metadata"]["annotations"]
    assert len(annotations["checksum/config"]) == 64
    secret = by_kind(docs, "Secret")[0]
    assert secret["stringData"]["admin-token"] == "t" and len(secret["stringData"]["pepper"]) == 48
    docs = render(helm, *VALUE_SETS["pvc-existing-secret"])
    assert by_kind(docs, "Secret") == [] and by_kind(docs, "PersistentVolumeClaim")
    volumes = {v["name"]: v for v in by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["secrets"]["secret"]["secretName"] == "mine"
    assert "persistentVolumeClaim" in volumes["data"]


def test_service_monitor_only_with_the_crd(helm):
    assert by_kind(render(helm), "ServiceMonitor") == []
    docs = render(helm, "--api-versions", "monitoring.coreos.com/v1/ServiceMonitor")
    assert by_kind(docs, "ServiceMonitor")[0]["spec"]["endpoints"][0]["path"] == "/metrics"


@pytest.mark.parametrize(
    "bad",
    [
        ["--set", "mode=bogus"],
        ["--set", "sidecar.port=0"],
        ["--set", "store.type=mysql"],
        ["--set", "sidecar.auditCapture=maybe"],
        ["--set", "mode=upstream"],
    ],
)
def test_bad_values_are_rejected(helm, bad):
    out = subprocess.run([helm, "template", "t", str(CHART), *bad], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
