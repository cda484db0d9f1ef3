"""The upper layer's fixed encodings (PS3.8 9.3, PS3.7 E.1), checked against pydicom's and
pynetdicom's own decoders and encoders: no sockets."""

from __future__ import annotations

import struct
from io import BytesIO

import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ, A_RELEASE_RP, P_DATA_TF

from pacs_agent.net.upperlayer import (
    C_ECHO_RSP,
    C_STORE_RSP,
    ProtocolError,
    abort_pdu,
    command_pdus,
    parse_command,
    reject_pdu,
    release_rp_pdu,
    response_command,
)

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"


def _decode_command(data: bytes) -> Dataset:
    ds = decode(BytesIO(data), is_implicit_vr=True, is_little_endian=True)
    assert isinstance(ds, Dataset)
    return ds


def _store_rq_command(sop_instance_uid: str, message_id: int = 7) -> bytes:
    """A C-STORE-RQ command set as pynetdicom encodes it (implicit VR little endian)."""
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = CT_IMAGE
    primitive.AffectedSOPInstanceUID = sop_instance_uid
    primitive.Priority = 0x0002
    primitive.MoveOriginatorApplicationEntityTitle = "MOVER"
    primitive.MoveOriginatorMessageID = 3
    primitive.DataSet = BytesIO(b"\x08\x00\x18\x00\x00\x00\x00\x00")
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    raw = encode(message.command_set, True, True)
    assert raw is not None
    return raw


def _split_pdus(stream: bytes) -> list[bytes]:
    pdus, pos = [], 0
    while pos < len(stream):
        (length,) = struct.unpack_from(">I", stream, pos + 2)
        pdus.append(stream[pos : pos + 6 + length])
        pos += 6 + length
    assert pos == len(stream), "the stream ends inside a PDU"
    return pdus


def test_store_response_decodes_with_pydicom_to_the_given_values() -> None:
    uid = generate_uid()  # odd or even length: both must decode to the same UID
    raw = response_command(C_STORE_RSP, 41, CT_IMAGE, 0xA700, uid, "storage failed: disk full")
    ds = _decode_command(raw)
    assert ds.CommandGroupLength == len(raw) - 12  # group length counts what follows it
    assert ds.AffectedSOPClassUID == CT_IMAGE
    assert ds.CommandField == C_STORE_RSP
    assert ds.MessageIDBeingRespondedTo == 41
    assert ds.CommandDataSetType == 0x0101
    assert ds.Status == 0xA700
    assert ds.ErrorComment == "storage failed: disk full"
    assert ds.AffectedSOPInstanceUID == uid
    tags = [int(elem.tag) for elem in ds]
    assert tags == sorted(tags), "command elements must ascend"


def test_echo_response_has_no_instance_uid_and_no_comment() -> None:
    ds = _decode_command(response_command(C_ECHO_RSP, 1, VERIFICATION, 0x0000))
    assert ds.CommandField == C_ECHO_RSP
    assert ds.Status == 0
    assert ds.AffectedSOPClassUID == VERIFICATION
    assert "AffectedSOPInstanceUID" not in ds
    assert "ErrorComment" not in ds


@pytest.mark.parametrize("length", [1, 63, 64, 65, 200])
def test_error_comment_is_padded_to_even_length_and_cut_at_64_characters(length: int) -> None:
    comment = "x" * length
    raw = response_command(C_STORE_RSP, 2, CT_IMAGE, 0xC210, "1.2.3", comment)
    values = parse_command(raw)
    value = values[0x0902]
    assert len(value) % 2 == 0 and len(value) <= 64
    assert value.rstrip(b" ") == comment[:64].encode()
    assert _decode_command(raw).ErrorComment == comment[:64]


def test_non_ascii_error_comment_stays_one_byte_per_character() -> None:
    raw = response_command(C_STORE_RSP, 2, CT_IMAGE, 0xC210, "1.2.3", "naïve")
    assert parse_command(raw)[0x0902] == b"na?ve "


def test_uid_values_are_padded_with_a_null_byte() -> None:
    values = parse_command(response_command(C_STORE_RSP, 2, CT_IMAGE, 0, "1.2.345"))
    assert values[0x1000] == b"1.2.345\x00"
    assert values[0x0002] == CT_IMAGE.encode() + b"\x00"  # 25 characters


def test_parse_command_reads_a_store_request_encoded_by_pynetdicom() -> None:
    uid = generate_uid()
    values = parse_command(_store_rq_command(uid, message_id=7))
    assert struct.unpack("<H", values[0x0100])[0] == 0x0001  # C-STORE-RQ
    assert struct.unpack("<H", values[0x0110])[0] == 7
    assert struct.unpack("<H", values[0x0700])[0] == 0x0002  # priority
    assert struct.unpack("<H", values[0x0800])[0] != 0x0101  # a data set follows
    assert values[0x0002].rstrip(b"\x00") == CT_IMAGE.encode()
    assert values[0x1000].rstrip(b"\x00") == uid.encode()
    assert values[0x1030].rstrip(b" ") == b"MOVER"
    assert struct.unpack("<I", values[0x0000])[0] == len(_store_rq_command(uid)) - 12


