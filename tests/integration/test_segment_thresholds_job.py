"""An inference job applies the model card's segment thresholds: its findings rows, SEG, SR and
``pacs-agent findings --json`` carry the kept components and the largest one's volume.

The job runs through the worker's own entry point (``run_inference_job``: catalog, volume
checks, the MONAI bundle runner, SEG and SR builders, findings in SQLite) on instances indexed
in a real spool. The model is a real MONAI bundle whose network is a fixed 1x1x1 convolution
that labels every voxel brighter than 500 HU, so its output is known voxel for voxel: a
4 x 10 x 10 blob and three single bright voxels ("specks") in a synthetic CT.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import torch
from pydicom import Dataset
from sqlalchemy import select
from typer.testing import CliRunner

from pacs_agent.cli.main import app
from pacs_agent.config import Settings
from pacs_agent.db.index import StoredFile, index_instance
from pacs_agent.db.migrate import upgrade
from pacs_agent.db.models import Finding, Job, Series
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.demo.synthetic import RESCALE_INTERCEPT, make_ct_study_with_truth
from pacs_agent.dicom.header import instance_header
from pacs_agent.dicom.sr import COMPONENT_COUNT, LARGEST_COMPONENT_VOLUME
from pacs_agent.queue import CeleryDispatcher, make_celery
from pacs_agent.storage.spool import Spool
from workers.celery_app import WorkerContext
from workers.inference import run_inference_job

pytestmark = pytest.mark.integration

MODEL = "bright_voxels"
#: 0.8 x 0.8 mm pixels, 2 mm slices (the synthetic CT's defaults).
VOXEL_MM3 = 0.8 * 0.8 * 2.0
BLOB_VOXELS = 4 * 10 * 10

CARD = f"""
[model]
name = "{MODEL}"
version = "1.0.0"
task = "segmentation"

[accepts]
modality = ["CT"]

[detection]
min_volume_mm3 = 100.0
min_component_mm3 = 5.0

