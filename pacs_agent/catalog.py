"""The model catalog: MONAI bundles in the models directory, each with pacs-agent's model card.

A model card (``pacs-agent.toml`` in the bundle's root) says what the bundle does, which series it
accepts (its input contract; *which* models run is decided by the routing rules), how each label
is coded, which thresholds turn outputs into findings and flags (a probability per
classification output; a volume and a minimum connected component per segment), its version
and whether it may be used clinically. The bundle's own files are never edited: configuration
entries the deployment wants different (``displayable_configs#highres = false``) go into the
card's ``[runtime]`` overrides. Reading the catalog imports no torch: the listener uses it to
create jobs.

A card, in full::

    [model]
    name = "demo_cr_finding"
    version = "0.1.0"
    task = "classification"          # or "segmentation"
    clinical_use = false
    description = "DEMO ONLY ..."

    [accepts]                        # every condition given must hold (input contract)
    modality = ["CR", "DX"]
    body_part = []                   # BodyPartExamined in this list (empty: any)
    sop_class = []                   # SOP Class UIDs (empty: any)
    photometric = []                 # PhotometricInterpretation (empty: any)
    min_slices = 1                   # image planes the model needs
    max_slices = 0                   # 0: no upper limit
    gantry_tilt = "resample"         # tilted CT: "resample" onto an orthogonal grid (labels
                                     # mapped back onto the tilted slices), "reject" it, or
                                     # hand the model the "sheared" grid as acquired

    [runtime]
    overrides = { "displayable_configs#highres" = false }
    input = "volume"                 # "volume": the whole series; "image": each image
                                     # (classification: the series gets the highest probability)

    [detection]                      # segmentation: when a segment is a finding (defaults)
    min_volume_mm3 = 0.0             # detected when the kept volume is at least this
    min_component_mm3 = 0.0          # connected components smaller than this are dropped
    connectivity = 26                # 6, 18 or 26 neighbours join voxels into a component

    [[segments]]                     # segmentation: label value -> coded segment
    number = 1
    label = "Spleen"
    category = { value = "123037004", scheme = "SCT", meaning = "Anatomical Structure" }
    type = { value = "78961009", scheme = "SCT", meaning = "Spleen" }
    min_volume_mm3 = 5000.0          # any [detection] key here overrides it for this segment

    [[findings]]                     # classification: output channel -> coded finding
    index = 1
    label = "Nodule"
    code = { value = "27925004", scheme = "SCT", meaning = "Nodule" }
    threshold = 0.5                  # flag when the probability is at least this
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydicom import Dataset

from pacs_agent.dicom.volume import GantryTilt
from pacs_agent.domain.detection import DetectionCriteria
from pacs_agent.domain.results import AlgorithmSpec, CodedConcept, SegmentSpec
from pacs_agent.domain.uids import device_uid

CARD_NAME = "pacs-agent.toml"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class CatalogError(ValueError):
    """A bundle or model card that cannot be used; the message says what and where.

    ``file`` is the file that is wrong (or missing), ``key`` the entry in it (``model.name``),
    ``line`` the line, each when known.
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


@dataclass(frozen=True)
class Problem:
    """What is wrong with one bundle. ``message`` names the file and the key; ``file``, ``key``
    and ``line`` repeat them apart (when known) for ``models validate --json``."""

    bundle: Path
    message: str
    file: Path | None = None
    key: str | None = None
    line: int | None = None

    @classmethod
    def of(cls, bundle: Path, exc: CatalogError) -> Problem:
        return cls(bundle, str(exc), exc.file, exc.key, exc.line)

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": None if self.file is None else str(self.file),
            "key": self.key,
            "line": self.line,
            "message": self.message,
        }


