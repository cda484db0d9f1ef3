"""Where the shared test data lies, for every test (and bench/bench_inference.py).

The data (``data/``, ``model-zoo/``) normally sits beside the checkout, in ``../shared``. A machine
that is sent the checkout alone (the GPU machine: see tests/gpu/device_check.sh) gets a copy in
``shared/`` inside it instead, ignored by git; when that folder exists it wins.
"""

from __future__ import annotations

from pathlib import Path

#: The project's root (the checkout).
REPO = Path(__file__).resolve().parents[2]


def shared_dir(repo: Path = REPO) -> Path:
    """``repo/shared`` when that folder exists, else ``repo.parent/shared``."""
    inside = repo / "shared"
    return inside if inside.is_dir() else repo.parent / "shared"


SHARED = shared_dir()
SHARED_DATA = SHARED / "data"
MODEL_ZOO = SHARED / "model-zoo"
