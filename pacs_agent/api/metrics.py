"""Prometheus metrics (decision 0018-metrics-from-the-database): the database is the truth.

Every figure about work (instances and bytes received, studies completed, jobs by state,
queue depth, inference seconds per model, export attempts and failures per destination) is
read from the database at scrape time by ``DatabaseCollector``, so any API process (inside
``serve`` or alone) gives the same answer, whatever process did the work. Spool free space is
read from the file system at scrape time. Only the association counters are counted where
they happen, in the listener process: ``ListenerMetrics`` lives in ``serve`` and its API.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.db.models import Export, Instance, InstanceCopy, Job, Study
from pacs_agent.db.session import read_session
from pacs_agent.domain.jobs import JobStatus

log = logging.getLogger(__name__)

#: Upper bounds (seconds) of the inference-time histogram buckets.
INFERENCE_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class ListenerMetrics:
    """Associations answered by this process's DICOM listener."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.associations = Counter(
            "pacs_agent_associations",
            "A-ASSOCIATE-RQs answered by the listener of this process, by result.",
            ["result"],
            registry=registry,
        )
        for result in ("accepted", "rejected"):
            self.associations.labels(result)

    def on_association(self, accepted: bool) -> None:
        self.associations.labels("accepted" if accepted else "rejected").inc()


class DatabaseCollector(Collector):
    """Figures read from the database (and the spool's file system) at each scrape."""

    def __init__(self, session_factory: sessionmaker[Session], spool_dir: Path) -> None:
        self.session_factory = session_factory
        self.spool_dir = spool_dir

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "pacs_agent_database_up", "1 when the database answered this scrape's queries."
        )
        try:
            with read_session(self.session_factory) as session:
                families = list(self._from_database(session))
        except Exception as exc:
            log.warning("metrics: database query failed (%s)", type(exc).__name__)
            up.add_metric([], 0)
            families = []
        else:
            up.add_metric([], 1)
        yield up
        yield from families
        free = GaugeMetricFamily(
            "pacs_agent_spool_free_bytes", "Free bytes on the file system of the spool."
        )
        where = self.spool_dir
        while not where.exists() and where != where.parent:
            where = where.parent  # before the first instance: the file system it will be on
        with contextlib.suppress(OSError):
            free.add_metric([], shutil.disk_usage(where).free)
        yield free

    def _from_database(self, session: Session) -> Iterator[Metric]:
        n, size = session.execute(
            select(func.count(Instance.id), func.coalesce(func.sum(Instance.size_bytes), 0))
        ).one()
        copies, copy_size = session.execute(
            select(func.count(InstanceCopy.id), func.coalesce(func.sum(InstanceCopy.size_bytes), 0))
        ).one()
        instances = CounterMetricFamily(
            "pacs_agent_instances_received", "Instances stored and indexed (database)."
        )
        instances.add_metric([], n + copies)
        yield instances
        received = CounterMetricFamily(
            "pacs_agent_received_bytes", "Bytes of the instances stored (database)."
        )
        received.add_metric([], int(size) + int(copy_size))
        yield received

        completed = CounterMetricFamily(
            "pacs_agent_studies_completed", "Studies that were complete at least once."
        )
        n_completed = session.scalar(
            select(func.count(Study.id)).where(Study.completed_at.is_not(None))
        )
        completed.add_metric([], n_completed or 0)
        yield completed

        by_state = dict(
            session.execute(select(Job.status, func.count(Job.id)).group_by(Job.status)).all()
        )
        jobs = GaugeMetricFamily("pacs_agent_jobs", "Jobs by state.", labels=["state"])
        for state in JobStatus:
            jobs.add_metric([state.value], by_state.get(state.value, 0))
        yield jobs
        depth = GaugeMetricFamily(
            "pacs_agent_queue_depth",
            "Inference jobs waiting: in the database (pending) and in the broker (queued).",
            labels=["where"],
        )
        depth.add_metric(["database"], by_state.get(JobStatus.PENDING.value, 0))
        depth.add_metric(["broker"], by_state.get(JobStatus.QUEUED.value, 0))
        yield depth

        yield self._inference_histogram(session)

        attempts = CounterMetricFamily(
            "pacs_agent_export_attempts",
            "Attempts to send a result object, per destination.",
            labels=["destination"],
        )
        failures = CounterMetricFamily(
            "pacs_agent_export_failures",
            "Failed attempts to send a result object, per destination.",
            labels=["destination"],
        )
        for destination, total, failed in session.execute(
            select(
                Export.destination,
                func.count(Export.id),
                func.sum(case((Export.status == "failed", 1), else_=0)),
            ).group_by(Export.destination)
        ):
            attempts.add_metric([destination], total)
            failures.add_metric([destination], int(failed or 0))
        yield attempts
        yield failures

    def _inference_histogram(self, session: Session) -> Metric:
        """Model-run seconds of each job's last run, per model (one query)."""
        columns = [func.sum(case((Job.inference_s <= b, 1), else_=0)) for b in INFERENCE_BUCKETS]
        hist = HistogramMetricFamily(
            "pacs_agent_inference_seconds",
            "Seconds of model inference of each job's last run, per model.",
            labels=["model"],
        )
        rows = session.execute(
            select(Job.model_name, func.count(Job.id), func.sum(Job.inference_s), *columns)
            .where(Job.inference_s.is_not(None))
            .group_by(Job.model_name)
        )
        for model, count, total, *cumulative in rows:
            buckets = [
                (str(b), int(c or 0)) for b, c in zip(INFERENCE_BUCKETS, cumulative, strict=True)
            ]
            buckets.append(("+Inf", int(count)))
            hist.add_metric([model], buckets, float(total or 0.0))
        return hist


def make_registry(
    session_factory: sessionmaker[Session],
    spool_dir: Path,
    listener: CollectorRegistry | None = None,
) -> CollectorRegistry:
    """The registry ``/metrics`` serves: database figures, plus the listener's counters
    when the listener runs in this process."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(session_factory, spool_dir))
    if listener is not None:
        registry.register(_Forward(listener))
    return registry


class _Forward(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        yield from self.registry.collect()
