"""``pacs-agent models evaluate``: the demo models on generated labelled sets, and the dcmqi liver
SEG in ../shared/data as a third-party reference segmentation."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from pydicom.pixels import apply_modality_lut

from pacs_agent.catalog import read_card
from pacs_agent.demo.radiograph import make_radiograph, radiograph_dataset
from pacs_agent.demo.synthetic import make_ct_study_with_truth, write_study
from tests.helpers.paths import SHARED_DATA
from workers.evaluation import classification_scores, evaluate, roc_curve

ROOT = Path(__file__).resolve().parents[2]
BUNDLES = ROOT / "workers" / "bundles"
LIVER = SHARED_DATA / "ct_liver_3sl_with_seg_dcmqi"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _cli(
    *args: str, data_dir: Path, models_dir: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_AGENT_")}
    env["PACS_AGENT_DATA_DIR"] = str(data_dir)
    env["PACS_AGENT_WORKER__DEVICE"] = "cpu"
    if models_dir is not None:
        env["PACS_AGENT_MODELS__DIRECTORY"] = str(models_dir)
    return subprocess.run(
        [sys.executable, "-m", "pacs_agent", "models", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_evaluate_demo_classifier_reports_the_figures_of_its_probabilities(
    tmp_path: Path,
) -> None:
    dataset = tmp_path / "cr_set"
    rng = np.random.default_rng(42)
    rows = []
    for i in range(12):
        finding = i % 2 == 1
        ds = radiograph_dataset(
            make_radiograph(rng, finding),
            patient_id=f"EVAL{i:03d}",
            modality="DX" if i % 3 == 0 else "CR",
            monochrome1=i % 4 == 0,
        )
        (dataset / f"case{i:02d}").mkdir(parents=True)
        ds.save_as(dataset / f"case{i:02d}" / "image.dcm", enforce_file_format=True)
        # Case 03 is labelled wrongly on purpose: a positive image marked 0.
        rows.append({"case": f"case{i:02d}", "Nodule": "0" if i == 3 else str(int(finding))})
    with (dataset / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["case", "Nodule"])
        writer.writeheader()
        writer.writerows(rows)

    run = _cli(
        "evaluate",
        "demo_cr_nodule_cls",
        "--dataset",
        str(dataset),
        "--json",
        data_dir=tmp_path / "var",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "[12/12] case11" in run.stderr  # progress on the terminal
    report = json.loads(run.stdout)
    assert report["evaluated"] == 12
    nodule = report["findings"][0]
    probabilities = [c["probabilities"]["Nodule"] for c in report["cases"]]
    truth = [int(r["Nodule"]) for r in rows]
    flagged = [p >= 0.5 for p in probabilities]
    # The demo model sees the opacities: every positive image is flagged, no negative one.
    assert flagged == [i % 2 == 1 for i in range(12)]
    assert nodule["true_positives"] == 5 and nodule["false_positives"] == 1
    assert nodule["true_negatives"] == 6 and nodule["false_negatives"] == 0
    assert nodule["accuracy"] == pytest.approx(11 / 12)
    assert nodule["precision"] == pytest.approx(5 / 6)
    assert nodule["recall"] == pytest.approx(1.0)
    assert nodule["specificity"] == pytest.approx(6 / 7)
    # ROC AUC: the fraction of (positive, negative) pairs ranked right.
    pos = [p for p, t in zip(probabilities, truth, strict=True) if t]
    neg = [p for p, t in zip(probabilities, truth, strict=True) if not t]
    pairs = [(a > b) + 0.5 * (a == b) for a in pos for b in neg]
    assert nodule["roc_auc"] == pytest.approx(sum(pairs) / len(pairs))
    out = dataset / "evaluation"
    assert json.loads((out / "report.json").read_text())["findings"][0] == nodule
    assert (out / "roc_nodule.png").read_bytes()[:8] == PNG_MAGIC


def _reference_seg(
    datasets: list[pydicom.Dataset], mask: np.ndarray, label: str
) -> pydicom.Dataset:
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=label,
        segmented_property_category=hd.sr.CodedConcept(
            "49755003", "SCT", "Morphologically Altered Structure"
        ),
        segmented_property_type=hd.sr.CodedConcept("4147007", "SCT", "Mass"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    return hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=mask.astype(bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=hd.UID(),
        series_number=99,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="reference",
        software_versions="1",
        device_serial_number="1",
    )


def test_evaluate_demo_segmenter_against_reference_segs_gives_high_dice(tmp_path: Path) -> None:
    dataset = tmp_path / "ct_set"
    for seed in (11, 12):
        datasets, truth = make_ct_study_with_truth(
            None, rows=128, cols=128, slices=24, seed=seed, patient_id=f"SEG{seed}"
        )
        case = dataset / f"case{seed}"
        write_study(datasets, case)
        _reference_seg(datasets, truth, "Blob").save_as(case / "reference_seg.dcm")
    card = read_card(BUNDLES / "demo_ct_blob_seg")
    lines: list[str] = []
    report = evaluate(card, dataset, tmp_path / "out", device="cpu", progress=lines.append)
    assert [line.split(":")[0] for line in lines] == ["[1/2] case11", "[2/2] case12"]
    blob = report["labels"][0]
    assert blob["cases"] == 2
    assert blob["dice_mean"] > 0.8
    assert 0 <= blob["hd95_mm_mean"] < 20
    assert (tmp_path / "out" / "dice.png").read_bytes()[:8] == PNG_MAGIC


class _Window(torch.nn.Module):
    """Label 1 where 0 < HU < 120 (soft tissue such as liver), as two-channel logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inside = torch.minimum(x, 120.0 - x)
        return torch.cat([torch.zeros_like(x), inside], dim=1)


