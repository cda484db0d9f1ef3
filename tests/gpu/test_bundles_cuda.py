"""The same bundles on CUDA, where CUDA exists; skipped elsewhere (never faked).

Run on a GPU machine with ``pytest tests/gpu``. Checks that the spleen bundle and the two demo
bundles run on ``cuda`` with mixed precision and agree with the CPU, that the runner is cached per
device, and that an out-of-memory error releases the GPU memory and, with the fallback, finishes
on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset

from pacs_agent.catalog import read_card
from pacs_agent.demo.radiograph import make_radiograph, radiograph_dataset
from pacs_agent.dicom.volume import plan_volume
from tests.helpers.realct import REAL_CT_DIR, repair_real_ct
from tests.integration.test_model_zoo import SPLEEN_CARD, zoo_bundle
from workers.runtime.bundle import BundleRunner, OutOfMemoryError
from workers.runtime.series import RunnerCache, run_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

BUNDLES = Path(__file__).resolve().parents[2] / "workers" / "bundles"


@pytest.fixture(scope="module")
def real_ct(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    folder = tmp_path_factory.mktemp("realct")
    return [pydicom.dcmread(p) for p in repair_real_ct(REAL_CT_DIR, folder)]


def test_spleen_bundle_on_cuda_matches_the_cpu(tmp_path: Path, real_ct: list[Dataset]) -> None:
    card = read_card(zoo_bundle("spleen_ct_segmentation", tmp_path / "spleen", SPLEEN_CARD))
    store: dict[str, object] = {}
    gpu = run_model(RunnerCache(store, "cuda"), card, real_ct)
    cpu = run_model(RunnerCache({}, "cpu"), card, real_ct)
    assert gpu.device.startswith("cuda")
    assert gpu.mask is not None and cpu.mask is not None
    # Mixed precision may flip a few voxels at the decision boundary, no more.
    assert float((gpu.mask == cpu.mask).mean()) > 0.99
    cache = RunnerCache(store, "cuda")
    run_model(cache, card, real_ct)
    assert cache.loads == 0  # loaded once per process and device


def test_demo_bundles_on_cuda(real_ct: list[Dataset]) -> None:
    seg = run_model(RunnerCache({}, "cuda:0"), read_card(BUNDLES / "demo_ct_blob_seg"), real_ct)
    assert seg.mask is not None and seg.mask.shape == (20, 512, 512)
    ds = radiograph_dataset(make_radiograph(np.random.default_rng(3), True), patient_id="GPU1")
    cls = run_model(RunnerCache({}, "cuda:0"), read_card(BUNDLES / "demo_cr_nodule_cls"), [ds])
    assert cls.classifications[0].flag


def test_whole_body_bundle_on_cuda(tmp_path: Path, real_ct: list[Dataset]) -> None:
    bundle = zoo_bundle("wholeBody_ct_segmentation", tmp_path / "wb")
    runner = BundleRunner(bundle, device="cuda", overrides={"displayable_configs#highres": True})
    mask = runner.segment_series(real_ct, plan_volume(real_ct))
    assert mask.shape == (20, 512, 512) and int(mask.max()) <= 104


class _GreedyOnCuda(torch.nn.Module):
    """Two-class logits (HU > 100), but on CUDA it first asks for a petabyte."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            waste = torch.empty([1125899906842624], dtype=torch.uint8, device=x.device)
            x = x + waste[0]
        return torch.cat([torch.zeros_like(x), x - 100.0], dim=1)


CARD = """
[model]
name = "greedy"
version = "1"
task = "segmentation"
[[segments]]
number = 1
label = "Bright"
category = { value = "49755003", scheme = "SCT", meaning = "Morphologically Altered Structure" }
type = { value = "4147007", scheme = "SCT", meaning = "Mass" }
"""


def test_cuda_out_of_memory_releases_memory_and_can_fall_back_to_the_cpu(
    tmp_path: Path, real_ct: list[Dataset]
) -> None:
    bundle = tmp_path / "greedy"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "configs" / "metadata.json").write_text("{}")
    (bundle / "pacs-agent.toml").write_text(CARD)
    (bundle / "configs" / "inference.json").write_text(
        '{"preprocessing": {"_target_": "Compose", "transforms": ['
        '{"_target_": "LoadImaged", "keys": "image"},'
        '{"_target_": "EnsureChannelFirstd", "keys": "image"}]},'
        '"inferer": {"_target_": "SimpleInferer"},'
        '"postprocessing": {"_target_": "Compose", "transforms": ['
        '{"_target_": "AsDiscreted", "keys": "pred", "argmax": true}]}}'
    )
    torch.jit.script(_GreedyOnCuda()).save(str(bundle / "models" / "model.ts"))
    card = read_card(bundle)
    before = torch.cuda.memory_reserved()
    with pytest.raises(OutOfMemoryError, match="out of memory on cuda"):
        run_model(RunnerCache({}, "cuda"), card, real_ct)
    assert torch.cuda.memory_reserved() <= before + 2**20  # the cache was released
    output = run_model(RunnerCache({}, "cuda"), card, real_ct, oom_cpu_fallback=True)
    assert output.device == "cpu"
    assert output.mask is not None and output.segments[0].voxel_count > 0
