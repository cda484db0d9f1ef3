"""Send the demo study through the demo PACS and print what the AI found.

Run by ``docker compose run --rm demo`` (deploy/compose.yaml): makes a synthetic CT study,
uploads it to Orthanc (the demo PACS), asks Orthanc to C-STORE it to pacs-agent, waits for the
jobs in the database, prints the findings, and checks that the SEG and the SR came back to
Orthanc. Settings come from the same environment variables as the services.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from pacs_agent.config import load_settings
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.demo.run import _report, _wait_for_jobs
from pacs_agent.demo.synthetic import make_ct_study_with_truth, write_study

ORTHANC = os.environ.get("DEMO_ORTHANC_URL", "http://orthanc:8042")
MODALITY = os.environ.get("DEMO_ORTHANC_MODALITY", "pacs-agent")


def orthanc(method: str, path: str, body: bytes | None = None, ctype: str = "") -> Any:
    req = urllib.request.Request(ORTHANC + path, data=body, method=method)
    if ctype:
        req.add_header("Content-Type", ctype)
    with urllib.request.urlopen(req, timeout=120) as rsp:
        data = rsp.read()
    return json.loads(data) if data else None


def main() -> int:
    settings = load_settings()
    seed = int(time.time())
    datasets, _ = make_ct_study_with_truth(None, seed=seed, patient_id=f"DEMO-{seed}")
    study_uid = str(datasets[0].StudyInstanceUID)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_study(datasets, Path(tmp))
        ids = {
            orthanc("POST", "/instances", p.read_bytes(), "application/dicom")["ParentStudy"]
            for p in paths
        }
    (orthanc_study,) = ids
    print(f"demo PACS holds the synthetic CT study {study_uid} ({len(paths)} slices)")
    orthanc(
        "POST",
        f"/modalities/{MODALITY}/store",
        json.dumps(orthanc_study).encode(),
        "application/json",
    )
    print(f"demo PACS sent it to pacs-agent (modality {MODALITY!r}); waiting for the results ...")
    sf = make_session_factory(make_engine(settings.database_url))
    jobs = _wait_for_jobs(sf, study_uid, float(os.environ.get("DEMO_TIMEOUT_S", "900")))
    status = _report(sf, settings, jobs)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        series = orthanc("GET", f"/studies/{orthanc_study}/series?expand")
        back = sorted(s["MainDicomTags"].get("Modality", "") for s in series)
        if "SR" in back:
            print(f"the demo PACS now holds series of modality {', '.join(back)} for the study")
            return status
        time.sleep(1)
    print("the results did not reach the demo PACS within 60 s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
