"""A cheap structural check of an encoded data set: does every element fit in the bytes?

pydicom is lenient on reading: a data set cut off in the middle of an element is read up to
the cut with only a warning. A receiver must not acknowledge such an instance, so the listener
walks the element headers (no values are decoded) and refuses data that end inside an element
or hold bytes past the last one.
"""

from __future__ import annotations

import struct

from pydicom.uid import UID

_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQ_END = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF


class Truncated(ValueError):
    """The encoded data set ends inside an element (or holds trailing garbage)."""


def file_meta_end(data: bytes | memoryview) -> int:
    """Offset of the data set in a Part-10 byte string (after preamble and file meta)."""
    if bytes(data[128:132]) != b"DICM":
        raise Truncated("no DICM prefix")
    if bytes(data[132:136]) != b"\x02\x00\x00\x00" or bytes(data[136:138]) != b"UL":
        raise Truncated("file meta does not start with its group length")
    (group_length,) = struct.unpack_from("<I", data, 140)
    end = 144 + int(group_length)
    if end > len(data):
        raise Truncated("file meta longer than the data")
    return end


def check_complete(data: bytes | bytearray | memoryview, offset: int, transfer_syntax: UID) -> None:
    """Raise Truncated unless the elements from ``offset`` end exactly at ``len(data)``.

    Deflated data sets are not walked (their bytes are compressed).
    """
    if transfer_syntax.is_deflated:
        return
    scan(data, offset, transfer_syntax, {})


#: Tags of the top-level attributes the index reads (no pixel data), by keyword.
HEADER_TAGS: dict[int, str] = {
    0x00080005: "SpecificCharacterSet",
    0x00080008: "ImageType",
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x00080020: "StudyDate",
    0x00080050: "AccessionNumber",
    0x00080060: "Modality",
    0x00081030: "StudyDescription",
    0x0008103E: "SeriesDescription",
    0x00100020: "PatientID",
    0x00180015: "BodyPartExamined",
    0x00180050: "SliceThickness",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
    0x00200011: "SeriesNumber",
    0x00200013: "InstanceNumber",
}

# Character sets whose text this scanner decodes itself; others go through pydicom.
_CODECS = {"": "ascii", "ISO_IR 6": "ascii", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}


class UnsupportedEncoding(ValueError):
    """The header uses an encoding this scanner leaves to pydicom (deflate, other charsets)."""


def scan(
    data: bytes | bytearray | memoryview, offset: int, transfer_syntax: UID, wanted: dict[int, str]
) -> dict[int, bytes]:
    """Check that the elements from ``offset`` end exactly at ``len(data)`` (else Truncated)
    and return the raw values of the top-level tags in ``wanted``.

    Deflated data sets are not walked (their bytes are compressed): UnsupportedEncoding when
    values are wanted, nothing checked otherwise.
    """
    if transfer_syntax.is_deflated:
        if wanted:
            raise UnsupportedEncoding("deflated data set")
        return {}
    walker = _Walker(
        data,
        implicit=transfer_syntax.is_implicit_VR,
        fmt="<" if transfer_syntax.is_little_endian else ">",
        wanted=wanted,
    )
    end = walker.elements(offset, len(data), until=None, depth=0)
    if end != len(data):
        raise Truncated(f"{len(data) - end} bytes after the last element")
    return walker.found


def header_values(
    data: bytes | bytearray | memoryview, offset: int, transfer_syntax: UID
) -> dict[str, str | list[str]]:
    """The index's header attributes by keyword, as pydicom would give them as text: one
    string, or a list for several values. Also checks completeness (Truncated).

    Raises UnsupportedEncoding for a deflated data set or a character set other than ASCII,
    ISO_IR 100 and ISO_IR 192 (the caller then reads the header with pydicom).
    """
    raw = scan(data, offset, transfer_syntax, HEADER_TAGS)
    charset = raw.pop(0x00080005, b"").decode("ascii", "replace").strip(" \x00")
    codec = _CODECS.get(charset)
    if codec is None:
        raise UnsupportedEncoding(f"character set {charset!r}")
    values: dict[str, str | list[str]] = {}
    for tag, value in raw.items():
        text = value.decode(codec).rstrip(" \x00")
        parts = [part.strip(" \x00") for part in text.split("\\")]
        values[HEADER_TAGS[tag]] = parts[0] if len(parts) == 1 else parts
    return values


