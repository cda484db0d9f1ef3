"""Retention: remove old studies (spool files, result files, rows), safely and audited.

Order, per study, so that no row ever points at a missing file that something still needs,
and a purge killed at any point is finished by the next run:

1. One transaction marks the study ``purging`` (only from ``complete``, and only while no
   job of it is in flight); its failed jobs are cancelled in the same transaction, so a
   concurrent ``retry`` cannot bring one back. From then on nothing reads its files: the
   scheduler only looks at ``receiving`` studies, ``reprocess`` only at ``complete`` ones.
2. Its files go: spool instances, kept duplicate copies, and ``results/<study>/``.
   Removing a missing file is not an error, so this step can run again.
3. One transaction deletes its rows (exports, findings, jobs, copies, instances, series,
   study). A late instance that re-opened the study meanwhile keeps the study: then only the
   rows of the instances whose files went are deleted, and the study is received again.

Studies left ``purging`` by a killed run are always taken up again by the next run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import CursorResult, delete, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.admin import audit
from pacs_agent.db.models import Export, Finding, Instance, InstanceCopy, Job, Series, Study
from pacs_agent.domain.jobs import JobStatus
from pacs_agent.domain.retention import (
    IN_FLIGHT,
    PURGING,
    PurgePolicy,
    StudyActivity,
    purge_decision,
)


@dataclass
class StudyPurge:
    """What a purge did (or, in a dry run, would do) with one study."""

    study_instance_uid: str
    #: purged, would-purge, kept, or reopened (a late instance arrived during the purge).
    action: str
    why: str
    files: int = 0
    bytes: int = 0
    job_ids: list[int] = field(default_factory=list)


def candidates(session: Session, policy: PurgePolicy, now: datetime) -> list[tuple[int, str]]:
    """(id, Study Instance UID) of the studies the policy may select, for a closer look."""
    conditions = [Study.status == PURGING]
    if policy.study_uids:
        conditions.append(Study.study_instance_uid.in_(sorted(policy.study_uids)))
    if policy.older_than is not None:
        conditions.append(Study.last_received_at <= now - policy.older_than)
    q = select(Study.id, Study.study_instance_uid).where(or_(*conditions)).order_by(Study.id)
    return [(i, u) for i, u in session.execute(q)]


def activity(session: Session, study_id: int) -> StudyActivity:
    """The facts :func:`purge_decision` needs about one study."""
    study = session.get_one(Study, study_id)
    jobs = session.execute(select(Job.status, Job.updated_at).where(Job.study_id == study_id)).all()
    last_export = session.scalar(
        select(func.max(Export.attempted_at)).join(Job).where(Job.study_id == study_id)
    )
    times = [study.last_received_at, study.completed_at, last_export, *(t for _, t in jobs)]
    return StudyActivity(
        study_instance_uid=study.study_instance_uid,
        status=study.status,
        last_activity=max(t for t in times if t is not None),
        job_statuses=tuple(JobStatus(s) for s, _ in jobs),
    )


class _Busy(Exception):
    pass


def _mark(session: Session, study_id: int, actor: str, now: datetime) -> None:
    moved: CursorResult[Any] = session.execute(  # type: ignore[assignment]
        update(Study)
        .where(Study.id == study_id, Study.status.in_(["complete", PURGING]))
        .values(status=PURGING)
        .execution_options(synchronize_session=False)
    )
    if moved.rowcount != 1:
        raise _Busy("re-opened by a late instance")
    session.execute(
        update(Job)
        .where(
            Job.study_id == study_id,
            Job.status.in_([JobStatus.FAILED.value, JobStatus.EXPORT_FAILED.value]),
        )
        .values(status=JobStatus.CANCELLED.value, reason=f"purged by {actor}", updated_at=now)
        .execution_options(synchronize_session=False)
    )
    busy = session.scalar(
        select(func.count(Job.id)).where(
            Job.study_id == study_id, Job.status.in_([s.value for s in IN_FLIGHT])
        )
    )
    if busy:
        raise _Busy("a job went in flight meanwhile")


def _inside(base: Path, relative: str) -> Path | None:
    path = (base / relative).resolve()
    return path if path.is_relative_to(base.resolve()) else None


def _remove(path: Path) -> int:
    """Remove one file; its size, or 0 when it was gone already."""
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    return size


def _prune_dirs(start: Path, stop: Path) -> None:
    """Remove ``start`` and its parents up to (not including) ``stop`` while empty."""
    d = start
    while d != stop and d.is_relative_to(stop):
        try:
            d.rmdir()
        except OSError:  # not empty, or gone
            if d.exists():
                return
        d = d.parent


def _files(
    session: Session, study_id: int
) -> tuple[list[tuple[int, str, int]], list[tuple[str, int]]]:
    """(instance id, spool path, size) of the study's instances; (path, size) of kept
    copies."""
    instances = [
        (int(i), str(p), int(n))
        for i, p, n in session.execute(
            select(Instance.id, Instance.path, Instance.size_bytes)
            .join(Series, Series.id == Instance.series_id)
            .where(Series.study_id == study_id)
        )
    ]
    copies = [
        (str(p), int(n))
        for p, n in session.execute(
            select(InstanceCopy.path, InstanceCopy.size_bytes)
            .join(Instance, Instance.id == InstanceCopy.instance_id)
            .join(Series, Series.id == Instance.series_id)
            .where(Series.study_id == study_id)
        )
    ]
    return instances, copies


def _delete_rows(
    session: Session, study_id: int, instance_ids: list[int] | None
) -> tuple[bool, list[int]]:
    """Delete the study's rows (all, or only ``instance_ids`` when it was re-opened);
    whether the study row went, and the ids of the jobs deleted."""
    status = session.scalar(select(Study.status).where(Study.id == study_id).with_for_update())
    if status is None:
        return True, []
    job_ids = list(
        session.scalars(
            select(Job.id).where(
                Job.study_id == study_id, Job.status.not_in([s.value for s in IN_FLIGHT])
            )
        )
    )
    whole = status == PURGING
    series_ids = select(Series.id).where(Series.study_id == study_id)
    if job_ids:
        session.execute(delete(Export).where(Export.job_id.in_(job_ids)))
        session.execute(delete(Finding).where(Finding.job_id.in_(job_ids)))
        session.execute(delete(Job).where(Job.id.in_(job_ids)))
    if whole:
        gone = select(Instance.id).where(Instance.series_id.in_(series_ids))
    else:
        gone = select(Instance.id).where(Instance.id.in_(instance_ids or []))
    session.execute(delete(InstanceCopy).where(InstanceCopy.instance_id.in_(gone)))
    session.execute(delete(Instance).where(Instance.id.in_(gone)))
    if whole:
        session.execute(delete(Series).where(Series.study_id == study_id))
        session.execute(delete(Study).where(Study.id == study_id))
    return whole, job_ids


def purge(
    session_factory: sessionmaker[Session],
    spool_dir: Path,
    results_dir: Path,
    policy: PurgePolicy,
    *,
    dry_run: bool,
    actor: str,
    now: datetime,
    progress: Callable[[StudyPurge], None] = lambda _r: None,
) -> list[StudyPurge]:
    """Purge the studies ``policy`` selects (see the module's docstring for the order).

    Returns one entry per study looked at; ``progress`` is called after each one. Every run
    (a dry run too) writes one audit entry.
    """
    with session_factory() as session:
        studies = [(i, u, activity(session, i)) for i, u in candidates(session, policy, now)]
    out: list[StudyPurge] = []
    for uid in sorted(policy.study_uids - {u for _, u, _ in studies}):
        out.append(StudyPurge(uid, "kept", "no such study"))
        progress(out[-1])
    for study_id, uid, facts in studies:
        decision = purge_decision(facts, policy, now)
        result = StudyPurge(uid, "kept", decision.why)
        if decision.purge:
            result = (
                _dry(session_factory, study_id, uid, decision.why, results_dir)
                if dry_run
                else _purge_one(
                    session_factory, study_id, uid, decision.why, spool_dir, results_dir, actor, now
                )
            )
        out.append(result)
        progress(result)
    with session_factory.begin() as session:
        done = [r for r in out if r.action in ("purged", "would-purge", "reopened")]
        audit(
            session,
            actor,
            "purge",
            {
                "older_than_days": policy.older_than.total_seconds() / 86400
                if policy.older_than
                else None,
                "study_uids": sorted(policy.study_uids),
                "dry_run": dry_run,
            },
            f"{len(done)} studies {'would be ' if dry_run else ''}purged, "
            f"{sum(r.files for r in done)} files, {sum(r.bytes for r in done)} bytes, "
            f"{len(out) - len(done)} kept",
            [j for r in done for j in r.job_ids],
            now,
        )
    return out


def _result_files(results_dir: Path, uid: str) -> list[Path]:
    """The files under ``results/<study>/`` (none when the UID would lead elsewhere)."""
    base = _inside(results_dir, uid)
    if base is None or base == results_dir.resolve() or not base.is_dir():
        return []
    return [f for f in base.rglob("*") if f.is_file()]


def _dry(
    session_factory: sessionmaker[Session],
    study_id: int,
    uid: str,
    why: str,
    results_dir: Path,
) -> StudyPurge:
    with session_factory() as session:
        instances, copies = _files(session, study_id)
        jobs = list(session.scalars(select(Job.id).where(Job.study_id == study_id)))
    results = _result_files(results_dir, uid)
    return StudyPurge(
        uid,
        "would-purge",
        why,
        len(instances) + len(copies) + len(results),
        sum(n for _, _, n in instances)
        + sum(n for _, n in copies)
        + sum(f.stat().st_size for f in results),
        jobs,
    )


def _purge_one(
    session_factory: sessionmaker[Session],
    study_id: int,
    uid: str,
    why: str,
    spool_dir: Path,
    results_dir: Path,
    actor: str,
    now: datetime,
) -> StudyPurge:
    try:
        with session_factory.begin() as session:
            _mark(session, study_id, actor, now)
    except _Busy as exc:
        return StudyPurge(uid, "kept", str(exc))
    with session_factory() as session:
        instances, copies = _files(session, study_id)
    result = StudyPurge(uid, "purged", why)
    removed: list[tuple[int, Path]] = []
    dirs: set[Path] = set()
    for instance_id, rel, _ in instances:
        path = _inside(spool_dir, rel)
        if path is None:
            continue
        size = _remove(path)
        result.files += 1 if size else 0
        result.bytes += size
        removed.append((instance_id, path))
        dirs.add(path.parent)
    for rel, _ in copies:
        path = _inside(spool_dir, rel)
        if path is not None:
            size = _remove(path)
            result.files += 1 if size else 0
            result.bytes += size
            dirs.add(path.parent)
    for f in _result_files(results_dir, uid):
        size = _remove(f)
        result.files += 1 if size else 0
        result.bytes += size
        dirs.add(f.parent)
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        _prune_dirs(
            d,
            results_dir.resolve()
            if d.is_relative_to(results_dir.resolve())
            else spool_dir.resolve(),
        )
    with session_factory.begin() as session:
        # A late copy of an instance may have been written back meanwhile: its row stays.
        gone = [i for i, path in removed if not path.exists()]
        whole, result.job_ids = _delete_rows(session, study_id, gone)
    if not whole:
        result.action = "reopened"
        result.why = "a late instance re-opened the study: its older files and rows went"
    return result
