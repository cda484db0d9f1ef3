"""``pacs-agent demo``: the whole path on embedded defaults, in one command.

Starts ``pacs-agent serve`` (listener, scheduler, embedded worker), sends it a synthetic CT
study over DICOM, waits for the job to finish, prints the findings and where the SEG and SR are,
then stops the agent.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.config import Settings
from pacs_agent.db.models import Finding, Job, Study
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.demo.synthetic import make_ct_study_with_truth, write_study
from pacs_agent.net.scu import echo, store_files

FINAL = {"succeeded", "exported", "failed", "export_failed", "cancelled"}


def _wait_for_listener(settings: Settings, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pacs-agent serve exited with {proc.returncode}")
        if (
            echo(
                host="127.0.0.1"
                if settings.listener.host in ("0.0.0.0", "")
                else settings.listener.host,
                port=settings.listener.port,
                called_ae=settings.listener.ae_title,
                calling_ae="DEMO",
                timeout_s=2,
            )
            == 0
        ):
            return
        time.sleep(0.5)
    raise TimeoutError("the listener did not answer C-ECHO in time")


def api_port_for_demo(settings: Settings) -> int | None:
    """The port the demo's ``serve`` runs its API on, or None when the API is off.

    ``serve`` refuses to start when its API port is taken (another agent, a test run in
    parallel, anything else on 8080): the demo then takes a free loopback port instead,
    since its point is the DICOM path, and says which.
    """
    if not settings.api.enabled:
        return None
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((settings.api.host, settings.api.port))
        return settings.api.port
    except OSError:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((settings.api.host, 0))
            return int(s.getsockname()[1])


def _wait_for_jobs(sf: sessionmaker[Session], study_uid: str, timeout_s: float) -> list[Job]:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        with sf() as session:
            jobs = list(
                session.scalars(
                    select(Job).join(Study).where(Study.study_instance_uid == study_uid)
                )
            )
        state = ", ".join(f"job {j.id}: {j.status}" for j in jobs) or "study not complete yet"
        if state != last:
            print(f"  {state}", flush=True)
            last = state
        if jobs and all(j.status in FINAL for j in jobs):
            return jobs
        time.sleep(0.5)
    raise TimeoutError(f"no result within {timeout_s:.0f} s ({last})")


def run_demo(settings: Settings, *, config_file: Path | None, timeout_s: float) -> int:
    seed = int(time.time())
    study_dir = settings.data_dir / "demo" / f"study-{seed}"
    datasets, truth = make_ct_study_with_truth(None, seed=seed, patient_id=f"DEMO-{seed}")
    ps = [float(v) for v in datasets[0].PixelSpacing]
    truth_mm3 = float(truth.sum()) * ps[0] * ps[1] * float(datasets[0].SliceThickness)
    paths = write_study(datasets, study_dir)
    study_uid = str(datasets[0].StudyInstanceUID)
    print(f"synthetic CT study: {len(paths)} slices in {study_dir}")

    cmd = [sys.executable, "-m", "pacs_agent"]
    if config_file is not None:
        cmd += ["--config", str(config_file)]
    cmd += ["serve"]
    env = os.environ.copy()
    env.setdefault("PACS_AGENT_DATA_DIR", str(settings.data_dir))
    api_port = api_port_for_demo(settings)
    if api_port is not None:
        if api_port != settings.api.port:
            print(f"port {settings.api.port} is taken: the API runs on {api_port} instead")
        env["PACS_AGENT_API__PORT"] = str(api_port)
        print(f"API and dashboard: http://{settings.api.host}:{api_port}/")
    log_path = settings.data_dir / "logs" / "demo-serve.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"starting pacs-agent serve (log: {log_path}) ...", flush=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for_listener(settings, proc, timeout_s=120)
        host = "127.0.0.1" if settings.listener.host in ("0.0.0.0", "") else settings.listener.host
        t0 = time.monotonic()
        outcomes = store_files(
            host=host,
            port=settings.listener.port,
            called_ae=settings.listener.ae_title,
            calling_ae="DEMO",
            paths=paths,
        )
        bad = [o for o in outcomes if not o.ok]
        print(
            f"sent {len(outcomes) - len(bad)}/{len(outcomes)} instances by C-STORE to "
            f"{settings.listener.ae_title}@{host}:{settings.listener.port} "
            f"in {time.monotonic() - t0:.1f} s"
        )
        if bad:
            print(f"C-STORE failures: {bad[0].error}", file=sys.stderr)
            return 1
        sf = make_session_factory(make_engine(settings.database_url))
        print("waiting for the study to complete and the model to run ...")
        jobs = _wait_for_jobs(sf, study_uid, timeout_s)
        print(f"results after {time.monotonic() - t0:.1f} s")
        status = _report(sf, settings, jobs)
        print(f"(the synthetic study's blobs measure {truth_mm3:.0f} mm3 in truth)")
        return status
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _report(sf: sessionmaker[Session], settings: Settings, jobs: list[Job]) -> int:
    ok = True
    for job in jobs:
        print(f"\njob {job.id}: model {job.model_name} {job.model_version}: {job.status}")
        if job.reason:
            print(f"  reason: {job.reason}")
        if job.status not in ("succeeded", "exported"):
            ok = False
            continue
        with sf() as session:
            findings = list(
                session.scalars(
                    select(Finding).where(Finding.job_id == job.id).order_by(Finding.segment_number)
                )
            )
        for f in findings:
            if f.detected:
                hu = f", mean {f.mean_hu:.0f} HU" if f.mean_hu is not None else ""
                parts = (
                    f", {f.component_count} component(s)" if f.component_count is not None else ""
                )
                print(
                    f"  finding: {f.label} ({f.code_meaning}, {f.code_scheme} {f.code_value}):"
                    f" {f.volume_mm3:.0f} mm3{hu}{parts}"
                )
            else:
                print(f"  finding: {f.label}: not detected")
        if job.seg_path:
            print(f"  SEG: {settings.results_dir / job.seg_path}")
        print(f"  SR:  {settings.results_dir / job.sr_path}" if job.sr_path else "  SR: none")
    print("\nDEMO ONLY: the demo model was trained on synthetic blobs; not for clinical use.")
    return 0 if ok else 1
