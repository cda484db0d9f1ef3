"""The listener's store path alone: how many C-STOREs per second it can finish with no network.

Calls the C-STORE handler (``pacs_agent.net.scp.store_instance``, as the listener's upper layer
does once a data set has arrived) on 500 CT instances of 512x512 int16 already in memory, from
1 and from 4 threads, with the collaborators ``serve`` starts (spool with files made ahead,
SQLite index, index writer): header walk, duplicate lookup, SHA-256, O_DIRECT write, file and
directory fsync, index commit. No socket, no sender: a ceiling for what the listener can reach
over 1 and over 4 associations on this machine. Beside it, in the same run and in an order
shuffled per run, dcmtk storescp receiving the same files from storescu over 1 and 4
associations (the reception benchmark's reference), storescp ``--ignore`` (receives and
discards: the pace of storescu itself), and the same store path with the file and directory
fsync skipped (the index commit still syncs), to show what the flushes cost. Each
measurement prints the share of CPU time the host stole from this VM meanwhile.

    .venv/bin/python bench/bench_store_path.py --runs 3
    .venv/bin/python bench/bench_store_path.py --stages

``--stages`` instead times each stage of the durable store path from one thread (the CPU time
of the thread that runs it, and wall time), to show where an instance's time goes.

Each measurement runs in a fresh process. Not run by pytest: a ceiling, not a timed test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

VARIANTS = ("durable", "no file/dir fsync")
#: storescp storing (the reference), and receiving but discarding (storescu's own pace).
REFERENCES = ("storescp", "storescp --ignore")


def measure_store_path(
    files: list[Path], workdir: Path, threads: int, variant: str
) -> dict[str, float]:
    """In this process: store every file's data set through the listener's C-STORE handler."""
    stages = _time_stages() if variant == "stages" else None  # before the names are imported
    from pydicom import dcmread
    from pydicom.uid import UID

    from pacs_agent.db.index import IndexWriter
    from pacs_agent.db.migrate import upgrade
    from pacs_agent.db.session import make_engine, make_session_factory
    from pacs_agent.dicom.structure import file_meta_end
    from pacs_agent.net.scp import Receiver, store_instance
    from pacs_agent.net.upperlayer import AssociationInfo, StoreRequest
    from pacs_agent.storage.spool import Spool

    if variant == "no file/dir fsync":
        os.fsync = lambda fd: None  # the spool's flushes only; SQLite syncs its own commit

    requests = []
    for path in files:
        data = path.read_bytes()
        header = dcmread(path, stop_before_pixels=True)
        requests.append(
            StoreRequest(
                str(header.SOPClassUID),
                str(header.SOPInstanceUID),
                UID(str(header.file_meta.TransferSyntaxUID)),
                memoryview(bytearray(data[file_meta_end(data) :])),
            )
        )
    url = f"sqlite:///{workdir}/pacs-agent.db"
    upgrade(url)
    session_factory = make_session_factory(make_engine(url))
    spool = Spool(workdir / "spool")
    spool.clear_incoming()
    spool.make_files_ahead()
    receiver = Receiver(spool, session_factory, writer=IndexWriter(session_factory))
    time.sleep(0.5)  # the files made ahead are there, as in a listener that waits for a peer
    failures: list[str] = []

    def association(share: list[StoreRequest]) -> None:
        assoc = AssociationInfo("BENCH", "PACSAGENT", "127.0.0.1")
        for request in share:
            status, comment = store_instance(receiver, assoc, request)
            if status != 0:
                failures.append(f"{status:#06x} {comment}")

    workers = [
        threading.Thread(target=association, args=(requests[i::threads],)) for i in range(threads)
    ]
    from bench_reception import cpu_ticks, steal_share

    ticks = cpu_ticks()
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    stolen = steal_share(ticks, cpu_ticks())
    assert receiver.writer is not None
    receiver.writer.close()
    spool.close()
    if failures:
        raise RuntimeError(f"{len(failures)} C-STOREs failed, first: {failures[0]}")
    n = len(requests)
    figure = {
        "rate": n / seconds,
        "user_ms": (after.ru_utime - before.ru_utime) * 1000 / n,
        "sys_ms": (after.ru_stime - before.ru_stime) * 1000 / n,
        "steal": stolen,
    }
    for name, (cpu, wall) in (stages or {}).items():
        figure[f"cpu:{name}"] = cpu * 1000 / n
        figure[f"wall:{name}"] = wall * 1000 / n
    return figure


#: The stages timed by ``--stages``: (label, module, attribute, method of).
_STAGES = (
    ("C-STORE handler, in all", "pacs_agent.net.scp", "store_instance", None),
    ("header walk and checks", "pacs_agent.net.scp", "_decode", None),
    ("duplicate lookup", "pacs_agent.net.scp", "_indexed_digest", None),
    ("SHA-256 (on a helper thread, beside the write)", "pacs_agent.net.scp", "_sha256", None),
    ("spool: file and directory entry", "pacs_agent.storage.spool", "store", "Spool"),
    (
        "of which O_DIRECT write, cut to size, fsync",
        "pacs_agent.storage.spool",
        "_write_direct",
        None,
    ),
    ("of which directory fsync (shared)", "pacs_agent.storage.spool", "sync", "DirectorySync"),
    ("index row commit", "pacs_agent.net.scp", "index", "Receiver"),
)


def _time_stages() -> dict[str, list[float]]:
    """Wrap each stage in timers: CPU time of the thread that runs it, and wall time."""
    import functools
    import importlib
    from collections.abc import Callable
    from typing import Any

    totals: dict[str, list[float]] = {}
    for label, module_name, attribute, owner_name in _STAGES:
        module = importlib.import_module(module_name)
        owner = getattr(module, owner_name) if owner_name else module
        inner = getattr(owner, attribute)
        total = totals[label] = [0.0, 0.0]

        def timed(inner: Callable[..., Any], total: list[float]) -> Callable[..., Any]:
            @functools.wraps(inner)
            def call(*args: Any, **kwargs: Any) -> Any:
                cpu, wall = time.thread_time(), time.perf_counter()
                try:
                    return inner(*args, **kwargs)
                finally:
                    total[0] += time.thread_time() - cpu
                    total[1] += time.perf_counter() - wall

            return call

        setattr(owner, attribute, timed(inner, total))
    return totals


def run_store_path(files_dir: Path, workdir: Path, threads: int, variant: str) -> dict[str, float]:
    """One measurement in a fresh process (its own imports, heap and threads)."""
    out = subprocess.run(
        [sys.executable, __file__, "--one", variant, str(threads), str(files_dir), str(workdir)],
        check=True,
        capture_output=True,
        text=True,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def run_storescp(
    files: list[Path], workdir: Path, associations: int, ignore: bool = False
) -> dict[str, float]:
    import bench_reception

    with bench_reception.storescp(workdir, ignore=ignore) as target:
        os.sync()
        ticks = bench_reception.cpu_ticks()
        seconds = bench_reception.send(target, files, associations)
        stolen = bench_reception.steal_share(ticks, bench_reception.cpu_ticks())
    return {"rate": len(files) / seconds, "steal": stolen}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--stages",
        action="store_true",
        help="instead: where one thread's time goes, stage by stage (timers around each)",
    )
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        variant, threads, files_dir, workdir = args.one
        files = sorted(Path(files_dir).glob("*.dcm"))
        print(json.dumps(measure_store_path(files, Path(workdir), int(threads), variant)))
        return 0

    import bench_reception

    if args.stages:
        return print_stages(args.instances, args.runs)

    figures: dict[tuple[str, int], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-store-path-") as tmp:
        root = Path(tmp)
        files = bench_reception.make_instances(root / "in", args.instances)
        cases = [(r, n) for r in REFERENCES for n in (1, 4)]
        cases += [(v, n) for v in VARIANTS for n in (1, 4)]
        _check_disk(root, sum(f.stat().st_size for f in files) * len(cases) * args.runs)
        for run in range(args.runs):
            order = list(cases)
            random.Random(run).shuffle(order)
            for name, n in order:
                workdir = root / f"run{run}-{n}-{name.replace(' ', '-').replace('/', '-')}"
                workdir.mkdir()
                if name in REFERENCES:
                    figure = run_storescp(files, workdir, n, ignore=name != "storescp")
                else:
                    os.sync()
                    figure = run_store_path(root / "in", workdir, n, name)
                figures.setdefault((name, n), []).append(figure)
                print(
                    f"run {run + 1} {n} {name:20s} {figure['rate']:7.1f} img/s, "
                    f"CPU stolen by the host {figure['steal']:.0%}",
                    flush=True,
                )

    print()
    print(
        f"{args.instances} CT instances 512x512 int16, median of {args.runs} runs; "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print("| what | 1 thread/assoc img/s | ratio | 4 img/s | ratio | CPU ms/instance (1 / 4) |")
    print("|---|---|---|---|---|---|")
    reference = {n: statistics.median(f["rate"] for f in figures[("storescp", n)]) for n in (1, 4)}
    for name in (*REFERENCES, *VARIANTS):
        cells = []
        cpu = []
        for n in (1, 4):
            rate = statistics.median(f["rate"] for f in figures[(name, n)])
            cells.append(f" {rate:.0f} | {rate / reference[n]:.2f}x |")
            if name not in REFERENCES:
                user = statistics.median(f["user_ms"] for f in figures[(name, n)])
                system = statistics.median(f["sys_ms"] for f in figures[(name, n)])
                cpu.append(f"{user:.2f} user + {system:.2f} sys")
        label = f"{name} (storescu over loopback)" if name in REFERENCES else f"store path, {name}"
        print(f"| {label} |{''.join(cells)} {' / '.join(cpu)} |")
    pace = statistics.median(f["rate"] for f in figures[("storescp --ignore", 1)])
    alone = statistics.median(f["rate"] for f in figures[("durable", 1)])
    bound = 1 / (1 / pace + 1 / alone)
    print(
        f"\nOne association, storescu's pace and the durable store path one after the other "
        f"(receiving for free): at most {bound:.0f} img/s, {bound / reference[1]:.2f}x storescp"
    )
    steal = [f["steal"] for runs in figures.values() for f in runs]
    print(
        f"\nCPU time stolen by the host during the measurements: median "
        f"{statistics.median(steal):.0%}, at most {max(steal):.0%}"
    )
    return 0


def _check_disk(root: Path, needed: int) -> None:
    """Every measurement's files are kept until the end (deleting them between measurements
    slows the next one's file creation, see bench_reception.py): refuse to start without
    the room."""
    free = shutil.disk_usage(root).free
    if needed > free * 0.9:
        raise SystemExit(
            f"not enough free disk ({needed / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB "
            "free): fewer --runs or --instances"
        )


def print_stages(instances: int, runs: int) -> int:
    """The durable store path from one thread, with a timer around each stage."""
    import bench_reception

    figures = []
    with tempfile.TemporaryDirectory(prefix="bench-store-path-") as tmp:
        root = Path(tmp)
        files = bench_reception.make_instances(root / "in", instances)
        _check_disk(root, sum(f.stat().st_size for f in files) * runs)
        for run in range(runs):
            workdir = root / f"stages{run}"
            workdir.mkdir()
            os.sync()
            figures.append(run_store_path(root / "in", workdir, 1, "stages"))
            print(f"run {run + 1}: {figures[-1]['rate']:.1f} img/s", flush=True)
    print(f"\n{instances} CT instances 512x512 int16, one thread, median of {runs} runs")
    print("| stage | CPU ms/instance | wall ms/instance |")
    print("|---|---|---|")
    for label, *_ in _STAGES:
        cpu = statistics.median(f[f"cpu:{label}"] for f in figures)
        wall = statistics.median(f[f"wall:{label}"] for f in figures)
        print(f"| {label} | {cpu:.3f} | {wall:.3f} |")
    user = statistics.median(f["user_ms"] for f in figures)
    system = statistics.median(f["sys_ms"] for f in figures)
    print(f"\nProcess CPU per instance: {user:.2f} ms user + {system:.2f} ms system (all threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
