"""Test bundles made from the real Model Zoo configs in ../shared/model-zoo.

Their weights cannot be downloaded here: a test bundle gets the shared ``configs/`` folder (linked
and read in place, or copied into the test's own folder when the test is going to break it) and
``models/model.pt`` made from the bundle's own ``network_def`` with a fixed seed. That exercises the
real loading, preprocessing, inferer and postprocessing; it says nothing about accuracy.
"""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from tests.helpers.paths import MODEL_ZOO


def zoo_bundle(name: str, target: Path, card: str = "", *, copy_configs: bool = False) -> Path:
    """``target``: the shared bundle's configs (linked, or copied with ``copy_configs``), seeded
    random weights from its own ``network_def``, and ``card`` as its model card when given."""
    source = MODEL_ZOO / name
    if not source.is_dir():
        pytest.fail(f"{source} is missing: the shared Model Zoo configs must sit beside the repo")
    target.mkdir(parents=True)
    if copy_configs:
        shutil.copytree(source / "configs", target / "configs")
    else:
        (target / "configs").symlink_to(source / "configs", target_is_directory=True)
    config = next(p for p in (source / "configs").iterdir() if p.stem == "inference")
    parser = ConfigParser()
    parser.read_config(str(config))
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    (target / "models").mkdir()
    torch.save(network.state_dict(), target / "models" / "model.pt")
    if card:
        (target / "pacs-agent.toml").write_text(textwrap.dedent(card))
    return target
