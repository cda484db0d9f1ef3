from __future__ import annotations

import os
from pathlib import Path

import pytest

from pacs_agent.storage.spool import InvalidUID, Spool, write_durable


@pytest.mark.parametrize("bad", ["../../etc", "1.2/../../x", "", "1.2.3\\4", "1.02.3", "a.b"])
def test_spool_path_refuses_anything_but_a_valid_uid(tmp_path: Path, bad: str) -> None:
    with pytest.raises(InvalidUID):
        Spool(tmp_path).relative_path(bad, "1.2.3", "1.2.4")


def test_spool_path_is_study_series_instance(tmp_path: Path) -> None:
    rel = Spool(tmp_path).relative_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert rel == Path("1.2.3/1.2.3.4/1.2.3.4.5.dcm")


def test_durable_write_leaves_no_temp_file_and_replaces_atomically(tmp_path: Path) -> None:
    target = tmp_path / "a" / "x.dcm"
    write_durable(target, b"first")
    write_durable(target, b"second")
    assert target.read_bytes() == b"second"
    assert os.listdir(target.parent) == ["x.dcm"]


def test_failed_write_removes_the_temp_file_and_keeps_the_old_copy(tmp_path: Path) -> None:
    target = tmp_path / "x.dcm"
    write_durable(target, b"old")

    with pytest.raises(TypeError):
        write_durable(target, object())  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x.dcm"]


def test_spool_store_keeps_its_temp_files_in_incoming_and_leaves_none(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    rel = spool.relative_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    spool.store(rel, [b"DICM", bytearray(b"-data")])
    assert (tmp_path / rel).read_bytes() == b"DICM-data"
    assert os.listdir(tmp_path / rel.parent) == ["1.2.3.4.5.dcm"]
    assert os.listdir(tmp_path / ".incoming") == []


def test_clear_incoming_removes_what_a_stopped_listener_left_half_written(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path)
    assert spool.clear_incoming() == 0  # no spool yet: nothing to do
    (tmp_path / ".incoming").mkdir()
    (tmp_path / ".incoming" / ".incoming-1-x.dcm.part").write_bytes(b"half")
    assert spool.clear_incoming() == 1
    assert os.listdir(tmp_path / ".incoming") == []
