"""The overlay's text and markers: any script drawn, never an empty box; markers only from the
image's PatientOrientation; the map names its class. No model needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fedbridge_edge import overlay
from fedbridge_edge.laterality import (
    NO_ATTRIBUTE,
    NOT_DICOM,
    markers_from_dataset,
    markers_from_orientation,
)
from fedbridge_edge.record import Markers


@pytest.mark.parametrize(
    ("value", "left", "right"),
    [("L\\F", "R", "L"), ("R\\F", "L", "R"), (["L", "F"], "R", "L"), ("P\\F", "A", "P"),
     ("LP\\F", "R", "L")],
)  # fmt: skip
def test_markers_follow_the_row_direction(value, left, right):
    markers, source = markers_from_orientation(value)
    assert markers == Markers(left=left, right=right) and "PatientOrientation" in source


@pytest.mark.parametrize("value", [None, "", "X\\F", "1\\2"])
def test_no_markers_without_a_patient_direction(value):
    markers, source = markers_from_orientation(value)
    assert markers is None and source.startswith("none:")


def test_png_and_headerless_dicom_get_no_markers():
    class Header:
        PatientOrientation = None

    assert markers_from_dataset(None) == (None, NOT_DICOM)
    assert markers_from_dataset(Header()) == (None, NO_ATTRIBUTE)


def _ink(text: str, font) -> np.ndarray:
    canvas = Image.new("L", (200, 40), 0)
    ImageDraw.Draw(canvas).text((2, 2), text, fill=255, font=font)
    return np.asarray(canvas)


@pytest.mark.parametrize("label", ["肺炎", "التهاب رئوي", "NORMAL", "Pneumonía"])
def test_labels_in_any_script_are_drawn_with_real_glyphs(label):
    shown, font = overlay.drawable(label, 20)
    assert shown == label, f"{label!r} fell back to {shown!r}"
    missing = _ink("\U0010fffd" * len(label.replace(" ", "")), font)
    drawn = _ink(label, font)
    assert drawn.any() and not np.array_equal(drawn, missing)  # not .notdef boxes
    assert Path(str(font.path)).is_file()


def test_a_character_no_font_has_is_written_as_its_code_point():
    shown, _ = overlay.drawable("A\ue000B", 20)  # a private-use character: no font draws it
    assert shown == "A<U+E000>B"


def _render(map_label: str | None, markers: tuple[str, str] | None) -> np.ndarray:
    grey = np.full((200, 300), 100, np.uint8)
    cam = np.ones((7, 7), np.float32)
    caption = overlay.Caption(
        verdict="COVID19  score 0.90", ood=False, model="m · sha 0", map_label=map_label,
        markers=markers,
    )  # fmt: skip
    image = overlay.render(grey, cam if map_label else None, caption=caption, reference=1.0)
    return np.asarray(image.convert("RGB")).astype(int)


def test_the_map_is_drawn_only_with_a_class_to_explain():
    with_map, without = _render("COVID19", None), _render(None, None)
    body = slice(overlay.HEADER, overlay.HEADER + 200)
    assert (np.ptp(with_map[body, :300], axis=2) > 3).mean() > 0.9  # colour over the image
    assert (np.ptp(without[body, :300], axis=2) == 0).all()  # grey: no heat map


def test_markers_are_drawn_where_the_record_says():
    body = slice(overlay.HEADER, overlay.HEADER + 200)
    plain, marked = _render(None, None), _render(None, ("R", "L"))
    yellow = (marked[body, :, 0] > 200) & (marked[body, :, 1] > 200) & (marked[body, :, 2] < 80)
    assert yellow[:, :40].any() and yellow[:, 260:300].any() and not yellow[:, 60:240].any()
    plain_yellow = (plain[body, :, 0] > 200) & (plain[body, :, 1] > 200) & (plain[body, :, 2] < 80)
    assert not plain_yellow.any()  # no orientation, no letters
