"""BundleRunner: unchanged MONAI bundles on DICOM series, labels mapped onto the source frames."""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
import torch
from monai.bundle import ConfigParser
from pydicom.dataset import Dataset

from pacs_agent.demo.synthetic import make_ct_study_with_truth
from tests.helpers.paths import MODEL_ZOO
from tests.helpers.realct import REAL_CT_DIR, repair_real_ct
from workers.runtime.bundle import BundleError, BundleRunner, labels_on_frames

ROOT = Path(__file__).resolve().parents[2]
DEMO_BUNDLE = ROOT / "workers" / "bundles" / "demo_ct_blob_seg"
SPLEEN_BUNDLE = MODEL_ZOO / "spleen_ct_segmentation"


def _dice(pred: npt.NDArray[np.uint8], truth: npt.NDArray[np.uint8]) -> float:
    p, t = pred > 0, truth > 0
    return 2.0 * float((p & t).sum()) / float(p.sum() + t.sum())


def _bundle_with_random_weights(source: Path, target: Path) -> Path:
    """A bundle folder that uses ``source``'s configs unchanged, with seeded random weights."""
    target.mkdir(parents=True)
    (target / "configs").symlink_to(source / "configs", target_is_directory=True)
    parser = ConfigParser()
    parser.read_config(str(source / "configs" / "inference.json"))
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    (target / "models").mkdir()
    torch.save(network.state_dict(), target / "models" / "model.pt")
    return target


@pytest.fixture(scope="module")
def demo_runner() -> BundleRunner:
    return BundleRunner(DEMO_BUNDLE, device="cpu")


@pytest.fixture(scope="module")
def synthetic_study(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, list[Dataset], npt.NDArray[np.uint8]]:
    folder = tmp_path_factory.mktemp("synthetic")
    datasets, truth = make_ct_study_with_truth(folder, seed=2024)
    return folder, datasets, truth


@pytest.fixture(scope="module")
def real_ct(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Dataset]]:
    if not REAL_CT_DIR.is_dir():
        pytest.skip(f"real CT test data not found at {REAL_CT_DIR}")
    folder = tmp_path_factory.mktemp("realct")
    paths = repair_real_ct(REAL_CT_DIR, folder)
    return folder, [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


def test_demo_bundle_segments_synthetic_study_with_dice_above_0_8(
    demo_runner: BundleRunner,
    synthetic_study: tuple[Path, list[Dataset], npt.NDArray[np.uint8]],
) -> None:
    folder, datasets, truth = synthetic_study
    masks = demo_runner.segment(folder, datasets)
    assert masks.shape == truth.shape == (40, 256, 256)
    assert masks.dtype == np.uint8
    assert set(np.unique(masks)) <= {0, 1}
    assert _dice(masks, truth) > 0.8


def test_demo_bundle_masks_follow_source_frames_given_in_shuffled_order(
    demo_runner: BundleRunner,
    synthetic_study: tuple[Path, list[Dataset], npt.NDArray[np.uint8]],
) -> None:
    folder, datasets, truth = synthetic_study
    order = list(range(len(datasets)))
    random.Random(7).shuffle(order)
    masks = demo_runner.segment(folder, [datasets[i] for i in order])
    assert _dice(masks, truth[order]) > 0.8
    # Every frame's mask matches that frame's truth, not its neighbour's.
    for position, index in enumerate(order):
        if truth[index].sum() > 200:
            assert _dice(masks[position : position + 1], truth[index : index + 1]) > 0.6


def test_runner_runs_unchanged_spleen_bundle_on_real_ct(
    tmp_path: Path, real_ct: tuple[Path, list[Dataset]]
) -> None:
    folder, datasets = real_ct
    bundle = _bundle_with_random_weights(SPLEEN_BUNDLE, tmp_path / "spleen_ct_segmentation")
    runner = BundleRunner(bundle, device="cpu")
    masks = runner.segment(folder, datasets)
    assert masks.shape == (20, 512, 512)
    assert masks.dtype == np.uint8
    assert set(np.unique(masks)) <= {0, 1}
    assert not (tmp_path / "spleen_ct_segmentation" / "eval").exists(), "SaveImaged must not run"


def test_demo_bundle_runs_on_real_ct(
    demo_runner: BundleRunner, real_ct: tuple[Path, list[Dataset]]
) -> None:
    folder, datasets = real_ct
    masks = demo_runner.segment(folder, datasets)
    assert masks.shape == (20, 512, 512)


def test_runner_refuses_bundle_without_weights(tmp_path: Path) -> None:
    (tmp_path / "configs").symlink_to(DEMO_BUNDLE / "configs", target_is_directory=True)
    with pytest.raises(BundleError, match=r"models/model\.pt"):
        BundleRunner(tmp_path, device="cpu")


def test_runner_refuses_bundle_without_config(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"inference\.json"):
        BundleRunner(tmp_path, device="cpu")
    with pytest.raises(BundleError, match="does not exist"):
        BundleRunner(tmp_path / "absent", device="cpu")


def test_runner_refuses_config_without_inferer(tmp_path: Path) -> None:
    config = (DEMO_BUNDLE / "configs" / "inference.json").read_text()
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "inference.json").write_text(
        config.replace('"inferer":', '"not_the_inferer":')
    )
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").symlink_to(DEMO_BUNDLE / "models" / "model.pt")
    with pytest.raises(BundleError, match="'inferer'"):
        BundleRunner(tmp_path, device="cpu")


