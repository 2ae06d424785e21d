"""The Helm chart: lint, render every documented values combination for every Kubernetes minor the chart claims,
validate the manifests offline (kubernetes-validate --strict), refuse the combinations that would lose data or
cannot work, render byte-identically twice, and check the rendered objects' shape.

Renders are cached per (combination, Kubernetes version); each version's manifests go to one kubernetes-validate
process, so the whole file stays at a few seconds of helm and validator time.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
import tempfile
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from tests.support.helm import CHART, KUBE_VERSIONS, LATEST, PEPPER, helm_run, render_values

DSN = "postgresql://u:p@db:5432/s"
FULL = "t-sidecar"  # release "t"

# Every documented values combination. Each is rendered for every Kubernetes version and validated.
COMBOS: dict[str, dict] = {
    # SQLite, one replica, PVC, native sidecar next to vLLM: the defaults (a pepper is the one required value).
    "sqlite-default": {"secrets": {"pepper": PEPPER}},
    "postgres-ha": {
        "replicaCount": 3,
        "store": {"type": "postgres"},
        "secrets": {
            "pepper": PEPPER,
            "postgresDsn": DSN,
            "adminToken": "admin-token-0123",
            "oidcClientSecret": "oidc-secret",
            "exportToken": "om-token",
        },
        "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6},
        "export": {"url": "https://openmeter.example/api/v1/events"},
        "sidecar": {
            "config": {
                "console": {
                    "enabled": True,
                    "oidc_issuer": "https://login.example.com/realms/platform",
                    "oidc_client_id": "sidecar-console",
                    "oidc_operator_claim": "groups=platform",
                    "oidc_viewer_claim": "groups=readers",
                }
            }
        },
    },
    "existing-secret": {
        "store": {"type": "postgres"},
        "replicaCount": 2,
        "secrets": {"create": False, "existingSecret": "mine"},
        "admin": {"enabled": True},
        "upstreamAuth": {"enabled": True},
        "staticKeys": {"enabled": True},
        "oidc": {"enabled": True},
        "export": {"url": "https://openmeter.example/api/v1/events", "auth": True},
        "sidecar": {"auditCapture": "all"},
    },
    "existing-secret-minimal": {"secrets": {"create": False, "existingSecret": "mine"}},
    "upstream": {
        "mode": "upstream",
        "upstream": {"url": "http://vllm.models.svc:8000/v1"},
        "secrets": {"pepper": PEPPER, "upstreamApiKey": "upstream-key"},
    },
    "plain-container": {"nativeSidecar": False, "secrets": {"pepper": PEPPER}},
    "ops-port-off": {
        "mode": "upstream",
        "upstream": {"url": "http://vllm.models.svc:8000/v1"},
        "sidecar": {"opsPort": 0},
        "secrets": {"pepper": PEPPER},
    },
    "ingress": {
        "secrets": {"pepper": PEPPER},
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "annotations": {"nginx.ingress.kubernetes.io/proxy-read-timeout": "600"},
            "hosts": [{"host": "llm.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]}],
            "tls": [{"secretName": "llm-tls", "hosts": ["llm.example.com"]}],
        },
    },
    "http-route": {
        "secrets": {"pepper": PEPPER},
        "httpRoute": {
            "enabled": True,
            "parentRefs": [{"name": "shared", "namespace": "gateways"}],
            "hostnames": ["llm.example.com"],
            "timeouts": {"request": "600s"},
        },
    },
    "network-policy": {
        "secrets": {"pepper": PEPPER},
        "networkPolicy": {
            "enabled": True,
            "http": {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "apps"}}}]},
            "egress": {"enabled": True, "to": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}]},
        },
    },
    "service-account": {
        "secrets": {"pepper": PEPPER},
        "serviceAccount": {"create": True, "name": "llm", "annotations": {"iam.gke.io/gcp-service-account": "x@y"}},
    },
    "vllm-cache-hf": {
        "secrets": {"pepper": PEPPER},
        "vllm": {
            "cache": {"persistence": {"enabled": True, "size": "100Gi", "storageClass": "fast"}},
            "hfToken": {"secretName": "hf"},
            "shm": {"sizeLimit": "16Gi"},
            "env": [{"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}],
            "extraVolumeMounts": [{"name": "extra", "mountPath": "/extra", "readOnly": True}],
        },
        "sidecar": {
            "extraEnv": [{"name": "SIDECAR_LIMITS_RPM", "value": "60"}],
            "extraVolumeMounts": [{"name": "extra", "mountPath": "/extra", "readOnly": True}],
        },
        "extraVolumes": [{"name": "extra", "configMap": {"name": "extra"}}],
    },
    "openshift": {
        "secrets": {"pepper": PEPPER},
        "podSecurityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "store": {"persistence": {"existingClaim": "keys-db"}},
    },
}
SERVICE_MONITOR_API = "monitoring.coreos.com/v1/ServiceMonitor"
CRD_KINDS = {"ServiceMonitor", "HTTPRoute"}  # not in Kubernetes' own schemas: checked by shape below


def refused(helm: str, values: dict, *args: str) -> str:
    out = helm_run(helm, values, *args)
    assert out.returncode != 0, "rendered, but should have been refused"
    return out.stderr


@functools.cache
def _render_text(helm: str, name: str, kube: str, api: bool) -> str:
    args = ["--kube-version", kube] + (["--api-versions", SERVICE_MONITOR_API] if api else [])
    out = helm_run(helm, COMBOS[name], *args)
    assert out.returncode == 0, f"{name} @ {kube}: {out.stderr}"
    return out.stdout


def render(helm: str, name: str, kube: str = LATEST, api: bool = True) -> list[dict]:
    return [d for d in yaml.safe_load_all(_render_text(helm, name, kube, api)) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str = FULL) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def pod_spec(docs: list[dict]) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def container(docs: list[dict], name: str) -> dict:
    pod = pod_spec(docs)
    (found,) = [c for c in pod.get("initContainers", []) + pod["containers"] if c["name"] == name]
    return found


def toml_config(docs: list[dict]) -> dict:
    return tomllib.loads(one(docs, "ConfigMap")["data"]["sidecar.toml"])


def validator() -> str:
    return shutil.which("kubernetes-validate") or str(Path(sys.executable).parent / "kubernetes-validate")


# -- lint and validation ------------------------------------------------------------------------------------


def test_chart_claims_exactly_the_tested_versions():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == ">=1.25.0-0 <1.38.0-0"
    import kubernetes_validate  # the schemas it ships decide which versions can be checked offline

    shipped = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    missing = [v for v in KUBE_VERSIONS if not (shipped / f"v{v}-local-strict").is_dir()]
    assert not missing, f"kubernetes-validate lacks {missing}: install kubernetes-validate>=1.37"


@pytest.mark.parametrize("kube", ["1.25.0", LATEST])
@pytest.mark.parametrize("name", list(COMBOS))
def test_lint_strict(helm, name, kube):
    out = helm_run(helm, COMBOS[name], "--strict", "--kube-version", kube, command="lint")
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
def test_kubernetes_validate(helm, tmp_path, kube):
    """Every combination rendered for this version, validated strictly in one kubernetes-validate process."""
    with ThreadPoolExecutor(4) as pool:
        rendered = dict(zip(COMBOS, pool.map(lambda n: render(helm, n, kube), COMBOS), strict=True))
    files = []
    for name, docs in rendered.items():
        for i, doc in enumerate(d for d in docs if d["kind"] not in CRD_KINDS):
            path = tmp_path / f"{name}-{i}-{doc['kind']}.yaml"
            path.write_text(yaml.safe_dump(doc))
            files.append(str(path))
    out = subprocess.run(
        [validator(), "--strict", "--quiet", "-k", kube, *files], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("name", ["sqlite-default", "postgres-ha", "existing-secret", "upstream", "vllm-cache-hf"])
def test_two_renders_are_byte_identical(helm, name):
    """No random pepper, no timestamps: a GitOps re-render changes nothing, checksum annotations included."""
    args = ["--kube-version", LATEST, "--api-versions", SERVICE_MONITOR_API]
    first, second = helm_run(helm, COMBOS[name], *args), helm_run(helm, COMBOS[name], *args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert "checksum/config" in first.stdout


# -- refused combinations -------------------------------------------------------------------------------------


def test_sqlite_refuses_more_than_one_replica(helm):
    err = refused(helm, {"replicaCount": 3, "secrets": {"pepper": PEPPER}})
    assert "replicaCount 3 needs store.type=postgres" in err
    assert "SQLite is one file on one pod's volume" in err and "one replica only" in err


def test_sqlite_refuses_an_autoscaler_above_one(helm):
    err = refused(helm, {"autoscaling": {"enabled": True, "maxReplicas": 4}, "secrets": {"pepper": PEPPER}})
    assert "autoscaling.maxReplicas 4 needs store.type=postgres" in err and "one pod's volume" in err
    # one replica at most is allowed (an HPA with max 1 is pointless but harmless)
    render_values(helm, {"autoscaling": {"enabled": True, "maxReplicas": 1}, "secrets": {"pepper": PEPPER}})


def test_postgres_refuses_to_render_without_a_dsn(helm):
    err = refused(helm, {"store": {"type": "postgres"}, "secrets": {"pepper": PEPPER}})
    assert "store.type=postgres needs a DSN" in err and "postgres-dsn" in err


def test_no_pepper_and_no_existing_secret_is_refused(helm):
    err = refused(helm, {})
    assert "secrets.pepper is empty" in err
    assert "--set secrets.pepper=$(head -c 32 /dev/urandom | base64 | tr -d '=+/')" in err
    assert "secrets.existingSecret" in err
    err = refused(helm, {"secrets": {"create": False}})
    assert "secrets.existingSecret is required when secrets.create is false" in err


def test_native_sidecar_true_below_1_29_is_refused(helm):
    err = refused(helm, {"nativeSidecar": True, "secrets": {"pepper": PEPPER}}, "--kube-version", "1.28.0")
    assert "nativeSidecar: true needs Kubernetes >= 1.29" in err and "nativeSidecar: auto" in err
    render_values(helm, {"nativeSidecar": True, "secrets": {"pepper": PEPPER}})  # fine on 1.29+


def test_upstream_mode_without_url_is_refused(helm):
    err = refused(helm, {"mode": "upstream", "secrets": {"pepper": PEPPER}})
    assert "upstream.url is required in mode upstream" in err


def test_feature_switch_without_its_secret_value_is_refused(helm):
    err = refused(helm, {"admin": {"enabled": True}, "secrets": {"pepper": PEPPER}})
    assert "admin.enabled needs secrets.adminToken" in err
    err = refused(helm, {"oidc": {"enabled": True}, "secrets": {"pepper": PEPPER}})
    assert "oidc.enabled needs secrets.oidcClientSecret" in err
    err = refused(helm, {"httpRoute": {"enabled": True}, "secrets": {"pepper": PEPPER}})
    assert "httpRoute.parentRefs is required" in err


def test_kubernetes_versions_outside_the_claim_are_refused(helm):
    for kube in ("1.24.0", "1.38.0"):
        assert "incompatible with Kubernetes" in refused(helm, COMBOS["sqlite-default"], "--kube-version", kube)


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"mode": "bogus"}, "/mode"),
        ({"sidecar": {"port": 0}}, "/sidecar/port"),
        ({"sidecar": {"opsPort": 8080}}, "sidecar.opsPort must differ"),
        ({"store": {"type": "mysql"}}, "/store/type"),
        ({"sidecar": {"auditCapture": "maybe"}}, "/sidecar/auditCapture"),
        ({"nativeSidecar": "yes"}, "/nativeSidecar"),
        ({"secrets": {"pepper": "short"}}, "/secrets/pepper"),
        ({"pdb": {"enabled": "sometimes"}}, "/pdb/enabled"),
    ],
)
def test_bad_values_are_rejected(helm, values, where):
    values = {**values, "secrets": {"pepper": PEPPER, **values.get("secrets", {})}}
    assert where in refused(helm, values)


# -- shape ------------------------------------------------------------------------------------------------------


def test_defaults_image_and_sqlite_on_a_volume(helm):
    docs = render(helm, "sqlite-default")
    sidecar = container(docs, "sidecar")
    assert sidecar["image"] == "localhost/sidecar:dev" and sidecar["imagePullPolicy"] == "IfNotPresent"
    deploy = one(docs, "Deployment")
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"] == {"type": "Recreate"}
    pvc = one(docs, "PersistentVolumeClaim", f"{FULL}-data")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == f"{FULL}-data"
    env = {e["name"]: e for e in sidecar["env"]}
    assert env["SIDECAR_STORE_URL"]["value"] == "sqlite:////data/sidecar.db"
    assert by_kind(docs, "PodDisruptionBudget") == [] and by_kind(docs, "HorizontalPodAutoscaler") == []
    # an existing claim: used, not created
    docs = render(helm, "openshift")
    assert by_kind(docs, "PersistentVolumeClaim") == []
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "keys-db"


def test_native_sidecar_and_drain_order(helm):
    docs = render(helm, "sqlite-default")
    pod = pod_spec(docs)
    (sidecar,) = pod["initContainers"]
    assert sidecar["name"] == "sidecar" and sidecar["restartPolicy"] == "Always"
    assert "lifecycle" not in sidecar  # SIGTERM reaches it after vLLM exits; vLLM's preStop drained it
    assert [c["name"] for c in pod["containers"]] == ["vllm"]
    vllm = pod["containers"][0]
    assert "--host=127.0.0.1" in vllm["args"] and "ports" not in vllm
    assert vllm["startupProbe"]["failureThreshold"] * vllm["startupProbe"]["periodSeconds"] >= 1800
    for probe in ("startupProbe", "livenessProbe"):
        assert sidecar[probe]["httpGet"]["path"] == "/healthz"  # never vLLM: no start-up deadlock
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    # vLLM's preStop: exactly ["python3", "-c", <files/wait-drain.py>, "<ops port>", "<bound>"]
    command = vllm["lifecycle"]["preStop"]["exec"]["command"]
    bound = 5 + 30 + 10  # drainGrace + drainTimeout + 10
    assert command == ["python3", "-c", (CHART / "files" / "wait-drain.py").read_text(), "9090", str(bound)]
    assert pod["terminationGracePeriodSeconds"] >= bound + 30
    compile(command[2], "wait-drain.py", "exec")


def test_drain_bound_follows_the_drain_settings(helm):
    values = {"secrets": {"pepper": PEPPER}, "sidecar": {"drainGrace": 10, "drainTimeout": 120, "opsPort": 9191}}
    docs = render_values(helm, values)
    assert container(docs, "vllm")["lifecycle"]["preStop"]["exec"]["command"][3:] == ["9191", "140"]
    assert pod_spec(docs)["terminationGracePeriodSeconds"] == 170
    # ops port off in mode vllm: refused, /drain would be on the client port the drain closes
    err = refused(helm, {"sidecar": {"opsPort": 0}, "secrets": {"pepper": PEPPER}})
    assert "mode vllm needs sidecar.opsPort" in err


def test_static_keys_change_without_rolling_the_pods(helm):
    """The sidecar reloads the mounted static keys file; the other secrets are read at start and roll the pods."""

    def checksum(**secrets):
        docs = render_values(helm, {"secrets": {"pepper": PEPPER, **secrets}})
        return one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/secret"]

    base = checksum(staticKeys='{"id": "a"}')
    assert checksum(staticKeys='{"id": "b"}') == base
    assert checksum(staticKeys='{"id": "a"}', adminToken="t") != base


def test_below_1_29_the_sidecar_is_a_plain_container_with_an_exec_sleep(helm):
    docs = render(helm, "sqlite-default", "1.28.0")
    pod = pod_spec(docs)
    assert "initContainers" not in pod and [c["name"] for c in pod["containers"]] == ["sidecar", "vllm"]
    sidecar = pod["containers"][0]
    assert "restartPolicy" not in sidecar
    assert sidecar["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", "5"]}}
    assert pod["containers"][1]["lifecycle"]["preStop"]["exec"]["command"][0] == "python3"
    # 1.29+, nativeSidecar false: the same layout, with the sleep action
    sidecar = pod_spec(render(helm, "plain-container", "1.29.0"))["containers"][0]
    assert sidecar["name"] == "sidecar" and sidecar["lifecycle"]["preStop"] == {"sleep": {"seconds": 5}}
    assert "initContainers" not in pod_spec(render(helm, "plain-container", "1.29.0"))
    # 1.29, auto: native
    assert pod_spec(render(helm, "sqlite-default", "1.29.0"))["initContainers"][0]["name"] == "sidecar"


def test_upstream_mode(helm):
    docs = render(helm, "upstream")
    pod = pod_spec(docs)
    assert [c["name"] for c in pod["containers"]] == ["sidecar"] and "initContainers" not in pod
    assert pod["containers"][0]["lifecycle"]["preStop"] == {"sleep": {"seconds": 5}}
    assert pod["terminationGracePeriodSeconds"] == 5 + 5 + 30 + 15
    config = toml_config(docs)
    assert config["upstream"] == {
        "url": "http://vllm.models.svc:8000/v1",
        "api_key_file": "/etc/sidecar/secrets/upstream-api-key",
    }
    volumes = {v["name"] for v in pod["volumes"]}
    assert "cache" not in volumes and "shm" not in volumes


def test_ops_port_services_and_service_monitor(helm):
    docs = render(helm, "sqlite-default")
    sidecar = container(docs, "sidecar")
    assert [(p["name"], p["containerPort"]) for p in sidecar["ports"]] == [("http", 8080), ("ops", 9090)]
    assert toml_config(docs)["server"]["ops_port"] == 9090
    client = one(docs, "Service")
    assert [(p["name"], p["targetPort"]) for p in client["spec"]["ports"]] == [("http", "http")]
    ops = one(docs, "Service", f"{FULL}-ops")
    assert ops["spec"]["type"] == "ClusterIP"
    assert [(p["name"], p["port"], p["targetPort"]) for p in ops["spec"]["ports"]] == [("ops", 9090, "ops")]
    assert by_kind(render(helm, "sqlite-default", api=False), "ServiceMonitor") == []  # only with the CRD
    monitor = one(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"] == [
        {"port": "ops", "path": "/metrics", "interval": "30s"},
        {  # mode vllm: vLLM's own page, relayed by the sidecar (#18)
            "port": "ops",
            "path": "/metrics/upstream",
            "interval": "30s",
            "relabelings": [{"targetLabel": "source", "replacement": "upstream"}],
        },
    ]
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = by_kind(docs, "Service")
    matching = [s["metadata"]["name"] for s in services if selector.items() <= s["metadata"]["labels"].items()]
    assert matching == [f"{FULL}-ops"]
    values = {"secrets": {"pepper": PEPPER}, "serviceMonitor": {"labels": {"release": "kps"}, "interval": "15s"}}
    monitor = one(render_values(helm, values, "--api-versions", SERVICE_MONITOR_API), "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kps" and monitor["spec"]["endpoints"][0]["interval"] == "15s"
    # ops port off: one Service, metrics on http
    docs = render(helm, "ops-port-off")
    assert [s["metadata"]["name"] for s in by_kind(docs, "Service")] == [FULL]
    assert one(docs, "ServiceMonitor")["spec"]["endpoints"][0]["port"] == "http"
    assert [p["name"] for p in container(docs, "sidecar")["ports"]] == ["http"]


def test_workers_reach_the_config_and_need_the_ops_port(helm):
    assert toml_config(render(helm, "sqlite-default"))["server"]["workers"] == 1
    docs = render_values(helm, {"secrets": {"pepper": PEPPER}, "sidecar": {"workers": 2}})
    assert toml_config(docs)["server"]["workers"] == 2
    # Only worker 0's operations port is a container port: the Service, the ServiceMonitor and vLLM's preStop
    # reach it, and it shows and drains the others (they are reached on loopback).
    assert [p["containerPort"] for p in container(docs, "sidecar")["ports"]] == [8080, 9090]
    upstream = {"mode": "upstream", "upstream": {"url": "http://vllm:8000/v1"}, "secrets": {"pepper": PEPPER}}
    err = refused(helm, {**upstream, "sidecar": {"workers": 2, "opsPort": 0}})
    assert "sidecar.workers > 1 needs sidecar.opsPort" in err
    assert "workers" in refused(helm, {**upstream, "sidecar": {"workers": 0}})


def test_postgres_ha_with_hpa_and_pdb(helm):
    docs = render(helm, "postgres-ha")
    deploy = one(docs, "Deployment")
    assert "replicas" not in deploy["spec"] and "strategy" not in deploy["spec"]  # the HPA owns replicas
    assert by_kind(docs, "PersistentVolumeClaim") == []
    env = {e["name"]: e for e in container(docs, "sidecar")["env"]}
    assert env["SIDECAR_STORE_URL"]["valueFrom"]["secretKeyRef"] == {"name": FULL, "key": "postgres-dsn"}
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULL}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1" and pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deploy["spec"]["selector"]["matchLabels"]
    # replicas without an HPA: a PDB too; minAvailable instead of maxUnavailable
    values = {
        "replicaCount": 2,
        "store": {"type": "postgres"},
        "secrets": {"pepper": PEPPER, "postgresDsn": DSN},
        "pdb": {"minAvailable": 1},
    }
    docs = render_values(helm, values)
    assert one(docs, "Deployment")["spec"]["replicas"] == 2
    assert one(docs, "PodDisruptionBudget")["spec"] == {
        "minAvailable": 1,
        "selector": {"matchLabels": {"app.kubernetes.io/name": "sidecar", "app.kubernetes.io/instance": "t"}},
    }
    assert by_kind(render_values(helm, {**values, "pdb": {"enabled": False}}), "PodDisruptionBudget") == []


def test_secret_keys_follow_the_features(helm):
    # created Secret, only a pepper: one key, one projected file, no *_file but pepper_file
    docs = render(helm, "sqlite-default")
    assert one(docs, "Secret")["stringData"] == {"pepper": PEPPER}
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    assert volumes["secrets"]["secret"]["items"] == [{"key": "pepper", "path": "pepper"}]
    config = toml_config(docs)
    assert config["auth"] == {"pepper_file": "/etc/sidecar/secrets/pepper"}
    assert "admin_token_file" not in config["server"] and "api_key_file" not in config["upstream"]
    # created Secret, admin and DSN
    docs = render(helm, "postgres-ha")
    assert set(one(docs, "Secret")["stringData"]) == {
        "pepper", "admin-token", "postgres-dsn", "oidc-client-secret", "export-token",
    }  # fmt: skip
    assert toml_config(docs)["server"]["admin_token_file"] == "/etc/sidecar/secrets/admin-token"
    console = toml_config(docs)["console"]  # the chart's secret file merged with the user's OIDC settings
    assert console["oidc_client_secret_file"] == "/etc/sidecar/secrets/oidc-client-secret"
    assert console["oidc_issuer"] == "https://login.example.com/realms/platform"
    assert toml_config(docs)["export"] == {
        "url": "https://openmeter.example/api/v1/events", "token_file": "/etc/sidecar/secrets/export-token",
    }  # fmt: skip
    # existing Secret with every feature: every key projected and named; nothing created
    docs = render(helm, "existing-secret")
    assert by_kind(docs, "Secret") == []
    secret = {v["name"]: v for v in pod_spec(docs)["volumes"]}["secrets"]["secret"]
    assert secret["secretName"] == "mine"
    assert [i["key"] for i in secret["items"]] == [
        "pepper", "admin-token", "upstream-api-key", "static-keys.jsonl", "oidc-client-secret", "export-token",
    ]  # fmt: skip
    assert toml_config(docs)["export"]["token_file"] == "/etc/sidecar/secrets/export-token"
    config = toml_config(docs)
    assert config["server"]["admin_token_file"] == "/etc/sidecar/secrets/admin-token"
    assert config["upstream"]["api_key_file"] == "/etc/sidecar/secrets/upstream-api-key"
    assert config["auth"]["static_keys_file"] == "/etc/sidecar/secrets/static-keys.jsonl"
    assert config["audit"] == {"capture": "all"}
    assert config["console"] == {"oidc_client_secret_file": "/etc/sidecar/secrets/oidc-client-secret"}
    env = {e["name"]: e for e in container(docs, "sidecar")["env"]}
    assert env["SIDECAR_STORE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "mine", "key": "postgres-dsn"}
    # existing Secret holding only the pepper
    docs = render(helm, "existing-secret-minimal")
    secret = {v["name"]: v for v in pod_spec(docs)["volumes"]}["secrets"]["secret"]
    assert secret == {"secretName": "mine", "items": [{"key": "pepper", "path": "pepper"}]}
    assert "checksum/secret" not in one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]


def test_checksums_roll_the_pods_on_a_change(helm):
    def annotations(values):
        return one(render_values(helm, values), "Deployment")["spec"]["template"]["metadata"]["annotations"]

    base = annotations({"secrets": {"pepper": PEPPER}})
    assert len(base["checksum/config"]) == 64 and len(base["checksum/secret"]) == 64
    changed = annotations({"secrets": {"pepper": PEPPER, "adminToken": "admin-token-0123"}})
    assert changed["checksum/config"] != base["checksum/config"]
    assert changed["checksum/secret"] != base["checksum/secret"]


def test_sidecar_config_merges_into_the_charts_sections(helm):
    values = {
        "secrets": {"pepper": PEPPER},
        "sidecar": {"pepperRotate": True, "config": {"auth": {"cache_ttl": 2}, "limits": {"rpm": 60}}},
    }
    config = toml_config(render_values(helm, values))  # one [auth] table, not two (TOML forbids it)
    assert config["auth"] == {"pepper_file": "/etc/sidecar/secrets/pepper", "pepper_rotate": True, "cache_ttl": 2}
    assert config["limits"] == {"rpm": 60}
    assert config["server"]["drain_grace"] == 5 and config["server"]["drain_timeout"] == 30
    assert config["upstream"]["url"] == "http://127.0.0.1:8000/v1"


def test_vllm_cache_hf_token_shm_resources_and_extras(helm):
    docs = render(helm, "vllm-cache-hf")
    pvc = one(docs, "PersistentVolumeClaim", f"{FULL}-model-cache")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"] and pvc["spec"]["storageClassName"] == "fast"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "100Gi"
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    assert volumes["cache"]["persistentVolumeClaim"]["claimName"] == f"{FULL}-model-cache"
    assert volumes["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert volumes["extra"] == {"name": "extra", "configMap": {"name": "extra"}}
    vllm = container(docs, "vllm")
    env = {e["name"]: e for e in vllm["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "HF_TOKEN"}
    assert env["VLLM_LOGGING_LEVEL"]["value"] == "DEBUG"
    assert {"name": "extra", "mountPath": "/extra", "readOnly": True} in vllm["volumeMounts"]
    sidecar = container(docs, "sidecar")
    assert {"name": "extra", "mountPath": "/extra", "readOnly": True} in sidecar["volumeMounts"]
    assert {"name": "SIDECAR_LIMITS_RPM", "value": "60"} in sidecar["env"]
    # defaults: emptyDir cache, no HF_TOKEN, CPU and memory next to the GPU
    docs = render(helm, "sqlite-default")
    vllm = container(docs, "vllm")
    assert "HF_TOKEN" not in {e["name"] for e in vllm["env"]}
    assert {v["name"]: v for v in pod_spec(docs)["volumes"]}["cache"] == {"name": "cache", "emptyDir": {}}
    assert {"cpu", "memory", "nvidia.com/gpu"} <= set(vllm["resources"]["requests"])
    assert {"memory", "nvidia.com/gpu"} <= set(vllm["resources"]["limits"])
    assert {v["name"]: v for v in pod_spec(docs)["volumes"]}["shm"]["emptyDir"]["sizeLimit"] == "8Gi"


def test_security_contexts(helm):
    docs = render(helm, "sqlite-default")
    pod = pod_spec(docs)
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "fsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    for c in pod["initContainers"] + pod["containers"]:
        ctx = c["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"]["drop"] == ["ALL"]
        assert ctx["runAsNonRoot"] is True and ctx["seccompProfile"]["type"] == "RuntimeDefault"
    assert container(docs, "sidecar")["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False
    # OpenShift: no fixed UID anywhere, the namespace's range applies
    docs = render(helm, "openshift")
    expected = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    assert pod_spec(docs)["securityContext"] == expected
    assert one(docs, "Pod", f"{FULL}-test")["spec"]["securityContext"] == expected
    assert "runAsUser" not in json.dumps(pod_spec(docs))


def test_service_account(helm):
    docs = render(helm, "sqlite-default")
    sa = one(docs, "ServiceAccount")
    assert sa["automountServiceAccountToken"] is False and pod_spec(docs)["serviceAccountName"] == FULL
    docs = render(helm, "service-account")
    sa = one(docs, "ServiceAccount", "llm")
    assert sa["metadata"]["annotations"] == {"iam.gke.io/gcp-service-account": "x@y"}
    assert pod_spec(docs)["serviceAccountName"] == "llm"
    docs = render_values(helm, {"secrets": {"pepper": PEPPER}, "serviceAccount": {"create": False, "name": "ops"}})
    assert by_kind(docs, "ServiceAccount") == [] and pod_spec(docs)["serviceAccountName"] == "ops"


def test_network_policy(helm):
    assert by_kind(render(helm, "sqlite-default"), "NetworkPolicy") == []
    policy = one(render(helm, "network-policy"), "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "sidecar",
        "app.kubernetes.io/instance": "t",
    }
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    http, ops = policy["ingress"]
    assert http["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert http["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "apps"}}}]
    assert ops["ports"] == [{"port": "ops", "protocol": "TCP"}]
    assert ops["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    dns, extra = policy["egress"]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert extra == {"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}
    # defaults: clients from anywhere, no egress policy
    values = {"secrets": {"pepper": PEPPER}, "networkPolicy": {"enabled": True}}
    policy = one(render_values(helm, values), "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"] and "from" not in policy["spec"]["ingress"][0]


def test_ingress_and_http_route(helm):
    ingress = one(render(helm, "ingress"), "Ingress")
    assert ingress["apiVersion"] == "networking.k8s.io/v1" and ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "600"
    assert ingress["spec"]["tls"] == [{"secretName": "llm-tls", "hosts": ["llm.example.com"]}]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "llm.example.com"
    assert rule["http"]["paths"] == [
        {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": FULL, "port": {"name": "http"}}}}
    ]
    route = one(render(helm, "http-route"), "HTTPRoute")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["spec"]["parentRefs"] == [{"name": "shared", "namespace": "gateways"}]
    assert route["spec"]["hostnames"] == ["llm.example.com"]
    assert route["spec"]["rules"] == [
        {
            "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
            "timeouts": {"request": "600s"},
            "backendRefs": [{"name": FULL, "port": 80}],
        }
    ]
    defaults = render(helm, "sqlite-default")
    assert by_kind(defaults, "Ingress") == by_kind(defaults, "HTTPRoute") == []


def test_notes_provision_keys_that_survive(helm):
    values = {"secrets": {"pepper": PEPPER, "adminToken": "admin-token-0123"}}
    out = helm_run(helm, values, "--dry-run=client", command="install")
    assert out.returncode == 0, out.stderr
    notes = out.stdout.split("NOTES:", 1)[1]
    assert "keys create --static" in notes and "secrets.staticKeys=static-keys.jsonl" in notes
    assert f"port-forward svc/{FULL}-ops 9090:9090" in notes and "POST localhost:9090/admin/keys" in notes
    assert " exec " not in notes.replace("`kubectl exec`", "")  # only the warning against it
    out = helm_run(
        helm,
        {"store": {"persistence": {"enabled": False}}, "secrets": {"pepper": PEPPER}},
        "--dry-run=client",
        command="install",
    )
    assert "WARNING: store.persistence.enabled is false" in out.stdout


@pytest.mark.parametrize("name", ["sqlite-default", "postgres-ha", "existing-secret", "upstream", "ops-port-off"])
def test_rendered_config_loads_in_the_sidecar(helm, name):
    """The chart's sidecar.toml is one the sidecar accepts: every option it sets exists and is valid."""
    from sidecar.config import load

    docs = render(helm, name)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sidecar.toml"
        path.write_text(one(docs, "ConfigMap")["data"]["sidecar.toml"])
        env = {e["name"]: e.get("value", DSN) for e in container(docs, "sidecar")["env"]}
        settings = load(str(path), env=env)
    assert settings.server.ops_port == toml_config(docs)["server"].get("ops_port", 0)
    assert settings.auth.pepper_file == "/etc/sidecar/secrets/pepper"
    assert settings.store.url == env["SIDECAR_STORE_URL"]
