"""Reception benchmark: dcmtk storescp, Orthanc and pacs-agent side by side, in one run.

Generates CT instances (512x512 int16), sends them with dcmtk storescu (TCP_NODELAY=1 on every
side, see FACTS: the Nagle trap) over 1 and over 4 concurrent associations, to each receiver
in turn (in an order shuffled for every run, so no receiver always follows the same one),
each receiver started fresh for each send. Nothing is deleted until the end: removing one
receiver's 500 files right before the next receiver's send slowed that next send (on this
machine's ext4 without a journal, new inodes are allocated past recently freed ones for about
half a minute after a mass delete), which measured the cleanup, not the receiver. Prints the
median images/s of each receiver and its ratio to storescp. A fourth receiver, plain pynetdicom
writing the encoded bytes with no fsync and no index (bench/plain_scp.py), shows what the
library alone reaches in the same run. ``--rss N`` also sends N instances
to one pacs-agent and reports the peak RSS (VmHWM) of its ``serve`` process. Each send also
prints the share of CPU time the host stole from this VM meanwhile (``steal`` in /proc/stat):
the Python receivers suffer from it far more than storescp, so a run with much of it says more
about the host than about the receivers.

    .venv/bin/python bench/bench_reception.py --instances 500 --runs 3 --rss 2000

``--processes 1,2,4`` runs pacs-agent once per listener process count (``listener.processes``,
decision 0013) in the same runs, and prints each one's img/s, its ratios to storescp and to
Orthanc, and whether it was above Orthanc in every single run. ``--no-plain`` leaves out the
plain pynetdicom receiver.

Loopback only. Not run by pytest: speed is a ratio measured here, never a timed test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pydicom import Dataset  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from pacs_agent.demo.synthetic import make_ct_study  # noqa: E402
from tests.helpers.servers import Agent, Orthanc, free_port, wait_for  # noqa: E402

# dcmtk's programs are found on PATH: /usr/bin, or wrappers around a private prefix
# (bench/device_reception.sh).
NODELAY_ENV = {"TCP_NODELAY": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}


def cpu_ticks() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs since boot, from /proc/stat (zeros elsewhere). On a
    VM, steal is the time the host gave our virtual CPUs to someone else: a run with much of
    it measured the host, not the receiver."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The share of CPU time stolen by the host between two ``cpu_ticks`` readings."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else 0.0


def make_instances(out_dir: Path, count: int) -> list[Path]:
    """``count`` CT instances of one series, 512x512 int16, written as files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    template = make_ct_study(None, slices=8, rows=512, cols=512, seed=7)
    series_uid = generate_uid()
    paths = []
    for n in range(count):
        ds: Dataset = template[n % len(template)].copy()
        ds.file_meta = template[n % len(template)].file_meta.copy()
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = n + 1
        ds.ImagePositionPatient = [0.0, 0.0, -2.0 * n]
        path = out_dir / f"CT{n:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _wait_port(port: int, timeout: float = 30) -> None:
    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    wait_for(up, timeout, f"port {port}", interval=0.05)


@dataclass
class Started:
    port: int
    ae_title: str
    count: Callable[[], int]
    #: What to print after a send (pacs-agent: how many listener processes took associations).
    detail: Callable[[], str] = lambda: ""
    #: What to print once the receiver has stopped, given the send's seconds (pacs-agent: its
    #: index writers' commits, and how busy the one SQLite write turn was).
    stopped: Callable[[float], str] = lambda seconds: ""


@contextmanager
def storescp(workdir: Path, ignore: bool = False) -> Iterator[Started]:
    """dcmtk storescp, one process per association; ``ignore``: receive and discard."""
    exe = shutil.which("storescp")
    assert exe, "dcmtk storescp is required"
    out = workdir / "storescp"
    out.mkdir(parents=True)
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--fork", "-od", str(out), "-aet", "STORESCP", str(port)]
        + (["--ignore"] if ignore else []),
        env=NODELAY_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(port)
        yield Started(port, "STORESCP", lambda: len(list(out.iterdir())))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


