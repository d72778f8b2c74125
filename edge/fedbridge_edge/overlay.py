"""The bedside overlay PNG a clinician reads: image, CAM, verdict, colour bar, provenance.

Layout (top to bottom): a header band with the label and its score — or, out of
distribution, a red band "NOT ASSESSED" and no heat map at all; the image with the CAM of the
class named under the colour bar over it (none for a class the bundle marks as normal) and the
laterality markers the prediction record carries (from DICOM PatientOrientation; none when the
image does not say); a colour bar on the right; a footer with the model name and sha and
"research use only". Text in any script is drawn with the first installed font that has its
glyphs; a character no font has is written as its code point, never as an empty box.

The colour scale is fixed per model: ``CAM / reference`` where the reference is learnt at export
(p99 of the predicted-class CAM on the calibration images, ``edge.cam.reference``), not the
image's own maximum, so a weak map looks weak. The colour map is ``inferno``, the one fedbridge
uses for unsigned maps everywhere (``fedbridge_shared.colours``; OpenCV's inferno is
matplotlib's).
"""

from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fedbridge_shared.colours import UNSIGNED_CMAP

MAX_SIDE = 512
"""The overlay PNG's long side (the CLI and HTTP outputs); the Secondary Capture asks for more."""
FONT_FILES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",  # Latin, Greek, Cyrillic, Arabic
    "/usr/share/fonts/truetype/noto/NotoSansArabic-Regular.ttf",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",  # Chinese, Japanese, Korean
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
)
"""Fonts tried in order (Debian fonts-dejavu-core, fonts-noto-core, fonts-noto-cjk);
``FEDBRIDGE_FONTS`` (paths separated by ``:``) puts others first."""
HEADER = 46
FOOTER = 34
BAR = 64
ALPHA = 0.6
OK_BAND = (24, 60, 90)
OOD_BAND = (170, 20, 20)
FOOTER_BAND = (32, 32, 32)
RESEARCH_USE = "RESEARCH USE ONLY - not for diagnostic use"
_CMAPS = {"inferno": cv2.COLORMAP_INFERNO}


@dataclass(frozen=True)
class Caption:
    """What the overlay says besides the map."""

    verdict: str
    """"LABEL 0.93" or "NOT ASSESSED: out of distribution"."""
    ood: bool
    model: str
    """Model name and short sha, e.g. "mobilenetv2_100 · sha 1a2b3c4d5e6f"."""
    detail: str = ""
    map_label: str | None = None
    """The class the heat map explains (None: no map), named under the colour bar."""
    markers: tuple[str, str] | None = None
    """(left, right) letters from the image's PatientOrientation; None draws none."""


def colour_lut() -> np.ndarray:
    """The colour map as a (256, 3) RGB uint8 table (index = round(255 · value))."""
    ramp = np.arange(256, dtype=np.uint8)[:, None]
    lut: np.ndarray = cv2.applyColorMap(ramp, _CMAPS[UNSIGNED_CMAP])[:, 0, ::-1].copy()
    return lut


def cam_to_unit(cam: np.ndarray, size: tuple[int, int], reference: float) -> np.ndarray:
    """One class map (h, w) → positive part / ``reference``, clipped to [0, 1], at (w, h)."""
    cam = np.maximum(cam.astype(np.float32), 0.0) / np.float32(max(reference, 1e-12))
    return np.clip(cv2.resize(cam, size, interpolation=cv2.INTER_LINEAR), 0.0, 1.0)


def _font_files() -> list[str]:
    extra = [p for p in os.environ.get("FEDBRIDGE_FONTS", "").split(":") if p]
    return [p for p in (*extra, *FONT_FILES) if os.path.isfile(p)]


@functools.lru_cache(maxsize=64)
def _truetype(path: str, size: int) -> ImageFont.FreeTypeFont | None:
    try:
        return ImageFont.truetype(path, size)
    except OSError:
        return None


@functools.lru_cache(maxsize=4096)
def _has_glyph(path: str, size: int, char: str) -> bool:
    """Whether the font draws ``char`` as something other than its missing-glyph box."""
    font = _truetype(path, size)
    if font is None:
        return False
    if char.isspace():
        return True
    mask = font.getmask(char)
    missing = font.getmask("\U0010fffd")  # a private-use code point: the .notdef glyph
    return mask.size != missing.size or bytes(mask) != bytes(missing)


