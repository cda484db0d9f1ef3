"""Schema tests: schemathesis generates requests from the API's own OpenAPI schema (bounded
examples per operation) and no request may end in a server error."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from pacs_agent.api.app import create_app
from pacs_agent.config import load_settings
from pacs_agent.db.migrate import upgrade
from pacs_agent.db.models import AuditEntry, Export, Finding, Instance, Job, Series, Study, utcnow
from pacs_agent.db.session import make_engine, make_session_factory

pytestmark = pytest.mark.integration

TOKEN = "schema-admin-token-0123456789"
#: Generated requests per operation (bounded: the whole test runs well under two minutes).
EXAMPLES = 30


def _seed(url: str) -> None:
    """One study with a series, instance, job (failed: retry and cancel apply), finding,
    export attempt and audit entry, so that ids in generated requests can hit real rows."""
    now = utcnow()
    engine = make_engine(url)
    with make_session_factory(engine).begin() as s:
        study = Study(study_instance_uid="1.2.3.4", accession_number="A1", status="complete")
        s.add(study)
        s.flush()
        series = Series(study_id=study.id, series_instance_uid="1.2.3.4.1", modality="CT")
        s.add(series)
        s.flush()
        s.add(
            Instance(
                series_id=series.id,
                sop_instance_uid="1.2.3.4.1.1",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                path="x.dcm",
                size_bytes=10,
                sha256="0" * 64,
            )
        )
        job = Job(
            study_id=study.id,
            series_id=series.id,
            model_name="demo_ct_blob_seg",
            status="failed",
            reason="seeded",
            created_at=now,
            updated_at=now,
        )
        s.add(job)
        s.flush()
        s.add(
            Finding(
                job_id=job.id,
                segment_number=1,
                label="Blob",
                code_value="1",
                code_scheme="SCT",
                code_meaning="Blob",
                detected=True,
            )
        )
        s.add(Export(job_id=job.id, destination="pacs", sop_instance_uid="2.25.1", status="failed"))
        s.add(AuditEntry(actor="t", action="retry", arguments="{}", outcome="", job_ids="[1]"))
    engine.dispose()


def test_no_generated_request_makes_a_server_error(tmp_path: Path) -> None:
    settings_ = load_settings(data_dir=tmp_path / "var", api={"admin_tokens": [TOKEN]})
    upgrade(settings_.database_url)
    _seed(settings_.database_url)
    settings_.broker_dir.mkdir(parents=True)
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(settings_))
    headers = {"Authorization": f"Bearer {TOKEN}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14, [op.label for op in operations]
    failures: list[str] = []
    statuses: list[int] = []
    for op in operations:

        @given(case=op.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def run(case: schemathesis.Case) -> None:
            response = case.call_and_validate(headers=headers, checks=[not_a_server_error])
            statuses.append(response.status_code)

        try:
            run()
        except Exception as exc:
            failures.append(f"{op.label}: {exc}"[:2000])
    assert failures == []
    # Requests were made, and both accepted and refused ones among them.
    assert len(statuses) >= len(operations) * 10
    assert any(200 <= c < 300 for c in statuses) and any(400 <= c < 500 for c in statuses)
