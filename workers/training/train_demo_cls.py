"""Train the demo radiograph classification bundle on synthetic images (CPU, reproducible).

Usage::

    python -m workers.training.train_demo_cls \\
        --out workers/bundles/demo_cr_nodule_cls --epochs 8

The network and the preprocessing after loading (resize, intensity scaling) are read from the
bundle's own ``configs/inference.json``, so the weights match what the bundle does at inference
time. Each training image is a synthetic CR or DX instance made by
:mod:`pacs_agent.demo.radiograph` (half with a round opacity, some MONOCHROME1), turned into
voxels by the same series-to-volume code the worker uses (:mod:`pacs_agent.dicom.volume`), so
the layout and intensities are those the bundle sees in production.

Writes ``<out>/models/model.pt`` (a plain ``state_dict``) and prints accuracy and ROC AUC on a
held-out set. DEMO ONLY: it finds round blobs in synthetic pictures; no clinical meaning.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.metrics import compute_roc_auc
from monai.transforms import Compose

from pacs_agent.demo.radiograph import make_radiograph, radiograph_dataset
from pacs_agent.dicom.volume import plan_volume, read_volume

DEFAULT_BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "demo_cr_nodule_cls"
DEFAULT_CONFIG = DEFAULT_BUNDLE / "configs" / "inference.json"
HELD_OUT_SEED = 123_456_789


class ClsBundleSpec:
    """What training takes from the bundle config: network and the transforms after loading."""

    def __init__(self, config_path: Path) -> None:
        parser = ConfigParser()
        parser.read_config(str(config_path))
        parser["bundle_root"] = str(config_path.parent.parent)
        self.network: torch.nn.Module = parser.get_parsed_content("network_def", instantiate=True)
        transforms: list[dict[str, Any]] = parser["preprocessing"]["transforms"]
        first = next(
            (
                i + 1
                for i, t in enumerate(transforms)
                if str(t.get("_target_", "")).endswith("EnsureChannelFirstd")
            ),
            None,
        )
        if first is None:
            raise ValueError(f"{config_path}: preprocessing has no EnsureChannelFirstd")
        self.after_load = Compose(
            [
                parser.get_parsed_content(f"preprocessing#transforms#{i}")
                for i in range(first, len(transforms))
            ]
        )
        self.key: str = str(parser["image_key"])

    def image_tensor(self, rng: np.random.Generator, finding: bool, index: int) -> torch.Tensor:
        """One synthetic instance through series-to-volume and the bundle's transforms."""
        modality = "DX" if rng.random() < 0.5 else "CR"
        ds = radiograph_dataset(
            make_radiograph(rng, finding, size=int(rng.choice([112, 128, 160]))),
            patient_id=f"TRAIN{index:06d}",
            modality=modality,
            monochrome1=bool(rng.random() < 0.3),
        )
        plan = plan_volume([ds])
        xy = torch.from_numpy(read_volume([ds], plan)[:, :, 0])[None]
        out = self.after_load({self.key: xy})[self.key]
        return torch.as_tensor(out, dtype=torch.float32)


def make_set(spec: ClsBundleSpec, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` images (half with the finding, shuffled) and their 0/1 labels."""
    rng = np.random.default_rng(seed)
    labels = np.array([i % 2 for i in range(count)])
    rng.shuffle(labels)
    images = torch.stack([spec.image_tensor(rng, bool(label), i) for i, label in enumerate(labels)])
    return images, torch.from_numpy(labels.astype(np.int64))


def evaluate(spec: ClsBundleSpec, model: torch.nn.Module, count: int = 200) -> tuple[float, float]:
    """Accuracy and ROC AUC (finding class) on a held-out set."""
    images, labels = make_set(spec, count, HELD_OUT_SEED)
    model.eval()
    with torch.no_grad():
        probs = torch.softmax(model(images), dim=1)[:, 1]
    accuracy = float(((probs >= 0.5).long() == labels).float().mean())
    auc = float(compute_roc_auc(probs, labels))
    return accuracy, auc


def train(
    out_dir: Path,
    epochs: int,
    *,
    seed: int = 0,
    train_size: int = 800,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    config_path: Path = DEFAULT_CONFIG,
) -> tuple[float, float]:
    """Train, write ``out_dir/models/model.pt`` and return held-out (accuracy, ROC AUC).

    Deterministic for a given seed on a given machine (CPU, deterministic algorithms).
    Raises ValueError for ``epochs < 1``.
    """
    if epochs < 1:
        raise ValueError("epochs must be >= 1")
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    spec = ClsBundleSpec(config_path)
    model = spec.network.to("cpu")
    started = time.monotonic()
    images, labels = make_set(spec, train_size, seed)
    print(f"made {train_size} training images in {time.monotonic() - started:.0f} s", flush=True)
    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)
    loss_fn = torch.nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(train_size, generator=generator)
        total = 0.0
        for start in range(0, train_size, batch_size):
            batch = order[start : start + batch_size]
            x = images[batch]
            if epoch > 1:  # flips: the orientation of a projection image is not fixed
                flip = torch.rand(len(batch), generator=generator) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(2), x)
            optimiser.zero_grad()
            loss = loss_fn(model(x), labels[batch])
            loss.backward()
            optimiser.step()
            total += float(loss) * len(batch)
        print(
            f"epoch {epoch}/{epochs} loss {total / train_size:.4f} "
            f"({time.monotonic() - started:.0f} s)",
            flush=True,
        )
    accuracy, auc = evaluate(spec, model)
    print(f"held-out accuracy {accuracy:.4f} ROC AUC {auc:.4f}", flush=True)
    models = out_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, models / "model.pt")
    print(f"wrote {models / 'model.pt'} in {time.monotonic() - started:.0f} s", flush=True)
    return accuracy, auc


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to write models/ in")
    parser.add_argument("--epochs", type=int, default=8, help="passes over the set (default 8)")
    parser.add_argument("--train-size", type=int, default=800, help="images (default 800)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="bundle inference config"
    )
    args = parser.parse_args(argv)
    train(
        args.out, args.epochs, seed=args.seed, train_size=args.train_size, config_path=args.config
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