def test_parse_command_of_a_response_round_trips_every_element() -> None:
    raw = response_command(C_STORE_RSP, 9, CT_IMAGE, 0x0000, "1.2.3.4", "ok")
    ds = _decode_command(raw)
    values = parse_command(raw)
    assert sorted(values) == sorted(int(elem.tag) & 0xFFFF for elem in ds)


@pytest.mark.parametrize("cut", [1, 7, 8, 11, 20])
def test_parse_command_rejects_a_truncated_command_set(cut: int) -> None:
    raw = _store_rq_command(generate_uid())
    with pytest.raises(ProtocolError):
        parse_command(raw[:-cut])


def test_parse_command_rejects_elements_outside_group_0000() -> None:
    # A data set (group 0008) where a command set should be.
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE
    raw = encode(ds, True, True)
    assert raw is not None
    with pytest.raises(ProtocolError):
        parse_command(raw)
    # A command set followed by one non-command element.
    with pytest.raises(ProtocolError):
        parse_command(response_command(C_ECHO_RSP, 1, VERIFICATION, 0) + raw)


def test_parse_command_of_nothing_is_an_empty_command() -> None:
    assert parse_command(b"") == {}


@pytest.mark.parametrize("peer_max", [7, 16, 64, 100])
def test_command_pdus_fragment_to_the_peers_maximum_and_reassemble(peer_max: int) -> None:
    command = response_command(C_STORE_RSP, 5, CT_IMAGE, 0xA700, generate_uid(), "x" * 60)
    pdus = _split_pdus(command_pdus(3, command, peer_max))
    assert len(pdus) > 1
    reassembled = b""
    for n, raw in enumerate(pdus):
        pdu = P_DATA_TF()
        pdu.decode(raw)  # pynetdicom's own decoder
        assert pdu.pdu_length <= peer_max  # the variable field fits the peer's maximum
        (pdv,) = pdu.presentation_data_value_items
        assert pdv.context_id == 3
        assert pdv.data is not None
        control, fragment = pdv.data[0], pdv.data[1:]
        last = n == len(pdus) - 1
        assert control == (0x03 if last else 0x01)  # command; last fragment flagged once
        reassembled += fragment
    assert reassembled == command


def test_command_pdus_send_one_pdu_when_the_peer_sets_no_limit() -> None:
    command = response_command(C_ECHO_RSP, 1, VERIFICATION, 0)
    (raw,) = _split_pdus(command_pdus(1, command, 0))
    pdu = P_DATA_TF()
    pdu.decode(raw)
    (pdv,) = pdu.presentation_data_value_items
    assert (pdv.context_id, pdv.data) == (1, b"\x03" + command)


def test_command_pdus_match_what_pynetdicom_itself_sends() -> None:
    """The same command set fragmented by pynetdicom's encoder and by ours: identical bytes."""
    command = _store_rq_command(generate_uid())
    message = C_STORE_RQ()
    message.command_set = _decode_command(command)
    message.data_set = BytesIO(b"")
    ours = command_pdus(1, command, 64)
    theirs = b""
    for primitive in message.encode_msg(1, 64):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        theirs += pdu.encode()
    # pynetdicom then sends an empty data set fragment: compare the command PDUs only.
    assert theirs.startswith(ours)


def test_abort_pdu_decodes_with_pynetdicom() -> None:
    pdu = A_ABORT_RQ()
    pdu.decode(abort_pdu(0x02, 0x02))
    assert (pdu.source, pdu.reason_diagnostic) == (0x02, 0x02)
    assert pdu.encode() == abort_pdu(0x02, 0x02)
    default = A_ABORT_RQ()
    default.decode(abort_pdu())
    assert (default.source, default.reason_diagnostic) == (0x02, 0x00)


@pytest.mark.parametrize(("result", "source", "reason"), [(1, 1, 3), (1, 1, 7), (2, 3, 2)])
def test_reject_pdu_decodes_with_pynetdicom(result: int, source: int, reason: int) -> None:
    pdu = A_ASSOCIATE_RJ()
    pdu.decode(reject_pdu(result, source, reason))
    assert (pdu.result, pdu.source, pdu.reason_diagnostic) == (result, source, reason)
    assert pdu.encode() == reject_pdu(result, source, reason)


def test_release_rp_pdu_decodes_with_pynetdicom() -> None:
    pdu = A_RELEASE_RP()
    pdu.decode(release_rp_pdu())
    assert pdu.encode() == release_rp_pdu()
    assert release_rp_pdu() == b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"
