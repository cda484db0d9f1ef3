"""The model catalog: MONAI bundles in the models directory, each with pacs-agent's model card.

A model card (``pacs-agent.toml`` in the bundle's root) says what the bundle does, which
series it accepts, how each label is coded and whether it may be used clinically. Reading the
catalog imports no torch: the listener uses it to create jobs.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pacs_agent.domain.results import AlgorithmSpec, CodedConcept, SegmentSpec
from pacs_agent.domain.uids import device_uid

CARD_NAME = "pacs-agent.toml"


class CatalogError(ValueError):
    """A bundle or model card that cannot be used; the message says what and where."""


class _Code(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: str
    scheme: str
    meaning: str

    def concept(self) -> CodedConcept:
        return CodedConcept(self.value, self.scheme, self.meaning)


class _Segment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    number: int = Field(ge=1)
    label: str
    category: _Code
    type: _Code


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    version: str
    task: Literal["segmentation", "classification"]
    clinical_use: bool = False
    description: str = ""


class _Accepts(BaseModel):
    model_config = ConfigDict(extra="forbid")
    modality: list[str] = Field(default_factory=list)


class _Card(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: _Model
    accepts: _Accepts = Field(default_factory=_Accepts)
    segments: list[_Segment] = Field(default_factory=list)


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

    def algorithm(self, uid_root: str) -> AlgorithmSpec:
        return AlgorithmSpec(
            name=self.name,
            version=self.version,
            device_uid=device_uid(uid_root, self.name, self.version),
            clinical_use=self.clinical_use,
        )


def read_card(bundle_dir: Path) -> ModelCard:
    """Read and validate one bundle's model card. Raises CatalogError saying what is wrong."""
    card_path = bundle_dir / CARD_NAME
    if not card_path.is_file():
        raise CatalogError(f"{bundle_dir}: no model card {CARD_NAME}")
    configs = bundle_dir / "configs"
    if not (configs / "metadata.json").is_file():
        raise CatalogError(f"{bundle_dir}: not a MONAI bundle (configs/metadata.json missing)")
    if not any((configs / f"inference.{ext}").is_file() for ext in ("json", "yaml", "yml")):
        raise CatalogError(f"{bundle_dir}: configs/inference.json (or .yaml) missing")
    if not any((bundle_dir / "models" / f).is_file() for f in ("model.pt", "model.ts")):
        raise CatalogError(f"{bundle_dir}: weights missing (models/model.pt or models/model.ts)")
    try:
        raw: dict[str, Any] = tomllib.loads(card_path.read_text(encoding="utf-8"))
        card = _Card.model_validate(raw)
    except (tomllib.TOMLDecodeError, ValidationError) as exc:
        raise CatalogError(f"{card_path}: {exc}") from exc
    if card.model.task == "segmentation" and not card.segments:
        raise CatalogError(f"{card_path}: a segmentation model needs at least one [[segments]]")
    numbers = [s.number for s in card.segments]
    if len(set(numbers)) != len(numbers):
        raise CatalogError(f"{card_path}: segment numbers repeat: {numbers}")
    return ModelCard(
        name=card.model.name,
        version=card.model.version,
        task=card.model.task,
        clinical_use=card.model.clinical_use,
        description=card.model.description,
        accepts_modality=tuple(card.accepts.modality),
        segments=tuple(
            SegmentSpec(s.number, s.label, s.category.concept(), s.type.concept())
            for s in card.segments
        ),
        bundle_dir=bundle_dir,
    )


@dataclass(frozen=True)
class Catalog:
    models: dict[str, ModelCard]
    errors: tuple[str, ...]

    def get(self, name: str) -> ModelCard:
        try:
            return self.models[name]
        except KeyError:
            raise CatalogError(f"model {name!r} is not in the catalog") from None


def load_catalog(models_dir: Path) -> Catalog:
    """Every valid bundle under ``models_dir``; invalid ones are listed in ``errors``."""
    models: dict[str, ModelCard] = {}
    errors: list[str] = []
    if not models_dir.is_dir():
        return Catalog({}, (f"models directory {models_dir} does not exist",))
    for bundle in sorted(p for p in models_dir.iterdir() if p.is_dir()):
        try:
            card = read_card(bundle)
        except CatalogError as exc:
            errors.append(str(exc))
            continue
        if card.name in models:
            errors.append(
                f"{bundle}: model name {card.name!r} already used by {models[card.name].bundle_dir}"
            )
            continue
        models[card.name] = card
    return Catalog(models, tuple(errors))
