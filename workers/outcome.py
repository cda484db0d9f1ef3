"""How a failed model run ends: retried with backoff (transient) or failed at once (permanent).

A transient error is one a later try may not meet: a database or broker connection dropped, a
file system hiccup, the GPU out of memory because another job held it. Everything else (bad
input, an unknown model, a bug, the soft time limit) is permanent: the job fails with its
reason, visible in ``pacs-agent jobs show``, and (``export.failure_notices``, on by default) a
failure notice SR goes to the export destinations so the PACS side knows no result will come.

The reason is written for the administrator, never as a bare Python exception: the step the
job was in (:class:`JobSteps`), then what was wrong. Errors of pacs-agent's own (refused input,
an unusable bundle output) carry their message; an attribute missing from a dataset is named
as the DICOM attribute the source images lack; anything else is an internal error named by
where it happened, with the traceback in the worker log. Patient texts of the job's sources
(names, IDs, birth dates, accession numbers) are redacted from both the reason and the log.
"""

from __future__ import annotations

import contextlib
import logging
import re
import traceback
from collections.abc import Iterable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from celery.exceptions import SoftTimeLimitExceeded
from pydicom import Dataset
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from sqlalchemy.exc import DBAPIError, OperationalError

from pacs_agent.db.jobs import transition
from pacs_agent.db.models import Job, utcnow
from pacs_agent.domain.jobs import JobStatus, TransientError, retry_delay
from pacs_agent.notices import send_failure_notice
from pacs_agent.notify.outbox import JOB_FAILED, create_notifications
from pacs_agent.scheduler import time_limits

if TYPE_CHECKING:
    from workers.celery_app import WorkerContext

log = logging.getLogger(__name__)

_PERMANENT_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling (MONAI wraps the
    errors of its transforms in ``RuntimeError('applying transform ...')``)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 20:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


#: Attributes whose values identify the patient: kept out of reasons and logs.
_PATIENT_KEYWORDS = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthDate",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "AccessionNumber",
    "MedicalRecordLocator",
)
#: Shorter texts are not redacted (they would blank digits and words everywhere).
_MIN_PRIVATE_LENGTH = 3
REDACTED = "[redacted]"
#: Top-level packages whose exceptions carry messages written for people.
_OWN_PACKAGES = ("pacs_agent", "workers")
#: Packages an error is placed in (the innermost frame's file).
_PACKAGES = (*_OWN_PACKAGES, "highdicom", "pydicom", "monai", "torch", "numpy", "sqlalchemy")
_NO_ATTRIBUTE = re.compile(r"'(?:File)?Dataset' object has no attribute '(\w+)'")


def patient_texts(datasets: Iterable[Dataset]) -> frozenset[str]:
    """The values of ``datasets`` that identify the patient (and the parts of each name)."""
    texts: set[str] = set()
    for ds in datasets:
        for keyword in _PATIENT_KEYWORDS:
            value = ds.get(keyword)
            if value is None:
                continue
            values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
            for one in values:
                text = str(one)
                texts.add(text)
                texts.update(part for part in re.split(r"[\^=]", text))
    return frozenset(t.strip() for t in texts if len(t.strip()) >= _MIN_PRIVATE_LENGTH)


def redact(text: str, private: Iterable[str]) -> str:
    """``text`` with every occurrence of a ``private`` text (any case) replaced, where it stands
    as a word of its own: a patient called "Demo" leaves the model ``demo_ct_blob_seg`` alone."""
    for secret in sorted(set(private), key=len, reverse=True):
        pattern = rf"(?<!\w){re.escape(secret)}(?!\w)"
        text = re.sub(pattern, REDACTED, text, flags=re.IGNORECASE)
    return text


class JobStepError(Exception):
    """``__cause__`` was raised while a job was ``step``; ``private`` are the patient texts of
    its sources, kept out of the reason and the log."""

    def __init__(self, step: str, private: frozenset[str]) -> None:
        super().__init__(step)
        self.step = step
        self.private = private


class JobSteps:
    """What a job is doing, so that a failure says in which step it happened.

    ``with steps.step("building the Segmentation"): ...`` re-raises any exception as a
    :class:`JobStepError` from it; :meth:`keep_private` adds the patient texts of the sources
    once they are read.
    """

    def __init__(self) -> None:
        self.private: frozenset[str] = frozenset()

    def keep_private(self, datasets: Iterable[Dataset]) -> None:
        self.private = self.private | patient_texts(datasets)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        try:
            yield
        except JobStepError:
            raise
        except Exception as exc:
            raise JobStepError(name, self.private) from exc


def _innermost_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """Where ``exc`` was raised: the innermost frame in one of :data:`_PACKAGES` (an error
    raised by the standard library on behalf of highdicom is highdicom's), else the innermost."""
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
    for frame in reversed(frames):
        if _package_of(frame):
            return frame
    return frames[-1] if frames else None


def _package_of(frame: traceback.FrameSummary | None) -> str:
    """The package (of :data:`_PACKAGES`) whose file ``frame`` runs in, else ""."""
    if frame is None:
        return ""
    parts = Path(frame.filename).parts[:-1]
    return next((part for part in reversed(parts) if part in _PACKAGES), "")


def _where(frame: traceback.FrameSummary | None) -> str:
    if frame is None:
        return "an unknown place"
    parts = Path(frame.filename).parts
    package = _package_of(frame)
    if package:
        parts = parts[len(parts) - 1 - parts[::-1].index(package) :]
    return f"{'/'.join(parts[-4:])}:{frame.lineno} ({frame.name})"


