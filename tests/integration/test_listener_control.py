"""Association control over real associations on loopback: allow-list, limits, exposure."""

from __future__ import annotations

import logging
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacs_agent.config import AllowedCaller, ListenerSettings
from pacs_agent.db.migrate import upgrade
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.net.scp import ListenerRefused, Receiver, start_listener
from pacs_agent.storage.spool import Spool
from tests.helpers.servers import REPO, free_port

pytestmark = pytest.mark.integration


def _start(tmp_path: Path, **settings: object) -> tuple[ListenerSettings, object]:
    url = f"sqlite:///{tmp_path / 'index.db'}"
    upgrade(url)
    cfg = ListenerSettings.model_validate({"port": free_port(), **settings})
    receiver = Receiver(Spool(tmp_path / "spool"), make_session_factory(make_engine(url)))
    return cfg, start_listener(cfg, receiver)


@pytest.fixture
def allow_list_listener(tmp_path: Path) -> Iterator[ListenerSettings]:
    cfg, server = _start(
        tmp_path,
        allowed_callers=[
            {"ae_title": "CTSCANNER"},
            {"ae_title": "PINNED", "hosts": ["127.0.0.2"]},
            {"ae_title": "LOOPNET", "hosts": ["127.0.0.0/8"]},
        ],
    )
    try:
        yield cfg
    finally:
        server.shutdown()  # type: ignore[attr-defined]


def _associate(
    cfg: ListenerSettings, calling: str, source: str = "127.0.0.1", called: str = "PACSAGENT"
) -> Association:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = 5
    return ae.associate("127.0.0.1", cfg.port, ae_title=called, bind_address=(source, 0))


def _aborted_within(assoc: Association, seconds: float) -> bool:
    """Wait until the listener ends ``assoc``; True when it was aborted in time."""
    deadline = time.monotonic() + seconds
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    return bool(assoc.is_aborted) and time.monotonic() < deadline


def _reject_reason(assoc: Association) -> tuple[int, int, int]:
    rj = assoc.acceptor.primitive
    assert rj is not None
    return int(rj.result), int(rj.result_source), int(rj.diagnostic)  # type: ignore[arg-type]


def test_unknown_calling_ae_is_rejected_as_not_recognised_and_logged(
    allow_list_listener: ListenerSettings, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="pacs_agent.net.scp"):
        assoc = _associate(allow_list_listener, "INTRUDER")
    assert assoc.is_rejected
    # rejected-permanent, DICOM UL service-user, calling AE title not recognised (PS3.8 9.3.4)
    assert _reject_reason(assoc) == (1, 1, 3)
    assert any(
        "association rejected" in r.message and "INTRUDER" in r.message for r in caplog.records
    )


def test_listed_calling_ae_is_accepted(allow_list_listener: ListenerSettings) -> None:
    assoc = _associate(allow_list_listener, "CTSCANNER")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def test_caller_pinned_to_an_address_is_accepted_only_from_it(
    allow_list_listener: ListenerSettings,
) -> None:
    wrong = _associate(allow_list_listener, "PINNED", source="127.0.0.1")
    assert wrong.is_rejected and _reject_reason(wrong) == (1, 1, 3)
    right = _associate(allow_list_listener, "PINNED", source="127.0.0.2")
    assert right.is_established
    right.release()
    network = _associate(allow_list_listener, "LOOPNET", source="127.0.0.3")
    assert network.is_established
    network.release()


