"""Run an unchanged MONAI bundle on one DICOM series and map its labels onto the source frames.

A bundle is a folder in MONAI Model Zoo layout: ``configs/inference.json`` (or ``.yaml``/``.yml``)
and ``models/model.pt`` (a state dict, or a checkpoint dict with a ``"model"`` entry) or
``models/model.ts`` (TorchScript). :class:`BundleRunner` parses the configuration once with
:class:`monai.bundle.ConfigParser` (``bundle_root`` set, ``device`` overridden), builds the
bundle's own network and loads its weights once; :meth:`BundleRunner.segment` can then be called
for many series. Per series it runs, exactly as the bundle defines them:

1. ``preprocessing`` on ``{image_key: "<series folder>"}`` (``LoadImaged`` reads a DICOM folder);
2. ``inferer`` with the network (no gradients; autocast on CUDA);
3. ``postprocessing`` with the steps that write files (``SaveImaged`` and the like) left out.

The prediction that comes out carries its own affine (usually back on the grid of the loaded
series, thanks to ``Invertd``, but any grid works); every pixel of every source frame is mapped
through that affine to the nearest voxel of the prediction, so the result lines up with the frames
whatever order the caller passes them in and whatever the bundle resampled to.

:meth:`BundleRunner.segment_series` and :meth:`BundleRunner.classify_series` take the series'
datasets instead of a folder: the volume is built and checked by
:mod:`pacs_agent.dicom.volume` (order along the normal, one orientation, even spacing, rescale,
MONOCHROME1, multi-frame, compressed pixel data), written as a NIfTI file in a temporary folder,
and that file is what the bundle's own ``LoadImaged`` reads: the bundle stays unchanged and every
series it sees has passed the same checks.

Bundles with a ``scripts/`` folder (``$scripts.module.function`` in their configs) work: the bundle
root is put on ``sys.path`` while the configuration is built, and a ``scripts`` package cached
from another bundle is dropped first.

On CUDA the network runs under autocast (mixed precision). An out-of-memory error releases the
cached GPU memory and raises :class:`OutOfMemoryError`, so the caller can fail the job with
that reason or retry on the CPU.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from monai.bundle import ConfigParser, ReferenceResolver
from monai.data import MetaTensor
from monai.transforms import Compose, MapTransform
from pydicom.dataset import Dataset

from pacs_agent.dicom.geometry import plane_headers
from pacs_agent.dicom.volume import VolumePlan, read_volume

__all__ = [
    "CONFIG_NAMES",
    "BundleError",
    "BundleRunner",
    "OutOfMemoryError",
    "SeriesGeometryError",
    "labels_on_frames",
    "resolve_device",
]

log = logging.getLogger(__name__)

#: Inference configuration files looked for under ``configs/``, in this order.
CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
#: The key MONAI's engines (and bundles' postprocessing) use for the network output.
PRED_KEY = "pred"
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: Transforms that only write files; left out of a bundle's postprocessing.
_WRITER_NAMES = frozenset(
    {"SaveImage", "SaveImaged", "SaveClassification", "SaveClassificationd", "WriteFileMapping"}
)
#: Transforms that turn probabilities into class indices; a classification keeps probabilities
#: (the model card's thresholds make the decision), so these are left out of its postprocessing.
_DISCRETE_NAMES = frozenset({"AsDiscrete", "AsDiscreted"})


class BundleError(ValueError):
    """The bundle cannot be used: a file is missing or its configuration lacks or breaks a part.

    ``file`` is the file that is wrong (the configuration, the weights), ``key`` the
    configuration id (``preprocessing#transforms#2#keys``) and ``line`` the line in ``file``,
    each when known; the message says them too.
    """

    def __init__(
        self,
        message: str,
        *,
        file: Path | None = None,
        key: str | None = None,
        line: int | None = None,
    ) -> None:
        super().__init__(message)
        self.file = file
        self.key = key
        self.line = line


class SeriesGeometryError(ValueError):
    """The source datasets lack the geometry needed to place the prediction on their frames."""


class OutOfMemoryError(RuntimeError):
    """The device ran out of memory during inference; cached GPU memory has been released.

    Named like ``torch.cuda.OutOfMemoryError`` on purpose: the job outcome
    (``workers.outcome.is_transient``) recognises both by name as a transient error.
    """


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> ``cuda`` when CUDA is available, else ``cpu``; anything else as torch reads it.

    Raises ValueError for a string torch does not accept as a device.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"not a device: {device!r} ({exc})") from exc


def _display_id(config_id: str) -> str:
    """A configuration id as bundles and model cards write it (``a#b#0``; MONAI uses ``::``)."""
    return config_id.replace("::", "#")


def _error_position(exc: BaseException) -> int | None:
    """The line a JSON or YAML parser reported for ``exc`` (1-based), when it did."""
    line = getattr(exc, "lineno", None)  # json.JSONDecodeError
    if isinstance(line, int):
        return line
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)  # yaml
    return int(mark.line) + 1 if mark is not None else None


_MISSING_REFERENCE = re.compile(
    r"referring item `@(?P<a>[^`]+)` is not defined|can not find expected ID '(?P<b>[^']+)'"
)


def _deepest_local(exc: BaseException, function: str, name: str) -> Any:
    """The local ``name`` of the deepest call of ``function`` on ``exc``'s traceback (the first
    exception of the chain that has such a call), or None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        found = None
        tb = current.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_name == function:
                found = tb.tb_frame.f_locals.get(name)
            tb = tb.tb_next
        if found is not None:
            return found
        current = current.__cause__ or current.__context__
    return None


def _failing_id(exc: BaseException, parser: ConfigParser, built: str) -> str:
    """The configuration id whose content made building ``built`` fail.

    MONAI resolves an id by resolving the ids it depends on first (``_resolve_one_item``
    recursing); the deepest of those calls on the failing path is the item that failed. A
    reference to an id that does not exist is narrowed further, to the entry that holds the
    ``@reference``. Falls back to ``built`` when the traceback says nothing more.
    """
    found = _deepest_local(exc, "_resolve_one_item", "id")
    deepest = found if isinstance(found, str) else built
    match = _MISSING_REFERENCE.search(str(exc))
    if match is not None:
        missing = match.group("a") or match.group("b")
        holder = _holder_of_reference(parser.get(deepest), deepest, missing)
        if holder is not None:
            deepest = holder
    return _display_id(deepest)


def _holder_of_reference(config: Any, config_id: str, missing: str) -> str | None:
    """The id of the first string under ``config`` (at ``config_id``) referring to ``missing``."""
    if isinstance(config, str):
        refs = ReferenceResolver.match_refs_pattern(config)
        return config_id if missing in refs else None
    if isinstance(config, (dict, list)):
        for _, sub_id, value in ReferenceResolver.iter_subconfigs(config_id, config):
            found = _holder_of_reference(value, sub_id, missing)
            if found is not None:
                return found
    return None


def _writes_files(transform: object) -> bool:
    return type(transform).__name__ in _WRITER_NAMES


def _without(transform: Any, names: frozenset[str]) -> Any:
    """``transform`` with every step named in ``names`` dropped (recursing into Compose)."""
    if isinstance(transform, Compose):
        transform.transforms = [
            _without(t, names) for t in transform.transforms if type(t).__name__ not in names
        ]
        return transform
    return None if type(transform).__name__ in names else transform


def _without_writers(transform: Any) -> Any:
    """``transform`` with every file-writing step dropped (recursing into nested Compose)."""
    return _without(transform, _WRITER_NAMES)


def _tolerate_missing_keys(transform: Any) -> None:
    """Let dictionary transforms skip keys that inference data lacks (a bundle's postprocessing
    often also treats ``label``, which exists only when it evaluates against references)."""
    if isinstance(transform, Compose):
        for t in transform.transforms:
            _tolerate_missing_keys(t)
    elif isinstance(transform, MapTransform):
        transform.allow_missing_keys = True


@contextlib.contextmanager
def _bundle_on_path(bundle_dir: Path) -> Any:
    """``bundle_dir`` importable (its ``scripts`` package), without another bundle's cached."""
    for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        del sys.modules[name]
    sys.path.insert(0, str(bundle_dir))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(bundle_dir))