def _font(size: int, text: str = "") -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """The first installed font with a glyph for every character of ``text``."""
    for path in _font_files():
        if all(_has_glyph(path, size, c) for c in set(text)):
            font = _truetype(path, size)
            if font is not None:
                return font
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def drawable(text: str, size: int) -> tuple[str, ImageFont.ImageFont | ImageFont.FreeTypeFont]:
    """(text, font) to draw: characters no installed font has become ``<U+XXXX>``."""
    font = _font(size, text)
    if isinstance(font, ImageFont.FreeTypeFont) and all(
        _has_glyph(str(font.path), size, c) for c in set(text)
    ):
        return text, font
    files = _font_files()
    kept = "".join(
        c if c.isascii() or any(_has_glyph(p, size, c) for p in files) else f"<U+{ord(c):04X}>"
        for c in text
    )
    return kept, _font(size, kept)


def _text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, size: int, fill: Any) -> None:
    shown, font = drawable(text, size)
    draw.text(xy, shown, fill=fill, font=font)


def render(
    grey: np.ndarray,
    cam: np.ndarray | None,
    *,
    caption: Caption,
    reference: float,
    max_side: int = MAX_SIDE,
) -> Image.Image:
    """The overlay for one image; ``cam`` None (out of distribution, a normal class) draws no
    heat map. The image keeps its resolution up to ``max_side`` pixels on its long side."""
    h, w = grey.shape
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
        grey = cv2.resize(grey, (w, h), interpolation=cv2.INTER_AREA)
    w_img = max(w, 320)  # room for the header text on narrow images
    base = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    if cam is not None and not caption.ood:
        heat = cam_to_unit(cam, (w, h), reference)
        colour = colour_lut()[np.uint8(np.rint(heat * 255))].astype(np.float32)
        weight = ALPHA * heat[..., None]
        base = base * (1 - weight) + colour * weight
    canvas = Image.new("RGB", (w_img + BAR, HEADER + h + FOOTER), FOOTER_BAND)
    canvas.paste(Image.fromarray(np.uint8(np.rint(base))), (0, HEADER))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, w_img + BAR - 1, HEADER - 1), fill=OOD_BAND if caption.ood else OK_BAND)
    _text(draw, (8, 4), caption.verdict, 20, "white")
    _text(draw, (8, 28), caption.detail or caption.model, 12, (230, 230, 230))
    if caption.markers is not None:
        size = max(18, h // 40)
        for text, x in ((caption.markers[0], 6), (caption.markers[1], w - 6 - size)):
            _text(draw, (x, HEADER + h // 2 - size // 2), text, size, "yellow")
    bar_height = colour_bar_height(h)
    off = cam is None or caption.ood
    _colour_bar(draw, canvas, x0=w_img + 14, y0=HEADER + 16, height=bar_height, off=off)
    if caption.map_label is not None and not off:
        _text(draw, (w_img + 4, HEADER + 20 + bar_height), "map:", 10, "white")
        _text(draw, (w_img + 4, HEADER + 32 + bar_height), caption.map_label[:10], 10, "white")
    _text(draw, (8, HEADER + h + 3), RESEARCH_USE, 13, "white")
    _text(draw, (8, HEADER + h + 19), caption.model, 11, (190, 190, 190))
    return canvas


def colour_bar_height(image_height: int) -> int:
    """The colour bar's height for an image of this height (room for "map: LABEL" below)."""
    return max(image_height - 48, 40)


def _colour_bar(
    draw: ImageDraw.ImageDraw, canvas: Image.Image, *, x0: int, y0: int, height: int, off: bool
) -> None:
    """A vertical bar, CAM/reference 1 at the top to 0 at the bottom, with ticks."""
    if off:
        draw.text((x0 - 10, y0), "no\nmap", fill="white", font=_font(10))
        return
    values = np.linspace(1.0, 0.0, height)
    lut = colour_lut()
    column = lut[np.uint8(np.rint(values * 255))]
    font = _font(10)
    bar = np.repeat(column[:, None, :], 14, axis=1)
    canvas.paste(Image.fromarray(bar), (x0, y0))
    draw.text((x0 - 10, y0 - 14), "CAM", fill="white", font=font)
    for value, label in ((1.0, "ref"), (0.5, ".5"), (0.0, "0")):
        y = y0 + round((1 - value) * (height - 1))
        draw.line((x0 + 14, y, x0 + 18, y), fill="white")
        draw.text((x0 + 20, y - 6), label, fill="white", font=font)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
