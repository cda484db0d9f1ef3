"""Findings in the database: what each job found, queryable by study.

A job's findings are rows of ``findings``: one per segment of a segmentation model (label,
coded type, and of the voxels kept after the card drops small connected components: voxel
count, volume, mean HU, the number of components and the largest one's volume; the card's
volume threshold; flag = detected) and one per output of a
classification model (label, coded finding, probability, the card's threshold, flag =
probability >= threshold). With the job they give the SEG and SR SOP Instance UIDs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from pacs_agent.db.models import Finding, Job, Study
from pacs_agent.domain.results import JobResult

SEGMENT = "segment"
CLASSIFICATION = "classification"


def finding_rows(job_id: int, result: JobResult) -> list[Finding]:
    """The ``findings`` rows of one job's result: segments first (numbered as in the model
    card), then classification outputs (numbered 1.. in the result's order)."""
    rows = [
        Finding(
            job_id=job_id,
            kind=SEGMENT,
            segment_number=s.segment.number,
            label=s.segment.label,
            code_value=s.segment.type.value,
            code_scheme=s.segment.type.scheme,
            code_meaning=s.segment.type.meaning,
            detected=s.detected,
            voxel_count=s.voxel_count,
            volume_mm3=s.volume_mm3,
            mean_hu=s.mean_hu,
            component_count=s.component_count,
            largest_component_mm3=s.largest_component_mm3,
            min_volume_mm3=s.segment.detection.min_volume_mm3,
            flag=s.detected,
        )
        for s in result.segments
    ]
    rows += [
        Finding(
            job_id=job_id,
            kind=CLASSIFICATION,
            segment_number=number,
            label=c.label,
            code_value=c.finding.value,
            code_scheme=c.finding.scheme,
            code_meaning=c.finding.meaning,
            detected=c.flag,
            voxel_count=0,
            probability=c.probability,
            threshold=c.threshold,
            flag=c.flag,
        )
        for number, c in enumerate(result.classifications, start=1)
    ]
    return rows


def replace_findings(session: Session, job_id: int, result: JobResult) -> None:
    """Record ``result`` as the job's findings, replacing those of an earlier run."""
    session.execute(delete(Finding).where(Finding.job_id == job_id))
    session.add_all(finding_rows(job_id, result))


@dataclass(frozen=True)
class StudyFinding:
    """One finding of one job of a study, with the job's result objects."""

    job_id: int
    job_status: str
    model_name: str
    model_version: str | None
    kind: str
    number: int
    label: str
    code_value: str
    code_scheme: str
    code_meaning: str
    detected: bool
    flag: bool
    volume_mm3: float | None
    mean_hu: float | None
    component_count: int | None
    largest_component_mm3: float | None
    min_volume_mm3: float | None
    probability: float | None
    threshold: float | None
    seg_sop_instance_uid: str | None
    sr_sop_instance_uid: str | None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def findings_of_study(session: Session, study_instance_uid: str) -> list[StudyFinding]:
    """Every finding of every job of the study, by job then kind then number.

    Superseded and cancelled jobs are left out: their results were replaced or never sent.
    An unknown study gives an empty list.
    """
    rows = session.execute(
        select(Finding, Job)
        .join(Job, Finding.job_id == Job.id)
        .join(Study, Job.study_id == Study.id)
        .where(
            Study.study_instance_uid == study_instance_uid,
            Job.status.not_in(["superseded", "cancelled"]),
        )
        .order_by(Job.id, Finding.kind.desc(), Finding.segment_number)
    ).all()
    return [
        StudyFinding(
            job_id=job.id,
            job_status=job.status,
            model_name=job.model_name,
            model_version=job.model_version,
            kind=finding.kind,
            number=finding.segment_number,
            label=finding.label,
            code_value=finding.code_value,
            code_scheme=finding.code_scheme,
            code_meaning=finding.code_meaning,
            detected=finding.detected,
            flag=finding.flag,
            volume_mm3=finding.volume_mm3,
            mean_hu=finding.mean_hu,
            component_count=finding.component_count,
            largest_component_mm3=finding.largest_component_mm3,
            min_volume_mm3=finding.min_volume_mm3,
            probability=finding.probability,
            threshold=finding.threshold,
            seg_sop_instance_uid=job.seg_sop_instance_uid,
            sr_sop_instance_uid=job.sr_sop_instance_uid,
        )
        for finding, job in rows
    ]
