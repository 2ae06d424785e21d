"""The container image's recipe: hadolint clean, non-root, a health check (the build itself: scripts/build-image.sh)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_dockerfile_is_hadolint_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    out = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert text.count("FROM ${BASE_IMAGE}") == 2 and 'ENTRYPOINT ["sidecar"]' in text and 'CMD ["serve"]' in text
    assert "USER ${UID}:${UID}" in text and "ARG UID=10001" in text and "HEALTHCHECK" in text
