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
