"""Benchmark: model load and per-series inference of the spleen Model Zoo bundle.

    .venv/bin/python bench/bench_inference.py [--slices 100] [--size 512] [--devices cpu,cuda]

Makes a synthetic CT series (``--size`` x ``--size`` x ``--slices``, 0.8 mm pixels, 2 mm slices,
written as DICOM files), builds the spleen bundle from ../shared/model-zoo (``shared/`` in the
checkout instead where it exists, see tests/helpers/paths.py; configs read in place, seeded random
weights: the timing does not depend on the weights) and, per device:

* loads the model once (``RunnerCache``, as a worker process does) and times it;
* runs two series through the worker's path (read files, series-to-volume checks, the bundle,
  labels back on the source frames) and shows that the second one does not load the model again;
* runs the same series through the reference path, MONAI's own ``LoadImaged`` reading the DICOM
  folder (no checks), in the same run, and prints the ratio;
* reports the process's peak resident memory (and peak CUDA memory on a GPU).

Figures go to stdout as a Markdown table; docs/benchmarks.md records them with the machine.
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pydicom
import torch
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pacs_agent.catalog import ModelCard, read_card  # noqa: E402
from pacs_agent.demo.synthetic import make_ct_study, write_study  # noqa: E402
from pacs_agent.dicom.geometry import segment_results  # noqa: E402
from pacs_agent.dicom.volume import plan_volume, read_volume  # noqa: E402
from tests.helpers.paths import MODEL_ZOO  # noqa: E402
from workers.runtime.bundle import BundleRunner, labels_on_frames, write_nifti  # noqa: E402
from workers.runtime.series import RunnerCache, run_model  # noqa: E402

SPLEEN = MODEL_ZOO / "spleen_ct_segmentation"
CARD = """[model]
name = "spleen_ct_segmentation"
version = "bench"
task = "segmentation"
[accepts]
modality = ["CT"]
[[segments]]
number = 1
label = "Spleen"
category = { value = "123037004", scheme = "SCT", meaning = "Anatomical Structure" }
type = { value = "78961009", scheme = "SCT", meaning = "Spleen" }
"""


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _bundle(target: Path) -> Path:
    target.mkdir(parents=True)
    (target / "configs").symlink_to(SPLEEN / "configs", target_is_directory=True)
    parser = ConfigParser()
    parser.read_config(str(SPLEEN / "configs" / "inference.json"))
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    (target / "models").mkdir()
    torch.save(network.state_dict(), target / "models" / "model.pt")
    (target / "pacs-agent.toml").write_text(CARD)
    return target


def _ours(cache: RunnerCache, card: ModelCard, folder: Path) -> tuple[float, float, Any]:
    """The worker's path: read the files, check, build the volume, run, map onto the frames."""
    started = time.perf_counter()
    datasets = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
    read_s = time.perf_counter() - started
    output = run_model(cache, card, datasets)
    return time.perf_counter() - started, read_s, output.mask


def _monai_reader(runner: BundleRunner, folder: Path) -> tuple[float, Any]:
    """The reference: the bundle's LoadImaged reads the DICOM folder itself (no checks)."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.iterdir())]
    started = time.perf_counter()
    mask = runner.segment(folder, headers)
    return time.perf_counter() - started, mask


def _stages(runner: BundleRunner, card: ModelCard, folder: Path) -> list[tuple[str, float]]:
    """The worker's path on one series, stage by stage."""
    times: list[tuple[str, float]] = []
    started = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal started
        now = time.perf_counter()
        times.append((name, now - started))
        started = now

    datasets = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
    lap("read files")
    plan = plan_volume(datasets, min_slices=card.accepts.min_slices)
    volume = read_volume(datasets, plan)
    lap("checks + decode + rescale (series to volume)")
    with tempfile.TemporaryDirectory(prefix="bench-nifti-") as tmp:
        path = write_nifti(volume, plan.affine, Path(tmp) / "v.nii")
        lap("NIfTI hand-off (write)")
        labels, affine = runner.predict(path)
        lap("bundle: LoadImaged (NIfTI) + preprocessing + network + postprocessing")
    mask = labels_on_frames(labels, affine, datasets)
    lap("labels back on the source frames")
    segment_results(mask, datasets, card.segments)
    lap("segment statistics (volume, mean HU)")
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--devices", default="cpu,cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    rows: list[tuple[str, str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        work = Path(tmp)
        card = read_card(_bundle(work / "spleen"))
        series = []
        for seed in (1, 2):
            folder = work / f"series{seed}"
            datasets = make_ct_study(
                None, rows=args.size, cols=args.size, slices=args.slices, seed=seed
            )
            write_study(datasets, folder)
            series.append(folder)
        print(
            f"# spleen_ct_segmentation on {args.size}x{args.size}x{args.slices} CT, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{platform.processor() or platform.machine()}",
            flush=True,
        )
        for device in args.devices.split(","):
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            cache = RunnerCache({}, device)
            started = time.perf_counter()
            runner = cache.get(card)
            load_s = time.perf_counter() - started
            rows.append((device, "model load (once per worker process)", f"{load_s:.2f} s", ""))
            for n, folder in enumerate(series, start=1):
                # Alternate which path goes first, so neither always gets the warm caches.
                if n % 2:
                    ours_s, read_s, mask = _ours(cache, card, folder)
                    reference_s, reference_mask = _monai_reader(runner, folder)
                else:
                    reference_s, reference_mask = _monai_reader(runner, folder)
                    ours_s, read_s, mask = _ours(cache, card, folder)
                agree = float((reference_mask == mask).mean())
                rows.append(
                    (
                        device,
                        f"series {n}: read files + checks + volume + bundle + labels on frames",
                        f"{ours_s:.2f} s (reading {read_s:.2f} s)",
                        f"MONAI LoadImaged on the folder + bundle + labels: {reference_s:.2f} s; "
                        f"ratio {ours_s / reference_s:.2f}; labels agree on {agree:.4%} of pixels",
                    )
                )
            rows.append((device, "model loads for 2 series", str(cache.loads), "must be 1"))
            for name, seconds in _stages(runner, card, series[0]):
                rows.append((device, f"stage: {name}", f"{seconds:.2f} s", "series 1 again"))
            memory = f"peak RSS {_peak_rss_mib():.0f} MiB"
            if device.startswith("cuda"):
                memory += f", peak CUDA {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
            rows.append((device, "memory", memory, "process peak so far"))
    print("| device | what | figure | beside it |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
