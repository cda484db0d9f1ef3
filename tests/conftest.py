"""Shared fixtures: real servers on free loopback ports (see tests/helpers/servers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.paths import SHARED_DATA
from tests.helpers.servers import (
    Orthanc,
    free_port,
    postgres_available,
    postgres_database,
    require_services,
)


@pytest.fixture
def shared_data() -> Path:
    path = SHARED_DATA
    if not path.is_dir():
        pytest.fail(f"{path} is missing: the shared test data must sit beside the project")
    return path


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    server = Orthanc(workdir=tmp_path / "orthanc", dicom_port=free_port(), http_port=free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    if not postgres_available():
        if require_services():
            pytest.fail("PostgreSQL is required in CI but not reachable on 127.0.0.1:5432")
        pytest.skip("PostgreSQL not reachable on 127.0.0.1:5432")
    with postgres_database() as url:
        yield url
