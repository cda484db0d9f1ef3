"""The scheduler inside ``pacs-agent serve``: assembler, router, dispatch and sweeper.

Each ``tick`` reads the database, decides with the pure functions of ``pacs_agent.domain``
and writes the outcome back; the broker only delivers. A restart loses nothing: every
pending study and job is in the database.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.catalog import Catalog, CatalogError
from pacs_agent.config import Settings
from pacs_agent.db.jobs import (
    count_in,
    expired_leases,
    jobs_in,
    series_facts,
    stale_queued,
    transition,
)
from pacs_agent.db.models import Job, Study, utcnow
from pacs_agent.db.session import read_session
from pacs_agent.domain.completeness import (
    CompletenessPolicy,
    Completion,
    PolicyOverride,
    StudyArrival,
    is_complete,
    least_patient,
    most_patient,
)
from pacs_agent.domain.jobs import JobStatus
from pacs_agent.domain.routing import Rule, select_models
from pacs_agent.notices import send_failure_notice
from pacs_agent.queue import Dispatcher, TaskLimits

log = logging.getLogger(__name__)


def rules_from(settings: Settings) -> list[Rule]:
    """The routing rules of the settings, as the pure domain type."""
    return [
        Rule(
            name=r.name,
            models=tuple(r.models),
            modality=tuple(r.modality),
            body_part_examined=tuple(r.body_part_examined),
            study_description=r.study_description,
            series_description=r.series_description,
            sop_class_uid=tuple(r.sop_class_uid),
            image_type_includes=tuple(r.image_type_includes),
            image_type_excludes=tuple(r.image_type_excludes),
            slice_thickness_min=r.slice_thickness_min,
            slice_thickness_max=r.slice_thickness_max,
            min_instances=r.min_instances,
            max_instances=r.max_instances,
            calling_ae_title=tuple(r.calling_ae_title),
            priority=r.priority,
        )
        for r in settings.models.rules
    ]


def time_limits(settings: Settings, model: str) -> TaskLimits:
    """Soft and hard time limits of a run of ``model``."""
    limits = settings.models.time_limits.get(model)
    if limits is not None:
        return TaskLimits(soft_s=limits.soft_s, hard_s=limits.hard_s)
    w = settings.worker
    return TaskLimits(soft_s=w.soft_time_limit_s, hard_s=w.time_limit_s)


class Scheduler:
    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        dispatcher: Dispatcher,
        catalog: Callable[[], Catalog],
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.dispatcher = dispatcher
        self.catalog = catalog
        self.clock = clock
        a = settings.assembler
        self.policy = CompletenessPolicy(a.idle_timeout_s, a.unreleased_timeout_s, a.max_wait_s)
        self.rules = rules_from(settings)
        # Completeness per routing rule: rules with their own timeouts, and the earliest any
        # policy could close a study (a cheap first check before the study's own policy).
        self.rule_policies = {
            r.name: PolicyOverride(r.idle_timeout_s, r.max_wait_s).apply(self.policy)
            for r in settings.models.rules
            if r.idle_timeout_s is not None or r.max_wait_s is not None
        }
        self.first_check = least_patient([self.policy, *self.rule_policies.values()])

    def tick(self) -> None:
        now = self.clock()
        self.complete_studies(now)
        self.dispatch_pending(now)
        self.sweep(now)

    def run(self, stop: threading.Event) -> None:
        """Tick until ``stop`` is set; a failing tick is logged and retried, never fatal."""
        while not stop.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("scheduler tick failed; retrying")
            stop.wait(self.settings.assembler.poll_interval_s)

    # -- assembler and router ---------------------------------------------------------------
    def complete_studies(self, now: datetime) -> list[int]:
        with read_session(self.session_factory) as session:
            receiving = session.execute(
                select(
                    Study.id,
                    Study.first_received_at,
                    Study.last_received_at,
                    Study.last_released_at,
                ).where(Study.status == "receiving")
            ).all()
        done: list[int] = []
        for study_id, first, last, released in receiving:
            arrival = StudyArrival(first, last, released)
            completion = is_complete(arrival, self.first_check, now)
            if completion is Completion.WAITING:
                continue
            if self.rule_policies:
                completion = is_complete(arrival, self.study_policy(study_id), now)
                if completion is Completion.WAITING:
                    continue
            if self._complete(study_id, last, completion, now):
                done.append(study_id)
        return done

    def study_policy(self, study_id: int) -> CompletenessPolicy:
        """The completeness policy of a study: the most patient of the rules its series match
        (``[assembler]`` for rules without their own timeouts, or when none matches)."""
        with read_session(self.session_factory) as session:
            facts, _ = series_facts(session, study_id)
        matched = {sel.rule for sel in select_models(facts, self.rules)}
        return most_patient(
            [self.rule_policies.get(name, self.policy) for name in matched] or [self.policy]
        )

    def _complete(
        self, study_id: int, last_seen: datetime, completion: Completion, now: datetime
    ) -> bool:
        catalog = self.catalog()
        with self.session_factory.begin() as session:
            # Guard: an instance that arrived since we looked keeps the study open.
            moved = session.execute(
                update(Study)
                .where(
                    Study.id == study_id,
                    Study.status == "receiving",
                    Study.last_received_at == last_seen,
                )
                .values(status="complete", completion=completion.value, completed_at=now)
                .execution_options(synchronize_session=False)
            )
            if moved.rowcount != 1:  # type: ignore[attr-defined]
                return False
            study_uid = session.scalar(select(Study.study_instance_uid).where(Study.id == study_id))
            facts, series_ids = series_facts(session, study_id)
            for sel in select_models(facts, self.rules):
                series_id = series_ids[sel.series_instance_uid]
                self._supersede_older(session, series_id, sel.model)
                job = Job(
                    study_id=study_id,
                    series_id=series_id,
                    model_name=sel.model,
                    rule=sel.rule,
                    priority=sel.priority,
                    created_at=now,
                    updated_at=now,
                )
                try:
                    job.model_version = catalog.get(sel.model).version
                    job.status = JobStatus.PENDING.value
                except CatalogError as exc:
                    job.status = JobStatus.FAILED.value
                    job.reason = str(exc)
                    job.finished_at = now
                session.add(job)
            log.info("study %s complete (%s): %d series", study_uid, completion.value, len(facts))
        return True

    @staticmethod
    def _supersede_older(session: Session, series_id: int, model: str) -> None:
        session.execute(
            update(Job)
            .where(
                Job.series_id == series_id,
                Job.model_name == model,
                Job.status.not_in([JobStatus.SUPERSEDED.value, JobStatus.CANCELLED.value]),
            )
            .values(
                status=JobStatus.SUPERSEDED.value,
                reason="a late instance re-opened the study; a newer job replaces this one",
            )
            .execution_options(synchronize_session=False)
        )

    # -- dispatch and sweeper ---------------------------------------------------------------
    def dispatch_pending(self, now: datetime) -> int:
        """Queue pending jobs, highest priority first; the row says 'queued' before the
        message leaves (outbox). At most ``broker.max_queued`` wait in the broker, so an
        urgent job created later still overtakes a routine backlog."""
        cap = self.settings.broker.max_queued
        with read_session(self.session_factory) as session:
            room = cap - count_in(session, JobStatus.QUEUED) if cap else 100
            if room <= 0:
                return 0
            pending = [
                (j.id, j.priority, j.model_name)
                for j in jobs_in(session, [JobStatus.PENDING], limit=room)
            ]
        sent = 0
        for job_id, priority, model in pending:
            with self.session_factory.begin() as session:
                if not transition(session, job_id, JobStatus.QUEUED, queued_at=now, updated_at=now):
                    continue
            try:
                self.dispatcher.send_inference(job_id, priority, time_limits(self.settings, model))
                sent += 1
            except Exception as exc:
                log.warning("job %d: broker unavailable (%s); will retry", job_id, exc)
                with self.session_factory.begin() as session:
                    transition(
                        session,
                        job_id,
                        JobStatus.PENDING,
                        only_from=[JobStatus.QUEUED],
                        updated_at=now,
                    )
                break
        return sent

    def sweep(self, now: datetime) -> None:
        """Send again what a dead worker or a lost message left behind."""
        w = self.settings.worker
        with read_session(self.session_factory) as session:
            expired = [
                (j.id, j.attempts)
                for j in session.scalars(
                    select(Job).where(Job.id.in_(expired_leases(session, now)))
                )
            ]
            stale = stale_queued(session, now - timedelta(seconds=w.requeue_after_s))
            stuck_exports = list(
                session.scalars(
                    select(Job.id).where(
                        Job.status == JobStatus.EXPORTING.value,
                        Job.updated_at < now - timedelta(seconds=w.requeue_after_s),
                    )
                )
            )
        for job_id, attempts in expired:
            if attempts >= w.max_attempts:
                with self.session_factory.begin() as session:
                    moved = transition(
                        session,
                        job_id,
                        JobStatus.FAILED,
                        only_from=[JobStatus.RUNNING],
                        finished_at=now,
                        updated_at=now,
                        reason=(
                            f"its worker was lost {attempts} time(s) (killed, out of memory, "
                            "or over the hard time limit); not tried again"
                        ),
                    )
                log.error("job %d: lease expired after %d attempt(s); failed", job_id, attempts)
                if moved:
                    send_failure_notice(
                        self.settings, self.session_factory, self.dispatcher.send_export, job_id
                    )
                continue
            with self.session_factory.begin() as session:
                moved = transition(
                    session,
                    job_id,
                    JobStatus.QUEUED,
                    only_from=[JobStatus.RUNNING],
                    queued_at=now,
                    updated_at=now,
                    reason="lease expired (worker lost); sent again",
                )
            if moved:
                log.warning("job %d: lease expired; sending again", job_id)
                self._send(job_id)
        for job_id in stale:
            with self.session_factory.begin() as session:
                moved = transition(
                    session,
                    job_id,
                    JobStatus.QUEUED,
                    only_from=[JobStatus.QUEUED],
                    queued_at=now,
                    updated_at=now,
                )
            if moved:
                log.warning("job %d: queued too long (message lost?); sending again", job_id)
                self._send(job_id)
        for job_id in stuck_exports:
            with self.session_factory.begin() as session:
                transition(
                    session,
                    job_id,
                    JobStatus.EXPORTING,
                    only_from=[JobStatus.EXPORTING],
                    updated_at=now,
                )
            try:
                self.dispatcher.send_export(job_id)
            except Exception as exc:
                log.warning("job %d: broker unavailable for export (%s)", job_id, exc)

    def _send(self, job_id: int) -> None:
        with read_session(self.session_factory) as session:
            row = session.execute(
                select(Job.priority, Job.model_name).where(Job.id == job_id)
            ).one()
        try:
            self.dispatcher.send_inference(
                job_id, row.priority, time_limits(self.settings, row.model_name)
            )
        except Exception as exc:
            log.warning("job %d: broker unavailable (%s); will retry", job_id, exc)