class _Walker:
    def __init__(
        self,
        data: bytes | bytearray | memoryview,
        *,
        implicit: bool,
        fmt: str,
        wanted: dict[int, str],
    ) -> None:
        self.data = data
        self.implicit = implicit
        self.wanted = wanted
        self.found: dict[int, bytes] = {}
        # One unpack per element header: (group, element, length) for implicit VR and
        # items; (group, element, VR, 16-bit length) for explicit VR; a 32-bit length.
        self._implicit = struct.Struct(fmt + "HHI")
        self._explicit = struct.Struct(fmt + "HH2sH")
        self._u32 = struct.Struct(fmt + "I")

    def elements(self, pos: int, limit: int, until: int | None, depth: int) -> int:
        """Walk elements from ``pos``; stop at ``limit`` or after the ``until`` delimiter.

        At ``depth`` 0 (the top level) the values of wanted tags are kept in ``found``."""
        data, wanted, implicit = self.data, self.wanted, self.implicit
        unpack_implicit = self._implicit.unpack_from
        unpack_explicit = self._explicit.unpack_from
        while pos < limit:
            if pos + 8 > limit:
                raise Truncated(f"data end inside an element at byte {pos}")
            if implicit:
                group, element, length = unpack_implicit(data, pos)
                pos += 8
            else:
                group, element, vr, length = unpack_explicit(data, pos)
                if group == 0xFFFE:
                    group, element, length = unpack_implicit(data, pos)
                    pos += 8
                elif vr in _LONG_VRS:
                    if pos + 12 > limit:
                        raise Truncated(f"data end inside an element at byte {pos}")
                    (length,) = self._u32.unpack_from(data, pos + 8)
                    pos += 12
                else:
                    pos += 8
            tag = (group << 16) | element
            if until is not None and tag == until:
                return pos
            if length == _UNDEFINED:
                pos = self.items(pos, limit)
                continue
            if pos + length > limit:
                raise Truncated(f"data end inside an element at byte {pos}")
            if depth == 0 and tag in wanted:
                self.found[tag] = bytes(data[pos : pos + length])
            pos += length
        if until is not None:
            raise Truncated("data end before a sequence or item delimiter")
        return pos

    def items(self, pos: int, limit: int) -> int:
        """Items of an undefined-length sequence (or encapsulated pixel data)."""
        unpack_implicit = self._implicit.unpack_from
        while True:
            if pos + 8 > limit:
                raise Truncated(f"data end inside an element at byte {pos}")
            group, element, length = unpack_implicit(self.data, pos)
            tag = (group << 16) | element
            pos += 8
            if tag == _SEQ_END:
                return pos
            if tag != _ITEM:
                raise Truncated(f"expected an item at byte {pos - 8}")
            if length == _UNDEFINED:
                # An item of undefined length: a nested data set up to the item delimiter.
                pos = self.elements(pos, limit, until=_ITEM_END, depth=1)
            else:
                if pos + length > limit:
                    raise Truncated(f"data end inside an element at byte {pos}")
                pos += length


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element of group 0002."""
    tag = struct.pack("<HH", 0x0002, element)
    if vr in _LONG_VRS:
        return tag + vr + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def part10_prefix(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    implementation_class_uid: str,
    implementation_version: str,
) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information (PS3.10 7.1) for a data set received
    over the network, encoded directly: this runs once per received instance, and building a
    pydicom FileMetaDataset for it costs more than the rest of the handler."""
    version = implementation_version.encode("ascii")
    if len(version) % 2:
        version += b" "
    body = b"".join(
        (
            _meta_element(0x0001, b"OB", b"\x00\x01"),
            _meta_element(0x0002, b"UI", _ui(sop_class_uid)),
            _meta_element(0x0003, b"UI", _ui(sop_instance_uid)),
            _meta_element(0x0010, b"UI", _ui(transfer_syntax_uid)),
            _meta_element(0x0012, b"UI", _ui(implementation_class_uid)),
            _meta_element(0x0013, b"SH", version),
        )
    )
    group_length = _meta_element(0x0000, b"UL", struct.pack("<I", len(body)))
    return b"\x00" * 128 + b"DICM" + group_length + body
