"""What the listener stores and answers, over real associations on loopback.

Compressed transfer syntaxes byte for byte, duplicates policies, late instances, a full disk
(a real 1 MiB tmpfs), a database that goes away, several senders on one study at once.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE
from sqlalchemy import create_engine, func, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.config import ListenerSettings
from pacs_agent.db.index import DuplicatePolicy
from pacs_agent.db.migrate import upgrade
from pacs_agent.db.models import Instance, InstanceCopy, Series, Study
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.demo.synthetic import make_ct_study, write_study
from pacs_agent.dicom.structure import file_meta_end
from pacs_agent.net import upperlayer
from pacs_agent.net.scp import Receiver, start_listener
from pacs_agent.net.scu import set_nodelay
from pacs_agent.storage.spool import Spool
from tests.helpers.servers import POSTGRES_ADMIN_URL, free_port, require_services

pytestmark = pytest.mark.integration


class Listener:
    """pacs-agent's listener in this process, on a free loopback port."""

    def __init__(self, root: Path, url: str | None = None, **receiver: Any) -> None:
        self.port = free_port()
        self.url = url or f"sqlite:///{root / 'index.db'}"
        upgrade(self.url)
        self.engine = make_engine(self.url)
        self.session_factory: sessionmaker[Session] = make_session_factory(self.engine)
        self.spool = Spool(root / "spool")
        self.server = start_listener(
            ListenerSettings(port=self.port),
            Receiver(self.spool, self.session_factory, **receiver),
        )

    def count(self, model: type) -> int:
        with self.session_factory() as s:
            return int(s.scalar(select(func.count()).select_from(model)) or 0)

    def stop(self) -> None:
        self.server.shutdown()
        self.engine.dispose()


@pytest.fixture
def make_listener(tmp_path: Path) -> Iterator[Any]:
    started: list[Listener] = []

    def make(root: Path | None = None, **kwargs: Any) -> Listener:
        lst = Listener(root or tmp_path, **kwargs)
        started.append(lst)
        return lst

    yield make
    for lst in started:
        lst.stop()


def send(port: int, datasets: list[Dataset], calling: str = "SENDER") -> list[int]:
    """C-STORE each dataset over one association (TCP_NODELAY); the statuses in order."""
    ae = AE(ae_title=calling)
    contexts = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSAGENT")
    assert assoc.is_established
    set_nodelay(assoc)
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def dataset_bytes(data: bytes) -> bytes:
    """The data set of a Part-10 byte string, without preamble and file meta."""
    return data[file_meta_end(data) :]


COMPRESSED = [
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline
    "JPEG-lossy.dcm",  # JPEG extended
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless SV1
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "JPEG2000.dcm",  # JPEG 2000
    "MR_small_RLE.dcm",  # RLE
    "image_dfl.dcm",  # deflated explicit VR little endian
]


@pytest.mark.parametrize("name", COMPRESSED)
def test_compressed_instance_is_stored_byte_for_byte(make_listener: Any, name: str) -> None:
    lst = make_listener()
    path = get_testdata_file(name)
    assert path is not None, f"pydicom's test file {name} is missing"
    original = Path(path).read_bytes()
    ae = AE(ae_title="SENDER")
    ds = dcmread(path)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", lst.port, ae_title="PACSAGENT")
    assert assoc.is_established
    set_nodelay(assoc)
    from pynetdicom import _config

    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's data set bytes as they are
    try:
        status = assoc.send_c_store(path).Status
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
        assoc.release()
    assert status == 0, hex(status)
    with lst.session_factory() as s:
        row = s.scalars(select(Instance)).one()
    stored = lst.spool.path(row.path).read_bytes()
    assert dataset_bytes(stored) == dataset_bytes(original)
    assert row.transfer_syntax_uid == str(ds.file_meta.TransferSyntaxUID)


