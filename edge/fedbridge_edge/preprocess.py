"""The training preprocessing reproduced with numpy + OpenCV from the embedded spec (no torch)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fedbridge_shared.data.images import IMAGE_SUFFIXES, read_image
from fedbridge_shared.errors import DataError


@dataclass(frozen=True)
class InputSpec:
    """What the network expects: square size, channels and per-channel mean/std."""

    image_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> InputSpec:
        """From the ``spec`` object of a bundle's model.json."""
        in_chans = int(spec.get("in_chans", 3))
        return cls(
            image_size=int(spec["image_size"]),
            in_chans=in_chans,
            mean=tuple(float(x) for x in spec.get("mean", (0.5,) * 3))[:in_chans],
            std=tuple(float(x) for x in spec.get("std", (0.5,) * 3))[:in_chans],
        )


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """Greyscale uint8 to ``size`` × ``size``, as ``fedbridge_shared.data.tensors.load_resized``."""
    interp = cv2.INTER_AREA if min(img.shape) >= size else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


def normalise(img: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Resized greyscale uint8 (H, W) → float32 (C, H, W), as ``to_tensor``."""
    x = img.astype(np.float32) / np.float32(255.0)
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
    return (np.broadcast_to(x, (spec.in_chans, *x.shape)) - mean) / std


def load(path: Path, spec: InputSpec) -> tuple[np.ndarray, np.ndarray]:
    """Read PNG/JPEG/DICOM; returns (network input (C, H, W), resized greyscale for overlays)."""
    small = resize(read_image(Path(path)), spec.image_size)
    return normalise(small, spec), small


def decode_bytes(data: bytes, name: str = "upload") -> np.ndarray:
    """Decode an image sent as bytes (PNG, JPEG or DICOM) through the same reader as files."""
    import tempfile

    suffix = ".dcm" if len(data) > 132 and data[128:132] == b"DICM" else ""
    with tempfile.NamedTemporaryFile(suffix=suffix) as fh:
        fh.write(data)
        fh.flush()
        try:
            return read_image(Path(fh.name))
        except DataError as e:
            raise DataError(str(e).replace(fh.name, name)) from e


def list_images(inputs: Iterable[Path]) -> list[Path]:
    """Image files among ``inputs``; folders are searched recursively (sorted)."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found.extend(
                sorted(
                    p
                    for p in item.rglob("*")
                    if p.is_file()
                    and p.suffix.lower() in IMAGE_SUFFIXES
                    and not any(part.startswith(".") for part in p.relative_to(item).parts)
                )
            )
        elif item.exists():
            found.append(item)
        else:
            raise DataError(f"{item}: no such file or folder")
    return found


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    """Consecutive chunks of ``items`` of at most ``size``."""
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + size]
