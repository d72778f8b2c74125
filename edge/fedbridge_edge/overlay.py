"""The bedside overlay PNG a clinician reads: image, CAM, verdict, colour bar, provenance.

Layout (top to bottom): a header band with the label and its probability — or, out of
distribution, a red band "NOT ASSESSED" and no heat map at all; the image with the predicted
class's CAM over it and, for chest X-rays, R/L markers; a colour bar on the right; a footer
with the model name and sha and "research use only".

The colour scale is fixed per model: ``CAM / reference`` where the reference is learnt at export
(p99 of the predicted-class CAM on the calibration images, ``edge.cam.reference``), not the
image's own maximum, so a weak map looks weak. The colour map is ``inferno``, the one fedbridge
uses for unsigned maps everywhere (``fedbridge_shared.colours``; OpenCV's inferno is
matplotlib's).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fedbridge_shared.colours import UNSIGNED_CMAP

MAX_SIDE = 512
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
    modality: str = "unknown"
    """"cxr" adds the patient's R/L markers (radiological convention)."""
    detail: str = ""


def colour_lut() -> np.ndarray:
    """The colour map as a (256, 3) RGB uint8 table (index = round(255 · value))."""
    ramp = np.arange(256, dtype=np.uint8)[:, None]
    return cv2.applyColorMap(ramp, _CMAPS[UNSIGNED_CMAP])[:, 0, ::-1].copy()


def cam_to_unit(cam: np.ndarray, size: tuple[int, int], reference: float) -> np.ndarray:
    """One class map (h, w) → positive part / ``reference``, clipped to [0, 1], at (w, h)."""
    cam = np.maximum(cam.astype(np.float32), 0.0) / np.float32(max(reference, 1e-12))
    return np.clip(cv2.resize(cam, size, interpolation=cv2.INTER_LINEAR), 0.0, 1.0)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def render(
    grey: np.ndarray, cam: np.ndarray | None, *, caption: Caption, reference: float
) -> Image.Image:
    """The overlay for one image; ``cam`` None (out of distribution) draws no heat map."""
    h, w = grey.shape
    scale = min(1.0, MAX_SIDE / max(h, w))
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
    draw.text((8, 4), caption.verdict, fill="white", font=_font(20))
    draw.text((8, 28), caption.detail or caption.model, fill=(230, 230, 230), font=_font(12))
    if caption.modality == "cxr" and not caption.ood:
        for text, x in (("R", 6), ("L", w - 18)):
            draw.text((x, HEADER + h // 2 - 10), text, fill="yellow", font=_font(18))
    bar_height = max(h - 32, 40)
    _colour_bar(draw, canvas, x0=w_img + 14, y0=HEADER + 16, height=bar_height, off=cam is None)
    draw.text((8, HEADER + h + 3), RESEARCH_USE, fill="white", font=_font(13))
    draw.text((8, HEADER + h + 19), caption.model, fill=(190, 190, 190), font=_font(11))
    return canvas


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
