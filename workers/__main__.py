"""``python -m workers``: start a Celery worker (``pacs-agent worker`` runs this)."""

from __future__ import annotations

import argparse
import logging
import sys

from pacs_agent.config import ConfigError, load_settings
from pacs_agent.db.migrate import upgrade


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers")
    parser.add_argument("--config", default=None)
    parser.add_argument("--queues", default=None, help="comma-separated; default: both queues")
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"])
    parser.add_argument("--loglevel", default=None)
    args = parser.parse_args(argv)
    overrides = {}
    try:
        settings = load_settings(args.config)
        if args.device:
            overrides["worker"] = settings.worker.model_copy(update={"device": args.device})
        if overrides:
            settings = settings.model_copy(update=overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.loglevel or settings.logging.level,
        format="%(asctime)s %(levelname)s [worker %(process)d] %(name)s: %(message)s",
    )
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, settings.logging.level_no))
    if settings.database.auto_upgrade:
        upgrade(settings.database_url)

    from celery.signals import worker_process_init, worker_process_shutdown

    from workers.celery_app import create_app, ignore_sigterm_while_exiting

    app = create_app(settings)
    worker_process_shutdown.connect(ignore_sigterm_while_exiting, weak=False)
    queues = args.queues or f"{settings.broker.inference_queue},{settings.broker.io_queue}"
    if settings.broker.inference_queue in queues.split(","):
        # Each pool process imports torch and MONAI as it starts, so a job's time limits
        # count its own work, not the first import. After the fork, not before: a pool
        # process forked from a parent holding torch could hang when it replaced one killed
        # at its hard time limit (the time-limit test caught it).
        def _warm(**_: object) -> None:
            import workers.inference
            import workers.runtime.bundle  # noqa: F401

        worker_process_init.connect(_warm, weak=False)
        app.conf.worker_proc_alive_timeout = 120.0  # the import takes seconds on a busy host
    concurrency = args.concurrency or settings.worker.concurrency
    app.worker_main(
        [
            "worker",
            "--queues",
            queues,
            "--concurrency",
            str(concurrency),
            "--pool",
            args.pool,
            "--loglevel",
            args.loglevel or settings.logging.level,
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--hostname",
            f"pacs-agent-{queues.replace(',', '-')}@%h",
        ]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
