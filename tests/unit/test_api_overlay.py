"""The dashboard's SEG thumbnail: the segment is drawn exactly where the SEG marks it, on the
middle one of the marked slices; unreadable input is an OverlayError, not a crash."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pacs_agent.api.overlay import PALETTE, WIDTH, OverlayError, _order_key, render_overlay
from pacs_agent.dicom.geometry import segment_results
from pacs_agent.dicom.seg import build_segmentation
from tests.helpers.dicom_results import SPECS, box_mask, job_result, liver_ct


def test_the_overlay_marks_the_seg_pixels_of_the_middle_marked_slice(tmp_path: Path) -> None:
    sources = liver_ct()
    mask = box_mask(sources)
    seg = build_segmentation(
        sources, mask, job_result(sources, segment_results(mask, sources, SPECS))
    )
    assert seg is not None
    seg_path = tmp_path / "seg.dcm"
    seg.save_as(seg_path)
    paths = []
    for n, ds in enumerate(sources):
        paths.append(tmp_path / f"{n}.dcm")
        ds.save_as(paths[-1])

    png = Image.open(io.BytesIO(render_overlay(seg_path, paths))).convert("RGB")
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    assert png.width == WIDTH
    ordered = sorted(range(len(sources)), key=lambda i: _order_key(sources[i]))
    middle = ordered[len(ordered) // 2]
    pixels = np.asarray(png)
    outline = np.all(pixels == PALETTE[0], axis=2)
    ys, xs = np.nonzero(outline)
    assert len(ys) > 0
    src_y = ys * rows // png.height
    src_x = xs * cols // png.width
    # Every outline pixel lies on the box the SEG marks on that slice (no transposition, no
    # other slice's box).
    assert mask[middle][src_y, src_x].all()
    others = [i for i in range(len(sources)) if i != middle]
    assert not all(mask[i][src_y, src_x].all() for i in others)


def test_an_unreadable_seg_is_an_overlay_error(tmp_path: Path) -> None:
    bad = tmp_path / "seg.dcm"
    bad.write_bytes(b"not dicom")
    with pytest.raises(OverlayError, match="cannot read the SEG"):
        render_overlay(bad, [])