def _is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the allocator failures torch reports as RuntimeError."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return any(
        marker in text
        for marker in ("out of memory", "can't allocate memory", "cannot allocate memory")
    )


def _release_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def write_nifti(
    volume_xyz: npt.NDArray[np.float32], affine_lps: npt.NDArray[np.float64], path: Path
) -> Path:
    """Write a volume indexed ``[x, y, z]`` with its voxel-to-LPS affine as NIfTI (RAS affine).

    A volume with one slice and a 2D plan can be written 2D (``volume_xyz`` of shape (x, y)).
    """
    import nibabel as nib

    image = nib.Nifti1Image(  # type: ignore[no-untyped-call]
        np.asarray(volume_xyz), _LPS_FROM_RAS @ affine_lps
    )
    nib.save(image, str(path))
    return path


class BundleRunner:
    """One MONAI bundle, loaded once, that segments or classifies DICOM series.

    Not thread safe: use one runner per worker thread or process.
    """

    def __init__(
        self,
        bundle_dir: Path,
        device: str | torch.device = "auto",
        *,
        overrides: Mapping[str, Any] | None = None,
        task: str = "segmentation",
    ) -> None:
        """Parse the bundle's inference configuration and load its network and weights.

        ``device`` is ``"auto"`` (CUDA when available, else CPU), or a torch device string.
        ``overrides`` sets configuration entries by id before anything is built, as
        ``monai.bundle run`` does with its keyword arguments (for example
        ``{"displayable_configs#highres": False}``); ``bundle_root`` and ``device`` are always set
        by the runner. ``task`` ``"classification"`` keeps probabilities: the postprocessing's
        discretising steps (``AsDiscreted``) are left out and its dictionary transforms skip keys
        that inference data lacks (``label``).
        Raises :class:`BundleError` with the reason when the bundle folder, its configuration, its
        weights, or its ``preprocessing`` / ``inferer`` / ``network_def`` are missing or cannot be
        built, or when the weights do not fit the network.
        """
        self.bundle_dir = Path(bundle_dir).resolve()
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.task = task
        if not self.bundle_dir.is_dir():
            raise BundleError(f"bundle folder {self.bundle_dir} does not exist")
        self.config_path = self._find_config()

        parser = ConfigParser()
        try:
            parser.read_config(str(self.config_path))
        except Exception as exc:
            raise BundleError(
                f"{self.config_path} cannot be read: {exc}",
                file=self.config_path,
                line=_error_position(exc),
            ) from exc
        for key, value in (overrides or {}).items():
            try:
                parser[key] = value
            except Exception as exc:
                raise BundleError(
                    f"{self.config_path}: the model card's override {key!r} cannot be set "
                    f"in this configuration ({type(exc).__name__}: {exc})",
                    file=self.config_path,
                    key=key,
                ) from exc
        parser["bundle_root"] = str(self.bundle_dir)
        parser["device"] = f"$torch.device({str(self.device)!r})"
        try:
            # What get_parsed_content does first; done here to say which entry fails.
            parser.parse()
        except Exception as exc:
            # MONAI's _do_resolve recurses with the id it is at and, for a macro, the file.
            where = _deepest_local(exc, "_do_resolve", "id")
            macro_file = _deepest_local(exc, "_do_resolve", "path")
            raise BundleError(
                f"{self.config_path}: {_display_id(str(where or ''))!r}: a macro (%file#id) or "
                f"relative id cannot be resolved: {exc}",
                file=Path(macro_file).resolve() if macro_file else self.config_path,
                key=_display_id(where) if isinstance(where, str) and where else None,
                line=_error_position(exc),
            ) from exc
        self._parser = parser

        for key in ("preprocessing", "inferer"):
            if key not in parser:
                raise BundleError(
                    f"{self.config_path} has no {key!r}", file=self.config_path, key=key
                )
        started = time.monotonic()
        with _bundle_on_path(self.bundle_dir):
            self.image_key: str = (
                str(self._parsed("image_key")) if "image_key" in parser else "image"
            )
            self.network = self._load_network()
            self.preprocessing: Any = self._parsed("preprocessing")
            self.inferer: Any = self._parsed("inferer")
            post = self._parsed("postprocessing") if "postprocessing" in parser else None
        post = _without_writers(post)
        if task == "classification" and post is not None:
            post = _without(post, _DISCRETE_NAMES)
            _tolerate_missing_keys(post)
        self.postprocessing: Any = post
        self.load_seconds = time.monotonic() - started
        log.info(
            "loaded bundle %s on %s in %.2f s", self.bundle_dir.name, self.device, self.load_seconds
        )

    def _find_config(self) -> Path:
        for name in CONFIG_NAMES:
            path = self.bundle_dir / "configs" / name
            if path.is_file():
                return path
        raise BundleError(
            f"bundle {self.bundle_dir} has no configs/{' or configs/'.join(CONFIG_NAMES)}",
            file=self.bundle_dir / "configs" / CONFIG_NAMES[0],
        )

    def _parsed(self, key: str) -> Any:
        """The built (instantiated) entry ``key``; BundleError naming the entry that failed
        (``key`` itself or the entry within or beneath it whose content is wrong)."""
        try:
            return self._parser.get_parsed_content(key, instantiate=True)
        except Exception as exc:
            where = _failing_id(exc, self._parser, key)
            building = "" if where == key else f" (building {key!r})"
            raise BundleError(
                f"{self.config_path}: {where!r} cannot be built{building}: {exc}",
                file=self.config_path,
                key=where,
            ) from exc

    def _load_network(self) -> torch.nn.Module:
        weights = self.bundle_dir / "models" / "model.pt"
        torchscript = self.bundle_dir / "models" / "model.ts"
        network: torch.nn.Module
        if weights.is_file():
            key = next((k for k in ("network", "network_def") if k in self._parser), None)
            if key is None:
                raise BundleError(
                    f"{self.config_path} has neither 'network' nor 'network_def'",
                    file=self.config_path,
                    key="network_def",
                )
            built = self._parsed(key)
            if not isinstance(built, torch.nn.Module):
                raise BundleError(
                    f"{self.config_path}: {key!r} is not a torch module",
                    file=self.config_path,
                    key=key,
                )
            network = built
            try:
                state: Any = torch.load(weights, map_location=self.device, weights_only=True)
            except Exception as exc:
                raise BundleError(
                    f"{weights} cannot be loaded as weights: {exc}", file=weights
                ) from exc
            if isinstance(state, dict) and isinstance(state.get("model"), dict):
                state = state["model"]
            if not isinstance(state, dict):
                raise BundleError(f"{weights} holds no state dict", file=weights)
            if state and all(str(k).startswith("module.") for k in state):
                state = {str(k)[len("module.") :]: v for k, v in state.items()}
            try:
                network.load_state_dict(state)
            except RuntimeError as exc:
                raise BundleError(
                    f"{weights} does not fit the bundle's network ({key!r} in "
                    f"{self.config_path.name}): {exc}",
                    file=weights,
                    key=key,
                ) from exc
        elif torchscript.is_file():
            try:
                network = torch.jit.load(  # type: ignore[no-untyped-call]
                    str(torchscript), map_location=self.device
                )
            except Exception as exc:
                raise BundleError(
                    f"{torchscript} cannot be loaded: {exc}", file=torchscript
                ) from exc
        else:
            raise BundleError(
                f"bundle {self.bundle_dir} has no models/model.pt or models/model.ts",
                file=weights,
            )
        return network.to(self.device).eval()

    def _infer(self, path: Path | str) -> MetaTensor:
        """Preprocessing, inferer and (writer-free) postprocessing on what ``LoadImaged`` reads
        at ``path``; the post-processed prediction. Raises :class:`OutOfMemoryError` when
        the device runs out of memory (cached memory released), BundleError for unusable output.
        """
        try:
            return self._infer_unguarded(path)
        except Exception as exc:
            if not _is_out_of_memory(exc):
                raise
            _release_device_memory(self.device)
            lines = str(exc).strip().splitlines() or [type(exc).__name__]
            raise OutOfMemoryError(
                f"out of memory on {self.device} running {self.bundle_dir.name} "
                f"(GPU cache released): {lines[-1]}"
            ) from exc

    def _infer_unguarded(self, path: Path | str) -> MetaTensor:
        with torch.no_grad():
            data = dict(self.preprocessing({self.image_key: str(path)}))
            image = data[self.image_key]
            if not isinstance(image, MetaTensor):
                raise BundleError("preprocessing did not produce a MetaTensor image")
            batch = image.as_tensor().unsqueeze(0).to(self.device)
            autocast = (
                torch.autocast(device_type="cuda")
                if self.device.type == "cuda"
                else contextlib.nullcontext()
            )
            with autocast:
                output = self.inferer(batch, self.network)
            if not isinstance(output, torch.Tensor):
                raise BundleError(f"inferer returned {type(output).__name__}, not a tensor")
            # The prediction starts on the grid of the preprocessed image; Invertd (if the
            # bundle has one) takes it back to the grid of the loaded series.
            meta = deepcopy(dict(image.meta))
            meta["affine"] = image.affine.clone()
            pred = MetaTensor(torch.as_tensor(output)[0].detach().float().cpu(), meta=meta)
            del output, batch
            data[PRED_KEY] = pred
            if self.postprocessing is not None:
                data = dict(self.postprocessing(data))
        result = data[PRED_KEY]
        if not isinstance(result, torch.Tensor):
            raise BundleError("postprocessing did not return the prediction as a tensor")
        if not isinstance(result, MetaTensor):
            result = MetaTensor(result)
        return result

    def _labels(self, result: MetaTensor) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        array = result.detach().cpu()
        if array.ndim == 4:
            array = array[0] if array.shape[0] == 1 else torch.argmax(array, dim=0)
        if array.ndim != 3:
            raise BundleError(f"prediction has shape {tuple(result.shape)}: not a 3D label volume")
        affine = np.asarray(result.affine.detach().cpu().numpy(), dtype=np.float64)
        space = str(result.meta.get("space", "RAS")).upper()
        if space == "RAS":
            affine = _LPS_FROM_RAS @ affine
        elif space != "LPS":
            raise BundleError(f"prediction is in an unknown space {space!r}")
        return np.rint(array.numpy()).astype(np.int64), affine

    def predict(self, series_dir: Path) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """Label volume of one series and its voxel-to-patient (LPS, mm) affine.

        ``series_dir`` is anything the bundle's ``LoadImaged`` reads (a DICOM series folder, a
        NIfTI file). Runs preprocessing, inferer and (writer-free) postprocessing. A
        multi-channel output is reduced with argmax over channels. Raises :class:`BundleError`
        when the bundle's output is not a 3D MetaTensor with an affine, and
        :class:`OutOfMemoryError` when the device runs out of memory.
        """
        started = time.monotonic()
        labels, affine = self._labels(self._infer(series_dir))
        log.debug("bundle %s predicted in %.2f s", self.bundle_dir.name, time.monotonic() - started)
        return labels, affine

    def predict_volume(
        self, volume_xyz: npt.NDArray[np.float32], affine_lps: npt.NDArray[np.float64]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """:meth:`predict` on a volume ``[x, y, z]`` with its voxel-to-LPS affine (via NIfTI)."""
        with tempfile.TemporaryDirectory(prefix="pacs-agent-volume-") as tmp:
            path = write_nifti(volume_xyz, affine_lps, Path(tmp) / "series.nii")
            return self.predict(path)

    def segment_series(
        self, datasets: Sequence[Dataset], plan: VolumePlan
    ) -> npt.NDArray[np.uint8]:
        """Labels on the source frames of ``plan``, in the order of ``datasets``.

        ``datasets`` are full datasets (pixel data included): single-frame instances or a
        multi-frame image; ``plan`` comes from :func:`pacs_agent.dicom.volume.plan_volume` on
        them. Returns uint8 ``(image planes, Rows, Columns)`` as :func:`labels_on_frames` does.
        """
        labels, affine = self.predict_volume(read_volume(datasets, plan), plan.affine)
        return labels_on_frames(labels, affine, datasets)

    def _probabilities(self, path: Path | str) -> npt.NDArray[np.float64]:
        result = self._infer(path)
        values = result.detach().cpu().float().reshape(-1)
        if values.numel() == 0:
            raise BundleError("the classification output is empty")
        if float(values.min()) < -1e-4 or float(values.max()) > 1 + 1e-4:
            # No activation in the bundle's postprocessing: logits.
            values = torch.sigmoid(values) if values.numel() == 1 else torch.softmax(values, 0)
        return np.asarray(values.numpy(), dtype=np.float64)

    def classify_series(
        self, datasets: Sequence[Dataset], plan: VolumePlan, *, per_image: bool = False
    ) -> npt.NDArray[np.float64]:
        """Class probabilities (one per output channel) for a series.

        ``per_image`` false: the whole volume of ``plan`` is one input (a 2D image when the
        plan has one frame). ``per_image`` true: each frame is classified as a 2D image and the
        series gets, per class, the highest probability of its images. Raises BundleError for
        an empty output and :class:`OutOfMemoryError` when the device runs out of memory.
        """
        volume = read_volume(datasets, plan)
        with tempfile.TemporaryDirectory(prefix="pacs-agent-image-") as tmp:
            if not per_image:
                data = volume[:, :, 0] if plan.is_2d else volume
                return self._probabilities(write_nifti(data, plan.affine, Path(tmp) / "s.nii"))
            found: list[npt.NDArray[np.float64]] = []
            for z in range(volume.shape[2]):
                path = write_nifti(volume[:, :, z], plan.affine, Path(tmp) / f"i{z}.nii")
                found.append(self._probabilities(path))
        return np.asarray(np.max(np.stack(found), axis=0), dtype=np.float64)

    def segment(
        self, series_dir: Path, source_datasets: Sequence[Dataset]
    ) -> npt.NDArray[np.uint8]:
        """Labels on the source frames: ``result[i]`` is the mask on ``source_datasets[i]``.

        ``series_dir`` holds the files of exactly one DICOM series; ``source_datasets`` are its
        single-frame instances (pixel data not needed) in any order. Returns a uint8 array of label
        values with shape ``(len(source_datasets), Rows, Columns)``. Raises
        :class:`BundleError` when the bundle's output cannot be used, and
        :class:`SeriesGeometryError` when the datasets lack geometry or differ in size.
        """
        if not source_datasets:
            raise SeriesGeometryError("no source datasets given")
        labels, affine = self.predict(series_dir)
        return labels_on_frames(labels, affine, source_datasets)


def _floats(ds: Dataset, keyword: str, count: int) -> npt.NDArray[np.float64]:
    value = ds.get(keyword)
    if value is None or len(value) != count:
        raise SeriesGeometryError(
            f"instance {ds.get('SOPInstanceUID', '?')} has no valid {keyword}"
        )
    return np.array([float(v) for v in value], dtype=np.float64)


def labels_on_frames(
    labels: npt.NDArray[np.integer[Any]],
    affine_lps: npt.NDArray[np.float64],
    datasets: Sequence[Dataset],
) -> npt.NDArray[np.uint8]:
    """Sample a label volume (nearest neighbour) at every pixel centre of each source frame.

    The frames are the image planes of ``datasets`` (:func:`pacs_agent.dicom.geometry.
    plane_headers`): each single-frame instance, and each frame of a multi-frame image.
    ``affine_lps`` maps voxel indices of ``labels`` to DICOM patient coordinates (LPS, mm). Pixel
    ``(r, c)`` of a frame lies at ``ImagePositionPatient + c * PixelSpacing[1] * row direction +
    r * PixelSpacing[0] * column direction`` (PS3.3 C.7.6.2.1.1). Pixels outside the volume get 0.
    Returns uint8 with shape ``(image planes, Rows, Columns)``. Raises
    :class:`SeriesGeometryError` for missing geometry or frames of different sizes, and
    ValueError for labels outside 0..255 or a singular affine.
    """
    if labels.ndim != 3:
        raise ValueError(f"labels must be 3D, got shape {labels.shape}")
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) > 255):
        raise ValueError("label values must be within 0..255")
    if all("Rows" in ds and "Columns" in ds for ds in datasets):
        try:
            datasets = plane_headers(datasets)
        except ValueError as exc:
            raise SeriesGeometryError(str(exc)) from exc
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets if "Rows" in ds and "Columns" in ds}
    if len(sizes) != 1 or any("Rows" not in ds or "Columns" not in ds for ds in datasets):
        raise SeriesGeometryError(f"source frames must all have one size, got {sorted(sizes)}")
    rows, cols = sizes.pop()
    try:
        voxel_from_patient = np.linalg.inv(np.asarray(affine_lps, dtype=np.float64))
    except np.linalg.LinAlgError as exc:
        raise ValueError("prediction affine is singular") from exc
    rotation, translation = voxel_from_patient[:3, :3], voxel_from_patient[:3, 3]
    volume = labels.astype(np.uint8, copy=False)
    shape = np.array(volume.shape)
    r = np.arange(rows, dtype=np.float64)[:, None]
    c = np.arange(cols, dtype=np.float64)[None, :]

    out = np.zeros((len(datasets), rows, cols), dtype=np.uint8)
    for i, ds in enumerate(datasets):
        position = _floats(ds, "ImagePositionPatient", 3)
        orientation = _floats(ds, "ImageOrientationPatient", 6)
        spacing = _floats(ds, "PixelSpacing", 2)
        origin = rotation @ position + translation
        along_row = rotation @ (orientation[:3] * spacing[1])  # per column index step
        along_col = rotation @ (orientation[3:] * spacing[0])  # per row index step
        index = [
            np.rint(origin[k] + c * along_row[k] + r * along_col[k]).astype(np.int64)
            for k in range(3)
        ]
        inside = np.ones((rows, cols), dtype=bool)
        for k in range(3):
            inside &= (index[k] >= 0) & (index[k] < shape[k])
        out[i][inside] = volume[index[0][inside], index[1][inside], index[2][inside]]
    return out
