"""One model on one series: input contract, series-to-volume, the bundle, coded results.

:func:`check_series` refuses what the model card's ``[accepts]`` excludes and what cannot be one
volume (:func:`pacs_agent.dicom.volume.plan_volume`), each with a reason made for the job list.
:func:`run_model` runs the bundle -- loaded once per process and device through
:class:`RunnerCache` -- and turns its output into the result model: segment statistics on the
source frames for a segmentation (connected components below the card's minimum dropped,
detection at the card's volume threshold), :class:`ClassificationResult` (coded finding,
probability, the card's threshold) for a classification.

Devices: the ``device`` setting is resolved once per process (``auto`` -> ``cuda`` when CUDA is
present). When CUDA runs out of memory, the bundle runner has already released the cached GPU
memory; with ``oom_cpu_fallback`` the run is repeated at once on the CPU, otherwise the error
goes up and fails (or retries) the job with its reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from pydicom import Dataset

from pacs_agent.catalog import ModelCard
from pacs_agent.dicom.geometry import measure_segments
from pacs_agent.dicom.volume import SeriesVolumeError, VolumePlan, frames_of, plan_volume
from pacs_agent.domain.results import ClassificationResult, SegmentResult
from workers.runtime.bundle import BundleRunner, OutOfMemoryError, resolve_device

__all__ = [
    "ModelInputError",
    "ModelOutput",
    "RunnerCache",
    "check_series",
    "run_model",
]

log = logging.getLogger(__name__)


class ModelInputError(ValueError):
    """The series is outside what the model accepts, or cannot be made into a volume."""


@dataclass(frozen=True)
class ModelOutput:
    """What one model said about one series."""

    plan: VolumePlan
    #: (image planes, rows, cols) for a segmentation: one per single-frame instance, in the
    #: order of the datasets, or one per frame of a multi-frame image; the model's labels
    #: without what the card drops (small components, segments not detected); what the SEG
    #: carries.
    mask: npt.NDArray[np.uint8] | None
    segments: tuple[SegmentResult, ...]
    classifications: tuple[ClassificationResult, ...]
    device: str

    @property
    def processing_notes(self) -> tuple[str, ...]:
        """What was done to the input before the model saw it (recorded in the SR)."""
        plan = self.plan
        if plan.resampled:
            return (
                f"input resampled: gantry tilt of {plan.tilt_deg:.1f} degrees corrected onto an "
                f"orthogonal grid ({plan.spacing[2]:.2f} mm along the slice normal, linear "
                "interpolation); labels mapped back onto the acquired tilted slices",
            )
        if plan.tilted:
            return (
                f"input on its acquired sheared grid (gantry tilt {plan.tilt_deg:.1f} degrees)",
            )
        return ()


class RunnerCache:
    """Bundle runners of one worker process, loaded once per (bundle, version, device).

    ``store`` is the dict the process keeps (``WorkerContext.runners``); the resolved device is
    kept in it too, so ``auto`` is resolved once per process.
    """

    _DEVICE_KEY = "__device__"

    def __init__(self, store: dict[str, Any], device: str) -> None:
        self.store = store
        if self._DEVICE_KEY not in store:
            store[self._DEVICE_KEY] = resolve_device(device)
        self.device: torch.device = store[self._DEVICE_KEY]
        self.loads = 0

    def get(self, card: ModelCard, device: torch.device | None = None) -> BundleRunner:
        """The runner of ``card`` on ``device`` (default: the worker's device), built once."""
        where = device or self.device
        key = f"{card.bundle_dir}:{card.version}:{where}"
        runner = self.store.get(key)
        if runner is None:
            runner = BundleRunner(
                card.bundle_dir, device=where, overrides=card.overrides, task=card.task
            )
            self.store[key] = runner
            self.loads += 1
        assert isinstance(runner, BundleRunner)
        return runner


def check_series(card: ModelCard, datasets: Sequence[Dataset]) -> VolumePlan:
    """The volume plan of ``datasets`` for ``card``; ModelInputError with the reason when the
    series is outside the card's ``[accepts]`` or is not one volume."""
    if not datasets:
        raise ModelInputError("the series has no instances")
    try:
        planes = len(frames_of(datasets))
    except SeriesVolumeError as exc:
        raise ModelInputError(f"series cannot be read as images: {exc}") from exc
    reason = card.accepts.rejects(datasets[0], planes)
    if reason is not None:
        raise ModelInputError(f"model {card.name} does not accept this series: {reason}")
    try:
        return plan_volume(
            datasets,
            min_slices=card.accepts.min_slices,
            gantry_tilt=card.accepts.gantry_tilt,
        )
    except SeriesVolumeError as exc:
        raise ModelInputError(f"series cannot be made into one volume: {exc}") from exc


def _classifications(
    card: ModelCard, probabilities: npt.NDArray[np.float64]
) -> tuple[ClassificationResult, ...]:
    out = []
    for spec in card.findings:
        if spec.index >= len(probabilities):
            raise ModelInputError(
                f"model {card.name} gave {len(probabilities)} output(s); the card codes "
                f"output {spec.index}"
            )
        out.append(
            ClassificationResult(
                finding=spec.code,
                label=spec.label,
                probability=float(probabilities[spec.index]),
                threshold=spec.threshold,
            )
        )
    return tuple(out)


def _run_on(
    runner: BundleRunner, card: ModelCard, datasets: Sequence[Dataset], plan: VolumePlan
) -> ModelOutput:
    if card.task == "classification":
        probabilities = runner.classify_series(datasets, plan, per_image=card.input == "image")
        return ModelOutput(
            plan, None, (), _classifications(card, probabilities), str(runner.device)
        )
    if plan.is_2d and plan.frames[0].position is None:
        raise ModelInputError(
            f"model {card.name} segments volumes; this series is a projection image"
        )
    multi_frame = {f.dataset_index for f in plan.frames if f.frame_index is not None}
    if multi_frame and len(datasets) > 1:
        raise ModelInputError(
            f"the series has {len(datasets)} instances, {len(multi_frame)} of them multi-frame: "
            "a Segmentation references one multi-frame image or single-frame instances"
        )
    measured = measure_segments(runner.segment_series(datasets, plan), datasets, card.segments)
    return ModelOutput(plan, measured.mask, measured.segments, (), str(runner.device))


def run_model(
    cache: RunnerCache,
    card: ModelCard,
    datasets: Sequence[Dataset],
    *,
    oom_cpu_fallback: bool = False,
) -> ModelOutput:
    """Check ``datasets`` (full, with pixel data) for ``card`` and run its bundle on them.

    Raises ModelInputError (the series is refused; the reason says why), BundleError (the
    bundle's output is unusable) and, without ``oom_cpu_fallback``, OutOfMemoryError.
    """
    plan = check_series(card, datasets)
    runner = cache.get(card)
    try:
        return _run_on(runner, card, datasets, plan)
    except OutOfMemoryError:
        if not oom_cpu_fallback or runner.device.type == "cpu":
            raise
        log.warning("model %s: out of memory on %s; running on the CPU", card.name, runner.device)
        return _run_on(cache.get(card, torch.device("cpu")), card, datasets, plan)
