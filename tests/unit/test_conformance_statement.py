"""docs/conformance.md says what the code does: its SOP class and transfer syntax tables are
compared with the listener's presentation contexts, the exporter's SOP classes and the objects
the builders emit."""

from __future__ import annotations

import re
from pathlib import Path

import pynetdicom
from pydicom import dcmread
from pydicom.uid import UID

from pacs_agent.config import ListenerSettings, Settings
from pacs_agent.dicom.geometry import segment_results
from pacs_agent.dicom.io import write_dataset
from pacs_agent.dicom.seg import build_segmentation
from pacs_agent.dicom.sr import build_measurement_report
from pacs_agent.export import EXPORTED_SOP_CLASSES
from pacs_agent.net.scp import build_ae
from pacs_agent.net.ups import build_ups_ae
from tests.helpers.dicom_results import SPECS, box_mask, job_result, liver_ct

DOC = Path(__file__).resolve().parents[2] / "docs" / "conformance.md"
VERIFICATION = "1.2.840.10008.1.1"
_ROW = re.compile(r"^\| (?P<name>[^|]+?) \| `(?P<uid>[0-9.]+)` \|$")


def _table(heading: str) -> dict[str, str]:
    """UID -> name of the two-column table under ``heading`` (up to the next heading)."""
    text = DOC.read_text()
    start = text.index(f"\n{heading}\n")
    section = re.split(r"\n#{1,4} ", text[start + len(heading) + 2 :], maxsplit=1)[0]
    rows = {m["uid"]: m["name"] for line in section.splitlines() if (m := _ROW.match(line))}
    assert rows, f"no table under {heading!r}"
    return rows


def _assert_names(rows: dict[str, str]) -> None:
    wrong = {uid: name for uid, name in rows.items() if UID(uid).name != name}
    assert wrong == {}


def test_scp_storage_table_lists_exactly_the_listeners_storage_contexts() -> None:
    ae = build_ae(ListenerSettings())
    supported = {str(c.abstract_syntax) for c in ae.supported_contexts}
    assert VERIFICATION in supported
    rows = _table("### 4.1 Storage SOP classes accepted (SCP)")
    assert set(rows) == supported - {VERIFICATION}
    _assert_names(rows)


def test_scp_transfer_syntax_table_is_what_every_listener_context_accepts() -> None:
    ae = build_ae(ListenerSettings())
    rows = _table("### 4.2 Transfer syntaxes accepted (SCP)")
    for context in ae.supported_contexts:
        # pynetdicom accepts the first of the acceptor's syntaxes the requestor proposes: the
        # table's order is the listener's preference.
        assert [str(s) for s in context.transfer_syntax] == list(rows), context.abstract_syntax
    _assert_names(rows)


def test_scu_tables_match_the_exporter_and_the_objects_it_sends(tmp_path: Path) -> None:
    sop_rows = _table("### 5.1 SOP classes sent (SCU)")
    assert set(sop_rows) == {str(uid) for uid in EXPORTED_SOP_CLASSES}
    _assert_names(sop_rows)
    ct = liver_ct()
    mask = box_mask(ct)
    result = job_result(ct, segment_results(mask, ct, SPECS))
    seg = build_segmentation(ct, mask, result)
    assert seg is not None
    sr = build_measurement_report(ct, seg, result)
    syntax_rows = _table("### 5.2 Transfer syntaxes of the objects sent")
    for ds, name in ((seg, "seg.dcm"), (sr, "sr.dcm")):
        assert str(ds.SOPClassUID) in sop_rows
        written = write_dataset(ds, tmp_path / name)
        assert str(dcmread(written).file_meta.TransferSyntaxUID) in syntax_rows
    _assert_names(syntax_rows)


def test_implementation_identity_is_pynetdicoms() -> None:
    text = DOC.read_text()
    assert f"`{pynetdicom.PYNETDICOM_IMPLEMENTATION_UID}`" in text
    assert f"`{pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION}`" in text


def test_ups_tables_list_exactly_the_ups_aes_contexts() -> None:
    ae = build_ups_ae(Settings())
    rows = _table("### 8.1 UPS SOP classes accepted (SCP)")
    assert set(rows) == {str(c.abstract_syntax) for c in ae.supported_contexts}
    _assert_names(rows)
    sent = _table("### 8.2 UPS SOP classes sent (SCU)")
    assert set(sent) == {str(c.abstract_syntax) for c in ae.requested_contexts}
    _assert_names(sent)
