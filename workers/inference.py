"""Run one inference job: series -> MONAI bundle -> SEG + TID 1500 SR + findings in the DB.

Called by the thin Celery task with a job id. Every outcome is a visible job state: the job
is claimed with a guarded transition (two workers never both run it), and any error ends in
``failed`` with its reason, which names the step the job was in
(:class:`workers.outcome.JobSteps`) and what was wrong, without patient data.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import Dataset, dcmread
from sqlalchemy import select

from pacs_agent.catalog import ModelCard, load_catalog
from pacs_agent.db.jobs import transition
from pacs_agent.db.models import Instance, Job, Series, Study, utcnow
from pacs_agent.dicom.io import write_dataset
from pacs_agent.dicom.seg import build_segmentation
from pacs_agent.dicom.sr import build_measurement_report
from pacs_agent.domain.jobs import JobStatus
from pacs_agent.domain.results import JobResult, ResultUIDs
from pacs_agent.domain.uids import job_result_uids
from pacs_agent.findings import replace_findings
from pacs_agent.notify.outbox import FINDINGS, create_notifications
from pacs_agent.storage.spool import Spool
from workers.outcome import JobSteps, fail_or_retry

if TYPE_CHECKING:
    from workers.celery_app import WorkerContext
    from workers.runtime.series import ModelOutput

log = logging.getLogger(__name__)


class JobInputError(ValueError):
    """The job's input cannot be processed (a reason shown to the administrator)."""


def _run_model(ctx: WorkerContext, card: ModelCard, datasets: list[Dataset]) -> ModelOutput:
    """The model's output on the series: runners cached per process (workers.runtime.series)."""
    from workers.runtime.series import RunnerCache, run_model

    cache = RunnerCache(ctx.runners, ctx.settings.worker.device)
    return run_model(cache, card, datasets, oom_cpu_fallback=ctx.settings.worker.oom_cpu_fallback)


def run_inference_job(ctx: WorkerContext, job_id: int) -> str:
    settings = ctx.settings
    now = utcnow()
    with ctx.session_factory.begin() as session:
        claimed = transition(
            session,
            job_id,
            JobStatus.RUNNING,
            only_from=[JobStatus.QUEUED],
            started_at=now,
            updated_at=now,
            worker=ctx.name,
            reason=None,
            lease_expires_at=now + timedelta(seconds=settings.worker.lease_s),
            attempts=Job.attempts + 1,
        )
    if not claimed:
        log.info("job %d: not queued any more; skipping this delivery", job_id)
        return "skipped"
    try:
        files = _produce(ctx, job_id, JobSteps())
    except Exception as exc:
        # Transient errors are retried with backoff; permanent ones fail at once.
        return fail_or_retry(ctx, job_id, exc)
    done = utcnow()
    export = bool(settings.export.destinations)
    with ctx.session_factory.begin() as session:
        succeeded = transition(
            session,
            job_id,
            JobStatus.SUCCEEDED,
            only_from=[JobStatus.RUNNING],
            where=[Job.worker == ctx.name],  # not a run the sweeper gave to another worker
            finished_at=done,
            succeeded_at=done,
            updated_at=done,
            **files,
        )
        if export:
            transition(session, job_id, JobStatus.EXPORTING, updated_at=done)
        # The outbox: the scheduler's sweep sends them on the io queue.
        if succeeded:
            create_notifications(session, settings.notify, job_id, FINDINGS, done)
    if export:
        try:
            ctx.dispatcher.send_export(job_id)
        except Exception as exc:  # the sweeper sends it again
            log.warning("job %d: could not queue export (%s)", job_id, exc)
    return "succeeded"


def _produce(ctx: WorkerContext, job_id: int, steps: JobSteps) -> dict[str, str | float | None]:
    settings = ctx.settings
    spool = Spool(settings.spool_dir)
    with steps.step("loading the job"), ctx.session_factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        series = session.get(Series, job.series_id)
        study = session.get(Study, job.study_id)
        assert series is not None and study is not None
        paths = [
            spool.path(p)
            for p in session.scalars(select(Instance.path).where(Instance.series_id == series.id))
        ]
        model_name = job.model_name
        study_uid, series_uid = study.study_instance_uid, series.series_instance_uid
    with steps.step("reading the series"):
        if not paths:
            raise JobInputError("the series has no instances")
        card = load_catalog(settings.models_dir).get(model_name)
        t0 = time.monotonic()
        datasets: list[Dataset] = [dcmread(p) for p in paths]
    steps.keep_private(datasets)
    t1 = time.monotonic()
    with steps.step(f"running model {card.name}"):
        output = _run_model(ctx, card, datasets)
    mask, segments = output.mask, output.segments
    t2 = time.monotonic()

    uids = ResultUIDs(
        *job_result_uids(settings.uid_root, study_uid, series_uid, card.name, card.version)
    )
    result = JobResult(
        algorithm=card.algorithm(settings.uid_root),
        segments=segments,
        uids=uids,
        classifications=output.classifications,
        processing_notes=output.processing_notes,
    )
    with steps.step("building the Segmentation"):
        seg = (
            build_segmentation(
                datasets, mask, result, include_empty=settings.export.include_empty_seg
            )
            if mask is not None
            else None
        )
    with steps.step("building the TID 1500 SR"):
        sr = build_measurement_report(datasets, seg, result)

    out_rel = Path(study_uid) / str(job_id)
    out_dir = settings.results_dir / out_rel
    seg_rel = sr_rel = None
    with steps.step("writing the results"):
        if seg is not None:
            seg_rel = out_rel / f"SEG_{uids.seg_sop_uid}.dcm"
            write_dataset(seg, settings.results_dir / seg_rel)
        sr_rel = out_rel / f"SR_{uids.sr_sop_uid}.dcm"
        write_dataset(sr, out_dir / sr_rel.name)

    with steps.step("recording the findings"), ctx.session_factory.begin() as session:
        replace_findings(session, job_id, result, card.flags)
    log.info(
        "job %d: %s on series %s (%s): %d segment(s) detected, %d finding(s) flagged",
        job_id,
        card.name,
        series_uid,
        output.device,
        sum(1 for s in segments if s.detected),
        sum(1 for c in output.classifications if c.flag),
    )
    return {
        "load_s": t1 - t0,
        "inference_s": t2 - t1,
        "write_s": time.monotonic() - t2,
        "seg_path": str(seg_rel) if seg_rel else None,
        "sr_path": str(sr_rel),
        "seg_sop_instance_uid": uids.seg_sop_uid if seg is not None else None,
        "sr_sop_instance_uid": uids.sr_sop_uid,
        "model_version": card.version,
    }
