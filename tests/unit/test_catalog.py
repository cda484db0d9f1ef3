"""Model cards and the catalog: what a card says, and what validation says is wrong, and where."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pacs_agent.catalog import CatalogError, is_bundle, load_bundle, load_catalog, read_card
from pacs_agent.cli.main import app
from pacs_agent.domain.detection import DetectionCriteria

BUNDLES = Path(__file__).resolve().parents[2] / "workers" / "bundles"


def _bundle(root: Path, name: str, card: str, channels: int = 2) -> Path:
    bundle = root / name
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "configs" / "inference.json").write_text("{}")
    meta = {"network_data_format": {"outputs": {"pred": {"num_channels": channels}}}}
    (bundle / "configs" / "metadata.json").write_text(json.dumps(meta))
    (bundle / "models" / "model.pt").write_bytes(b"")
    (bundle / "pacs-agent.toml").write_text(textwrap.dedent(card))
    return bundle


CLASSIFIER = """
    [model]
    name = "{name}"
    version = "1.0"
    task = "classification"
    [accepts]
    modality = ["cr", "DX"]
    [[findings]]
    index = 1
    label = "Nodule"
    code = {{ value = "27925004", scheme = "SCT", meaning = "Nodule" }}
    threshold = {threshold}
"""


SEGMENTER = """
    [model]
    name = "seg"
    version = "1.0"
    task = "segmentation"
    {detection}
    [[segments]]
    number = 1
    label = "Liver"
    category = {{ value = "123037004", scheme = "SCT", meaning = "Anatomical Structure" }}
    type = {{ value = "10200004", scheme = "SCT", meaning = "Liver" }}
    {override}
    [[segments]]
    number = 2
    label = "Lesion"
    category = {{ value = "49755003", scheme = "SCT", meaning = "Morphologic Structure" }}
    type = {{ value = "52988006", scheme = "SCT", meaning = "Lesion" }}
