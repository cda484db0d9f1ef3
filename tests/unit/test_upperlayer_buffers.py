"""The association's data-set buffer: in memory up to a limit, then in a temporary file."""

from __future__ import annotations

import os
from pathlib import Path

from pacs_agent.net.upperlayer import _DataSetBuffer


def test_data_set_buffer_spills_past_its_limit_and_returns_the_same_bytes(
    tmp_path: Path,
) -> None:
    chunks = [os.urandom(300) for _ in range(10)]
    buffer = _DataSetBuffer(64, tmp_path, spill_bytes=1000)
    for chunk in chunks[:3]:
        buffer.append(memoryview(chunk))
    assert not buffer.spilled  # 900 bytes: still in memory
    for chunk in chunks[3:]:
        buffer.append(memoryview(chunk))
    assert buffer.spilled and buffer.length == 3000
    with buffer.view(buffer.length) as view:
        assert bytes(view) == b"".join(chunks)
    buffer.reset(0)
    assert not buffer.spilled and buffer.length == 0
    buffer.append(memoryview(b"again"))  # in memory again after the reset
    with buffer.view(buffer.length) as view:
        assert bytes(view) == b"again"
    assert os.listdir(tmp_path) == []  # the temporary file had no name to leave behind


def test_data_set_buffer_without_a_spill_directory_stays_in_memory() -> None:
    buffer = _DataSetBuffer(16, None, spill_bytes=10)
    buffer.append(memoryview(b"x" * 100))
    assert not buffer.spilled
    with buffer.view(buffer.length) as view:
        assert bytes(view) == b"x" * 100


def test_data_set_buffer_past_its_size_limit_discards_what_comes_and_says_why(
    tmp_path: Path,
) -> None:
    buffer = _DataSetBuffer(0, tmp_path, spill_bytes=100, limit_bytes=1000)
    for _ in range(3):
        buffer.append(memoryview(b"x" * 300))  # 900 bytes: spilled, under the limit
    assert buffer.spilled and buffer.failure() is None
    buffer.append(memoryview(b"x" * 300))  # 1200 bytes: over it
    buffer.append(memoryview(b"x" * 300))
    assert buffer.too_large and buffer.length == 1500
    assert not buffer.spilled and len(buffer.data) == 0  # file closed, memory given back
    failure = buffer.failure()
    assert failure is not None
    for_log, for_peer = failure
    assert "listener.max_instance_mb" in for_log and "discarded" in for_log
    assert len(for_peer) <= 64 and "listener.max_instance_mb" in for_peer
    buffer.reset(0)
    assert not buffer.too_large and buffer.failure() is None
    buffer.append(memoryview(b"next"))  # the next data set of the association is kept
    with buffer.view(buffer.length) as view:
        assert bytes(view) == b"next"
