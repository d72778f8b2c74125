"""Saliency overlay PNG: the predicted class's CAM, upsampled on the host, over the image."""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image

MAX_SIDE = 512


def cam_to_unit(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One class map (h, w) → positive part scaled to [0, 1] and resized to (width, height)."""
    cam = np.maximum(cam.astype(np.float32), 0.0)
    top = float(cam.max())
    cam = cam / top if top > 0 else cam
    return np.clip(cv2.resize(cam, size, interpolation=cv2.INTER_LINEAR), 0.0, 1.0)


def render(grey: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """Blend a jet-coloured CAM over a greyscale uint8 image (long side capped at 512 px)."""
    h, w = grey.shape
    scale = min(1.0, MAX_SIDE / max(h, w))
    if scale < 1.0:
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
        grey = cv2.resize(grey, (w, h), interpolation=cv2.INTER_AREA)
    heat = cam_to_unit(cam, (w, h))
    colour = cv2.applyColorMap(np.uint8(np.rint(heat * 255)), cv2.COLORMAP_JET)[..., ::-1]
    base = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    weight = alpha * heat[..., None]
    return Image.fromarray(np.uint8(np.rint(base * (1 - weight) + colour * weight)))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
