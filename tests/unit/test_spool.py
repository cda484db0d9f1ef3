from __future__ import annotations

import errno
import itertools
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from pacs_agent.storage import spool as spool_module
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
    (tmp_path / ".incoming" / "123-4.ahead").write_bytes(b"half")  # taken, then stopped
    assert spool.clear_incoming() == 2
    assert os.listdir(tmp_path / ".incoming") == []


def test_clear_incoming_of_one_process_leaves_the_other_processes_files(tmp_path: Path) -> None:
    """A dead listener process's leftovers go; the files of those still running stay."""
    incoming = tmp_path / ".incoming"
    incoming.mkdir()
    mine = [".incoming-123-77-x.dcm.part", "123-0.ahead", "123-11.ahead"]
    others = [".incoming-1234-77-x.dcm.part", "1234-0.ahead", "12-3.ahead", "9123-1.ahead"]
    for name in mine + others:
        (incoming / name).write_bytes(b"")
    assert Spool(tmp_path).clear_incoming(123) == 3
    assert sorted(os.listdir(incoming)) == sorted(others)


def test_a_temp_file_of_our_own_is_named_for_this_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    real = spool_module._write_and_rename

    def spy(tmp: Path, path: Path, parts: Any, fd: int | None) -> None:
        seen.append(tmp.name)
        real(tmp, path, parts, fd)

    monkeypatch.setattr(spool_module, "_write_and_rename", spy)
    write_durable(tmp_path / "a.dcm", b"x", temp_dir=tmp_path)
    assert seen == [f".incoming-{os.getpid()}-{threading.get_ident()}-a.dcm.part"]


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 512 * 1024 + 300])
def test_durable_write_past_the_page_cache_keeps_the_exact_bytes_and_size(
    tmp_path: Path, size: int
) -> None:
    data = os.urandom(size)
    target = tmp_path / "a.dcm"
    write_durable(target, [data[:300], memoryview(data)[300:]])
    assert target.read_bytes() == data  # the padding of the last O_DIRECT block is cut off


def test_durable_write_without_o_direct_or_too_large_for_it_goes_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[bool] = []
    original = spool_module._write_direct

    def watch(tmp: Path, parts: list[bytes], fd: int | None = None) -> bool:
        written.append(original(tmp, parts, fd))
        return written[-1]

    monkeypatch.setattr(spool_module, "_write_direct", watch)
    large = os.urandom(spool_module._DIRECT_MAX + 1)
    write_durable(tmp_path / "large.dcm", large)
    monkeypatch.setattr(spool_module, "_O_DIRECT", 0)  # a platform or filesystem without it
    small = os.urandom(1000)
    write_durable(tmp_path / "small.dcm", small)
    assert written == [False, False]
    assert (tmp_path / "large.dcm").read_bytes() == large
    assert (tmp_path / "small.dcm").read_bytes() == small
    assert sorted(p.name for p in tmp_path.iterdir()) == ["large.dcm", "small.dcm"]


