"""The three MONAI Model Zoo bundles in ../shared/model-zoo run unchanged on DICOM series.

Their weights cannot be downloaded here: each test bundle (:func:`tests.helpers.zoo.zoo_bundle`)
links the shared ``configs/`` folder (read in place, never copied) and gets ``models/model.pt``
made from the bundle's own ``network_def`` with a fixed seed. That exercises the real loading,
preprocessing, inferer and postprocessing; it says nothing about accuracy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from monai.bundle import ConfigParser
from pydicom.dataset import Dataset

from pacs_agent.catalog import read_card
from pacs_agent.demo.radiograph import make_radiograph, radiograph_dataset
from pacs_agent.dicom.volume import plan_volume
from tests.helpers.realct import REAL_CT_DIR, repair_real_ct
from tests.helpers.zoo import zoo_bundle
from workers.runtime.bundle import BundleRunner
from workers.runtime.series import RunnerCache, run_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def real_ct(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Dataset]]:
    if not REAL_CT_DIR.is_dir():
        pytest.fail(f"real CT test data not found at {REAL_CT_DIR}")
    folder = tmp_path_factory.mktemp("realct")
    paths = repair_real_ct(REAL_CT_DIR, folder)
    return folder, [pydicom.dcmread(p) for p in paths]


SPLEEN_CARD = """
    [model]
    name = "spleen_ct_segmentation"
    version = "0.5.9"
    task = "segmentation"
    [accepts]
    modality = ["CT"]
    min_slices = 8
    [[segments]]
    number = 1
    label = "Spleen"
    category = { value = "123037004", scheme = "SCT", meaning = "Anatomical Structure" }
    type = { value = "78961009", scheme = "SCT", meaning = "Spleen" }
"""


def test_spleen_bundle_runs_unchanged_and_its_labels_land_on_the_source_frames(
    tmp_path: Path, real_ct: tuple[Path, list[Dataset]]
) -> None:
    folder, datasets = real_ct
    bundle = zoo_bundle("spleen_ct_segmentation", tmp_path / "spleen", SPLEEN_CARD)
    card = read_card(bundle)
    store: dict[str, object] = {}
    cache = RunnerCache(store, "cpu")
    shuffled = datasets[::-1]
    output = run_model(cache, card, shuffled)
    assert output.mask is not None
    assert output.mask.shape == (20, 512, 512)
    assert set(np.unique(output.mask)) == {0, 1}  # random weights: some of each
    assert output.plan.shape == (512, 512, 20)
    assert output.segments[0].segment.label == "Spleen"
    assert output.segments[0].voxel_count == int(output.mask.sum())
    # The same bundle reading the folder with MONAI's own DICOM reader gives the same labels on
    # the same frames: the volume built by pacs-agent has the series' true geometry.
    by_monai = cache.get(card).segment(folder, shuffled)
    assert float((by_monai == output.mask).mean()) > 0.999
    # The second series reuses the loaded model.
    run_model(cache, card, datasets)
    assert cache.loads == 1
    assert not (bundle / "eval").exists(), "SaveImaged must not run"


def test_whole_body_bundle_runs_unchanged_at_low_resolution(
    tmp_path: Path, real_ct: tuple[Path, list[Dataset]]
) -> None:
    _, datasets = real_ct
    bundle = zoo_bundle("wholeBody_ct_segmentation", tmp_path / "wholebody")
    runner = BundleRunner(bundle, device="cpu", overrides={"displayable_configs#highres": False})
    assert runner.preprocessing.transforms[4].spacing_transform.pixdim.tolist() == [3.0, 3.0, 3.0]
    mask = runner.segment_series(datasets, plan_volume(datasets))
    assert mask.shape == (20, 512, 512)
    assert int(mask.max()) <= 104
    assert len(np.unique(mask)) > 1  # random weights still label something


def test_classification_template_yaml_bundle_gives_probabilities_for_a_radiograph(
    tmp_path: Path,
) -> None:
    pytest.importorskip("yaml")
    bundle = zoo_bundle("classification_template", tmp_path / "cls")
    runner = BundleRunner(bundle, device="cpu", task="classification")
    ds = radiograph_dataset(
        make_radiograph(np.random.default_rng(1), True), patient_id="ZOO1", modality="DX"
    )
    probabilities = runner.classify_series([ds], plan_volume([ds]))
    assert probabilities.shape == (4,)  # background, circle, triangle, rectangle
    assert abs(float(probabilities.sum()) - 1.0) < 1e-4
    assert np.all(probabilities >= 0)


SCRIPTED_CONFIG = """
imports:
  - $import scripts.tiny
settings:
  roi: [16, 16, 8]
  overlap: 0.25
