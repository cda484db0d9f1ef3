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


def check_complete(data: bytes | memoryview, offset: int, transfer_syntax: UID) -> None:
    """Raise Truncated unless the elements from ``offset`` end exactly at ``len(data)``.

    Deflated data sets are not walked (their bytes are compressed).
    """
    if transfer_syntax.is_deflated:
        return
    walker = _Walker(
        bytes(data) if isinstance(data, memoryview) else data,
        implicit=transfer_syntax.is_implicit_VR,
        fmt="<" if transfer_syntax.is_little_endian else ">",
    )
    end = walker.elements(offset, len(data), until=None)
    if end != len(data):
        raise Truncated(f"{len(data) - end} bytes after the last element")


class _Walker:
    def __init__(self, data: bytes, *, implicit: bool, fmt: str) -> None:
        self.data = data
        self.implicit = implicit
        self.fmt = fmt

    def _u16(self, pos: int) -> int:
        return int(struct.unpack_from(self.fmt + "H", self.data, pos)[0])

    def _u32(self, pos: int) -> int:
        return int(struct.unpack_from(self.fmt + "I", self.data, pos)[0])

    def _tag(self, pos: int) -> int:
        return (self._u16(pos) << 16) | self._u16(pos + 2)

    def _need(self, pos: int, count: int, limit: int) -> None:
        if pos + count > limit:
            raise Truncated(f"data end inside an element at byte {pos}")

    def elements(self, pos: int, limit: int, until: int | None) -> int:
        """Walk elements from ``pos``; stop at ``limit`` or after the ``until`` delimiter."""
        while pos < limit:
            self._need(pos, 8, limit)
            tag = self._tag(pos)
            if until is not None and tag == until:
                return pos + 8
            if self.implicit or tag >> 16 == 0xFFFE:
                length = self._u32(pos + 4)
                vr = b"SQ" if length == _UNDEFINED else b""
                pos += 8
            else:
                vr = self.data[pos + 4 : pos + 6]
                if vr in _LONG_VRS:
                    self._need(pos, 12, limit)
                    length = self._u32(pos + 8)
                    pos += 12
                else:
                    length = self._u16(pos + 6)
                    pos += 8
            if length == _UNDEFINED:
                pos = self.items(pos, limit)
            else:
                self._need(pos, length, limit)
                pos += length
        if until is not None:
            raise Truncated("data end before a sequence or item delimiter")
        return pos

    def items(self, pos: int, limit: int) -> int:
        """Items of an undefined-length sequence (or encapsulated pixel data)."""
        while True:
            self._need(pos, 8, limit)
            tag = self._tag(pos)
            length = self._u32(pos + 4)
            pos += 8
            if tag == _SEQ_END:
                return pos
            if tag != _ITEM:
                raise Truncated(f"expected an item at byte {pos - 8}")
            if length == _UNDEFINED:
                # An item of undefined length: a nested data set up to the item delimiter.
                pos = self.elements(pos, limit, until=_ITEM_END)
            else:
                self._need(pos, length, limit)
                pos += length