@pytest.fixture
def refuse_o_direct(monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem that refuses O_DIRECT (EINVAL at open), as tmpfs did before Linux 6.6."""
    real_open = os.open

    def refuse_direct(path: Any, flags: int, mode: int = 0o777) -> int:
        if flags & spool_module._O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(spool_module.os, "open", refuse_direct)


@pytest.mark.usefixtures("refuse_o_direct")
def test_a_filesystem_that_refuses_o_direct_gets_the_buffered_write(tmp_path: Path) -> None:
    data = os.urandom(5000)
    write_durable(tmp_path / "a.dcm", data)
    assert (tmp_path / "a.dcm").read_bytes() == data


@contextmanager
def _files_ahead(spool: Spool, keep: int) -> Iterator[Path]:
    """The spool with files made ahead in its ``.incoming``; once closed, none may be left."""
    spool.make_files_ahead(keep=keep)
    incoming = spool.root / ".incoming"
    try:
        yield incoming
    finally:
        spool.close()
    assert os.listdir(incoming) == []


def _wait_for_files_ahead(incoming: Path, count: int) -> list[str]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        names = sorted(p.name for p in incoming.glob("*.ahead"))
        if len(names) >= count:
            return names
        time.sleep(0.01)
    raise AssertionError(f"fewer than {count} files made ahead in {incoming}")


def test_store_writes_into_a_file_made_ahead_and_close_removes_the_untaken_ones(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path)
    with _files_ahead(spool, keep=3) as incoming:
        before = _wait_for_files_ahead(incoming, 3)
        data = os.urandom(512 * 1024 + 300)
        rel = spool.relative_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
        spool.store(rel, [data[:132], memoryview(data)[132:]])
        assert (tmp_path / rel).read_bytes() == data
        after = _wait_for_files_ahead(incoming, 3)
        assert before[0] not in after  # the first one ready was taken, and replaced


@pytest.mark.usefixtures("refuse_o_direct")
def test_without_o_direct_nothing_is_made_ahead_and_store_makes_its_own_temp_file(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path)
    with _files_ahead(spool, keep=3) as incoming:
        rel = spool.relative_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
        spool.store(rel, b"DICM-data")
        assert (tmp_path / rel).read_bytes() == b"DICM-data"
        assert list(incoming.glob("*.ahead")) == []


def test_a_file_made_ahead_that_the_write_fails_on_is_removed_and_the_target_untouched(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path)
    rel = spool.relative_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    spool.store(rel, b"first")
    with _files_ahead(spool, keep=2) as incoming:
        _wait_for_files_ahead(incoming, 2)
        with pytest.raises(TypeError):
            spool.store(rel, [b"DICM", object()])  # type: ignore[list-item]
        assert (tmp_path / rel).read_bytes() == b"first"


def test_directory_sync_shares_flushes_and_each_caller_waits_for_one_begun_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, int]] = []  # ("begin"/"end", flush number), in order
    lock = threading.Lock()
    flushes = itertools.count()
    real = spool_module.fsync_dir

    def slow_fsync(path: Path) -> None:
        n = next(flushes)
        with lock:
            events.append(("begin", n))
        time.sleep(0.02)  # long enough for the other threads to pile up behind it
        real(path)
        with lock:
            events.append(("end", n))

    monkeypatch.setattr(spool_module, "fsync_dir", slow_fsync)
    sync = spool_module.DirectorySync()
    problems: list[str] = []

    def caller() -> None:
        with lock:
            asked_at = len(events)
        sync.sync(tmp_path)
        with lock:
            done = events[: len(events)]
        # Some flush began after this call and ended before it returned.
        begun_after = {n for kind, n in done[asked_at:] if kind == "begin"}
        ended = {n for kind, n in done if kind == "end"}
        if not begun_after & ended:
            problems.append(f"returned without a flush begun after its call: {done}")

    threads = [threading.Thread(target=caller) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert problems == []
    assert 1 <= next(flushes) < 16  # shared: fewer flushes than callers


def test_directory_sync_raises_a_failed_flush_and_the_next_caller_flushes_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []

    def failing(path: Path) -> None:
        calls.append(path)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(spool_module, "fsync_dir", failing)
    sync = spool_module.DirectorySync()
    with pytest.raises(OSError):
        sync.sync(tmp_path)
    sync.sync(tmp_path)  # not left waiting on the failed one
    assert calls == [tmp_path, tmp_path]


def test_store_makes_a_series_directory_again_when_it_was_removed_after_an_earlier_store(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path)
    first = spool.relative_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    spool.store(first, b"first")
    shutil.rmtree(tmp_path / "1.2.3")  # the study purged while the listener runs
    second = spool.relative_path("1.2.3", "1.2.3.4", "1.2.3.4.6")
    spool.store(second, b"second")
    assert (tmp_path / second).read_bytes() == b"second"
    assert os.listdir(tmp_path / ".incoming") == []


def test_a_directory_another_thread_just_made_is_still_synced_in_its_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    monkeypatch.setattr(spool_module, "fsync_dir", synced.append)
    real_mkdir = Path.mkdir

    def made_meanwhile(self: Path, *args: Any, **kwargs: Any) -> None:
        real_mkdir(self, *args, **kwargs)  # as if another thread won the race
        raise FileExistsError(str(self))

    monkeypatch.setattr(Path, "mkdir", made_meanwhile)
    write_durable(tmp_path / "study" / "x.dcm", b"data")
    assert tmp_path in synced  # the new "study" entry is made durable before anything relies on it


def test_store_goes_on_when_the_files_made_ahead_were_removed_with_their_directory(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path)
    spool.make_files_ahead(keep=3)
    try:
        _wait_for_files_ahead(tmp_path / ".incoming", 3)
        shutil.rmtree(tmp_path / ".incoming")  # an administrator cleaning up, say
        for n in range(5):  # more than were made ahead: every one of them is gone
            rel = spool.relative_path("1.2.3", "1.2.3.4", f"1.2.3.4.{n + 1}")
            spool.store(rel, [b"DICM", os.urandom(5000)])
            assert (tmp_path / rel).stat().st_size == 5004
    finally:
        spool.close()
    assert not list((tmp_path / ".incoming").glob("*.part"))
