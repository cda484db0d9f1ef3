"""The spool: received instances as durable files, byte for byte as received.

Paths are derived only from validated UIDs, so no attribute value can name a path outside
the spool (``spool/<study>/<series>/<sop>.dcm``).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import re
import threading
from collections import deque
from collections.abc import Sequence
from pathlib import Path

Buffer = bytes | bytearray | memoryview

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


class InvalidUID(ValueError):
    """A UID that is empty, too long or not made of dotted numbers."""


def check_uid(name: str, value: object) -> str:
    """Return ``value`` as a valid UID string, or raise InvalidUID naming the attribute."""
    text = str(value or "").strip().rstrip("\x00")
    if not text:
        raise InvalidUID(f"{name} is empty")
    if len(text) > 64 or not _UID_RE.match(text):
        raise InvalidUID(f"{name} is not a valid UID")
    return text


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirectorySync:
    """fsync of directories, shared between threads: a thread that renamed a file into a
    directory before another thread's fsync of that directory began relies on that fsync
    instead of starting its own (a group commit for directory entries).

    Why: with several associations writing one series, each new instance needs its
    directory entry durable before its index row commits; one flush covers every rename made
    before it started, so the flushes run beside each other's file writes instead of one
    after another in the index writer (docs/decisions/0009)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._dirs: dict[Path, _DirectoryState] = {}

    def sync(self, directory: Path) -> None:
        """Return once every rename into ``directory`` made before this call is durable."""
        with self._cond:
            state = self._dirs.get(directory)
            if state is None:
                if len(self._dirs) >= 4096:  # forget idle directories (their state is done)
                    self._dirs = {d: s for d, s in self._dirs.items() if s.running}
                state = self._dirs[directory] = _DirectoryState()
            state.asked += 1
            ticket = state.asked
            while state.synced < ticket:
                if state.running:
                    self._cond.wait()
                    continue
                state.running = True
                covers = state.asked
                self._cond.release()
                try:
                    fsync_dir(directory)
                finally:
                    self._cond.acquire()
                    state.running = False
                    self._cond.notify_all()
                state.synced = max(state.synced, covers)


class _DirectoryState:
    __slots__ = ("asked", "running", "synced")

    def __init__(self) -> None:
        self.asked = 0  # syncs asked for so far (each after its rename)
        self.synced = 0  # asks covered by a finished fsync
        self.running = False


def _make_dirs(path: Path) -> None:
    """Create ``path`` and missing parents, making each new directory entry durable."""
    if path.is_dir():
        return
    _make_dirs(path.parent)
    # Made by another thread meanwhile: its entry may not be durable yet, so sync it too.
    with contextlib.suppress(FileExistsError):
        path.mkdir()
    fsync_dir(path.parent)


def write_durable(
    path: Path,
    data: Buffer | Sequence[Buffer],
    *,
    sync_dir: bool = True,
    temp_dir: Path | None = None,
    ahead: FilesAhead | None = None,
) -> None:
    """Write ``data`` (bytes, or buffers written one after another) to ``path`` so that it
    survives a crash once this returns.

    Temp file in the same directory (named for this thread, so concurrent writers of one
    path never share one; written with O_DIRECT when it can be), fsync, rename over the
    target, fsync the directory. On any error (a full disk) the temp file is removed and the
    target is untouched. With ``sync_dir`` false the caller makes the directory durable
    itself before relying on the new name (``Spool.store`` does, with a flush shared between
    threads). The temp file goes to ``temp_dir`` when given (same
    filesystem), else beside ``path``; with ``ahead``, one of its files made ahead of time is
    used when it has one ready.
    """
    parts: Sequence[Buffer] = [data] if isinstance(data, Buffer) else data
    _make_dirs(path.parent)
    taken = ahead.take() if ahead is not None else None
    written = False
    if taken is not None:
        try:
            _write_and_rename(taken[0], path, parts, taken[1])
            written = True
        except FileNotFoundError:
            # The file made ahead is gone (its directory removed while the listener ran):
            # one more try with a temp file of our own instead of a failed C-STORE.
            _make_dirs(path.parent)
        finally:
            os.close(taken[1])
    if not written:
        tmp = (
            temp_dir or path.parent
        ) / f".incoming-{os.getpid()}-{threading.get_ident()}-{path.name}.part"
        _write_and_rename(tmp, path, parts, None)
    if sync_dir:
        fsync_dir(path.parent)