@contextmanager
def orthanc(workdir: Path) -> Iterator[Started]:
    server = Orthanc(workdir=workdir / "orthanc", dicom_port=free_port(), http_port=free_port())
    server.start()
    try:
        yield Started(
            server.dicom_port,
            server.aet,
            lambda: int(server.get("/statistics")["CountInstances"]),
        )
    finally:
        server.stop()


@contextmanager
def plain_pynetdicom(workdir: Path) -> Iterator[Started]:
    out = workdir / "plain"
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "plain_scp.py"), str(port), str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(port)
        yield Started(port, "PLAINSCP", lambda: len(list(out.iterdir())))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def _agent_count(agent: Agent) -> int:
    import sqlite3

    with sqlite3.connect(agent.data_dir / "pacs-agent.db") as conn:
        return int(conn.execute("select count(*) from instances").fetchone()[0])


@contextmanager
def pacs_agent(workdir: Path, env: dict[str, str] | None = None) -> Iterator[Started]:
    agent = Agent(
        workdir=workdir / "agent", port=free_port(), with_worker=False, env_overrides=env or {}
    )
    agent.start()
    try:
        processes = int((env or {}).get("PACS_AGENT_LISTENER__PROCESSES", "1"))
        if processes > 1:  # every listener process accepting before the send starts
            wait_for(
                lambda: agent.log_tail(10**7).count(" ready (pid ") >= processes,
                120,
                f"{processes} listener processes",
            )
        yield Started(
            agent.port,
            agent.ae_title,
            lambda: _agent_count(agent),
            lambda: _served_by(agent),
            lambda seconds: _index_writers(agent, seconds),
        )
    finally:
        agent.stop()


def _index_writers(agent: Agent, seconds: float) -> str:
    """The index writers' own counters, logged by each as it closes (``IndexWriter.stats``):
    rows per commit, and the time the write turn was held over the send's time (near 1 for
    N processes on SQLite: one commit at a time bounds them)."""
    found = re.findall(
        r"index writer: (\d+) rows in (\d+) commits .*?waited ([\d.]+) s for the write turn, "
        r"held it ([\d.]+) s",
        agent.log_tail(10**8),
    )
    if not found:
        return ""
    rows, commits = sum(int(f[0]) for f in found), sum(int(f[1]) for f in found)
    wait, hold = sum(float(f[2]) for f in found), sum(float(f[3]) for f in found)
    return (
        f"; index: {len(found)} writer(s), {rows / max(commits, 1):.2f} rows per commit, "
        f"wait {1000 * wait / max(commits, 1):.2f} ms and hold "
        f"{1000 * hold / max(commits, 1):.2f} ms per commit, write turn busy "
        f"{hold / seconds:.0%} of the send"
    )


def _served_by(agent: Agent) -> str:
    """How many processes accepted the senders' associations (from serve's log)."""
    pids = set(
        re.findall(r"\[(\d+)\] \S+: association accepted: 'STORESCU'", agent.log_tail(10**8))
    )
    return f", associations taken by {len(pids)} process(es)"


RECEIVERS: dict[str, Callable[[Path], Iterator[Started]]] = {
    "storescp": storescp,  # type: ignore[dict-item]
    "orthanc": orthanc,  # type: ignore[dict-item]
    "pynetdicom (bytes, no fsync)": plain_pynetdicom,  # type: ignore[dict-item]
    "pacs-agent": pacs_agent,  # type: ignore[dict-item]
}


def send(target: Started, files: list[Path], associations: int) -> float:
    """Seconds for storescu to send ``files`` over ``associations`` concurrent associations."""
    exe = shutil.which("storescu")
    assert exe, "dcmtk storescu is required"
    chunks = [files[i::associations] for i in range(associations)]
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [exe, "-aec", target.ae_title, "127.0.0.1", str(target.port), *map(str, chunk)],
            env=NODELAY_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for chunk in chunks
    ]
    errors = [p.communicate()[1] for p in procs]
    elapsed = time.perf_counter() - started
    for p, err in zip(procs, errors, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-2000:]}")
    return elapsed