WINDOW_CONFIG = {
    "image_key": "image",
    "preprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
        ],
    },
    "inferer": {"_target_": "SimpleInferer"},
    "postprocessing": {
        "_target_": "Compose",
        "transforms": [{"_target_": "AsDiscreted", "keys": "pred", "argmax": True}],
    },
}
WINDOW_METADATA = {
    "version": "0.0.1",
    "name": "window",
    "network_data_format": {"outputs": {"pred": {"num_channels": 2}}},
}
WINDOW_CARD = """
    [model]
    name = "soft_tissue_window"
    version = "0.0.1"
    task = "segmentation"
    [accepts]
    modality = ["CT"]
    [[segments]]
    number = 1
    label = "Liver"
    category = { value = "123037004", scheme = "SCT", meaning = "Anatomical Structure" }
    type = { value = "10200004", scheme = "SCT", meaning = "Liver" }
"""


def test_evaluate_against_the_dcmqi_liver_seg_computes_dice_on_the_right_frames(
    tmp_path: Path,
) -> None:
    if not LIVER.is_dir():
        pytest.fail(f"{LIVER} is missing")
    models = tmp_path / "models"
    bundle = models / "soft_tissue_window"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "configs" / "inference.json").write_text(json.dumps(WINDOW_CONFIG))
    (bundle / "configs" / "metadata.json").write_text(json.dumps(WINDOW_METADATA))
    (bundle / "pacs-agent.toml").write_text(textwrap.dedent(WINDOW_CARD))
    torch.jit.script(_Window()).save(str(bundle / "models" / "model.ts"))
    # The data set: one case, the three CT slices and dcmqi's SEG (linked, not copied).
    case = tmp_path / "liver_set" / "liver"
    case.mkdir(parents=True)
    for source in sorted((LIVER / "ct").iterdir()):
        (case / source.name).symlink_to(source)
    (case / "liver.dcm").symlink_to(LIVER / "liver.dcm")

    run = _cli(
        "evaluate",
        "soft_tissue_window",
        "--dataset",
        str(case.parent),
        "--json",
        "--out",
        str(tmp_path / "report"),
        data_dir=tmp_path / "var",
        models_dir=models,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    scores = report["cases"][0]["scores"]["Liver"]

    # The same Dice computed here from the files: the window on each slice vs the SEG's frames
    # (dcmqi codes the liver with an older code; the label "Liver" matches it).
    cts = [pydicom.dcmread(p) for p in sorted((LIVER / "ct").iterdir())]
    reference = hd.seg.segread(LIVER / "liver.dcm").get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in cts],
        segment_numbers=[1],
        combine_segments=True,
        skip_overlap_checks=True,
        ignore_spatial_locations=True,
    )
    pred = np.stack(
        [(lambda hu: (hu > 0) & (hu < 120))(apply_modality_lut(ds.pixel_array, ds)) for ds in cts]
    )
    ref = np.asarray(reference) > 0
    assert ref.sum() > 1000
    expected = 2 * (pred & ref).sum() / (pred.sum() + ref.sum())
    assert scores["dice"] == pytest.approx(float(expected), abs=1e-4)
    assert scores["hd95_mm"] is not None and 0 < scores["hd95_mm"] < 500
    assert (tmp_path / "report" / "dice.png").is_file()


def test_roc_curve_and_scores_on_a_known_ranking() -> None:
    fpr, tpr = roc_curve(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0]))
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    scores = classification_scores([0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0], 0.75)
    assert scores["roc_auc"] == pytest.approx(0.75)
    assert (scores["precision"], scores["recall"], scores["specificity"]) == (0.5, 0.5, 0.5)
