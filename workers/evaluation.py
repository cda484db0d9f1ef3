"""How well does a model do on local data? ``pacs-agent models evaluate MODEL --dataset DIR``.

The data set is a folder with one sub-folder per case, each holding the DICOM files of one
series (the model's input):

* segmentation: each case folder also holds the reference Segmentation (SEG) object of that
  series. Reference segments are matched to the model card's segments by Segmented Property
  Type code (value and scheme), else by label (case ignored). Per label and case: Dice and the
  95th percentile Hausdorff distance in mm (MONAI's ``DiceMetric`` and
  ``HausdorffDistanceMetric(percentile=95)`` with the voxel spacing of the series);
* classification: ``labels.csv`` beside the case folders, with a column ``case`` and one column
  per finding label of the model card (``1`` finding present, ``0`` absent); a card with one
  finding may call the column ``label``. Per finding: accuracy, precision, recall (sensitivity)
  and specificity at the card's threshold, and ROC AUC (MONAI's ``compute_roc_auc``).

Each case goes through exactly what a job does: the input contract and series-to-volume checks,
then the bundle (:func:`workers.runtime.series.run_model`). A case the model refuses is reported
with its reason and left out of the figures. Writes ``report.json`` and PNG plots (``dice.png``
per case, ``roc_<finding>.png``) to the output folder and prints progress on stderr.

Run as ``python -m workers.evaluation MODEL --dataset DIR --models-dir DIR --out DIR``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import torch
from pydicom import Dataset

from pacs_agent.catalog import CatalogError, ModelCard, load_catalog
from workers.runtime.series import ModelInputError, RunnerCache, run_model

__all__ = ["EvaluationError", "evaluate", "main"]

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


class EvaluationError(ValueError):
    """The data set cannot be evaluated (layout, labels, references); the message says why."""


@dataclass
class Case:
    name: str
    datasets: list[Dataset]
    references: list[Path] = field(default_factory=list)


def _read_case(folder: Path) -> Case:
    images: list[Dataset] = []
    references: list[Path] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue  # not DICOM: ignored
        if str(header.get("SOPClassUID", "")) == SEG_SOP_CLASS:
            references.append(path)
        elif "Rows" in header:
            images.append(pydicom.dcmread(path))
    return Case(folder.name, images, references)


def _cases(dataset: Path) -> list[Path]:
    if not dataset.is_dir():
        raise EvaluationError(f"data set {dataset} is not a folder")
    folders = sorted(p for p in dataset.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise EvaluationError(f"data set {dataset} has no case folders")
    return folders


# -- segmentation ---------------------------------------------------------------------------


def _reference_labels(card: ModelCard, case: Case, order: Sequence[int]) -> npt.NDArray[np.uint8]:
    """The reference SEG of ``case`` as a label map ``[frame, row, col]`` in the frame ``order``,
    with the model card's segment numbers as values."""
    import highdicom as hd

    if len(case.references) != 1:
        raise EvaluationError(
            f"case {case.name}: {len(case.references)} reference SEG object(s); exactly one needed"
        )
    seg = hd.seg.segread(case.references[0])
    uids = [str(case.datasets[i].SOPInstanceUID) for i in order]
    by_code: dict[tuple[str, str], int] = {}
    by_label: dict[str, int] = {}
    for item in seg.SegmentSequence:
        code = item.SegmentedPropertyTypeCodeSequence[0]
        by_code[(str(code.CodeValue), str(code.CodingSchemeDesignator))] = int(item.SegmentNumber)
        by_label[str(item.SegmentLabel).strip().lower()] = int(item.SegmentNumber)
    out = np.zeros(
        (len(uids), int(case.datasets[0].Rows), int(case.datasets[0].Columns)), dtype=np.uint8
    )
    matched = 0
    for spec in card.segments:
        number = by_code.get((spec.type.value, spec.type.scheme)) or by_label.get(
            spec.label.strip().lower()
        )
        if number is None:
            continue
        matched += 1
        try:
            pixels = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=uids,
                segment_numbers=[number],
                combine_segments=True,
                skip_overlap_checks=True,
                ignore_spatial_locations=True,
                assert_missing_frames_are_empty=True,
            )
        except Exception as exc:
            raise EvaluationError(
                f"case {case.name}: reference SEG does not fit the series: {exc}"
            ) from exc
        out[np.asarray(pixels) > 0] = spec.number
    if not matched:
        raise EvaluationError(
            f"case {case.name}: no segment of the reference SEG matches the model card's "
            f"segments ({[s.label for s in card.segments]}) by code or label"
        )
    return out