def peak_rss(workdir: Path, count: int, env: dict[str, str] | None = None) -> tuple[float, float]:
    """Send ``count`` 512x512 instances to one pacs-agent; its peak RSS in MB and images/s."""
    from pynetdicom import AE

    from pacs_agent.net.scu import set_nodelay

    template = make_ct_study(None, slices=8, rows=512, cols=512, seed=8)
    agent = Agent(
        workdir=workdir / "rss-agent", port=free_port(), with_worker=False, env_overrides=env or {}
    )
    agent.start()
    try:
        os.sync()
        ae = AE(ae_title="BENCH")
        ae.add_requested_context(template[0].SOPClassUID, template[0].file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", agent.port, ae_title=agent.ae_title)
        assert assoc.is_established
        set_nodelay(assoc)
        series_uid = generate_uid()
        started = time.perf_counter()
        for n in range(count):
            ds = template[n % len(template)]
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = generate_uid()
            ds.InstanceNumber = n + 1
            status = assoc.send_c_store(ds).Status
            if status != 0:
                raise RuntimeError(f"C-STORE {n} answered {status:#06x}")
        elapsed = time.perf_counter() - started
        assoc.release()
        assert agent.proc is not None
        status_text = Path(f"/proc/{agent.proc.pid}/status").read_text()
        hwm_kb = int(next(line for line in status_text.splitlines() if line.startswith("VmHWM"))
                     .split()[1])  # fmt: skip
        received = _agent_count(agent)
        if received != count:
            raise RuntimeError(f"pacs-agent indexed {received} of {count}")
    finally:
        agent.stop()
    return hwm_kb / 1024, count / elapsed


def agent_name(count: int, counts: list[int]) -> str:
    """The receiver's name of pacs-agent with ``count`` listener processes ("pacs-agent" as
    before when only one process is measured)."""
    return "pacs-agent" if counts == [1] else f"pacs-agent x{count}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rss", type=int, default=0, help="instances for the peak-RSS run")
    parser.add_argument(
        "--agent-env",
        default="{}",
        help='extra environment for pacs-agent serve, JSON: {"PACS_AGENT_LISTENER__...": "..."}',
    )
    parser.add_argument(
        "--processes",
        default="1",
        help="listener process counts of pacs-agent, comma-separated: 1,2,4 (one receiver each)",
    )
    parser.add_argument(
        "--no-plain", action="store_true", help="leave out plain pynetdicom (bench/plain_scp.py)"
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=0,
        help="start no run that would end past this many seconds of sending (0: no limit); "
        "the summary covers the runs done",
    )
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args()
    agent_env = json.loads(args.agent_env)
    counts = [int(c) for c in args.processes.split(",") if c.strip()]
    receivers = dict(RECEIVERS)
    del receivers["pacs-agent"]
    if args.no_plain:
        del receivers["pynetdicom (bytes, no fsync)"]
    agents = []
    for count in counts:
        name = agent_name(count, counts)
        env = {**agent_env, "PACS_AGENT_LISTENER__PROCESSES": str(count)}
        receivers[name] = lambda w, env=env: pacs_agent(w, env)  # type: ignore[assignment,misc]
        agents.append(name)

    rates: dict[tuple[str, int], list[float]] = {}
    steal: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-reception-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        files = make_instances(root / "in", args.instances)
        print(f"generated {len(files)} instances in {time.perf_counter() - t0:.1f} s", flush=True)
        names = list(receivers)
        needed = len(files) * (512 * 512 * 2 + 4096) * len(names) * len(args.associations)
        free = shutil.disk_usage(root).free
        fit = int(free * 0.9 // needed) if needed else args.runs
        if fit < 1:
            raise SystemExit(
                f"not enough free disk for one run kept until the end "
                f"({needed / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB free): "
                "fewer --instances"
            )
        if fit < args.runs:
            print(f"only {fit} of {args.runs} runs fit on the disk: {fit} runs", flush=True)
            args.runs = fit
        runs_done = 0
        started_runs = time.perf_counter()
        for run in range(args.runs):
            spent = time.perf_counter() - started_runs
            if args.max_seconds and run and spent / run * (run + 1) > args.max_seconds:
                print(
                    f"stopping after {run} runs: another would end past --max-seconds "
                    f"{args.max_seconds:.0f}",
                    flush=True,
                )
                break
            runs_done = run + 1
            order = list(names)
            random.Random(run).shuffle(order)
            print(f"run {run + 1} order: {', '.join(order)}", flush=True)
            for n_assoc in args.associations:
                for name in order:
                    workdir = root / f"run{run}-{n_assoc}-{name}"
                    with receivers[name](workdir) as target:  # type: ignore[attr-defined]
                        # Flush what earlier receivers left in the page cache, so nobody's
                        # fsync waits behind another receiver's writeback.
                        os.sync()
                        ticks = cpu_ticks()
                        seconds = send(target, files, n_assoc)
                        stolen = steal_share(ticks, cpu_ticks())
                        detail = target.detail()
                        got = wait_for(
                            lambda t=target: t.count() >= len(files) and t.count(),
                            30,
                            f"{name} to hold every instance",
                        )
                    rate = len(files) / seconds
                    detail += target.stopped(seconds)
                    rates.setdefault((name, n_assoc), []).append(rate)
                    steal.append(stolen)
                    print(
                        f"run {run + 1} {n_assoc} assoc {name:28s} {rate:7.1f} img/s ({got}), "
                        f"CPU stolen by the host {stolen:.0%}{detail}",
                        flush=True,
                    )
        rss = peak_rss(root, args.rss, agent_env) if args.rss else None

    print()
    print(
        f"{args.instances} CT instances 512x512 int16, storescu TCP_NODELAY=1, median of "
        f"{runs_done} runs; {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{platform.platform()}"
    )
    header = "| receiver |" + "".join(f" {n} assoc img/s | ratio |" for n in args.associations)
    print(header)
    print("|---|" + "---|---|" * len(args.associations))
    for name in names:
        cells = []
        for n in args.associations:
            med = statistics.median(rates[(name, n)])
            ref = statistics.median(rates[("storescp", n)])
            cells.append(f" {med:.0f} | {med / ref:.2f}x |")
        print(f"| {name} |" + "".join(cells))
    if "orthanc" in names:
        for agent_receiver in agents:
            for n in args.associations:
                pairs = list(zip(rates[(agent_receiver, n)], rates[("orthanc", n)], strict=True))
                above = sum(agent > orthanc for agent, orthanc in pairs)
                print(
                    f"{agent_receiver} above Orthanc over {n} association(s) in {above} of "
                    f"{len(pairs)} runs" + (" (every run)" if above == len(pairs) else "")
                )
    if len(counts) > 1 or counts != [1]:
        print("\nper listener process count (medians; every run: above Orthanc in each run):")
        print(
            "| processes |"
            + "".join(
                f" {n} assoc img/s | vs storescp | vs Orthanc | every run |"
                for n in args.associations
            )
        )
        print("|---|" + "---|---|---|---|" * len(args.associations))
        for count, agent_receiver in zip(counts, agents, strict=True):
            cells = []
            for n in args.associations:
                med = statistics.median(rates[(agent_receiver, n)])
                ref = statistics.median(rates[("storescp", n)])
                if "orthanc" in names:
                    orth = rates[("orthanc", n)]
                    every = all(
                        a > o for a, o in zip(rates[(agent_receiver, n)], orth, strict=True)
                    )
                    vs_orthanc = f"{med / statistics.median(orth):.2f}x"
                    every_text = "yes" if every else "no"
                else:
                    vs_orthanc, every_text = "-", "-"
                cells.append(f" {med:.0f} | {med / ref:.2f}x | {vs_orthanc} | {every_text} |")
            print(f"| {count} |" + "".join(cells))
    print(
        f"\nCPU time stolen by the host during the sends: median {statistics.median(steal):.0%}, "
        f"at most {max(steal):.0%}"
    )
    if rss is not None:
        print(f"\npacs-agent peak RSS receiving {args.rss} instances: {rss[0]:.0f} MB ")
        print(f"(pynetdicom sender, 1 association, {rss[1]:.0f} img/s)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "rates": {f"{k[0]}@{k[1]}": v for k, v in rates.items()},
                    "rss_mb": rss[0] if rss else None,
                    "steal": steal,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