[[segments]]
number = 1
label = "Bright"
category = {{ value = "49755003", scheme = "SCT", meaning = "Morphologically Altered Structure" }}
type = {{ value = "4147007", scheme = "SCT", meaning = "Mass" }}
"""

INFERENCE = {
    "image_key": "image",
    "network_def": {
        "_target_": "torch.nn.Conv3d",
        "in_channels": 1,
        "out_channels": 2,
        "kernel_size": 1,
    },
    "preprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {
                "_target_": "ScaleIntensityRanged",
                "keys": "image",
                "a_min": 0,
                "a_max": 1000,
                "b_min": 0,
                "b_max": 1,
                "clip": True,
            },
        ],
    },
    "inferer": {"_target_": "SimpleInferer"},
    "postprocessing": {
        "_target_": "Compose",
        "transforms": [{"_target_": "AsDiscreted", "keys": "pred", "argmax": True}],
    },
}


def _bundle(models: Path) -> None:
    """Channel 1 (scaled intensity) beats channel 0 (0.5) above 500 HU."""
    bundle = models / MODEL
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "configs" / "inference.json").write_text(json.dumps(INFERENCE))
    metadata = {
        "version": "1.0.0",
        "network_data_format": {"outputs": {"pred": {"num_channels": 2}}},
    }
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata))
    (bundle / "pacs-agent.toml").write_text(CARD)
    weights = {
        "weight": torch.tensor([0.0, 1.0]).reshape(2, 1, 1, 1, 1),
        "bias": torch.tensor([0.5, 0.0]),
    }
    torch.save(weights, bundle / "models" / "model.pt")


def _study(seed: int, blob: bool) -> list[Dataset]:
    """A 10-slice 64 x 64 CT at 0 HU with three bright single voxels (and a bright blob)."""
    datasets, _ = make_ct_study_with_truth(
        None, rows=64, cols=64, slices=10, seed=seed, patient_id=f"THRESH-{seed}", n_blobs=0
    )
    hu = np.zeros((10, 64, 64), dtype=np.int32)
    if blob:
        hu[3:7, 20:30, 20:30] = 1000
    hu[1, 5, 5] = hu[8, 50, 50] = hu[5, 55, 10] = 1000
    for ds, plane in zip(datasets, hu, strict=True):
        ds.PixelData = (plane - RESCALE_INTERCEPT).astype("<u2").tobytes()
    return datasets


def _index(settings: Settings, datasets: list[Dataset]) -> None:
    spool = Spool(settings.spool_dir)
    sf = make_session_factory(make_engine(settings.database_url))
    for ds in datasets:
        relative = spool.relative_path(
            str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
        )
        path = spool.path(relative)
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        data = path.read_bytes()
        stored = StoredFile(
            str(relative),
            len(data),
            hashlib.sha256(data).hexdigest(),
            str(ds.file_meta.TransferSyntaxUID),
            "TESTSCU",
        )
        index_instance(sf, instance_header(ds), stored, datetime.now(UTC))


def _queued_job(ctx: WorkerContext, series_uid: str) -> int:
    with ctx.session_factory.begin() as session:
        series = session.scalars(
            select(Series).where(Series.series_instance_uid == series_uid)
        ).one()
        job = Job(study_id=series.study_id, series_id=series.id, model_name=MODEL, status="queued")
        session.add(job)
        session.flush()
        return job.id


def test_inference_job_findings_carry_kept_components_and_ignore_specks(tmp_path: Path) -> None:
    models = tmp_path / "models"
    _bundle(models)
    settings = Settings(data_dir=tmp_path / "var", models={"directory": models})  # type: ignore[arg-type]
    settings.data_dir.mkdir()
    upgrade(settings.database_url)
    ctx = WorkerContext(
        settings=settings,
        session_factory=make_session_factory(make_engine(settings.database_url)),
        dispatcher=CeleryDispatcher(make_celery(settings)),
        name="test-worker",
        runners={},
    )
    with_blob, specks_only = _study(11, blob=True), _study(12, blob=False)
    jobs = []
    for datasets in (with_blob, specks_only):
        _index(settings, datasets)
        jobs.append(_queued_job(ctx, str(datasets[0].SeriesInstanceUID)))
    assert [run_inference_job(ctx, job_id) for job_id in jobs] == ["succeeded", "succeeded"]

    with ctx.session_factory() as session:
        rows = {
            f.job_id: f for f in session.scalars(select(Finding).where(Finding.job_id.in_(jobs)))
        }
        blob_job, specks_job = (session.get(Job, job_id) for job_id in jobs)
    assert blob_job is not None and specks_job is not None
    found, ignored = rows[jobs[0]], rows[jobs[1]]
    # The blob counts; its three specks (1.28 mm3 each, under the 5 mm3 minimum) do not.
    assert found.detected and found.flag
    assert found.component_count == 1
    assert found.largest_component_mm3 == pytest.approx(BLOB_VOXELS * VOXEL_MM3)
    assert found.volume_mm3 == pytest.approx(BLOB_VOXELS * VOXEL_MM3)
    assert found.voxel_count == BLOB_VOXELS and found.min_volume_mm3 == 100.0
    # Specks alone flag nothing, and no SEG is made.
    assert not ignored.detected and not ignored.flag
    assert (ignored.component_count, ignored.voxel_count, ignored.largest_component_mm3) == (
        0,
        0,
        0.0,
    )
    assert specks_job.seg_path is None and specks_job.sr_path is not None

    assert blob_job.seg_path is not None and blob_job.sr_path is not None
    seg = hd.seg.segread(settings.results_dir / blob_job.seg_path)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in with_blob],
        segment_numbers=[1],
    )
    assert int(pixels.sum()) == BLOB_VOXELS
    assert not pixels[1].any() and not pixels[8].any()  # the slices of two specks
    report = hd.sr.srread(settings.results_dir / blob_job.sr_path).content
    assert isinstance(report, hd.sr.MeasurementReport)
    (group,) = report.get_volumetric_roi_measurement_groups()
    (count,) = group.get_measurements(name=COMPONENT_COUNT)
    (largest,) = group.get_measurements(name=LARGEST_COMPONENT_VOLUME)
    assert count.value == 1 and largest.value == pytest.approx(BLOB_VOXELS * VOXEL_MM3)

    out = CliRunner().invoke(
        app,
        ["findings", str(with_blob[0].StudyInstanceUID), "--json"],
        env={"PACS_AGENT_DATA_DIR": str(settings.data_dir)},
    )
    assert out.exit_code == 0, out.output
    (shown,) = json.loads(out.stdout)
    assert shown["component_count"] == 1
    assert shown["largest_component_mm3"] == pytest.approx(BLOB_VOXELS * VOXEL_MM3)
    assert shown["min_volume_mm3"] == 100.0 and shown["flag"] is True
