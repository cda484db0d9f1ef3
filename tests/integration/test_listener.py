"""The listener over real associations on loopback: pynetdicom and dcmtk storescu as peers."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select

from pacs_agent.config import ListenerSettings
from pacs_agent.db.migrate import upgrade
from pacs_agent.db.models import Instance, Series, Study
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.demo.synthetic import make_ct_study, write_study
from pacs_agent.net.scp import Receiver, start_listener
from pacs_agent.net.scu import set_nodelay, store_files
from pacs_agent.storage.spool import Spool
from tests.helpers.servers import free_port

pytestmark = pytest.mark.integration


class Listener:
    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.url = f"sqlite:///{root / 'index.db'}"
        upgrade(self.url)
        self.session_factory = make_session_factory(make_engine(self.url))
        self.spool = Spool(root / "spool")
        self.server = start_listener(
            ListenerSettings(port=self.port), Receiver(self.spool, self.session_factory)
        )

    def count(self, model: type) -> int:
        with self.session_factory() as s:
            return int(s.scalar(select(func.count()).select_from(model)) or 0)


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    lst = Listener(tmp_path)
    try:
        yield lst
    finally:
        lst.server.shutdown()


def _storescu(port: int, files: list[Path], *extra: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("storescu")
    assert exe, "dcmtk storescu is required (apt-get install dcmtk)"
    return subprocess.run(
        [exe, "-v", "-aec", "PACSAGENT", *extra, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
    )


def test_c_echo_succeeds(listener: Listener) -> None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="PACSAGENT")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def test_wrong_called_ae_title_is_rejected(listener: Listener) -> None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="NOTUS")
    assert assoc.is_rejected


def test_storescu_study_is_stored_byte_for_byte_and_indexed(
    listener: Listener, tmp_path: Path
) -> None:
    files = write_study(make_ct_study(None, slices=8, rows=64, cols=64, seed=11), tmp_path / "in")
    result = _storescu(listener.port, files)
    assert result.returncode == 0, result.stderr
    assert listener.count(Instance) == 8 and listener.count(Series) == 1
    with listener.session_factory() as s:
        study = s.scalars(select(Study)).one()
        assert study.status == "receiving"
        assert study.last_released_at is not None  # the release was recorded
        rows = s.scalars(select(Instance)).all()
    for row in rows:
        assert row.calling_ae_title == "STORESCU"
        stored = listener.spool.path(row.path)
        original = next(f for f in files if dcmread(f).SOPInstanceUID == row.sop_instance_uid)
        # The dataset bytes are identical (the file meta is rebuilt by the receiver).
        assert dcmread(stored).PixelData == dcmread(original).PixelData
        assert dcmread(stored).SOPInstanceUID == row.sop_instance_uid


def test_same_instance_twice_is_success_and_stored_once(listener: Listener, tmp_path: Path) -> None:
    files = write_study(make_ct_study(None, slices=8, rows=48, cols=48, seed=12), tmp_path / "in")
    assert store_files(
        host="127.0.0.1", port=listener.port, called_ae="PACSAGENT", calling_ae="A", paths=files
    )[0].ok
    again = store_files(
        host="127.0.0.1", port=listener.port, called_ae="PACSAGENT", calling_ae="A", paths=files
    )
    assert all(o.ok for o in again)
    assert listener.count(Instance) == 8


@pytest.fixture
def send_files_as_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom then sends a file's data set bytes unparsed, with the file meta's UIDs."""
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


@pytest.mark.usefixtures("send_files_as_they_are")
def test_unrepaired_real_ct_is_refused_with_a_clear_status(
    listener: Listener, shared_data: Path
) -> None:
    """The anonymiser blanked these files' UIDs: the agent answers 0xA900 and stores nothing."""
    files = sorted((shared_data / "ct_torso_human_totalseg_20sl").iterdir())[:3]
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, dcmread(files[0]).file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="PACSAGENT")
    assert assoc.is_established
    set_nodelay(assoc)
    # Sent from the file: the request takes the UIDs of the file meta, the data set is as is.
    responses = [assoc.send_c_store(f) for f in files]
    assoc.release()
    for rsp in responses:
        assert rsp.Status == 0xA900, hex(rsp.Status)
        assert "is empty" in str(rsp.ErrorComment)
    assert listener.count(Instance) == 0
    assert not any(listener.spool.root.rglob("*.dcm"))


@pytest.mark.usefixtures("send_files_as_they_are")
def test_truncated_dataset_is_refused_with_c210(listener: Listener, tmp_path: Path) -> None:
    """A file cut off inside its header: pynetdicom sends the bytes as they are."""
    good = write_study(make_ct_study(None, slices=8, rows=64, cols=64, seed=13), tmp_path / "in")[0]
    data = good.read_bytes()
    ds = dcmread(good)
    # Cut inside the value of Study Description, which lies after the UIDs of the header.
    cut = data.index(str(ds.StudyDescription).encode()) + 3
    broken = tmp_path / "truncated.dcm"
    broken.write_bytes(data[:cut])
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="PACSAGENT")
    assert assoc.is_established
    set_nodelay(assoc)
    rsp = assoc.send_c_store(broken)
    assoc.release()
    assert rsp.Status == 0xC210, hex(rsp.Status)
    assert listener.count(Instance) == 0