def test_dataset_of_another_sop_class_than_requested_is_refused_with_a900(
    make_listener: Any, tmp_path: Path
) -> None:
    lst = make_listener()
    ds = _study(8, seed=3)[0]
    path = tmp_path / "mislabelled.dcm"
    ds.save_as(path, enforce_file_format=True)
    # The file meta (which pynetdicom puts in the request) says MR; the data set says CT.
    ct, mr = b"1.2.840.10008.5.1.4.1.1.2\x00", b"1.2.840.10008.5.1.4.1.1.4\x00"
    data = path.read_bytes()
    meta_end = file_meta_end(data)
    assert data[:meta_end].count(ct) == 1
    path.write_bytes(data[:meta_end].replace(ct, mr) + data[meta_end:])
    ae = AE(ae_title="SENDER")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4", ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", lst.port, ae_title="PACSAGENT")
    from pynetdicom import _config

    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        rsp = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
        assoc.release()
    assert rsp.Status == 0xA900, hex(rsp.Status)
    assert lst.count(Instance) == 0


def _study(slices: int, seed: int, size: int = 48) -> list[Dataset]:
    """A synthetic CT study (at least 8 slices of 48x48 for the phantom)."""
    datasets = make_ct_study(None, slices=max(slices, 8), rows=size, cols=size, seed=seed)
    return list(datasets[:slices])


def _changed(ds: Dataset) -> Dataset:
    other = ds.copy()
    other.ImageComments = "second version"
    return other


def _mark_complete(lst: Listener) -> None:
    with lst.session_factory.begin() as s:
        s.execute(update(Study).values(status="complete", completion="released_and_idle"))


@pytest.mark.parametrize(
    ("policy", "stored_version", "copies", "reopened"),
    [
        (DuplicatePolicy.REPLACE, "second", 0, True),
        (DuplicatePolicy.KEEP_FIRST, "first", 0, False),
        (DuplicatePolicy.KEEP_BOTH, "first", 1, False),
    ],
)
def test_instance_received_again_with_other_bytes_follows_the_duplicates_policy(
    make_listener: Any, policy: DuplicatePolicy, stored_version: str, copies: int, reopened: bool
) -> None:
    lst = make_listener(duplicates=policy)
    first = _study(4, seed=21)
    assert send(lst.port, first) == [0] * 4
    _mark_complete(lst)  # as the scheduler would after the idle timeout
    assert send(lst.port, [first[0]]) == [0]  # identical bytes: success, nothing changes
    assert send(lst.port, [_changed(first[0])]) == [0]

    with lst.session_factory() as s:
        row = s.scalars(
            select(Instance).where(Instance.sop_instance_uid == first[0].SOPInstanceUID)
        ).one()
        status = s.scalars(select(Study)).one().status
        copy_rows = s.scalars(select(InstanceCopy)).all()
    stored = dcmread(lst.spool.path(row.path))
    assert ("ImageComments" in stored) == (stored_version == "second")
    assert lst.count(Instance) == 4
    assert len(copy_rows) == copies
    for copy in copy_rows:
        kept = dcmread(lst.spool.path(copy.path))
        assert kept.ImageComments == "second version"
        assert copy.path.startswith("duplicates/")
    # The series directory that workers read holds exactly the indexed instances.
    assert len(list(lst.spool.path(row.path).parent.iterdir())) == 4
    assert (status == "receiving") == reopened


@pytest.mark.parametrize(("reopen", "status"), [(True, "receiving"), (False, "complete")])
def test_late_instance_for_a_complete_study_follows_the_late_instance_policy(
    make_listener: Any, reopen: bool, status: str
) -> None:
    lst = make_listener(reopen_complete=reopen)
    study = _study(5, seed=22)
    assert send(lst.port, study[:4]) == [0] * 4
    _mark_complete(lst)
    assert send(lst.port, study[4:]) == [0]
    assert lst.count(Instance) == 5  # indexed either way: nothing is lost
    with lst.session_factory() as s:
        assert s.scalars(select(Study)).one().status == status