network_def:
  _target_: scripts.tiny.TinyNet
  channels: 2
preprocessing:
  _target_: Compose
  transforms:
    - _target_: LoadImaged
      keys: image
    - _target_: EnsureChannelFirstd
      keys: image
    - _target_: scripts.tiny.ScaleHU
      keys: image
inferer:
  _target_: SlidingWindowInferer
  roi_size: "@settings#roi"
  sw_batch_size: 2
  overlap: "@settings#overlap"
postprocessing:
  _target_: Compose
  transforms:
    - _target_: AsDiscreted
      keys: pred
      argmax: true
"""

SCRIPT = """
import torch
from monai.transforms import MapTransform


class TinyNet(torch.nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ScaleHU(MapTransform):
    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = d[key] / 1000.0
        return d
"""


def test_bundle_with_scripts_yaml_subkey_references_and_torchscript_weights_runs(
    tmp_path: Path, real_ct: tuple[Path, list[Dataset]]
) -> None:
    pytest.importorskip("yaml")
    _, datasets = real_ct
    bundle = tmp_path / "scripted"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "scripts").mkdir()
    (bundle / "models").mkdir()
    (bundle / "configs" / "inference.yaml").write_text(SCRIPTED_CONFIG)
    (bundle / "scripts" / "__init__.py").write_text("")
    (bundle / "scripts" / "tiny.py").write_text(SCRIPT)
    # TorchScript weights, made from the bundle's own network: conv with a known decision rule:
    # label 1 where HU / 1000 > 0.1, i.e. above 100 HU.
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.yaml"))
    import sys

    sys.path.insert(0, str(bundle))
    try:
        network = parser.get_parsed_content("network_def")
    finally:
        sys.path.remove(str(bundle))
        for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
            del sys.modules[name]
    with torch.no_grad():
        network.conv.weight.copy_(torch.tensor([0.0, 1.0]).reshape(2, 1, 1, 1, 1))
        network.conv.bias.copy_(torch.tensor([0.0, -0.1]))
    torch.jit.script(network).save(str(bundle / "models" / "model.ts"))

    runner = BundleRunner(bundle, device="cpu")
    assert runner.inferer.roi_size == (16, 16, 8) or list(runner.inferer.roi_size) == [16, 16, 8]
    mask = runner.segment_series(datasets, plan_volume(datasets))
    hu = np.stack([pydicom.pixels.apply_modality_lut(ds.pixel_array, ds) for ds in datasets])
    expected = (hu > 100).astype(np.uint8)
    assert float((mask == expected).mean()) > 0.999


DEMO_BUNDLES = ROOT / "workers" / "bundles"


def test_demo_classifier_flags_opacities_in_cr_and_dx_monochrome1_or_2() -> None:
    card = read_card(DEMO_BUNDLES / "demo_cr_nodule_cls")
    cache = RunnerCache({}, "cpu")
    rng = np.random.default_rng(77)
    for i, (finding, modality, inverted) in enumerate(
        [(True, "CR", False), (False, "CR", True), (True, "DX", True), (False, "DX", False)]
    ):
        ds = radiograph_dataset(
            make_radiograph(rng, finding),
            patient_id=f"DEMOCLS{i}",
            modality=modality,
            monochrome1=inverted,
        )
        output = run_model(cache, card, [ds])
        (result,) = output.classifications
        assert (result.finding.value, result.label, result.threshold) == ("27925004", "Nodule", 0.5)
        assert result.flag is finding, (modality, inverted, result.probability)
    assert cache.loads == 1


def test_model_refuses_a_series_outside_its_accepts_with_the_reason(
    real_ct: tuple[Path, list[Dataset]],
) -> None:
    from workers.runtime.series import ModelInputError

    card = read_card(DEMO_BUNDLES / "demo_cr_nodule_cls")
    with pytest.raises(ModelInputError, match=r"Modality CT is not one of \['CR', 'DX'\]"):
        run_model(RunnerCache({}, "cpu"), card, real_ct[1])


def test_classifier_training_script_is_reproducible_and_fits_the_bundle(tmp_path: Path) -> None:
    import subprocess
    import sys

    states = []
    for run in ("a", "b"):
        out = tmp_path / run
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "workers.training.train_demo_cls",
                "--out",
                str(out),
                "--epochs",
                "1",
                "--train-size",
                "64",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert "held-out accuracy" in done.stdout
        states.append(torch.load(out / "models" / "model.pt", weights_only=True))
        (out / "configs").symlink_to(
            DEMO_BUNDLES / "demo_cr_nodule_cls" / "configs", target_is_directory=True
        )
        BundleRunner(out, device="cpu", task="classification")  # the weights fit the network
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
