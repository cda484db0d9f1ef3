"""DICOM TLS on the listener with dcmtk as the TLS peer, and shutdown of open TLS associations.

Certificates come from test_listener_tls's Pki (openssl); dcmtk 3.6.7's echoscu and storescu
speak TLS with ``+tls key cert`` (a client certificate) or ``+tla`` (none) and ``+cf`` (the CA
they trust).
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from pacs_agent.config import ListenerSettings
from pacs_agent.db.migrate import upgrade
from pacs_agent.db.models import Instance
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.demo.synthetic import make_ct_study, write_study
from pacs_agent.dicom.structure import file_meta_end
from pacs_agent.net.scp import Receiver, RunningListener, start_listener
from pacs_agent.storage.spool import Spool
from tests.helpers.servers import free_port
from tests.integration.test_listener_tls import MakeListener, Pki, make_tls_listener, pki

pytestmark = pytest.mark.integration

__all__ = ["make_tls_listener", "pki"]  # fixtures shared with test_listener_tls

DCMTK_ENV = {"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}


def _dcmtk(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which(tool)
    assert exe, f"dcmtk {tool} is required (apt-get install dcmtk)"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60, env=DCMTK_ENV)


def _ct_files(root: Path, count: int) -> list[Path]:
    return write_study(make_ct_study(None, rows=64, cols=64, slices=8, seed=5)[:count], root)


def test_storescu_over_tls_with_a_client_certificate_stores_byte_for_byte(
    make_tls_listener: MakeListener, pki: Pki, tmp_path: Path
) -> None:
    client_ca = pki.ca("client-ca")
    cert, key = pki.leaf("modality", client_ca, server=False)
    port, trust = make_tls_listener(client_ca[0])
    files = _ct_files(tmp_path / "ct", 2)
    result = _dcmtk(
        "storescu", "+tls", str(key), str(cert), "+cf", str(trust), "-R",
        "-aet", "TLSSCU", "-aec", "PACSAGENT", "127.0.0.1", str(port), *map(str, files),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    factory = make_session_factory(make_engine(f"sqlite:///{tmp_path / 'index.db'}"))
    with factory() as s:
        rows = {row.sop_instance_uid: row.path for row in s.scalars(select(Instance))}
    assert len(rows) == 2
    for path in files:
        sent = path.read_bytes()
        stored = (tmp_path / "spool" / rows[str(dcmread(path).SOPInstanceUID)]).read_bytes()
        assert stored[file_meta_end(stored) :] == sent[file_meta_end(sent) :]


def test_echoscu_over_tls_without_a_client_certificate_is_refused_when_one_is_required(
    make_tls_listener: MakeListener, pki: Pki
) -> None:
    client_ca = pki.ca("client-ca")
    port, trust = make_tls_listener(client_ca[0])
    refused = _dcmtk(
        "echoscu", "+tla", "+cf", str(trust), "-aec", "PACSAGENT", "127.0.0.1", str(port)
    )
    assert refused.returncode != 0, refused.stdout + refused.stderr
    assert "Echo Response" not in refused.stdout + refused.stderr
    # The same anonymous client is answered when the listener requires no certificate.
    port, trust = make_tls_listener(None)
    answered = _dcmtk(
        "echoscu", "+tla", "+cf", str(trust), "-aec", "PACSAGENT", "127.0.0.1", str(port)
    )
    assert answered.returncode == 0, answered.stdout + answered.stderr


def test_echoscu_over_tls_with_a_certificate_from_another_ca_is_refused(
    make_tls_listener: MakeListener, pki: Pki
) -> None:
    client_ca, rogue_ca = pki.ca("client-ca"), pki.ca("rogue-ca")
    cert, key = pki.leaf("rogue", rogue_ca, server=False)
    port, trust = make_tls_listener(client_ca[0])
    result = _dcmtk(
        "echoscu", "+tls", str(key), str(cert), "+cf", str(trust),
        "-aec", "PACSAGENT", "127.0.0.1", str(port),
    )  # fmt: skip
    assert result.returncode != 0, result.stdout + result.stderr


def test_plain_tcp_echoscu_is_refused_by_a_tls_listener(make_tls_listener: MakeListener) -> None:
    port, _ = make_tls_listener(None)
    result = _dcmtk("echoscu", "-to", "5", "-aec", "PACSAGENT", "127.0.0.1", str(port))
    assert result.returncode != 0, result.stdout + result.stderr


def _bare_tls_listener(pki: Pki, tmp_path: Path) -> tuple[Any, ListenerSettings, RunningListener]:
    """A TLS listener the test shuts down itself: its server CA, settings and listener."""
    server_ca = pki.ca("server-ca")
    cert, key = pki.leaf("listener", server_ca, server=True)
    url = f"sqlite:///{tmp_path / 'index.db'}"
    upgrade(url)
    settings = ListenerSettings(port=free_port(), tls_certificate=cert, tls_private_key=key)
    receiver = Receiver(Spool(tmp_path / "spool"), make_session_factory(make_engine(url)))
    return server_ca, settings, start_listener(settings, receiver)


def test_shutdown_ends_an_open_tls_association_at_once(pki: Pki, tmp_path: Path) -> None:
    server_ca, settings, running = _bare_tls_listener(pki, tmp_path)
    ae = AE(ae_title="TLSSCU")
    ae.add_requested_context(Verification)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(server_ca[0]))
    assoc = ae.associate(
        "127.0.0.1", settings.port, ae_title="PACSAGENT", tls_args=(ctx, "127.0.0.1")
    )
    assert assoc.is_established
    started = time.monotonic()
    try:
        running.server.shutdown(timeout_s=10)
        took = time.monotonic() - started
        deadline = time.monotonic() + 5
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not assoc.is_established, "the TLS association outlived the listener"
        assert took < 3, f"shutdown waited {took:.1f} s for the TLS association"
    finally:
        if assoc.is_established:
            assoc.abort()
        running.shutdown()


def test_shutdown_ends_a_connection_stalled_in_the_tls_handshake(pki: Pki, tmp_path: Path) -> None:
    _server_ca, settings, running = _bare_tls_listener(pki, tmp_path)
    with socket.create_connection(("127.0.0.1", settings.port), timeout=10) as sock:
        time.sleep(0.2)  # the listener's thread now waits for a ClientHello (acse_timeout_s)
        started = time.monotonic()
        running.shutdown()
        assert time.monotonic() - started < 3
        assert sock.recv(1024) == b""