@pytest.fixture
def tiny_spool(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB filesystem (tmpfs) to fill up."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        message = f"cannot mount a 1 MiB tmpfs (needs root): {result.stderr.strip()}"
        if require_services():
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_answers_a700_and_indexes_nothing_partial(
    make_listener: Any, tmp_path: Path, tiny_spool: Path
) -> None:
    lst = make_listener(tmp_path)
    lst.spool.root = tiny_spool  # the spool lives on the 1 MiB filesystem
    study = _study(12, seed=23, size=256)  # 12 x 128 KiB: more than fits
    statuses = send(lst.port, study)
    stored = statuses.count(0)
    assert 0 < stored < 12
    assert set(statuses) == {0, 0xA700}, [hex(s) for s in statuses]
    assert lst.count(Instance) == stored
    with lst.session_factory() as s:
        rows = s.scalars(select(Instance)).all()
    for row in rows:  # every indexed instance is whole on disk
        ds = dcmread(lst.spool.path(row.path))
        assert len(ds.PixelData) == 256 * 256 * 2
    assert not list(tiny_spool.rglob("*.part")), "a partial temp file was left behind"
    on_disk = {p.name for p in tiny_spool.rglob("*.dcm")}
    assert on_disk == {Path(r.path).name for r in rows}
    # Nothing of the refusals stays in the way (no temp file, no index state): with room on
    # the disk again the next instance is stored and indexed.
    lst.spool.root = tmp_path / "roomy-spool"
    assert send(lst.port, _study(1, seed=25)) == [0]
    assert lst.count(Instance) == stored + 1


def test_a_full_disk_under_files_made_ahead_fails_the_write_and_leaves_nothing_behind(
    tiny_spool: Path,
) -> None:
    """The listener's spool writes into files made ahead of time (O_DIRECT, tmpfs has it):
    a real full disk fails the write with ENOSPC, the taken file is removed, the instances
    stored before are whole, and nothing half-written stays in ``.incoming``."""
    spool = Spool(tiny_spool)
    spool.make_files_ahead(keep=4)
    incoming = tiny_spool / ".incoming"
    stored: list[Path] = []
    data = os.urandom(300 * 1024)
    try:
        deadline = time.monotonic() + 10
        while len(list(incoming.glob("*.ahead"))) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        made_ahead = {p.name for p in incoming.glob("*.ahead")}
        assert len(made_ahead) == 4
        with pytest.raises(OSError) as failure:
            for n in range(1, 10):  # 9 x 300 KiB: more than 1 MiB holds
                relative = spool.relative_path("1.2.3", "1.2.3.4", f"1.2.3.4.{n}")
                spool.store(relative, data)
                stored.append(relative)
        assert failure.value.errno == errno.ENOSPC
        assert 0 < len(stored) < 9
        assert made_ahead - {p.name for p in incoming.glob("*.ahead")}, "none was taken"
        for relative in stored:
            assert spool.path(relative).read_bytes() == data
        assert not spool.path(
            spool.relative_path("1.2.3", "1.2.3.4", f"1.2.3.4.{len(stored) + 1}")
        ).exists()
    finally:
        spool.close()
    assert sorted(os.listdir(incoming)) == []


def test_database_that_is_gone_answers_a700_and_stores_nothing(
    make_listener: Any, tmp_path: Path, postgres_url: str
) -> None:
    lst = make_listener(tmp_path, url=postgres_url)
    study = _study(3, seed=24)
    assert send(lst.port, study[:1]) == [0]
    name = postgres_url.rsplit("/", 1)[1]
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()
    assert send(lst.port, study[1:]) == [0xA700, 0xA700]
    files = list(lst.spool.root.rglob("*.dcm"))
    assert [f.name for f in files] == [f"{study[0].SOPInstanceUID}.dcm"]


def test_several_senders_at_once_on_one_study_lose_nothing(
    make_listener: Any, tmp_path: Path
) -> None:
    lst = make_listener()
    study = _study(40, seed=25)
    files = write_study(study[30:], tmp_path / "f")
    statuses: dict[int, list[int]] = {}

    def worker(n: int) -> None:
        statuses[n] = send(lst.port, study[n * 10 : (n + 1) * 10], calling=f"SENDER{n}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    storescu = shutil.which("storescu")
    assert storescu, "dcmtk storescu is required (apt-get install dcmtk)"
    result = subprocess.run(
        [storescu, "-aec", "PACSAGENT", "127.0.0.1", str(lst.port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
    )
    for t in threads:
        t.join(120)
    assert result.returncode == 0, result.stderr
    assert all(statuses[n] == [0] * 10 for n in range(3)), statuses
    assert lst.count(Study) == 1 and lst.count(Series) == 1
    assert lst.count(Instance) == 40
    with lst.session_factory() as s:
        callers = set(s.scalars(select(Instance.calling_ae_title)))
    assert callers == {"SENDER0", "SENDER1", "SENDER2", "STORESCU"}
    with lst.session_factory() as s:
        rows = s.scalars(select(Instance)).all()
    for row in rows:  # each checksum, computed beside the write or in line, names its file
        data = lst.spool.path(row.path).read_bytes()
        assert (row.sha256, row.size_bytes) == (hashlib.sha256(data).hexdigest(), len(data))


def _spilling_listener(spool_root: Path, db_root: Path, **settings_: Any) -> tuple[Any, Spool, Any]:
    """A listener that gathers data sets over 1 MiB in a temporary file, not in memory."""
    url = f"sqlite:///{db_root / 'spill.db'}"
    upgrade(url)
    factory = make_session_factory(make_engine(url))
    spool = Spool(spool_root)
    settings = ListenerSettings(port=free_port(), memory_per_instance_mb=1, **settings_)
    return start_listener(settings, Receiver(spool, factory)), spool, factory


def test_instance_larger_than_memory_per_instance_is_spilled_and_stored_byte_for_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spilled: list[bool] = []
    original = upperlayer._DataSetBuffer.view

    def watch(self: Any, length: int) -> memoryview:
        spilled.append(self.spilled)
        return original(self, length)

    monkeypatch.setattr(upperlayer._DataSetBuffer, "view", watch)
    server, spool, _factory = _spilling_listener(tmp_path / "spool", tmp_path)
    try:
        big, small = _study(1, seed=31, size=1024)[0], _study(1, seed=32, size=128)[0]
        assert send(server.server.port, [big, small]) == [0, 0]
    finally:
        server.shutdown()
    assert spilled == [True, False]  # 2 MiB of pixels went to a file, 32 KiB stayed in memory
    for ds in (big, small):
        stored = spool.path(spool.relative_path(
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))  # fmt: skip
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        assert dataset_bytes(stored.read_bytes()) == dataset_bytes(buffer.getvalue())
    assert not list((tmp_path / "spool" / ".incoming").iterdir())


def _big_refused_small_stored(server: Any, factory: Any, seed: int) -> Dataset:
    """Send a 2 MiB instance then a 32 KiB one on one association: the first is answered
    0xA700, the second stored, and only the second is indexed. Returns the refused one."""
    try:
        big, small = _study(1, seed=seed, size=1024)[0], _study(1, seed=seed + 1, size=128)[0]
        assert send(server.server.port, [big, small]) == [0xA700, 0]
    finally:
        server.shutdown()
    with factory() as s:
        assert [r.sop_instance_uid for r in s.scalars(select(Instance))] == [
            str(small.SOPInstanceUID)
        ]
    return big


def test_spilling_onto_a_full_disk_answers_a700_and_the_association_goes_on(
    tmp_path: Path, tiny_spool: Path
) -> None:
    server, _spool, factory = _spilling_listener(tiny_spool, tmp_path)
    _big_refused_small_stored(server, factory, seed=33)


def test_a_spill_that_fills_the_disk_gives_the_space_back_at_once(tiny_spool: Path) -> None:
    """A peer may go on sending for long after the disk filled; other associations need the
    space meanwhile."""
    buffer = upperlayer._DataSetBuffer(0, tiny_spool, spill_bytes=1)
    free_before = os.statvfs(tiny_spool).f_bfree
    chunk = memoryview(bytes(64 * 1024))
    for _ in range(40):  # 2.5 MiB into 1 MiB
        buffer.append(chunk)
    assert buffer.error is not None and buffer.length == 40 * 64 * 1024
    assert os.statvfs(tiny_spool).f_bfree >= free_before - 1  # nothing held while it goes on
    buffer.reset(0)
    assert buffer.error is None and not buffer.spilled


def test_instance_larger_than_max_instance_mb_is_refused_a700_and_the_association_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server, spool, factory = _spilling_listener(tmp_path / "spool", tmp_path, max_instance_mb=1)
    with caplog.at_level("ERROR", logger="pacs_agent.net.upperlayer"):
        big = _big_refused_small_stored(server, factory, seed=35)
    assert not spool.path(spool.relative_path(
        big.StudyInstanceUID, big.SeriesInstanceUID, big.SOPInstanceUID)).exists()  # fmt: skip
    assert not list((tmp_path / "spool" / ".incoming").iterdir())
    refused = [r.getMessage() for r in caplog.records if "max_instance_mb" in r.getMessage()]
    assert len(refused) == 1 and str(big.SOPInstanceUID) in refused[0], refused
