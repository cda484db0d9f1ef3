"""``pacs-agent models validate``: each way a bundle breaks is found before a study arrives, with
the file and the key that are wrong; a single bundle folder is taken as one bundle.

The bundles are real: copies of the shipped demo bundles and of the Model Zoo configs in
../shared/model-zoo (weights made from each bundle's own ``network_def``), each broken one way.
The command loads them in a worker process exactly as an inference worker does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from monai.bundle import ConfigParser
from typer.testing import CliRunner

from pacs_agent.cli.main import app
from tests.helpers.zoo import zoo_bundle

ROOT = Path(__file__).resolve().parents[2]
DEMOS = ROOT / "workers" / "bundles"

SPLEEN_CARD = """
    [model]
    name = "{name}"
    version = "0.5.9"
    task = "segmentation"
    [accepts]
    modality = ["CT"]
    [runtime]
    overrides = {{ {overrides} }}
    [[segments]]
    number = 1
    label = "Spleen"
    category = {{ value = "123037004", scheme = "SCT", meaning = "Anatomical Structure" }}
    type = {{ value = "78961009", scheme = "SCT", meaning = "Spleen" }}
"""

TEMPLATE_CARD = """
    [model]
    name = "cls_truncated_yaml"
    version = "0.1"
    task = "classification"
    [[findings]]
    index = 1
    label = "Circle"
    code = { value = "27925004", scheme = "SCT", meaning = "Nodule" }