"""


def _segmenter(tmp_path: Path, detection: str = "", override: str = "") -> Path:
    card = SEGMENTER.format(detection=detection, override=override)
    return _bundle(tmp_path, "seg", card, channels=3)


def test_segment_thresholds_come_from_detection_and_each_segment_overrides_them(
    tmp_path: Path,
) -> None:
    detection = "[detection]\n    min_volume_mm3 = 50.0\n    min_component_mm3 = 10"
    card = read_card(_segmenter(tmp_path, detection, "min_volume_mm3 = 5000\n    connectivity = 6"))
    liver, lesion = (s.detection for s in card.segments)
    assert (liver.min_volume_mm3, liver.min_component_mm3, liver.connectivity) == (5000, 10, 6)
    assert (lesion.min_volume_mm3, lesion.min_component_mm3, lesion.connectivity) == (50, 10, 26)
    shown = card.as_dict()["segments"]
    assert [(s["min_volume_mm3"], s["min_component_mm3"], s["connectivity"]) for s in shown] == [
        (5000, 10, 6),
        (50, 10, 26),
    ]


def test_a_card_without_thresholds_detects_any_voxel_as_before(tmp_path: Path) -> None:
    card = read_card(_segmenter(tmp_path))
    assert {s.detection for s in card.segments} == {DetectionCriteria(0.0, 0.0, 26)}


@pytest.mark.parametrize(
    ("detection", "override", "message"),
    [
        ("[detection]\nmin_volume_mm3 = -1", "", r"detection\.min_volume_mm3: .*greater than"),
        ("", "connectivity = 8", r"segments\[0\]\.connectivity: Input should be 6, 18 or 26"),
        ("", "min_component_mm3 = nan", r"segments\[0\]\.min_component_mm3: .*finite"),
        ("[detection]\nminimum = 3", "", r"detection\.minimum: Extra inputs"),
    ],
)
def test_invalid_segment_thresholds_say_what_and_where(
    tmp_path: Path, detection: str, override: str, message: str
) -> None:
    with pytest.raises(CatalogError, match=message):
        read_card(_segmenter(tmp_path, detection, override))


def test_detection_is_refused_on_a_classification_card(tmp_path: Path) -> None:
    card = CLASSIFIER.format(name="m", threshold=0.5) + "\n[detection]\nmin_volume_mm3 = 5\n"
    with pytest.raises(CatalogError, match=r"\[detection\] is for segmentation models"):
        read_card(_bundle(tmp_path, "m", card))


def test_shipped_demo_bundles_form_a_valid_catalog() -> None:
    catalog = load_catalog(BUNDLES)
    assert catalog.errors == ()
    seg, cls = catalog.get("demo_ct_blob_seg"), catalog.get("demo_cr_nodule_cls")
    assert (seg.task, cls.task) == ("segmentation", "classification")
    assert not seg.clinical_use and not cls.clinical_use
    assert cls.accepts.modality == ("CR", "DX")
    assert cls.findings[0].code.value == "27925004" and cls.findings[0].threshold == 0.5
    assert cls.input == "image"
    # The demo segmenter states its thresholds: specks under 20 mm3 dropped, 50 mm3 to flag.
    assert seg.segments[0].detection == DetectionCriteria(50.0, 20.0, 26)
    assert (BUNDLES / "demo_cr_nodule_cls" / "models" / "model.pt").stat().st_size < 20 * 2**20
    meta = json.loads((BUNDLES / "demo_cr_nodule_cls" / "configs" / "metadata.json").read_text())
    assert "not for clinical use" in meta["description"]


def test_card_reads_accepts_thresholds_and_overrides(tmp_path: Path) -> None:
    card = read_card(_bundle(tmp_path, "m", CLASSIFIER.format(name="m", threshold=0.3)))
    assert card.accepts.rejects({"Modality": "CT"}, 1) == "Modality CT is not one of ['CR', 'DX']"
    assert card.accepts.rejects({"Modality": "dx"}, 1) is None
    assert card.as_dict()["findings"][0]["threshold"] == 0.3


@pytest.mark.parametrize(
    ("card", "message"),
    [
        (CLASSIFIER.format(name="m", threshold=1.5), r"findings\[0\]\.threshold: .*less than or"),
        (CLASSIFIER.format(name="bad name!", threshold=0.5), r"model\.name: .*letters, digits"),
        (
            CLASSIFIER.format(name="m", threshold=0.5).replace("index = 1", "index = 2"),
            r"findings\.index 2 is beyond the bundle's output: .* 2 channel",
        ),
        (
            CLASSIFIER.format(name="m", threshold=0.5).replace("[[findings]]", "[[segments]]"),
            r"segments\[0\]",
        ),
        (
            "[model]\nname = 'm'\nversion = '1'\ntask = 'segmentation'\n",
            "segmentation model needs at least one",
        ),
        ("[model\n", "not valid TOML"),
        (CLASSIFIER.format(name="m", threshold=0.5) + "\n[accepts2]\n", r"accepts2: Extra inputs"),
    ],
)
def test_invalid_card_says_what_and_where(tmp_path: Path, card: str, message: str) -> None:
    bundle = _bundle(tmp_path, "m", card)
    with pytest.raises(CatalogError, match=message) as info:
        read_card(bundle)
    assert str(bundle / "pacs-agent.toml") in str(info.value)


def test_card_errors_carry_the_file_and_the_key(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path, "m", CLASSIFIER.format(name="m", threshold=0.5))
    text = (bundle / "pacs-agent.toml").read_text()
    (bundle / "pacs-agent.toml").write_text(text.replace("index = 1", "index = 5"))
    with pytest.raises(CatalogError) as info:
        read_card(bundle)
    assert (info.value.file, info.value.key) == (bundle / "pacs-agent.toml", "findings.index")


def test_one_bundle_folder_is_a_bundle_and_its_subfolders_are_not_bundles(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path, "m", CLASSIFIER.format(name="m", threshold=0.5))
    assert is_bundle(bundle) and not is_bundle(tmp_path)
    one = load_bundle(bundle)
    assert list(one.models) == ["m"] and one.problems == () and one.bundles == (bundle,)
    # Read as a models directory, a bundle's own folders are taken for bundles without cards.
    as_directory = load_catalog(bundle)
    assert {p.bundle.name for p in as_directory.problems} == {"configs", "models"}
    assert all("no model card" in e for e in as_directory.errors)


def test_bundle_without_weights_is_reported(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path, "m", CLASSIFIER.format(name="m", threshold=0.5))
    (bundle / "models" / "model.pt").unlink()
    with pytest.raises(
        CatalogError, match=r"weights missing \(models/model\.pt or models/model"
    ) as e:
        read_card(bundle)
    assert e.value.file == bundle / "models" / "model.pt"


def test_models_list_json_shows_the_shipped_demo_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PACS_AGENT_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("PACS_AGENT_MODELS__DIRECTORY", raising=False)
    monkeypatch.delenv("PACS_AGENT_CONFIG", raising=False)
    result = CliRunner().invoke(app, ["models", "list", "--json"])
    assert result.exit_code == 0, result.output
    names = {m["name"]: m for m in json.loads(result.stdout)["models"]}
    assert set(names) >= {"demo_ct_blob_seg", "demo_cr_nodule_cls"}
    assert names["demo_ct_blob_seg"]["segments"][0]["type"]["meaning"] == "Mass"