def _write_and_rename(tmp: Path, path: Path, parts: Sequence[Buffer], fd: int | None) -> None:
    """Write ``tmp`` (``fd``: already open for it) and rename it over ``path``; on any error
    ``tmp`` is removed and ``path`` untouched."""
    try:
        if not _write_direct(tmp, parts, fd):
            _write_buffered(tmp, parts)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_buffered(tmp: Path, parts: Sequence[Buffer]) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        views = [memoryview(p) for p in parts]
        while views:  # writev may write less (Linux: at most 2 GiB a call): go on from there
            written = os.writev(fd, views)
            while views and written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            if views and written:
                views[0] = views[0][written:]
        os.fsync(fd)
    finally:
        os.close(fd)


#: Files up to this size go past the page cache (O_DIRECT) from a page-aligned buffer kept
#: per thread; larger ones (and filesystems without O_DIRECT) are written through it.
_DIRECT_MAX = 4 * 1024 * 1024
#: O_DIRECT offsets and lengths are multiples of this (the largest logical block size).
_BLOCK = 4096
_O_DIRECT: int = getattr(os, "O_DIRECT", 0)
_per_thread = threading.local()

_INCOMING = ".incoming"
_AHEAD_SUFFIX = ".ahead"


def _aligned_buffer() -> mmap.mmap:
    buffer: mmap.mmap | None = getattr(_per_thread, "buffer", None)
    if buffer is None:  # anonymous maps are page-aligned; pages are backed when first used
        buffer = _per_thread.buffer = mmap.mmap(-1, _DIRECT_MAX)
    return buffer