def test_runner_refuses_weights_that_do_not_fit_the_network(tmp_path: Path) -> None:
    (tmp_path / "configs").symlink_to(DEMO_BUNDLE / "configs", target_is_directory=True)
    (tmp_path / "models").mkdir()
    torch.save({"not.a.layer": torch.zeros(1)}, tmp_path / "models" / "model.pt")
    with pytest.raises(BundleError, match="does not fit"):
        BundleRunner(tmp_path, device="cpu")


def _frame(position: Sequence[float], rows: int = 4, cols: int = 5) -> Dataset:
    ds = Dataset()
    ds.Rows, ds.Columns = rows, cols
    ds.ImagePositionPatient = list(position)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [2.0, 1.0]  # 2 mm between rows, 1 mm between columns
    return ds


def test_labels_on_frames_maps_pixels_through_the_affine() -> None:
    # A volume indexed [x, y, z] in LPS with 1 x 2 x 3 mm voxels, origin (10, 20, 30).
    affine = np.array(
        [[1.0, 0, 0, 10], [0, 2.0, 0, 20], [0, 0, 3.0, 30], [0, 0, 0, 1]], dtype=np.float64
    )
    labels = np.zeros((5, 4, 3), dtype=np.int64)
    labels[3, 1, 2] = 7  # patient point (13, 22, 36)
    frames = [_frame((10, 20, 36)), _frame((10, 20, 33)), _frame((10, 20, 99))]
    out = labels_on_frames(labels, affine, frames)
    assert out.shape == (3, 4, 5)
    expected = np.zeros((4, 5), dtype=np.uint8)
    expected[1, 3] = 7  # row 1 (y = 22), column 3 (x = 13)
    np.testing.assert_array_equal(out[0], expected)
    assert out[1].sum() == 0
    assert out[2].sum() == 0  # outside the volume


def test_training_script_short_run_writes_a_loadable_model(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "workers.training.train_demo_seg",
            "--out",
            str(out),
            "--iterations",
            "3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "held-out Dice" in run.stdout
    weights = out / "models" / "model.pt"
    state = torch.load(weights, weights_only=True)
    assert isinstance(state, dict) and state
    (out / "configs").symlink_to(DEMO_BUNDLE / "configs", target_is_directory=True)
    BundleRunner(out, device="cpu")  # the weights fit the bundle's own network


def test_runner_applies_config_overrides_before_building(tmp_path: Path) -> None:
    runner = BundleRunner(DEMO_BUNDLE, device="cpu", overrides={"inferer#overlap": 0.5})
    assert runner.inferer.overlap == 0.5
    assert runner.device == torch.device("cpu")


class _Greedy(torch.nn.Module):
    """A network that asks for far more memory than any machine has (a petabyte)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        waste = torch.empty([1125899906842624], dtype=torch.uint8, device=x.device)
        return torch.cat([x, x], dim=1) + waste[0]


def test_out_of_memory_fails_with_a_clear_reason_and_the_runner_stays_usable(
    tmp_path: Path,
) -> None:
    from pacs_agent.demo.synthetic import make_ct_study
    from pacs_agent.dicom.volume import plan_volume
    from workers.runtime.bundle import OutOfMemoryError

    (tmp_path / "configs").mkdir()
    (tmp_path / "models").mkdir()
    (tmp_path / "configs" / "inference.json").write_text(
        '{"preprocessing": {"_target_": "Compose", "transforms": ['
        '{"_target_": "LoadImaged", "keys": "image"},'
        '{"_target_": "EnsureChannelFirstd", "keys": "image"}]},'
        '"inferer": {"_target_": "SimpleInferer"}}'
    )
    torch.jit.script(_Greedy()).save(str(tmp_path / "models" / "model.ts"))
    runner = BundleRunner(tmp_path, device="cpu")
    datasets = make_ct_study(None, rows=64, cols=64, slices=8, seed=1)
    plan = plan_volume(datasets)
    with pytest.raises(
        OutOfMemoryError, match=r"out of memory on cpu running .*: .*can.t allocate memory"
    ):
        runner.segment_series(datasets, plan)
    # Nothing is left half-done: the demo runner in the same process still works.
    demo = BundleRunner(DEMO_BUNDLE, device="cpu")
    assert demo.segment_series(datasets, plan).shape == (8, 64, 64)