def _segmentation_scores(
    pred: npt.NDArray[np.uint8],
    ref: npt.NDArray[np.uint8],
    number: int,
    spacing_zyx: tuple[float, float, float],
) -> tuple[float, float | None]:
    """Dice and HD95 (mm) of label ``number``; HD95 is None when either mask is empty."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    p = torch.from_numpy((pred == number).astype(np.float32))[None, None]
    r = torch.from_numpy((ref == number).astype(np.float32))[None, None]
    if not p.any() and not r.any():
        return 1.0, 0.0
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(p, r)
    if not p.any() or not r.any():
        return float(dice.item()), None
    hd95 = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
        p, r, spacing=list(spacing_zyx)
    )
    return float(dice.item()), float(hd95.item())


# -- classification -------------------------------------------------------------------------


def _labels(card: ModelCard, dataset: Path) -> dict[str, dict[str, int]]:
    path = dataset / "labels.csv"
    if not path.is_file():
        raise EvaluationError(f"{path} is missing (columns: case, then one per finding)")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "case" not in rows[0]:
        raise EvaluationError(f"{path}: needs a header with a 'case' column")
    out: dict[str, dict[str, int]] = {}
    for line, row in enumerate(rows, start=2):
        values: dict[str, int] = {}
        for spec in card.findings:
            column = spec.label if spec.label in row else "label"
            if column == "label" and (len(card.findings) > 1 or "label" not in row):
                raise EvaluationError(f"{path}: no column {spec.label!r}")
            text = (row.get(column) or "").strip()
            if text not in ("0", "1"):
                raise EvaluationError(f"{path} line {line}: {column} must be 0 or 1, not {text!r}")
            values[spec.label] = int(text)
        out[row["case"].strip()] = values
    return out


def roc_curve(
    scores: npt.NDArray[np.float64], truth: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """False and true positive rates over every threshold (descending), from (0, 0) to (1, 1)."""
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], truth[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(t)[distinct]
    fps = (distinct + 1) - tps
    positives, negatives = max(int(t.sum()), 1), max(int(len(t) - t.sum()), 1)
    return (
        np.r_[0.0, fps / negatives].astype(np.float64),
        np.r_[0.0, tps / positives].astype(np.float64),
    )


def _rate(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def classification_scores(
    probabilities: Sequence[float], truth: Sequence[int], threshold: float
) -> dict[str, Any]:
    """Accuracy, precision, recall, specificity at ``threshold`` and ROC AUC."""
    from monai.metrics import compute_roc_auc

    p = np.asarray(probabilities, dtype=np.float64)
    t = np.asarray(truth, dtype=np.int64)
    flagged = p >= threshold
    tp = int(np.sum(flagged & (t == 1)))
    fp = int(np.sum(flagged & (t == 0)))
    tn = int(np.sum(~flagged & (t == 0)))
    fn = int(np.sum(~flagged & (t == 1)))
    auc: float | None = None
    if 0 < t.sum() < len(t):
        auc = float(compute_roc_auc(torch.from_numpy(p), torch.from_numpy(t)))
    return {
        "threshold": threshold,
        "cases": len(t),
        "positives": int(t.sum()),
        "true_positives": tp,
        "false_positives": fp,
        "true_negatives": tn,
        "false_negatives": fn,
        "accuracy": _rate(tp + tn, len(t)),
        "precision": _rate(tp, tp + fp),
        "recall": _rate(tp, tp + fn),
        "specificity": _rate(tn, tn + fp),
        "roc_auc": auc,
    }


# -- plots ----------------------------------------------------------------------------------


def _plot_dice(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in report["cases"] if "scores" in c]
    labels = [s["label"] for s in report["labels"]]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(cases) + 2), 3.5))
    width = 0.8 / max(len(labels), 1)
    for k, label in enumerate(labels):
        values = [c["scores"][label]["dice"] for c in cases]
        ax.bar(np.arange(len(cases)) + k * width, values, width, label=label)
    ax.set_xticks(np.arange(len(cases)) + 0.4 - width / 2, [c["case"] for c in cases], rotation=45)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice")
    ax.set_title(f"{report['model']} {report['version']}: Dice per case")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_roc(label: str, fpr: npt.NDArray[np.float64], tpr: npt.NDArray[np.float64],
              auc: float | None, title: str, path: Path) -> None:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr, drawstyle="steps-post", label=f"AUC {auc:.3f}" if auc is not None else "")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"{title}: {label}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- the evaluation -------------------------------------------------------------------------


def evaluate(
    card: ModelCard,
    dataset: Path,
    out_dir: Path,
    *,
    device: str = "auto",
    progress: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Run ``card``'s model over the data set, write ``report.json`` and plots; the report.

    Raises EvaluationError for a data set that does not fit the layout above.
    """
    started = time.monotonic()
    folders = _cases(dataset)
    truth = _labels(card, dataset) if card.task == "classification" else {}
    cache = RunnerCache({}, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    cases: list[dict[str, Any]] = []
    probabilities: dict[str, list[float]] = {f.label: [] for f in card.findings}
    expected: dict[str, list[int]] = {f.label: [] for f in card.findings}
    for n, folder in enumerate(folders, start=1):
        case = _read_case(folder)
        entry: dict[str, Any] = {"case": case.name, "images": len(case.datasets)}
        if card.task == "classification" and case.name not in truth:
            raise EvaluationError(f"case {case.name} has no row in labels.csv")
        try:
            output = run_model(cache, card, case.datasets)
        except ModelInputError as exc:
            entry["refused"] = str(exc)
            cases.append(entry)
            progress(f"[{n}/{len(folders)}] {case.name}: refused: {exc}")
            continue
        if card.task == "classification":
            entry["probabilities"] = {}
            for c in output.classifications:
                entry["probabilities"][c.label] = c.probability
                probabilities[c.label].append(c.probability)
                expected[c.label].append(truth[case.name][c.label])
            entry["truth"] = truth[case.name]
            summary = ", ".join(f"{k} {v:.3f}" for k, v in entry["probabilities"].items())
        else:
            assert output.mask is not None
            order = [f.dataset_index for f in output.plan.frames]
            reference = _reference_labels(card, case, order)
            pred = output.mask[order]
            dx, dy, dz = output.plan.spacing
            entry["scores"] = {}
            for spec in card.segments:
                dice, hd95 = _segmentation_scores(pred, reference, spec.number, (dz, dy, dx))
                entry["scores"][spec.label] = {"dice": dice, "hd95_mm": hd95}
            summary = ", ".join(f"{k} Dice {v['dice']:.3f}" for k, v in entry["scores"].items())
        cases.append(entry)
        progress(f"[{n}/{len(folders)}] {case.name}: {summary}")

    report: dict[str, Any] = {
        "model": card.name,
        "version": card.version,
        "task": card.task,
        "dataset": str(dataset),
        "device": str(cache.device),
        "cases": cases,
        "evaluated": sum(1 for c in cases if "refused" not in c),
        "refused": sum(1 for c in cases if "refused" in c),
        "plots": [],
    }
    if card.task == "classification":
        report["findings"] = []
        for finding in card.findings:
            label = finding.label
            scores = classification_scores(probabilities[label], expected[label], finding.threshold)
            report["findings"].append({"label": label, **scores})
            if expected[label]:
                fpr, tpr = roc_curve(np.asarray(probabilities[label]), np.asarray(expected[label]))
                name = f"roc_{label.lower().replace(' ', '_')}.png"
                _plot_roc(label, fpr, tpr, scores["roc_auc"], card.name, out_dir / name)
                report["plots"].append(name)
    else:
        report["labels"] = []
        for spec in card.segments:
            scored = [c["scores"][spec.label] for c in cases if "scores" in c]
            dices = [float(s["dice"]) for s in scored]
            hd95s = [float(s["hd95_mm"]) for s in scored if s["hd95_mm"] is not None]
            report["labels"].append(
                {
                    "label": spec.label,
                    "number": spec.number,
                    "cases": len(scored),
                    "dice_mean": float(np.mean(dices)) if dices else None,
                    "dice_median": float(np.median(dices)) if dices else None,
                    "hd95_mm_mean": float(np.mean(hd95s)) if hd95s else None,
                    "hd95_mm_median": float(np.median(hd95s)) if hd95s else None,
                }
            )
        if any("scores" in c for c in cases):
            _plot_dice(report, out_dir / "dice.png")
            report["plots"].append("dice.png")
    report["seconds"] = round(time.monotonic() - started, 2)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=_json_default))
    return report


def _json_default(value: object) -> object:
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"{type(value).__name__} is not JSON")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point (``pacs-agent models evaluate`` runs it); the exit status:
    0 done, 2 the model or the data set cannot be used."""
    parser = argparse.ArgumentParser(description="Evaluate a model of the catalog on a data set.")
    parser.add_argument("model")
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--models-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        card = load_catalog(args.models_dir).get(args.model)
        report = evaluate(
            card,
            args.dataset,
            args.out,
            device=args.device,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except (CatalogError, EvaluationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for item in report.get("findings", []):
            print(
                f"{item['label']}: accuracy {item['accuracy']}, precision {item['precision']}, "
                f"recall {item['recall']}, specificity {item['specificity']}, "
                f"ROC AUC {item['roc_auc']} ({item['cases']} cases, threshold {item['threshold']})"
            )
        for item in report.get("labels", []):
            print(
                f"{item['label']}: Dice mean {item['dice_mean']}, HD95 mean "
                f"{item['hd95_mm_mean']} mm ({item['cases']} cases)"
            )
        print(f"report: {args.out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