def _write_direct(tmp: Path, parts: Sequence[Buffer], fd: int | None = None) -> bool:
    """Write ``parts`` to ``tmp`` with O_DIRECT (the last block padded, then the file cut to
    its size) and fsync it. False, with ``tmp`` left for the buffered path to overwrite, when
    the data is too large for it or the filesystem refuses O_DIRECT. ``fd``: ``tmp`` already
    open (empty, O_DIRECT), left open for the caller to close.

    Why: on the virtual disks measured (docs/decisions/0009) copying an instance into the
    page cache and writing it back cost more CPU than receiving it; from an aligned buffer the
    device reads the bytes itself."""
    total = sum(len(p) for p in parts)
    if not _O_DIRECT or total > _DIRECT_MAX:
        return False
    buffer = _aligned_buffer()
    at = 0
    for part in parts:
        buffer[at : at + len(part)] = part
        at += len(part)
    owned = fd is None
    if fd is None:
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | _O_DIRECT
            fd = os.open(tmp, flags, 0o600)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return False
            raise
    try:
        with memoryview(buffer)[: -(-total // _BLOCK) * _BLOCK] as view:
            offset = 0
            while offset < len(view):  # a short write goes on from where it stopped
                written = os.pwrite(fd, view[offset:], offset)
                if written <= 0:
                    raise OSError(errno.EIO, "O_DIRECT write made no progress")
                offset += written
        os.ftruncate(fd, total)
        os.fsync(fd)
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # an alignment this device refuses
            return False
        raise
    finally:
        if owned:
            os.close(fd)
    return True


class FilesAhead:
    """Empty temp files made ahead of time in one directory by a helper thread, each open for
    O_DIRECT writing, so that a writer on the hot path does not wait for the filesystem to
    allocate an inode.

    Why: creating a file was up to a tenth of the listener's time per instance on the disks
    measured (docs/decisions/0009), more with several associations creating at once, while the
    rest of the machine had cycles to spare. ``take`` never waits: with nothing ready (the
    helper behind, a full disk, a filesystem without O_DIRECT) the writer makes its own temp
    file as before and meets any error itself. The files are named ``<pid>-<n>.ahead`` (empty
    until taken, then written and renamed away); ``Spool.clear_incoming`` removes any that a
    stopped process left, ``close`` those nobody took.
    """

    def __init__(self, directory: Path, keep: int = 8) -> None:
        self.directory = directory
        self.keep = keep
        self._ready: deque[tuple[Path, int]] = deque()
        self._wanted = threading.Event()
        self._stop = threading.Event()
        self._made = 0
        self._thread = threading.Thread(target=self._run, name="spool-files-ahead", daemon=True)
        self._wanted.set()
        self._thread.start()

    def take(self) -> tuple[Path, int] | None:
        """A ready file (its path and an open descriptor the caller closes), or None."""
        try:
            taken = self._ready.popleft()
        except IndexError:
            taken = None
        self._wanted.set()
        return taken

    def close(self) -> None:
        """Stop the helper; remove the files it made that nobody took."""
        self._stop.set()
        self._wanted.set()
        self._thread.join(10)
        while self._ready:
            path, fd = self._ready.popleft()
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wanted.wait()
            self._wanted.clear()
            while not self._stop.is_set() and len(self._ready) < self.keep:
                if not self._make_one():
                    return

    def _make_one(self) -> bool:
        """Make one file; False when this filesystem cannot give what the helper makes."""
        path = self.directory / f"{os.getpid()}-{self._made}{_AHEAD_SUFFIX}"
        self._made += 1
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | _O_DIRECT
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            return True  # a leftover of an earlier process with this pid: the next name
        except OSError as exc:
            if exc.errno == errno.EINVAL or not _O_DIRECT:
                return False  # no O_DIRECT here: writers make their own temp files
            # A full disk or the like: writers meet it themselves; try again later.
            self._stop.wait(1.0)
            return True
        if self._stop.is_set():
            os.close(fd)
            path.unlink(missing_ok=True)
            return False
        self._ready.append((path, fd))
        return True


class Spool:
    """Where received instances live on disk."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._ahead: FilesAhead | None = None
        self._directories = DirectorySync()

    def make_files_ahead(self, keep: int = 8) -> None:
        """Have temp files made ahead of time in ``.incoming/`` for ``store`` (the listener
        does, after ``clear_incoming``); ``close`` stops it."""
        if self._ahead is None and _O_DIRECT:
            self._ahead = FilesAhead(self.incoming_dir(), keep)

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        parts = (
            check_uid("StudyInstanceUID", study_uid),
            check_uid("SeriesInstanceUID", series_uid),
            check_uid("SOPInstanceUID", sop_uid),
        )
        return Path(parts[0]) / parts[1] / f"{parts[2]}.dcm"

    def copy_path(self, study_uid: str, series_uid: str, sop_uid: str, sha256: str) -> Path:
        """Where keep-both puts a second copy: outside the series directories that are
        processed (``duplicates/<study>/<series>/<sop>.<digest>.dcm``)."""
        if not re.fullmatch(r"[0-9a-f]{16,64}", sha256):
            raise ValueError("sha256 must be a lowercase hex digest")
        first = self.relative_path(study_uid, series_uid, sop_uid)
        return Path("duplicates") / first.parent / f"{first.stem}.{sha256[:16]}.dcm"

    def path(self, relative: Path | str) -> Path:
        return self.root / relative

    def series_dir(self, study_uid: str, series_uid: str) -> Path:
        return (
            self.root
            / check_uid("StudyInstanceUID", study_uid)
            / check_uid("SeriesInstanceUID", series_uid)
        )

    def incoming_dir(self) -> Path:
        """``.incoming/``: temp files of instances being written (made when missing)."""
        incoming = self.root / _INCOMING
        if not incoming.is_dir():
            _make_dirs(incoming)
        return incoming

    def clear_incoming(self, pid: int | None = None) -> int:
        """Remove what a stopped listener left half-written in ``.incoming`` (never indexed,
        never answered); the number of files removed. With ``pid``, only what the listener
        process ``pid`` left (one of several that share the spool died; the others' files
        stay)."""
        removed = 0
        incoming = self.root / _INCOMING
        part, ahead = ("*.part", f"*{_AHEAD_SUFFIX}")
        if pid is not None:
            part, ahead = (f".incoming-{pid}-*.part", f"{pid}-*{_AHEAD_SUFFIX}")
        for leftover in [*incoming.glob(part), *incoming.glob(ahead)]:
            with contextlib.suppress(OSError):
                leftover.unlink()
                removed += 1
        return removed

    def discard(self, relative: Path) -> None:
        """Remove a stored file whose index row could not be written (best effort)."""
        target = self.root / relative
        try:
            target.unlink()
            fsync_dir(target.parent)
        except OSError:
            pass

    def store(
        self, relative: Path, data: Buffer | Sequence[Buffer], *, sync_dir: bool = True
    ) -> Path:
        """Write ``relative`` durably; its temp file lives in ``.incoming/`` (so what a
        stopped listener left half-written is in one place: ``clear_incoming``)."""
        target = self.root / relative
        incoming = self.incoming_dir()
        ahead = self._ahead if self._ahead and self._ahead.directory == incoming else None
        write_durable(target, data, sync_dir=False, temp_dir=incoming, ahead=ahead)
        if sync_dir:
            self._directories.sync(target.parent)
        return target
