"""Celery's process pool keeps running jobs after it kills a pool process at a hard time limit."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# The pool Celery's prefork worker runs with the embedded broker (billiard's threaded pool, as
# celery.concurrency.prefork.TaskPool builds it), one process, each job past a 0.05 s hard time
# limit. The job keeps a second thread busy, as torch's intra-op threads do. After each kill a
# quick job must run: a pool whose replacement process waits on a lock the killed one held
# never runs it (without the receiver, every run here stopped after the first or second kill).
SCENARIO = """
import os, sys, threading, time
from billiard.pool import Pool
from celery.concurrency.prefork import process_destructor
from celery.signals import worker_process_shutdown
from workers.celery_app import ignore_sigterm_while_exiting

def run_with_a_second_thread():
    def spin():
        end = time.monotonic() + 30
        while time.monotonic() < end:
            sum(range(1000))
    threading.Thread(target=spin, daemon=True).start()
    spin()

def quick():
    return "ran"

worker_process_shutdown.connect(ignore_sigterm_while_exiting, weak=False)
pool = Pool(1, threads=True, enable_timeouts=True, on_process_exit=process_destructor)
for kill in range(1, 4):
    try:
        pool.apply_async(run_with_a_second_thread, timeout=0.05).get(timeout=30)
    except Exception:
        pass  # TimeLimitExceeded
    try:
        pool.apply_async(quick).get(timeout=20)
    except Exception as exc:
        print(f"after kill {kill}: the next job did not run ({type(exc).__name__})", flush=True)
        os._exit(1)  # a wedged pool cannot be shut down
print("ran after every kill", flush=True)
pool.terminate()
"""


def test_a_pool_process_killed_at_its_hard_time_limit_does_not_stop_the_pool(
    tmp_path: Path,
) -> None:
    log = tmp_path / "scenario.log"
    with log.open("w") as out:
        # Its own session: a wedged pool's processes are killed as one group. Output to a
        # file, not a pipe, which a left-over pool process would hold open.
        proc = subprocess.Popen(
            [sys.executable, "-c", SCENARIO],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=120)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "ran after every kill" in text