def _missing_attribute(exc: BaseException) -> str | None:
    """The DICOM attribute a dataset lacked, when that is what ``exc`` says."""
    keyword: str | None = None
    if isinstance(exc, AttributeError):
        match = _NO_ATTRIBUTE.search(str(exc))
        keyword = match.group(1) if match else None
    elif isinstance(exc, KeyError) and exc.args and _package_of(_innermost_frame(exc)) == "pydicom":
        key = exc.args[0]
        keyword = keyword_for_tag(key) if isinstance(key, int) else str(key)
    tag = tag_for_keyword(keyword) if keyword else None
    if tag is None:
        return None
    return f"the source images lack {keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X})"


def explain(exc: BaseException) -> str:
    """What went wrong, in words for the administrator (no exception class names)."""
    own = type(exc).__module__.split(".")[0] in _OWN_PACKAGES
    frame = _innermost_frame(exc)
    if own or (type(exc) is ValueError and _package_of(frame) in _OWN_PACKAGES):
        return str(exc) or "the step failed without saying why"
    missing = _missing_attribute(exc)
    if missing is not None:
        return missing
    cause = exc.__cause__
    if isinstance(exc, RuntimeError) and str(exc).startswith("applying transform") and cause:
        # MONAI wraps the error of a transform: the cause is what happened.
        return f"a transform of the bundle failed: {explain(cause)}"
    if isinstance(exc, InvalidDicomError):
        return f"a file of the series is not DICOM: {exc}"
    if type(exc).__name__ == "OutOfMemoryError":
        return f"the device ran out of memory: {exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    library = _package_of(frame)
    if isinstance(exc, ValueError | TypeError) and library in ("highdicom", "pydicom"):
        return f"{library} could not use the series: {exc}"
    return (
        f"internal error at {_where(frame)}, a defect rather than a fault of the input as far "
        "as pacs-agent can tell; the traceback is in the worker log"
    )


def failure_reason(exc: BaseException) -> str:
    """The reason shown on a failed job: the step (when known), then :func:`explain` of the
    error; a time limit says so, even wrapped. Patient texts of the sources are redacted."""
    chain = causes(exc)
    stepped = next((c for c in chain if isinstance(c, JobStepError)), None)
    private = stepped.private if stepped is not None else frozenset()
    inner = stepped.__cause__ if stepped is not None and stepped.__cause__ is not None else exc
    if any(isinstance(cause, SoftTimeLimitExceeded) for cause in chain):
        text = "time limit: the model run took longer than its soft time limit"
    else:
        text = explain(inner)
    reason = f"{stepped.step}: {text}" if stepped is not None else text
    return redact(reason, private)[:2000]


def failure_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` (with its causes) for the worker log, patient texts redacted."""
    stepped = next((c for c in causes(exc) if isinstance(c, JobStepError)), None)
    private = stepped.private if stepped is not None else frozenset()
    return redact("".join(traceback.format_exception(exc)), private)


def is_transient(exc: BaseException) -> bool:
    """True when trying again later may succeed (looking through wrapped exceptions)."""
    chain = causes(exc)
    if any(isinstance(c, SoftTimeLimitExceeded) for c in chain):
        return False
    return any(_transient(c) for c in chain)


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, TransientError | OperationalError | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, OSError) and not isinstance(exc, _PERMANENT_OS_ERRORS):
        return True
    # torch.cuda.OutOfMemoryError, matched by name: this module does not import torch.
    return type(exc).__name__ == "OutOfMemoryError"


def fail_or_retry(ctx: WorkerContext, job_id: int, exc: BaseException) -> str:
    """End a running job after ``exc``: back to ``queued`` with a delayed message when the
    error is transient and attempts remain, else ``failed`` with the reason."""
    reason = failure_reason(exc)
    w = ctx.settings.worker
    with ctx.session_factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        attempts, priority, model = job.attempts, job.priority, job.model_name
    delay = None
    if is_transient(exc):
        delay = retry_delay(attempts, w.max_attempts, w.retry_backoff_s, w.retry_backoff_max_s)
    now = utcnow()
    if delay is not None:
        with ctx.session_factory.begin() as session:
            moved = transition(
                session,
                job_id,
                JobStatus.QUEUED,
                only_from=[JobStatus.RUNNING],
                where=[Job.worker == ctx.name],
                queued_at=now + timedelta(seconds=delay),
                updated_at=now,
                lease_expires_at=None,
                reason=f"transient error, try {attempts + 1} in {delay:g} s: {reason}",
            )
        if moved:
            log.warning("job %d: transient %s; retrying in %g s", job_id, type(exc).__name__, delay)
            try:
                ctx.dispatcher.send_inference(
                    job_id, priority, time_limits(ctx.settings, model), countdown_s=delay
                )
            except Exception as send_exc:  # the sweeper sends stale queued jobs again
                log.warning("job %d: could not queue the retry (%s)", job_id, send_exc)
        return "retrying"
    log.error("job %d failed: %s\n%s", job_id, reason, failure_traceback(exc))
    with ctx.session_factory.begin() as session:
        if transition(
            session,
            job_id,
            JobStatus.FAILED,
            only_from=[JobStatus.RUNNING],
            where=[Job.worker == ctx.name],
            reason=reason,
            finished_at=now,
            updated_at=now,
            lease_expires_at=None,
        ):
            # "The AI could not process this series", to the notifiers that want it.
            create_notifications(session, ctx.settings.notify, job_id, JOB_FAILED, now)
    send_failure_notice(ctx.settings, ctx.session_factory, ctx.dispatcher.send_export, job_id)
    return "failed"