class _Code(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: str = Field(min_length=1, max_length=64)
    scheme: str = Field(min_length=1, max_length=16)
    meaning: str = Field(min_length=1, max_length=64)

    def concept(self) -> CodedConcept:
        return CodedConcept(self.value, self.scheme, self.meaning)


class _Detection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_volume_mm3: float = Field(0.0, ge=0, allow_inf_nan=False)
    min_component_mm3: float = Field(0.0, ge=0, allow_inf_nan=False)
    connectivity: Literal[6, 18, 26] = 26


class _Segment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    number: int = Field(ge=1, le=255)
    label: str = Field(min_length=1, max_length=64)
    category: _Code
    type: _Code
    min_volume_mm3: float | None = Field(None, ge=0, allow_inf_nan=False)
    min_component_mm3: float | None = Field(None, ge=0, allow_inf_nan=False)
    connectivity: Literal[6, 18, 26] | None = None

    def criteria(self, defaults: _Detection) -> DetectionCriteria:
        """This segment's thresholds: its own keys, else the card's ``[detection]``."""
        return DetectionCriteria(
            min_volume_mm3=(
                defaults.min_volume_mm3 if self.min_volume_mm3 is None else self.min_volume_mm3
            ),
            min_component_mm3=(
                defaults.min_component_mm3
                if self.min_component_mm3 is None
                else self.min_component_mm3
            ),
            connectivity=defaults.connectivity if self.connectivity is None else self.connectivity,
        )


class _Finding(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int = Field(ge=0)
    label: str = Field(min_length=1, max_length=64)
    code: _Code
    threshold: float = Field(0.5, ge=0, le=1)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    version: str = Field(min_length=1, max_length=64)
    task: Literal["segmentation", "classification"]
    clinical_use: bool = False
    description: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("letters, digits, '_', '.', '-' only (at most 128)")
        return v


class _Accepts(BaseModel):
    model_config = ConfigDict(extra="forbid")
    modality: list[str] = Field(default_factory=list)
    body_part: list[str] = Field(default_factory=list)
    sop_class: list[str] = Field(default_factory=list)
    photometric: list[str] = Field(default_factory=list)
    min_slices: int = Field(1, ge=1)
    max_slices: int = Field(0, ge=0)
    gantry_tilt: GantryTilt = "resample"

    @field_validator("gantry_tilt", mode="before")
    @classmethod
    def _legacy_tilt(cls, v: Any) -> Any:
        # Cards written before tilt correction said true (sheared affine) or false (refuse).
        if isinstance(v, bool):
            return "sheared" if v else "reject"
        return v

    @field_validator("modality", "body_part", "photometric")
    @classmethod
    def _upper(cls, v: list[str]) -> list[str]:
        return [s.strip().upper() for s in v]


class _Runtime(BaseModel):
    model_config = ConfigDict(extra="forbid")
    overrides: dict[str, Any] = Field(default_factory=dict)
    input: Literal["volume", "image"] = "volume"


class _Card(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: _Model
    accepts: _Accepts = Field(default_factory=_Accepts)
    runtime: _Runtime = Field(default_factory=_Runtime)
    detection: _Detection | None = None
    segments: list[_Segment] = Field(default_factory=list)
    findings: list[_Finding] = Field(default_factory=list)


@dataclass(frozen=True)
class AcceptsSpec:
    """The series a model accepts: its input contract (see the module docstring)."""

    modality: tuple[str, ...] = ()
    body_part: tuple[str, ...] = ()
    sop_class: tuple[str, ...] = ()
    photometric: tuple[str, ...] = ()
    min_slices: int = 1
    max_slices: int = 0
    gantry_tilt: GantryTilt = "resample"

    def rejects(self, attributes: Mapping[str, Any] | Dataset, num_images: int) -> str | None:
        """Why a series with these DICOM attributes (keyword -> value, from its first instance)
        and ``num_images`` image planes is outside the contract, or None when it is inside."""

        def text(keyword: str) -> str:
            return str(attributes.get(keyword) or "").strip().upper()

        checks = (
            ("Modality", self.modality, text("Modality")),
            ("BodyPartExamined", self.body_part, text("BodyPartExamined")),
            ("PhotometricInterpretation", self.photometric, text("PhotometricInterpretation")),
        )
        for keyword, allowed, value in checks:
            if allowed and value not in allowed:
                return f"{keyword} {value or '(empty)'} is not one of {list(allowed)}"
        sop_class = str(attributes.get("SOPClassUID") or "")
        if self.sop_class and sop_class not in self.sop_class:
            return f"SOP Class {sop_class or '(empty)'} is not one of {list(self.sop_class)}"
        if num_images < self.min_slices:
            return f"{num_images} image(s): the model needs at least {self.min_slices}"
        if self.max_slices and num_images > self.max_slices:
            return f"{num_images} image(s): the model takes at most {self.max_slices}"
        return None


@dataclass(frozen=True)
class FindingSpec:
    """One output of a classification model, as the model card codes it."""

    index: int  # output channel
    label: str
    code: CodedConcept
    threshold: float


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    task: str
    clinical_use: bool
    description: str
    accepts_modality: tuple[str, ...]
    segments: tuple[SegmentSpec, ...]
    bundle_dir: Path
    accepts: AcceptsSpec = field(default_factory=AcceptsSpec)
    findings: tuple[FindingSpec, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)
    input: str = "volume"
    card_path: Path | None = None

    def algorithm(self, uid_root: str) -> AlgorithmSpec:
        return AlgorithmSpec(
            name=self.name,
            version=self.version,
            device_uid=device_uid(uid_root, self.name, self.version),
            clinical_use=self.clinical_use,
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``models list --json``."""
        return {
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "clinical_use": self.clinical_use,
            "description": self.description,
            "bundle": str(self.bundle_dir),
            "accepts": {
                "modality": list(self.accepts.modality),
                "body_part": list(self.accepts.body_part),
                "sop_class": list(self.accepts.sop_class),
                "photometric": list(self.accepts.photometric),
                "min_slices": self.accepts.min_slices,
                "max_slices": self.accepts.max_slices,
                "gantry_tilt": self.accepts.gantry_tilt,
            },
            "input": self.input,
            "overrides": dict(self.overrides),
            "segments": [
                {
                    "number": s.number,
                    "label": s.label,
                    "category": vars(s.category),
                    "type": vars(s.type),
                    "min_volume_mm3": s.detection.min_volume_mm3,
                    "min_component_mm3": s.detection.min_component_mm3,
                    "connectivity": s.detection.connectivity,
                }
                for s in self.segments
            ],
            "findings": [
                {"index": f.index, "label": f.label, "code": vars(f.code), "threshold": f.threshold}
                for f in self.findings
            ],
        }


def _where(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(card)"


def _describe(exc: ValidationError) -> str:
    return "; ".join(f"{_where(e['loc'])}: {e['msg']}" for e in exc.errors())


def _output_channels(bundle_dir: Path) -> int | None:
    """``num_channels`` of the bundle's declared output (metadata.json), when it says one."""
    try:
        meta = json.loads((bundle_dir / "configs" / "metadata.json").read_text(encoding="utf-8"))
        outputs = meta["network_data_format"]["outputs"]
        first = next(iter(outputs.values()))
        return int(first["num_channels"])
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return None


def read_card(bundle_dir: Path) -> ModelCard:
    """Read and validate one bundle's model card. Raises CatalogError saying what is wrong,
    prefixed with the file it is wrong in."""
    card_path = bundle_dir / CARD_NAME
    if not card_path.is_file():
        raise CatalogError(f"{bundle_dir}: no model card {CARD_NAME}", file=card_path)
    configs = bundle_dir / "configs"
    metadata = configs / "metadata.json"
    if not metadata.is_file():
        raise CatalogError(
            f"{bundle_dir}: not a MONAI bundle (configs/metadata.json missing)", file=metadata
        )
    try:
        json.loads(metadata.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CatalogError(
            f"{metadata}: not valid JSON: {exc}",
            file=metadata,
            line=getattr(exc, "lineno", None),
        ) from exc
    if not any((configs / f"inference.{ext}").is_file() for ext in ("json", "yaml", "yml")):
        raise CatalogError(
            f"{bundle_dir}: configs/inference.json (or .yaml) missing",
            file=configs / "inference.json",
        )
    if not any((bundle_dir / "models" / f).is_file() for f in ("model.pt", "model.ts")):
        raise CatalogError(
            f"{bundle_dir}: weights missing (models/model.pt or models/model.ts)",
            file=bundle_dir / "models" / "model.pt",
        )
    try:
        raw: dict[str, Any] = tomllib.loads(card_path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{card_path}: not valid TOML: {exc}", file=card_path) from exc
    try:
        card = _Card.model_validate(raw)
    except ValidationError as exc:
        first = _where(exc.errors()[0]["loc"]) if exc.errors() else None
        raise CatalogError(f"{card_path}: {_describe(exc)}", file=card_path, key=first) from exc

    def fail(message: str, key: str) -> CatalogError:
        return CatalogError(f"{card_path}: {message}", file=card_path, key=key)

    if card.model.task == "segmentation":
        if not card.segments:
            raise fail("a segmentation model needs at least one [[segments]]", "segments")
        if card.findings:
            raise fail("[[findings]] are for classification models; use [[segments]]", "findings")
    else:
        if not card.findings:
            raise fail("a classification model needs at least one [[findings]]", "findings")
        if card.segments:
            raise fail("[[segments]] are for segmentation models; use [[findings]]", "segments")
        if card.detection is not None:
            raise fail(
                "[detection] is for segmentation models; findings have a threshold", "detection"
            )
    numbers = [s.number for s in card.segments]
    if len(set(numbers)) != len(numbers):
        raise fail(f"segments.number repeats: {numbers}", "segments.number")
    indices = [f.index for f in card.findings]
    if len(set(indices)) != len(indices):
        raise fail(f"findings.index repeats: {indices}", "findings.index")
    channels = _output_channels(bundle_dir)
    if channels is not None:
        # A segmentation's label values are channel indices after argmax; a one-channel
        # output is a binary mask whose foreground is label 1.
        top = max(numbers + indices, default=0)
        limit = max(channels - 1, 1) if card.model.task == "segmentation" else channels - 1
        if top > limit:
            what = "segments.number" if card.model.task == "segmentation" else "findings.index"
            raise fail(
                f"{what} {top} is beyond the bundle's output: configs/metadata.json declares "
                f"{channels} channel(s)",
                what,
            )
    if card.runtime.input == "image" and card.model.task != "classification":
        raise fail("runtime.input = 'image' is for classification models", "runtime.input")
    if card.accepts.max_slices and card.accepts.max_slices < card.accepts.min_slices:
        raise fail("accepts.max_slices is below accepts.min_slices", "accepts.max_slices")
    accepts = AcceptsSpec(
        modality=tuple(card.accepts.modality),
        body_part=tuple(card.accepts.body_part),
        sop_class=tuple(card.accepts.sop_class),
        photometric=tuple(card.accepts.photometric),
        min_slices=card.accepts.min_slices,
        max_slices=card.accepts.max_slices,
        gantry_tilt=card.accepts.gantry_tilt,
    )
    return ModelCard(
        name=card.model.name,
        version=card.model.version,
        task=card.model.task,
        clinical_use=card.model.clinical_use,
        description=card.model.description,
        accepts_modality=accepts.modality,
        segments=tuple(
            SegmentSpec(
                s.number,
                s.label,
                s.category.concept(),
                s.type.concept(),
                s.criteria(card.detection or _Detection()),
            )
            for s in card.segments
        ),
        bundle_dir=bundle_dir,
        accepts=accepts,
        findings=tuple(
            FindingSpec(f.index, f.label, f.code.concept(), f.threshold) for f in card.findings
        ),
        overrides=dict(card.runtime.overrides),
        input=card.runtime.input,
        card_path=card_path,
    )


@dataclass(frozen=True)
class Catalog:
    models: dict[str, ModelCard]
    problems: tuple[Problem, ...]
    #: The bundle folders looked at, valid or not.
    bundles: tuple[Path, ...] = ()

    @property
    def errors(self) -> tuple[str, ...]:
        """Each problem's message (it names the file and the key)."""
        return tuple(p.message for p in self.problems)

    def get(self, name: str) -> ModelCard:
        try:
            return self.models[name]
        except KeyError:
            raise CatalogError(f"model {name!r} is not in the catalog") from None


def is_bundle(folder: Path) -> bool:
    """Whether ``folder`` is one bundle (it has a model card or a ``configs/`` folder with
    ``metadata.json`` or an inference configuration) rather than a models directory."""
    configs = folder / "configs"
    names = ("metadata.json", "inference.json", "inference.yaml", "inference.yml")
    return (folder / CARD_NAME).is_file() or any((configs / n).is_file() for n in names)


def _catalog_of(bundles: list[Path]) -> Catalog:
    models: dict[str, ModelCard] = {}
    problems: list[Problem] = []
    for bundle in bundles:
        try:
            card = read_card(bundle)
        except CatalogError as exc:
            problems.append(Problem.of(bundle, exc))
            continue
        if card.name in models:
            problems.append(
                Problem(
                    bundle,
                    f"{bundle}: model name {card.name!r} already used by "
                    f"{models[card.name].bundle_dir}",
                    card.card_path,
                    "model.name",
                )
            )
            continue
        models[card.name] = card
    return Catalog(models, tuple(problems), tuple(bundles))


def load_catalog(models_dir: Path) -> Catalog:
    """Every valid bundle under ``models_dir`` (one per folder; folders starting with ``.`` or
    ``_`` are skipped); invalid ones are listed in ``problems``."""
    if not models_dir.is_dir():
        what = "is not a folder" if models_dir.exists() else "does not exist"
        message = f"models directory {models_dir} {what}"
        return Catalog({}, (Problem(models_dir, message, models_dir),))
    bundles = sorted(p for p in models_dir.iterdir() if p.is_dir())
    return _catalog_of([b for b in bundles if not b.name.startswith((".", "_"))])


def load_bundle(bundle_dir: Path) -> Catalog:
    """The catalog of one bundle folder (see :func:`is_bundle`)."""
    if not bundle_dir.is_dir():
        message = f"bundle {bundle_dir} does not exist"
        return Catalog({}, (Problem(bundle_dir, message, bundle_dir),))
    return _catalog_of([bundle_dir])
