"""DICOM TLS on the listener: real TLS associations on loopback, certificates made by openssl."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacs_agent.config import ListenerSettings
from pacs_agent.db.migrate import upgrade
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.net.scp import Receiver, start_listener
from pacs_agent.storage.spool import Spool
from tests.helpers.servers import free_port

pytestmark = pytest.mark.integration


def _openssl(*args: str) -> None:
    exe = shutil.which("openssl")
    assert exe, "the openssl command is required"
    subprocess.run([exe, *args], check=True, capture_output=True, timeout=60)


@dataclass
class Pki:
    root: Path

    def ca(self, name: str) -> tuple[Path, Path]:
        key, cert = self.root / f"{name}.key", self.root / f"{name}.pem"
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert),
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
        return cert, key

    def leaf(self, name: str, ca: tuple[Path, Path], server: bool) -> tuple[Path, Path]:
        key, csr, cert = (self.root / f"{name}.{ext}" for ext in ("key", "csr", "pem"))
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", str(key), "-out", str(csr),
        )  # fmt: skip
        ext = self.root / f"{name}.ext"
        usage = "serverAuth" if server else "clientAuth"
        ext.write_text(f"subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n")
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
            "-CAcreateserial", "-days", "2", "-out", str(cert), "-extfile", str(ext),
        )  # fmt: skip
        return cert, key


MakeListener = Callable[[Path | None], tuple[int, Path]]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@pytest.fixture
def make_tls_listener(tmp_path: Path, pki: Pki) -> Iterator[MakeListener]:
    servers: list[object] = []
    server_ca = pki.ca("server-ca")
    server_cert = pki.leaf("listener", server_ca, server=True)

    def make(client_ca: Path | None) -> tuple[int, Path]:
        url = f"sqlite:///{tmp_path / 'index.db'}"
        upgrade(url)
        settings = ListenerSettings(
            port=free_port(),
            tls_certificate=server_cert[0],
            tls_private_key=server_cert[1],
            tls_client_ca=client_ca,
        )
        receiver = Receiver(Spool(tmp_path / "spool"), make_session_factory(make_engine(url)))
        servers.append(start_listener(settings, receiver))
        return settings.port, server_ca[0]

    yield make
    for server in servers:
        server.shutdown()  # type: ignore[attr-defined]


def _associate(
    port: int, trust: Path | None, client: tuple[Path, Path] | None = None
) -> Association:
    ae = AE(ae_title="TLSSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    if trust is None:
        return ae.associate("127.0.0.1", port, ae_title="PACSAGENT")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(trust))
    if client is not None:
        ctx.load_cert_chain(str(client[0]), str(client[1]))
    return ae.associate("127.0.0.1", port, ae_title="PACSAGENT", tls_args=(ctx, "127.0.0.1"))


def test_tls_listener_accepts_a_tls_caller_that_trusts_it(make_tls_listener: MakeListener) -> None:
    port, trust = make_tls_listener(None)
    assoc = _associate(port, trust)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def test_tls_listener_refuses_a_caller_without_tls(make_tls_listener: MakeListener) -> None:
    port, _ = make_tls_listener(None)
    assoc = _associate(port, None)
    assert not assoc.is_established


def test_client_certificate_signed_by_the_configured_ca_is_accepted_others_refused(
    make_tls_listener: MakeListener, pki: Pki
) -> None:
    client_ca = pki.ca("client-ca")
    rogue_ca = pki.ca("rogue-ca")
    port, trust = make_tls_listener(client_ca[0])
    good = _associate(port, trust, pki.leaf("modality", client_ca, server=False))
    assert good.is_established
    assert good.send_c_echo().Status == 0
    good.release()
    assert not _associate(port, trust).is_established  # no client certificate
    rogue = _associate(port, trust, pki.leaf("rogue", rogue_ca, server=False))
    assert not rogue.is_established
