"""Celery, seen from the service side: configuration and sending tasks by name.

``pacs_agent`` never imports ``workers`` (or torch): tasks are sent by name, and the worker
process registers them (``workers.celery_app``). The database is the truth about work; the
broker only delivers (DESIGN invariant 2).
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from celery import Celery
from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.json import dumps

from pacs_agent.config import Settings

RUN_INFERENCE = "pacs_agent.run_inference"
EXPORT_RESULTS = "pacs_agent.export_results"
SEND_NOTIFICATION = "pacs_agent.send_notification"


class _AtomicFilesystemChannel(filesystem.Channel):
    """kombu's filesystem channel, but a message appears in the queue folder only whole.

    kombu 5.7 writes a message in place; a consumer polling at the same moment can take the
    file while it is still empty, fail to decode it and die, and the message is gone (the
    sweeper sends the job again only after ``worker.requeue_after_s``). Here the message is
    written under a name no consumer looks at and renamed into the queue folder (a rename is
    atomic on one file system, and only one consumer can win the consumer's own rename).
    """

    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        name = f"{round(time.monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        folder = str(self.data_folder_out)
        incoming = os.path.join(folder, f".incoming-{uuid.uuid4()}")
        try:
            with open(incoming, "wb") as f:
                f.write(dumps(payload).encode())  # type: ignore[no-untyped-call]
            os.replace(incoming, os.path.join(folder, name))
        except OSError as exc:
            raise ChannelError(f"cannot add a message to {folder}: {exc}") from exc

    def get_table(self, exchange: Any) -> Any:
        """kombu creates an exchange's table file empty and fills it only after taking its
        lock, so a producer reading it in between (a worker declaring its queues while
        ``serve`` sends) finds it empty and its send fails. Read again until it is whole."""
        for _ in range(100):
            try:
                return super().get_table(exchange)  # type: ignore[no-untyped-call]
            except ValueError:  # JSONDecodeError: the table is being written
                time.sleep(0.01)
        return super().get_table(exchange)  # type: ignore[no-untyped-call]


class AtomicFilesystemTransport(filesystem.Transport):
    """The embedded broker: kombu's filesystem transport with whole-message writes."""

    Channel = _AtomicFilesystemChannel


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for ``settings``: embedded filesystem broker by default."""
    b = settings.broker
    conf: dict[str, Any] = {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_routes": {
            RUN_INFERENCE: {"queue": b.inference_queue},
            EXPORT_RESULTS: {"queue": b.io_queue},
            SEND_NOTIFICATION: {"queue": b.io_queue},
        },
        "task_default_queue": b.io_queue,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
    }
    url = settings.broker_url
    if url is None:
        queue_dir = settings.broker_dir / "queue"
        control_dir = settings.broker_dir / "control"
        for d in (queue_dir, control_dir):
            d.mkdir(parents=True, exist_ok=True)
        conf["broker_url"] = "filesystem://"
        conf["broker_transport"] = f"{__name__}:AtomicFilesystemTransport"
        conf["broker_transport_options"] = {
            "data_folder_in": str(queue_dir),
            "data_folder_out": str(queue_dir),
            "control_folder": str(control_dir),
            "store_processed": False,
            "polling_interval": b.polling_interval_s,
        }
        # The filesystem transport has no broadcast worth relying on: no remote control.
        conf["worker_enable_remote_control"] = False
    else:
        conf["broker_url"] = url
        options: dict[str, Any] = {"visibility_timeout": 3600}
        if url.startswith("redis"):
            options |= {"queue_order_strategy": "priority", "priority_steps": list(range(10))}
        else:
            conf["task_queue_max_priority"] = 9
            conf["task_default_priority"] = 0
        conf["broker_transport_options"] = options
    return conf


def make_celery(settings: Settings) -> Celery:
    app = Celery("pacs_agent")
    app.conf.update(celery_config(settings))
    return app


@dataclass(frozen=True)
class TaskLimits:
    """Soft and hard time limits of one model run, in seconds."""

    soft_s: float
    hard_s: float


class Dispatcher(Protocol):
    """How the scheduler and workers hand work to workers (Celery, sending by task name)."""

    def send_inference(
        self, job_id: int, priority: int, limits: TaskLimits, countdown_s: float = 0.0
    ) -> None: ...

    def send_export(self, job_id: int) -> None: ...

    def send_notification(self, notification_id: int) -> None: ...


def message_priority(priority: int, broker_url: str | None) -> int | None:
    """The broker's message priority for a rule priority (higher = more urgent).

    RabbitMQ ranks 0..9 with 9 first; Redis ranks 0..9 with 0 first; the embedded broker has
    none (the scheduler's database backlog, highest priority first, does the ordering).
    """
    level = max(0, min(9, priority))
    if broker_url is None or broker_url.startswith("filesystem"):
        return None
    if broker_url.startswith("redis"):
        return 9 - level
    return level


class CeleryDispatcher:
    def __init__(self, app: Celery) -> None:
        self.app = app

    def send_inference(
        self, job_id: int, priority: int, limits: TaskLimits, countdown_s: float = 0.0
    ) -> None:
        options: dict[str, Any] = {
            "soft_time_limit": limits.soft_s,
            "time_limit": limits.hard_s,
        }
        level = message_priority(priority, self.app.conf.broker_url)
        if level is not None:
            options["priority"] = level
        if countdown_s > 0:
            options["countdown"] = countdown_s
        self.app.send_task(RUN_INFERENCE, kwargs={"job_id": job_id}, **options)

    def send_export(self, job_id: int) -> None:
        self.app.send_task(EXPORT_RESULTS, kwargs={"job_id": job_id})

    def send_notification(self, notification_id: int) -> None:
        self.app.send_task(SEND_NOTIFICATION, kwargs={"notification_id": notification_id})
