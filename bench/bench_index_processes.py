"""The index writers of N listener processes on one SQLite file: rows per second, and where
each commit's time goes.

Each of N processes (``listener.processes`` N) runs an ``IndexWriter`` on the shared database,
fed by its share of A threads (the associations, 4 by default), each indexing instances of
one shared series as fast as the writer commits them: no socket, no spool, only the index
path every C-STORE waits for. Per process it takes the writer's own counters
(``IndexWriter.stats``): committed batches and rows, the time from the start of a batch's
write until the write lock is held (waiting for the other processes) and the time it is held
(BEGIN IMMEDIATE to COMMIT, the WAL flush included); and the process's CPU time. Summed over
processes, the time the lock was held over the wall time is how busy the one writer slot
was: well under 1 while the writers wait means they sleep while the lock is free (SQLite's
busy handler sleeps 1, 2, 5, 10, 15, 20, 25, ... ms between tries instead of waking when
the lock is released); near 1 means the lock itself, one commit at a time, is the bound.

    .venv/bin/python bench/bench_index_processes.py --processes 1,2,4 --runs 3
    .venv/bin/python bench/bench_index_processes.py --variants busy-handler,process-lock

``--variants``: ``process-lock`` is the index writer as built (on a SQLite file, the writers
of all processes take turns on an OS lock next to the database, which wakes a waiter the
moment it is released); ``busy-handler`` switches that lock off, so the writers meet only in
SQLite's busy handler (as before decision 0024); ``postgresql`` indexes into a fresh database
on the PostgreSQL of the tests (127.0.0.1:5432), where the writers commit side by side. The
variants alternate in a shuffled order per run; compare ratios within a run, not absolute
figures across machines.

Not run by pytest: a measurement, not a timed test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = ("busy-handler", "process-lock", "postgresql")


def child(
    url: str, proc: int, threads: int, count: int, variant: str, start_at: float, work_ms: float
) -> None:
    """In this process: one index writer, ``threads`` threads indexing ``count`` rows in all."""
    from datetime import UTC, datetime

    from pacs_agent.db.index import IndexWriter, StoredFile
    from pacs_agent.db.session import make_engine, make_session_factory
    from pacs_agent.dicom.header import InstanceHeader

    if os.environ.get("BENCH_SWITCH_INTERVAL_S"):
        sys.setswitchinterval(float(os.environ["BENCH_SWITCH_INTERVAL_S"]))
    engine = make_engine(url)
    session_factory = make_session_factory(engine)
    writer = IndexWriter(session_factory)
    if variant == "busy-handler":
        writer.process_lock = None  # the writers meet only in SQLite's busy handler
    now = datetime.now(UTC)
    study, series = "1.2.826.0.1.3680043.10.999.1", "1.2.826.0.1.3680043.10.999.1.1"

    def association(t: int) -> None:
        for n in range(t, count, threads):
            spin_until = time.thread_time() + work_ms / 1000  # the C-STORE's own Python work
            while time.thread_time() < spin_until:
                pass
            header = InstanceHeader(
                study, series, f"1.2.826.0.1.3680043.10.999.2.{proc}.{n}",
                "1.2.840.10008.5.1.4.1.1.2", "CT", "BENCH", None, None, None, None, None, 1, n,
            )  # fmt: skip
            stored = StoredFile(f"x/{proc}-{n}.dcm", 1, "0" * 64, "1.2.840.10008.1.2.1", "B")
            writer.index(header, stored, now)

    workers = [threading.Thread(target=association, args=(t,)) for t in range(threads)]
    time.sleep(max(0.0, start_at - time.time()))
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    writer.close()
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    print(
        json.dumps(
            {
                "seconds": seconds,
                "started": started,
                "rows": count,
                "batches": writer.stats.commits,
                "wait_s": writer.stats.wait_s,
                "hold_s": writer.stats.hold_s,
                "cpu_s": cpu,
            }
        )
    )


def run(
    workdir: Path, processes: int, threads: int, total: int, variant: str, work_ms: float
) -> dict[str, float]:
    """One measurement: a fresh database, ``processes`` children started together."""
    if variant == "postgresql":
        sys.path.insert(0, str(REPO / "tests"))
        from helpers.servers import postgres_database

        with postgres_database("bench_index") as url:
            return _run(url, processes, threads, total, variant, work_ms)
    db = workdir / f"index-{variant}-{processes}.db"
    for suffix in ("", "-wal", "-shm", "-writer.lock"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    return _run(f"sqlite:///{db}", processes, threads, total, variant, work_ms)


def _run(
    url: str, processes: int, threads: int, total: int, variant: str, work_ms: float
) -> dict[str, float]:
    from pacs_agent.db.migrate import upgrade

    upgrade(url)
    start_at = time.time() + 2.0  # every child imported and connected by then
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--child",
                url,
                str(i),
                str(threads),
                str(total // processes),
                variant,
                repr(start_at),
                repr(work_ms),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    results = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"child failed ({p.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    wall = max(r["seconds"] for r in results)
    batches = sum(r["batches"] for r in results)
    rows = sum(r["rows"] for r in results)
    return {
        "rate": rows / wall,
        "rows_per_batch": rows / batches,
        "wait_ms": 1000 * sum(r["wait_s"] for r in results) / batches,
        "hold_ms": 1000 * sum(r["hold_s"] for r in results) / batches,
        "lock_busy": sum(r["hold_s"] for r in results) / wall,
        "cpu_share": sum(r["cpu_s"] for r in results) / (wall * (os.cpu_count() or 1)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument(
        "--associations", type=int, default=4,
        help="threads in all, spread over the processes (at least one each)",
    )  # fmt: skip
    parser.add_argument("--rows", type=int, default=2000, help="rows in all, per measurement")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--work-ms", type=float, default=0.0,
        help="CPU time of Python work per row in its association thread, before the index "
        "(the rest of a C-STORE: it competes with the writer for the interpreter lock)",
    )  # fmt: skip
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--dir", type=Path, default=None, help="where the database lives")
    args = parser.parse_args()
    counts = [int(n) for n in args.processes.split(",")]
    variants = args.variants.split(",")
    figures: dict[tuple[str, int], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for r in range(args.runs):
            order = [(v, n) for v in variants for n in counts]
            random.shuffle(order)
            for variant, n in order:
                threads = max(1, args.associations // n)
                fig = run(Path(tmp), n, threads, args.rows, variant, args.work_ms)
                figures.setdefault((variant, n), []).append(fig)
                print(f"run {r + 1} {variant} x{n}: " + json.dumps(
                    {k: round(v, 3) for k, v in fig.items()}), flush=True)  # fmt: skip
    print(
        f"\nmedians of {args.runs} runs, {args.rows} rows, {args.associations} associations, "
        f"{args.work_ms} ms of work per row"
    )
    print("| variant | processes | rows/s | rows/batch | wait ms/batch | hold ms/batch "
          "| lock busy | CPU share |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for variant in variants:
        for n in counts:
            m = {k: statistics.median(f[k] for f in figures[(variant, n)]) for k in figures[
                (variant, n)][0]}  # fmt: skip
            print(f"| {variant} | {n} | {m['rate']:.0f} | {m['rows_per_batch']:.1f} "
                  f"| {m['wait_ms']:.2f} | {m['hold_ms']:.2f} "
                  f"| {m['lock_busy']:.2f} "
                  f"| {m['cpu_share']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        a = sys.argv[2:]
        child(a[0], int(a[1]), int(a[2]), int(a[3]), a[4], float(a[5]), float(a[6]))
    else:
        main()
