"""Celery configuration per broker, and how rule priorities map to message priorities."""

from __future__ import annotations

from pathlib import Path

from pacs_agent.config import Settings
from pacs_agent.queue import celery_config, message_priority


def test_the_embedded_broker_is_the_whole_message_filesystem_transport(tmp_path: Path) -> None:
    conf = celery_config(Settings(data_dir=tmp_path))
    assert conf["broker_url"] == "filesystem://"
    assert conf["broker_transport"].endswith(":AtomicFilesystemTransport")
    assert conf["broker_transport_options"]["polling_interval"] == 0.05
    assert (tmp_path / "broker" / "queue").is_dir()
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1


def test_redis_orders_by_priority_and_rabbitmq_declares_priority_queues(tmp_path: Path) -> None:
    redis = celery_config(Settings(data_dir=tmp_path, broker={"url": "redis://127.0.0.1/0"}))  # type: ignore[arg-type]
    assert redis["broker_transport_options"]["queue_order_strategy"] == "priority"
    rabbit = celery_config(Settings(data_dir=tmp_path, broker={"url": "amqp://127.0.0.1//"}))  # type: ignore[arg-type]
    assert rabbit["task_queue_max_priority"] == 9
    assert "broker_transport" not in rabbit


def test_urgent_rules_map_to_each_brokers_most_urgent_level() -> None:
    # RabbitMQ: 9 first. Redis: 0 first. Embedded: no message priority (database backlog).
    assert [message_priority(p, "amqp://h//") for p in (-5, 0, 5, 9, 50)] == [0, 0, 5, 9, 9]
    assert [message_priority(p, "redis://h/0") for p in (0, 9)] == [9, 0]
    assert message_priority(9, "filesystem://") is None
    assert message_priority(9, None) is None