def test_storescu_from_an_unknown_ae_fails_with_the_rejection(
    allow_list_listener: ListenerSettings, tmp_path: Path
) -> None:
    exe = shutil.which("echoscu")
    assert exe, "dcmtk echoscu is required (apt-get install dcmtk)"
    result = subprocess.run(
        [exe, "-aet", "INTRUDER", "-aec", "PACSAGENT", "127.0.0.1", str(allow_list_listener.port)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stdout + result.stderr


def test_wrong_called_ae_is_rejected_as_not_recognised(
    allow_list_listener: ListenerSettings,
) -> None:
    assoc = _associate(allow_list_listener, "CTSCANNER", called="SOMEONEELSE")
    assert assoc.is_rejected and _reject_reason(assoc) == (1, 1, 7)


def test_associations_beyond_the_limit_are_rejected_as_transient(tmp_path: Path) -> None:
    cfg, server = _start(tmp_path, max_associations=1)
    try:
        first = _associate(cfg, "A")
        assert first.is_established
        second = _associate(cfg, "B")
        # rejected-transient, presentation-related provider, local limit exceeded
        assert second.is_rejected and _reject_reason(second) == (2, 3, 2)
        first.release()
        third = _associate(cfg, "C")
        assert third.is_established
        third.release()
    finally:
        server.shutdown()  # type: ignore[attr-defined]


def test_max_pdu_is_what_the_listener_announces(tmp_path: Path) -> None:
    cfg, server = _start(tmp_path, max_pdu=32768)
    try:
        assoc = _associate(cfg, "A")
        assert assoc.is_established
        assert assoc.acceptor.maximum_length == 32768
        assoc.release()
    finally:
        server.shutdown()  # type: ignore[attr-defined]


def test_idle_association_is_aborted_after_the_network_timeout(tmp_path: Path) -> None:
    cfg, server = _start(tmp_path, network_timeout_s=0.5)
    try:
        assoc = _associate(cfg, "A")
        assert assoc.is_established
        assert _aborted_within(assoc, 10)
    finally:
        server.shutdown()  # type: ignore[attr-defined]


def test_connection_that_never_requests_an_association_is_closed_after_acse_timeout(
    tmp_path: Path,
) -> None:
    cfg, server = _start(tmp_path, acse_timeout_s=0.5)
    try:
        with socket.create_connection(("127.0.0.1", cfg.port), timeout=10) as sock:
            started = time.monotonic()
            assert sock.recv(1024) == b""  # closed by the listener, nothing sent
            assert time.monotonic() - started < 9
    finally:
        server.shutdown()  # type: ignore[attr-defined]


def test_listener_on_a_network_address_without_allow_list_refuses_to_start(
    tmp_path: Path,
) -> None:
    with pytest.raises(ListenerRefused, match="allowed_callers"):
        _start(tmp_path, host="0.0.0.0")


def test_serve_refuses_to_start_on_a_network_address_without_allow_list(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "PACS_AGENT_DATA_DIR": str(tmp_path / "var"),
        "PACS_AGENT_LISTENER__HOST": "0.0.0.0",
        "PACS_AGENT_LISTENER__PORT": str(free_port()),
        # Not under test here; never the default 8080 another test may hold.
        "PACS_AGENT_API__ENABLED": "false",
    }
    result = subprocess.run(
        [sys.executable, "-m", "pacs_agent", "serve", "--no-worker"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
    )
    assert result.returncode == 2
    assert "refusing to start" in result.stderr and "allow_any_caller" in result.stderr
    assert not (tmp_path / "var" / "spool").exists()  # nothing was started


def test_allowed_caller_hosts_must_be_addresses() -> None:
    with pytest.raises(ValueError):
        AllowedCaller(ae_title="CT", hosts=["scanner.example"])


def test_message_that_stalls_midway_is_aborted_after_the_dimse_timeout(tmp_path: Path) -> None:
    cfg, server = _start(tmp_path, dimse_timeout_s=0.5, network_timeout_s=60)
    try:
        assoc = _associate(cfg, "A")
        assert assoc.is_established
        context_id = assoc.accepted_contexts[0].context_id
        assert context_id is not None and assoc.dul.socket is not None
        # The first fragment of a command (not the last one), then nothing.
        fragment = b"\x00\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00\x00"
        pdv = struct.pack(">IBB", len(fragment) + 2, context_id, 0x01) + fragment
        assoc.dul.socket.send(struct.pack(">BxI", 0x04, len(pdv)) + pdv)
        assert _aborted_within(assoc, 10)  # well before network_timeout_s
    finally:
        server.shutdown()  # type: ignore[attr-defined]


def test_data_transfer_pdu_larger_than_max_pdu_aborts_the_association(tmp_path: Path) -> None:
    cfg, server = _start(tmp_path, max_pdu=16384)
    try:
        assoc = _associate(cfg, "A")
        assert assoc.is_established and assoc.dul.socket is not None
        assoc.dul.socket.send(struct.pack(">BxI", 0x04, 1 << 20) + b"\x00" * 64)
        assert _aborted_within(assoc, 10)
    finally:
        server.shutdown()  # type: ignore[attr-defined]
