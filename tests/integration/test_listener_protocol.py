"""The listener's upper layer (pacs_agent.net.upperlayer) over real loopback connections.

Peers: a raw socket speaking PDUs encoded by pynetdicom's own classes (to send what a correct
peer never would), pynetdicom's requestor and dcmtk's echoscu and storescu.
"""

from __future__ import annotations

import logging
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.config import ListenerSettings
from pacs_agent.db.migrate import upgrade
from pacs_agent.db.models import Instance, Study
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.demo.synthetic import make_ct_study, write_study
from pacs_agent.dicom.structure import file_meta_end
from pacs_agent.net import upperlayer
from pacs_agent.net.scp import Receiver, RunningListener, start_listener
from pacs_agent.net.scu import set_nodelay
from pacs_agent.storage.spool import Spool
from tests.helpers.servers import free_port

pytestmark = pytest.mark.integration

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
DCMTK_ENV = {"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}
# A-ABORT from the service provider, reason "unexpected PDU" (PS3.8 9.3.8): what the listener
# sends for every protocol violation.
PROVIDER_ABORT = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x02"


@dataclass
class Running:
    cfg: ListenerSettings
    listener: RunningListener
    session_factory: sessionmaker[Session]
    spool: Path

    def count(self, model: type) -> int:
        with self.session_factory() as s:
            return int(s.scalar(select(func.count()).select_from(model)) or 0)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until the listener has finished every association (its threads have returned)."""
        server = self.listener.server
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with server._lock:
                if not server._open:
                    return
            time.sleep(0.02)
        raise AssertionError("an association thread is still running")


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Any]:
    started: list[Running] = []

    def make(**settings: object) -> Running:
        url = f"sqlite:///{tmp_path / 'index.db'}"
        upgrade(url)
        cfg = ListenerSettings.model_validate({"port": free_port(), **settings})
        factory = make_session_factory(make_engine(url))
        spool = tmp_path / "spool"
        running = Running(cfg, start_listener(cfg, Receiver(Spool(spool), factory)), factory, spool)
        started.append(running)
        return running

    yield make
    for running in started:
        running.listener.shutdown()


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Eight 128x128 CT slices (32 KiB of pixels each: several 4 KiB PDUs per instance)."""
    study = make_ct_study(None, rows=128, cols=128, slices=8, seed=3)
    return write_study(study, tmp_path_factory.mktemp("ct"))


def dataset_bytes(data: bytes) -> bytes:
    """The data set of a Part-10 byte string, without preamble and file meta."""
    return data[file_meta_end(data) :]


# ---------------------------------------------------------------------------------------------
# A raw peer: correct PDUs from pynetdicom's encoders, sent (or not) one by one


def associate_rq(contexts: list[tuple[int, str, str]], max_pdu: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing (context id, abstract syntax, transfer syntax)."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = UID("1.2.840.10008.3.1.1.1")
    primitive.calling_ae_title = "RAWPEER"
    primitive.called_ae_title = "PACSAGENT"
    proposed = []
    for context_id, abstract, syntax in contexts:
        cx = build_context(abstract, [syntax])
        cx.context_id = context_id
        proposed.append(cx)
    primitive.presentation_context_definition_list = proposed
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    class_uid = ImplementationClassUIDNotification()
    class_uid.implementation_class_uid = UID("1.2.826.0.1.3680043.9.3811.0")
    primitive.user_information = [length, class_uid]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def store_pdus(path: Path, context_id: int, max_pdu: int, message_id: int = 1) -> list[bytes]:
    """The P-DATA-TF PDUs of a C-STORE-RQ of the file at ``path``, as pynetdicom sends them."""
    ds = dcmread(path)
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = ds.SOPClassUID
    primitive.AffectedSOPInstanceUID = ds.SOPInstanceUID
    primitive.Priority = 0x0002
    primitive.DataSet = BytesIO(dataset_bytes(path.read_bytes()))
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    pdus = []
    for p_data in message.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(p_data)
        pdus.append(bytes(pdu.encode()))
    return pdus


def command_pdu(context_id: int, fragment: bytes, control: int) -> bytes:
    pdv = struct.pack(">IBB", len(fragment) + 2, context_id, control) + fragment
    return struct.pack(">BxI", 0x04, len(pdv)) + pdv


class RawPeer:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _exactly(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError(f"closed after {len(out)} of {n} bytes")
            out += chunk
        return out

    def read_pdu(self) -> bytes:
        header = self._exactly(6)
        (length,) = struct.unpack(">I", header[2:])
        return header + self._exactly(length)

    def at_eof(self) -> bool:
        return self.sock.recv(1) == b""

    def associate(self, contexts: list[tuple[int, str, str]], max_pdu: int = 16384) -> set[int]:
        """Associate; the accepted context ids."""
        self.send(associate_rq(contexts, max_pdu))
        raw = self.read_pdu()
        assert raw[0] == 0x02, f"expected A-ASSOCIATE-AC, got PDU type {raw[0]:#04x}"
        ac = A_ASSOCIATE_AC()
        ac.decode(raw)
        results = ac.to_primitive().presentation_context_definition_results_list
        return {cx.context_id for cx in results if cx.result == 0 and cx.context_id is not None}

    def read_response(self) -> tuple[Dataset, list[int]]:
        """The next DIMSE response command set and the lengths of the PDUs it came in."""
        command, lengths = b"", []
        while True:
            raw = self.read_pdu()
            assert raw[0] == 0x04, f"expected P-DATA-TF, got PDU type {raw[0]:#04x}"
            pdu = P_DATA_TF()
            pdu.decode(raw)
            lengths.append(int(pdu.pdu_length))
            for pdv in pdu.presentation_data_value_items:
                assert pdv.data is not None
                control, fragment = pdv.data[0], pdv.data[1:]
                assert control & 0x01, "a response carries no data set"
                command += fragment
                if control & 0x02:
                    ds = decode(BytesIO(command), is_implicit_vr=True, is_little_endian=True)
                    assert isinstance(ds, Dataset)
                    return ds, lengths

    def expect_provider_abort(self, reason: int = 0x02) -> None:
        """The listener sends A-ABORT (provider, ``reason``: unexpected PDU by default) and
        closes the connection."""
        raw = self.read_pdu()
        abort = A_ABORT_RQ()
        abort.decode(raw)
        assert (abort.source, abort.reason_diagnostic) == (0x02, reason)
        if reason == 0x02:
            assert raw == PROVIDER_ABORT
        assert self.at_eof()


@pytest.fixture
def raw_peers() -> Iterator[Any]:
    peers: list[RawPeer] = []

    def make(port: int) -> RawPeer:
        peer = RawPeer(port)
        peers.append(peer)
        return peer

    yield make
    for peer in peers:
        peer.close()


def _echo(port: int) -> int:
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSAGENT")
    assert assoc.is_established
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def _wait_aborted(assoc: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.02)
    assert assoc.is_aborted


# ---------------------------------------------------------------------------------------------
# Protocol violations


def test_data_before_an_association_request_is_answered_with_an_abort(
    start: Any, raw_peers: Any
) -> None:
    running = start()
    peer = raw_peers(running.cfg.port)
    peer.send(command_pdu(1, b"\x00" * 12, 0x03))
    peer.expect_provider_abort()
    assert _echo(running.cfg.port) == 0


def test_undecodable_association_request_is_answered_with_an_abort(
    start: Any, raw_peers: Any
) -> None:
    running = start()
    peer = raw_peers(running.cfg.port)
    peer.send(b"\x01\x00\x00\x00\x00\x10" + b"\xff" * 16)
    peer.expect_provider_abort(reason=0x06)  # invalid PDU parameter value
    assert _echo(running.cfg.port) == 0


def test_unknown_pdu_type_after_association_aborts_a_pynetdicom_requestor(start: Any) -> None:
    running = start()
    ae = AE(ae_title="WEIRD")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", running.cfg.port, ae_title="PACSAGENT")
    assert assoc.is_established and assoc.dul.socket is not None
    assoc.dul.socket.send(b"\x7f\x00\x00\x00\x00\x04\x00\x00\x00\x00")
    _wait_aborted(assoc)
    running.wait_idle()
    assert _echo(running.cfg.port) == 0


def test_unknown_pdu_type_is_answered_with_a_provider_abort_unrecognized_pdu(
    start: Any, raw_peers: Any
) -> None:
    running = start()
    peer = raw_peers(running.cfg.port)
    assert peer.associate([(1, Verification, ImplicitVRLittleEndian)]) == {1}
    peer.send(b"\x7f\x00\x00\x00\x00\x04\x00\x00\x00\x00")
    peer.expect_provider_abort(reason=0x01)  # unrecognized PDU (PS3.8 9.3.8)


def test_association_request_while_established_aborts(start: Any, raw_peers: Any) -> None:
    running = start()
    peer = raw_peers(running.cfg.port)
    assert peer.associate([(1, Verification, ImplicitVRLittleEndian)]) == {1}
    peer.send(associate_rq([(1, Verification, ImplicitVRLittleEndian)]))
    peer.expect_provider_abort()


def test_pdv_on_a_rejected_presentation_context_aborts(start: Any, raw_peers: Any) -> None:
    running = start()
    peer = raw_peers(running.cfg.port)
    # Context 3 proposes an abstract syntax the listener does not support: rejected.
    accepted = peer.associate(
        [(1, Verification, ImplicitVRLittleEndian), (3, "1.2.3.4.5.6.7", ImplicitVRLittleEndian)]
    )
    assert accepted == {1}
    peer.send(command_pdu(3, b"\x00" * 12, 0x01))
    peer.expect_provider_abort()


def test_pdv_on_a_context_never_proposed_aborts(start: Any, raw_peers: Any) -> None:
    running = start()
    peer = raw_peers(running.cfg.port)
    assert peer.associate([(1, Verification, ImplicitVRLittleEndian)]) == {1}
    peer.send(command_pdu(5, b"\x00" * 12, 0x01))
    peer.expect_provider_abort()


def test_release_request_after_a_command_fragment_aborts(start: Any, raw_peers: Any) -> None:
    running = start()
    peer = raw_peers(running.cfg.port)
    assert peer.associate([(1, Verification, ImplicitVRLittleEndian)]) == {1}
    peer.send(command_pdu(1, b"\x00\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00\x00", 0x01))
    peer.send(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-RELEASE-RQ
    peer.expect_provider_abort()


def test_release_request_after_a_data_set_fragment_aborts(
    start: Any, raw_peers: Any, ct_files: list[Path]
) -> None:
    running = start()
    peer = raw_peers(running.cfg.port)
    assert peer.associate([(1, CT_IMAGE, ExplicitVRLittleEndian)]) == {1}
    pdus = store_pdus(ct_files[0], 1, 4096)
    peer.send(b"".join(pdus[:3]))  # the command and two data set fragments of many
    peer.send(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")
    peer.expect_provider_abort()
    running.wait_idle()
    assert running.count(Instance) == 0


def test_release_between_messages_is_answered_and_the_peer_closes_first(
    start: Any, raw_peers: Any
) -> None:
    running = start()
    peer = raw_peers(running.cfg.port)
    assert peer.associate([(1, Verification, ImplicitVRLittleEndian)]) == {1}
    peer.send(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")
    assert peer.read_pdu() == b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"  # A-RELEASE-RP
    peer.sock.settimeout(0.3)
    with pytest.raises(TimeoutError):  # the listener waits for the requestor to close
        peer.sock.recv(1)
    peer.close()
    running.wait_idle()


def test_data_set_fragment_before_its_command_aborts(start: Any, raw_peers: Any) -> None:
    running = start()
    peer = raw_peers(running.cfg.port)
    assert peer.associate([(1, Verification, ImplicitVRLittleEndian)]) == {1}
    peer.send(command_pdu(1, b"\x08\x00\x18\x00\x00\x00\x00\x00", 0x02))
    peer.expect_provider_abort()


def test_message_switching_presentation_context_midway_aborts(
    start: Any, raw_peers: Any, ct_files: list[Path]
) -> None:
    running = start()
    peer = raw_peers(running.cfg.port)
    contexts = [(1, CT_IMAGE, ExplicitVRLittleEndian), (3, Verification, ImplicitVRLittleEndian)]
    assert peer.associate(contexts) == {1, 3}
    pdus = store_pdus(ct_files[0], 1, 4096)
    peer.send(pdus[0] + pdus[1])  # command and the first data set fragment on context 1
    peer.send(store_pdus(ct_files[0], 3, 4096)[2])  # the next fragment on context 3
    peer.expect_provider_abort()


# ---------------------------------------------------------------------------------------------
# Fragmentation: commands and data sets in many small PDUs, both directions


@pytest.fixture
def pdata_lengths(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The lengths of the P-DATA-TF PDUs the listener reads (to prove a test's premise)."""
    lengths: list[int] = []
    read = upperlayer.Association._read_pdu

    def recording(self: upperlayer.Association, timeout: float) -> tuple[int, bytearray]:
        pdu_type, body = read(self, timeout)
        if pdu_type == upperlayer.P_DATA_TF_PDU:
            lengths.append(len(body))
        return pdu_type, body

    monkeypatch.setattr(upperlayer.Association, "_read_pdu", recording)
    return lengths


def _stored_bytes(running: Running, sop_instance_uid: str) -> bytes:
    with running.session_factory() as s:
        row = s.scalars(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)).one()
    return (running.spool / row.path).read_bytes()


def test_storescu_with_4k_pdus_stores_byte_for_byte(
    start: Any, ct_files: list[Path], pdata_lengths: list[int]
) -> None:
    running = start()
    exe = shutil.which("storescu")
    assert exe, "dcmtk storescu is required (apt-get install dcmtk)"
    result = subprocess.run(
        [exe, "-R", "--max-send-pdu", "4096", "-aet", "STORESCU", "-aec", "PACSAGENT",
         "127.0.0.1", str(running.cfg.port), *map(str, ct_files[:3])],
        capture_output=True, text=True, timeout=60, env=DCMTK_ENV,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    running.wait_idle()
    assert running.count(Instance) == 3
    assert len(pdata_lengths) > 3 * 8 and max(pdata_lengths) <= 4096
    for path in ct_files[:3]:
        sent = path.read_bytes()
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert dataset_bytes(_stored_bytes(running, uid)) == dataset_bytes(sent)


@pytest.mark.parametrize("listener_max_pdu", [4096, 128])
def test_pynetdicom_with_small_pdus_both_ways_stores_byte_for_byte(
    start: Any, ct_files: list[Path], pdata_lengths: list[int], listener_max_pdu: int
) -> None:
    """The listener's max_pdu bounds what pynetdicom sends (at 128 the command set too is
    fragmented); pynetdicom's 64-byte maximum makes the listener fragment its responses."""
    running = start(max_pdu=listener_max_pdu)
    ae = AE(ae_title="SMALLPDU")
    ae.maximum_pdu_size = 64
    ae.add_requested_context(CT_IMAGE, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", running.cfg.port, ae_title="PACSAGENT")
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == listener_max_pdu
    set_nodelay(assoc)
    files = ct_files[:2] if listener_max_pdu >= 4096 else ct_files[:1]
    try:
        statuses = [int(assoc.send_c_store(path).Status) for path in files]
    finally:
        assoc.release()
    assert statuses == [0] * len(files)
    assert max(pdata_lengths) <= listener_max_pdu
    # every instance (32 KiB of pixels) arrived in many PDUs
    assert len(pdata_lengths) > len(files) * 32768 // listener_max_pdu
    for path in files:
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert dataset_bytes(_stored_bytes(running, uid)) == dataset_bytes(path.read_bytes())


def test_responses_are_fragmented_to_the_requestors_maximum_pdu(
    start: Any, raw_peers: Any, ct_files: list[Path]
) -> None:
    running = start()
    peer = raw_peers(running.cfg.port)
    assert peer.associate([(1, CT_IMAGE, ExplicitVRLittleEndian)], max_pdu=32) == {1}
    peer.send(b"".join(store_pdus(ct_files[0], 1, 4096, message_id=77)))
    rsp, lengths = peer.read_response()
    assert rsp.Status == 0 and rsp.MessageIDBeingRespondedTo == 77
    assert rsp.AffectedSOPInstanceUID == dcmread(ct_files[0]).SOPInstanceUID
    assert len(lengths) > 1 and max(lengths) <= 32


def test_several_pdvs_in_one_pdu_make_one_message(
    start: Any, raw_peers: Any, ct_files: list[Path]
) -> None:
    """A P-DATA-TF may carry several PDV items (PS3.8 9.3.5): the command's and the data set's."""
    running = start()
    peer = raw_peers(running.cfg.port)
    assert peer.associate([(1, CT_IMAGE, ExplicitVRLittleEndian)]) == {1}
    items = b"".join(raw[6:] for raw in store_pdus(ct_files[1], 1, 4096))
    peer.send(struct.pack(">BxI", 0x04, len(items)) + items)
    rsp, _ = peer.read_response()
    assert rsp.Status == 0
    uid = str(dcmread(ct_files[1], stop_before_pixels=True).SOPInstanceUID)
    assert dataset_bytes(_stored_bytes(running, uid)) == dataset_bytes(ct_files[1].read_bytes())


def _command(elements: list[tuple[int, bytes]]) -> bytes:
    """A command set (implicit VR little endian) with its group length."""
    body = b"".join(struct.pack("<HHI", 0, tag, len(v)) + v for tag, v in elements)
    return struct.pack("<HHI", 0, 0, 4) + struct.pack("<I", len(body)) + body


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def test_store_on_a_context_of_another_sop_class_is_refused_0122_and_nothing_stored(
    start: Any, raw_peers: Any, ct_files: list[Path]
) -> None:
    """PS3.7 9.1.1.1: a C-STORE's SOP class is its presentation context's abstract syntax."""
    running = start()
    peer = raw_peers(running.cfg.port)
    assert peer.associate([(1, Verification, ExplicitVRLittleEndian)]) == {1}
    for raw in store_pdus(ct_files[2], 1, 16384):
        peer.send(raw)
    rsp, _ = peer.read_response()
    assert rsp.Status == 0x0122 and rsp.CommandField == 0x8001
    with running.session_factory() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 0
    peer.send(struct.pack(">BxIxxxx", 0x05, 4))  # still established: release works
    assert peer.read_pdu()[0] == 0x06


def test_unsupported_dimse_command_is_answered_0211_and_the_association_goes_on(
    start: Any, raw_peers: Any
) -> None:
    running = start()
    peer = raw_peers(running.cfg.port)
    assert peer.associate([(1, Verification, ImplicitVRLittleEndian)]) == {1}
    uid = Verification.encode() + b"\x00" if len(Verification) % 2 else Verification.encode()
    # An N-ACTION-RQ (0x0130) without a data set: not a service this listener offers.
    command = _command([(0x0002, uid), (0x0100, _us(0x0130)), (0x0110, _us(7)),
                        (0x0800, _us(0x0101))])  # fmt: skip
    peer.send(command_pdu(1, command, 0x03))
    rsp, _ = peer.read_response()
    assert (rsp.CommandField, rsp.MessageIDBeingRespondedTo, rsp.Status) == (0x8130, 7, 0x0211)
    # C-CANCEL gets no answer; the next C-ECHO does.
    cancel = _command([(0x0100, _us(0x0FFF)), (0x0120, _us(7)), (0x0800, _us(0x0101))])
    echo = _command([(0x0002, uid), (0x0100, _us(0x0030)), (0x0110, _us(8)),
                     (0x0800, _us(0x0101))])  # fmt: skip
    peer.send(command_pdu(1, cancel, 0x03) + command_pdu(1, echo, 0x03))
    rsp, _ = peer.read_response()
    assert (rsp.CommandField, rsp.MessageIDBeingRespondedTo, rsp.Status) == (0x8030, 8, 0)


def test_abort_before_any_association_request_is_met_by_a_close(start: Any, raw_peers: Any) -> None:
    running = start()
    peer = raw_peers(running.cfg.port)
    peer.send(struct.pack(">BxIxxBB", 0x07, 4, 0, 0))
    assert peer.at_eof()  # PS3.8 Sta2: AA-2, close without answering


# ---------------------------------------------------------------------------------------------
# Peers that go away midway


def test_peer_abort_midway_leaves_its_study_pending_and_nothing_partial(
    start: Any, ct_files: list[Path]
) -> None:
    running = start()
    ae = AE(ae_title="ABORTER")
    ae.add_requested_context(CT_IMAGE, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", running.cfg.port, ae_title="PACSAGENT")
    assert assoc.is_established and assoc.dul.socket is not None
    set_nodelay(assoc)
    assert [int(assoc.send_c_store(p).Status) for p in ct_files[:2]] == [0, 0]
    context_id = assoc.accepted_contexts[0].context_id
    assert context_id is not None
    pdus = store_pdus(ct_files[2], context_id, 4096, message_id=9)
    assert len(pdus) > 2
    assoc.dul.socket.send(b"".join(pdus[:2]))  # the command and part of the data set
    assoc.abort()
    running.wait_idle()
    assert running.count(Instance) == 2
    with running.session_factory() as s:
        study = s.scalars(select(Study)).one()
        assert study.status == "receiving"
        assert study.last_released_at is None  # an abort is no release
    assert not list(running.spool.rglob(".incoming-*")) + list(running.spool.rglob("*.part"))
    assert _echo(running.cfg.port) == 0


def test_connection_closed_mid_data_set_indexes_nothing_and_the_listener_serves_on(
    start: Any, raw_peers: Any, ct_files: list[Path]
) -> None:
    running = start()
    peer = raw_peers(running.cfg.port)
    assert peer.associate([(1, CT_IMAGE, ExplicitVRLittleEndian)]) == {1}
    pdus = store_pdus(ct_files[3], 1, 4096)
    peer.send(b"".join(pdus[:-1]))  # all but the last fragment
    peer.send(pdus[-1][: len(pdus[-1]) // 2])  # and half of it
    peer.close()
    running.wait_idle()
    assert running.count(Instance) == 0
    assert running.count(Study) == 0
    assert not list(running.spool.rglob(".incoming-*")) + list(running.spool.rglob("*.part"))
    assert not list(running.spool.rglob("*.dcm"))
    assert _echo(running.cfg.port) == 0


@pytest.mark.parametrize("ending", ["provider abort", "peer abort", "peer closes"])
def test_an_association_that_ends_without_release_frees_its_slot(
    start: Any, raw_peers: Any, ending: str
) -> None:
    """max_associations=1: the next association is accepted once the first ended badly.
    (The slot after a release: test_listener_control.)"""
    running = start(max_associations=1)
    peer = raw_peers(running.cfg.port)
    assert peer.associate([(1, Verification, ImplicitVRLittleEndian)]) == {1}
    if ending == "provider abort":
        peer.send(command_pdu(5, b"\x00" * 12, 0x01))
        peer.expect_provider_abort()
    elif ending == "peer abort":
        peer.send(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")
        assert peer.at_eof()  # the listener closes, sending nothing back
    else:
        peer.close()
    running.wait_idle()
    assert _echo(running.cfg.port) == 0


# ---------------------------------------------------------------------------------------------
# dcmtk as the peer


def test_echoscu_gets_an_answer(start: Any) -> None:
    running = start()
    exe = shutil.which("echoscu")
    assert exe, "dcmtk echoscu is required (apt-get install dcmtk)"
    result = subprocess.run(
        [exe, "-v", "-aet", "ECHOSCU", "-aec", "PACSAGENT", "127.0.0.1", str(running.cfg.port)],
        capture_output=True,
        text=True,
        timeout=60,
        env=DCMTK_ENV,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Received Echo Response (Success)" in result.stdout + result.stderr


def test_each_association_is_logged_when_accepted_and_with_its_counts_when_released(
    start: Any, ct_files: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    """What a PACS administrator greps for: who associated, and what became of its C-STOREs."""
    running = start()
    ae = AE(ae_title="CTLOGGED")
    ae.add_requested_context(CT_IMAGE, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    with caplog.at_level(logging.INFO, logger="pacs_agent.net.upperlayer"):
        assoc = ae.associate("127.0.0.1", running.cfg.port, ae_title="PACSAGENT")
        assert assoc.is_established
        set_nodelay(assoc)
        bad = dcmread(ct_files[1])
        del bad.StudyInstanceUID  # refused 0xA900: StudyInstanceUID is empty
        statuses = [int(assoc.send_c_store(ct_files[0]).Status)]
        statuses.append(int(assoc.send_c_store(bad).Status))
        assoc.release()
        running.wait_idle()
    assert statuses == [0, 0xA900]
    messages = [r.getMessage() for r in caplog.records]
    assert "association accepted: 'CTLOGGED' from 127.0.0.1 (1 of 1 presentation contexts)" in (
        messages
    )
    assert "association released: 'CTLOGGED' from 127.0.0.1: 1 stored, 1 refused" in messages


def test_a_peer_that_trickles_its_request_is_closed_at_the_acse_timeout(
    start: Any, raw_peers: Any
) -> None:
    """One byte at a time, each within the timeout, must not keep a connection forever."""
    running = start(acse_timeout_s=0.6)
    peer = raw_peers(running.cfg.port)
    request = associate_rq([(1, Verification, ImplicitVRLittleEndian)])
    started = time.monotonic()
    closed = False
    for byte in request:
        try:
            peer.send(bytes([byte]))
        except OSError:
            closed = True
            break
        time.sleep(0.25)
        if time.monotonic() - started > 5:
            break
    if not closed:
        peer.sock.settimeout(5)
        closed = peer.at_eof()
    assert closed and time.monotonic() - started < 5


def test_connections_beyond_the_limit_are_closed_at_once(start: Any) -> None:
    running = start(max_associations=1, acse_timeout_s=30)
    idle = [
        socket.create_connection(("127.0.0.1", running.cfg.port), timeout=10)
        for _ in range(1 + upperlayer._EXTRA_CONNECTIONS)
    ]
    try:
        time.sleep(0.3)  # all accepted and waiting for their A-ASSOCIATE-RQ
        with socket.create_connection(("127.0.0.1", running.cfg.port), timeout=10) as extra:
            started = time.monotonic()
            assert extra.recv(16) == b""
            assert time.monotonic() - started < 5
    finally:
        for conn in idle:
            conn.close()
    running.wait_idle()
    assert _echo(running.cfg.port) == 0  # once they are gone, callers get in again


def test_store_with_a_non_ascii_sop_instance_uid_in_its_command_is_refused_a900(
    start: Any, raw_peers: Any, ct_files: list[Path]
) -> None:
    running = start()
    peer = raw_peers(running.cfg.port)
    assert peer.associate([(1, CT_IMAGE, ExplicitVRLittleEndian)]) == {1}
    uid = CT_IMAGE.encode()
    command = _command([(0x0002, uid), (0x0100, _us(0x0001)), (0x0110, _us(5)),
                        (0x0700, _us(0)), (0x0800, _us(0x0000)),
                        (0x1000, b"1.2.3.\xe9\xe9")])  # fmt: skip
    data = dataset_bytes(ct_files[0].read_bytes())
    peer.send(command_pdu(1, command, 0x03) + command_pdu(1, data, 0x02))
    rsp, _ = peer.read_response()
    assert (rsp.MessageIDBeingRespondedTo, rsp.Status) == (5, 0xA900)
    assert running.count(Instance) == 0