"""


def _spleen(root: Path, name: str, overrides: str = "") -> Path:
    card = SPLEEN_CARD.format(name=name, overrides=overrides)
    return zoo_bundle("spleen_ct_segmentation", root / name, card, copy_configs=True)


def _edit_json(path: Path, key: str, value: Any) -> None:
    """Set ``key`` (``a#b#0``) in the JSON file ``path``, keeping the rest as it is."""
    config = json.loads(path.read_text())
    *parents, last = key.split("#")
    node = config
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[int(last) if isinstance(node, list) else last] = value
    path.write_text(json.dumps(config, indent=4))


def _truncated_yaml(bundle: Path) -> int:
    """Cut the bundle's inference.yaml inside a quoted value (a prefix of the real file, as a
    copy cut short leaves it); the number of the line it now ends on."""
    path = bundle / "configs" / "inference.yaml"
    text = path.read_text()
    cut = text.index("'@num_classes'") + 5
    path.write_text(text[:cut])
    return text[:cut].count("\n") + 1


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory with valid bundles and bundles broken one way each."""
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(DEMOS / "demo_cr_nodule_cls", root / "demo_cr_nodule_cls")
    _spleen(root, "spleen_ok")

    demo = shutil.copytree(DEMOS / "demo_ct_blob_seg", root / "demo_truncated_json")
    config = demo / "configs" / "inference.json"
    config.write_bytes(config.read_bytes()[:40])

    template = zoo_bundle(
        "classification_template", root / "cls_truncated_yaml", TEMPLATE_CARD, copy_configs=True
    )
    _truncated_yaml(template)

    (_spleen(root, "spleen_no_weights") / "models" / "model.pt").unlink()

    misfit = _spleen(root, "spleen_misfit_weights")
    parser = ConfigParser()
    parser.read_config(str(misfit / "configs" / "inference.json"))
    parser["network_def#out_channels"] = 3  # another network: its last layers have 3 channels
    torch.save(parser.get_parsed_content("network_def").state_dict(), misfit / "models/model.pt")

    missing = _spleen(root, "spleen_missing_reference")
    _edit_json(missing / "configs/inference.json", "preprocessing#transforms#3#pixdim", "@pixdim")

    unknown = _spleen(root, "spleen_unknown_transform")
    _edit_json(unknown / "configs/inference.json", "postprocessing#transforms#1#_target_", "Nope")

    _spleen(root, "spleen_bad_override", '"displayable_configs#highres" = false')

    macro = shutil.copytree(DEMOS / "demo_ct_blob_seg", root / "demo_truncated_macro_file")
    (macro / "pacs-agent.toml").write_text(
        (macro / "pacs-agent.toml").read_text().replace("demo_ct_blob_seg", "macro")
    )
    extra = macro / "configs" / "extra.json"
    extra.write_text('{"inferer": {"_target_": "SlidingWindowInf')
    _edit_json(macro / "configs/inference.json", "inferer", f"%{extra}#inferer")

    broken_card = shutil.copytree(DEMOS / "demo_cr_nodule_cls", root / "broken_card")
    card = (broken_card / "pacs-agent.toml").read_text()
    card = card.replace('name = "demo_cr_nodule_cls"', 'name = "broken_card"')
    (broken_card / "pacs-agent.toml").write_text(card.replace("threshold = 0.5", "threshold = 7"))
    return root


@pytest.fixture(scope="module")
def report(models_dir: Path) -> dict[str, Any]:
    result = CliRunner().invoke(app, ["models", "validate", str(models_dir), "--json"])
    assert result.exit_code == 1, result.output
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def _errors(report: dict[str, Any], models_dir: Path, bundle: str) -> list[dict[str, Any]]:
    entry = next(e for e in report["bundles"] if e["bundle"] == str(models_dir / bundle))
    assert entry["valid"] is (not entry["errors"])
    errors: list[dict[str, Any]] = entry["errors"]
    return errors


def test_a_models_directory_is_taken_as_one_and_only_broken_bundles_are_invalid(
    report: dict[str, Any], models_dir: Path
) -> None:
    assert report["taken_as"] == "models directory"
    assert report["directory"] == str(models_dir)
    assert report["valid"] is False
    assert len(report["bundles"]) == 11
    valid = sorted(e["name"] for e in report["bundles"] if e["valid"])
    assert valid == ["demo_cr_nodule_cls", "spleen_ok"]
    assert sorted(m["name"] for m in report["models"]) == valid
    assert len(report["errors"]) == 9
    for entry in report["bundles"]:
        assert len(entry["errors"]) <= 1, entry  # the first failure, as a worker meets it


def test_truncated_json_config_is_invalid_naming_the_file_and_line(
    report: dict[str, Any], models_dir: Path
) -> None:
    [error] = _errors(report, models_dir, "demo_truncated_json")
    assert error["file"] == str(models_dir / "demo_truncated_json/configs/inference.json")
    assert error["line"] == 3
    assert "cannot be read" in error["message"] and "line 3" in error["message"]


def test_truncated_yaml_config_is_invalid_naming_the_file_and_line(
    report: dict[str, Any], models_dir: Path
) -> None:
    [error] = _errors(report, models_dir, "cls_truncated_yaml")
    path = models_dir / "cls_truncated_yaml/configs/inference.yaml"
    assert error["file"] == str(path)
    assert error["line"] == path.read_text().count("\n") + 1
    assert "cannot be read" in error["message"] and "quoted scalar" in error["message"]


def test_truncated_file_named_by_a_macro_is_named_with_the_entry_holding_the_macro(
    report: dict[str, Any], models_dir: Path
) -> None:
    [error] = _errors(report, models_dir, "demo_truncated_macro_file")
    assert error["file"] == str(models_dir / "demo_truncated_macro_file/configs/extra.json")
    assert (error["key"], error["line"]) == ("inferer", 1)
    assert "macro" in error["message"] and "Unterminated string" in error["message"]


def test_missing_weights_are_named(report: dict[str, Any], models_dir: Path) -> None:
    [error] = _errors(report, models_dir, "spleen_no_weights")
    assert error["file"] == str(models_dir / "spleen_no_weights/models/model.pt")
    assert "weights missing" in error["message"]


def test_weights_that_do_not_fit_the_network_are_named_with_the_network_key(
    report: dict[str, Any], models_dir: Path
) -> None:
    [error] = _errors(report, models_dir, "spleen_misfit_weights")
    assert error["file"] == str(models_dir / "spleen_misfit_weights/models/model.pt")
    assert error["key"] == "network"
    assert "does not fit the bundle's network" in error["message"]
    assert "size mismatch" in error["message"]


def test_reference_to_an_id_that_does_not_exist_names_the_entry_holding_it(
    report: dict[str, Any], models_dir: Path
) -> None:
    [error] = _errors(report, models_dir, "spleen_missing_reference")
    assert error["file"] == str(models_dir / "spleen_missing_reference/configs/inference.json")
    assert error["key"] == "preprocessing#transforms#3#pixdim"
    assert "`@pixdim` is not defined" in error["message"]


def test_component_that_cannot_be_built_names_its_entry(
    report: dict[str, Any], models_dir: Path
) -> None:
    [error] = _errors(report, models_dir, "spleen_unknown_transform")
    assert error["key"] == "postprocessing#transforms#1"
    assert "Nope" in error["message"]


def test_card_override_without_a_place_in_the_config_names_the_override(
    report: dict[str, Any], models_dir: Path
) -> None:
    [error] = _errors(report, models_dir, "spleen_bad_override")
    assert error["key"] == "displayable_configs#highres"
    assert "override" in error["message"]


def test_invalid_model_card_is_reported_with_its_key(
    report: dict[str, Any], models_dir: Path
) -> None:
    [error] = _errors(report, models_dir, "broken_card")
    assert error["file"] == str(models_dir / "broken_card/pacs-agent.toml")
    assert error["key"] == "findings[0].threshold"


def test_one_bundle_folder_is_validated_as_a_bundle_not_as_a_directory(models_dir: Path) -> None:
    result = CliRunner().invoke(app, ["models", "validate", str(models_dir / "spleen_ok")])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"bundle {models_dir / 'spleen_ok'}"
    assert lines[1].startswith("valid: spleen_ok 0.5.9 (segmentation")
    assert "no model card" not in result.output


def test_one_broken_bundle_folder_exits_1_and_says_what_is_wrong(models_dir: Path) -> None:
    bundle = models_dir / "spleen_missing_reference"
    result = CliRunner().invoke(app, ["models", "validate", str(bundle), "--json"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["taken_as"] == "bundle"
    [entry] = report["bundles"]
    assert entry["errors"][0]["key"] == "preprocessing#transforms#3#pixdim"
    assert "configs" not in {Path(e["bundle"]).name for e in report["bundles"]}


def test_a_folder_without_bundles_is_invalid(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["models", "validate", str(tmp_path)])
    assert result.exit_code == 1
    assert "no bundle found" in result.output


def test_validation_loads_no_torch_in_the_cli_process() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from typer.testing import CliRunner; from pacs_agent.cli.main import app;"
        f"CliRunner().invoke(app, ['models', 'validate', {str(DEMOS)!r}]);"
        "print('torch' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip().splitlines()[-1] == "False"
