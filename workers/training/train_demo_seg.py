"""Train the demo blob-segmentation bundle on synthetic phantoms (CPU, reproducible, minutes).

Usage::

    python -m workers.training.train_demo_seg \\
        --out workers/bundles/demo_ct_blob_seg --iterations 500

The network, the intensity scaling and the sliding-window inferer are all read from the bundle's
own ``configs/inference.json`` (``--config``, by default the one in this repository), so the
weights always match what the bundle does at inference time. Training volumes come from
:func:`pacs_agent.demo.synthetic.make_phantom`, put into the array layout that the bundle's
preprocessing produces from a DICOM series (``LoadImaged`` + ``Orientationd("RAS")``: ``[x, y, z]``;
the flips it also applies are covered by random-flip augmentation).

Writes ``<out>/models/model.pt`` (a plain ``state_dict``) and prints the Dice of the blob class on a
held-out phantom. DEMO ONLY: the model finds bright blobs in synthetic noise; it has no clinical
meaning whatsoever.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from monai.bundle import ConfigParser
from monai.losses import DiceCELoss

from pacs_agent.demo.synthetic import make_phantom

DEFAULT_BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "demo_ct_blob_seg"
DEFAULT_CONFIG = DEFAULT_BUNDLE / "configs" / "inference.json"
#: Held-out phantom: the geometry of the default demo study, a seed no training phantom uses.
HELD_OUT_SHAPE = (40, 256, 256)
HELD_OUT_SEED = 987_654_321


class DemoBundleSpec:
    """What training takes from the bundle config: network, intensity scaling, inferer."""

    def __init__(self, config_path: Path) -> None:
        parser = ConfigParser()
        parser.read_config(str(config_path))
        parser["bundle_root"] = str(config_path.parent.parent)
        self.network: torch.nn.Module = parser.get_parsed_content("network_def", instantiate=True)
        transforms: list[dict[str, Any]] = parser["preprocessing"]["transforms"]
        index = next(
            (
                i
                for i, t in enumerate(transforms)
                if str(t.get("_target_", "")).endswith("ScaleIntensityRanged")
            ),
            None,
        )
        if index is None:
            raise ValueError(f"{config_path}: preprocessing has no ScaleIntensityRanged")
        self.scale: Any = parser.get_parsed_content(f"preprocessing#transforms#{index}")
        self.scale_key: str = next(iter(self.scale.keys))
        self.inferer: Any = parser.get_parsed_content("inferer")
        self.roi_size: tuple[int, int, int] = tuple(int(s) for s in self.inferer.roi_size)  # type: ignore[assignment]

    def to_network_input(self, volume_zyx: npt.NDArray[np.int16]) -> torch.Tensor:
        """HU volume ``[z, y, x]`` -> scaled float tensor ``[1, x, y, z]`` as the bundle sees it."""
        xyz = torch.from_numpy(np.ascontiguousarray(volume_zyx.transpose(2, 1, 0), np.float32))
        scaled = self.scale({self.scale_key: xyz[None]})[self.scale_key]
        return torch.as_tensor(scaled, dtype=torch.float32)


def _crop(
    image: torch.Tensor,
    label: npt.NDArray[np.uint8],
    roi: tuple[int, int, int],
    gen: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random ``roi`` crop of ``image [1, x, y, z]`` and ``label [x, y, z]``, half of them centred
    on a blob voxel, padded with the image minimum where the volume is smaller than ``roi``."""
    spatial = label.shape
    positives = np.argwhere(label > 0)
    if len(positives) and gen.random() < 0.5:
        centre = positives[gen.integers(len(positives))] + gen.integers(-8, 9, size=3)
    else:
        centre = np.array([gen.integers(0, s) for s in spatial])
    starts = [
        int(np.clip(c - r // 2, 0, max(0, s - r)))
        for c, r, s in zip(centre, roi, spatial, strict=True)
    ]
    sl = tuple(slice(st, st + r) for st, r in zip(starts, roi, strict=True))
    img = image[(slice(None), *sl)]
    lab = torch.from_numpy(label[sl].astype(np.int64))[None]
    pad: list[int] = []
    for dim in range(3, 0, -1):  # torch pad order: last dim first
        missing = roi[dim - 1] - img.shape[dim]
        pad += [0, max(0, missing)]
    if any(pad):
        img = torch.nn.functional.pad(img, pad, value=float(image.min()))
        lab = torch.nn.functional.pad(lab, pad, value=0)
    # Random flips: the bundle's Orientationd may flip any axis of the DICOM grid.
    for axis in (1, 2, 3):
        if gen.random() < 0.5:
            img, lab = img.flip(axis), lab.flip(axis)
    return img, lab


def dice(pred: npt.NDArray[np.integer[Any]], truth: npt.NDArray[np.integer[Any]]) -> float:
    """Dice of the foreground (label > 0) of two masks; 1.0 when both are empty."""
    p, t = pred > 0, truth > 0
    denominator = int(p.sum()) + int(t.sum())
    return 1.0 if denominator == 0 else 2.0 * int((p & t).sum()) / denominator


def evaluate(spec: DemoBundleSpec, model: torch.nn.Module) -> float:
    """Dice of the blob class on the held-out phantom, inferred with the bundle's own inferer."""
    volume, mask = make_phantom(HELD_OUT_SHAPE, np.random.default_rng(HELD_OUT_SEED), 4)
    image = spec.to_network_input(volume)[None]
    model.eval()
    with torch.no_grad():
        logits = spec.inferer(image, model)
    pred = torch.argmax(torch.as_tensor(logits)[0], dim=0).numpy()
    return dice(pred, mask.transpose(2, 1, 0))


def train(
    out_dir: Path,
    iterations: int,
    *,
    seed: int = 0,
    batch_size: int = 2,
    learning_rate: float = 3e-3,
    config_path: Path = DEFAULT_CONFIG,
    log_every: int = 25,
) -> float:
    """Train, write ``out_dir/models/model.pt`` (a state_dict) and return the held-out Dice.

    Deterministic for a given seed on a given machine (CPU, deterministic algorithms).
    Raises ValueError for ``iterations < 1`` or a config without the expected entries.
    """
    if iterations < 1:
        raise ValueError("iterations must be >= 1")
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    gen = np.random.default_rng(seed)

    spec = DemoBundleSpec(config_path)
    model = spec.network.to("cpu")
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=iterations)

    def new_volume() -> tuple[torch.Tensor, npt.NDArray[np.uint8]]:
        shape = (
            int(gen.integers(24, 49)),
            int(gen.integers(128, 289)),
            int(gen.integers(128, 289)),
        )
        volume, mask = make_phantom(shape, gen, int(gen.integers(2, 7)))
        return spec.to_network_input(volume), mask.transpose(2, 1, 0)

    pool = [new_volume() for _ in range(4)]
    started = time.monotonic()
    model.train()
    for step in range(1, iterations + 1):
        pool[step % len(pool)] = new_volume()  # a fresh phantom every step
        crops = [
            _crop(*pool[int(gen.integers(len(pool)))], spec.roi_size, gen)
            for _ in range(batch_size)
        ]
        images = torch.stack([c[0] for c in crops])
        labels = torch.stack([c[1] for c in crops])
        optimiser.zero_grad()
        loss = loss_fn(model(images), labels)
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % log_every == 0 or step == iterations:
            print(
                f"step {step}/{iterations} loss {loss.item():.4f} "
                f"({time.monotonic() - started:.0f} s)",
                flush=True,
            )

    score = evaluate(spec, model)
    print(f"held-out Dice (blob): {score:.4f}", flush=True)
    models = out_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, models / "model.pt")
    print(f"wrote {models / 'model.pt'} in {time.monotonic() - started:.0f} s", flush=True)
    return score


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to write models/ in")
    parser.add_argument("--iterations", type=int, default=500, help="training steps (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=2, help="crops per step (default 2)")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help="bundle inference config to take network, scaling and inferer from",
    )
    args = parser.parse_args(argv)
    train(
        args.out,
        args.iterations,
        seed=args.seed,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        config_path=args.config,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
