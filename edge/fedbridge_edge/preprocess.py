"""Bedside inputs: files, uploaded bytes and calibration batches, preprocessed as in training.

The pixels go through :mod:`fedbridge_shared.data.pixels`, the functions training uses (no torch).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedbridge_edge.errors import EdgeError
from fedbridge_shared.data.images import (
    IMAGE_SUFFIXES,
    DecodedImage,
    check_shape,
    dicom_to_grey,
    has_dicom_magic,
    parse_dicom,
    read_image,
)
from fedbridge_shared.data.pixels import InputSpec, normalise, resize
from fedbridge_shared.errors import DataError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = [
    "InputSpec",
    "normalise",
    "resize",
    "load",
    "decode_bytes",
    "decode_upload",
    "DecodedImage",
    "list_images",
    "check_declared_size",
    "ImageTooLarge",
]


def load(path: Path, spec: InputSpec) -> tuple[np.ndarray, np.ndarray]:
    """Read PNG/JPEG/DICOM; returns (network input (C, H, W), resized greyscale for overlays)."""
    small = resize(read_image(Path(path)), spec.image_size)
    return normalise(small, spec), small


def decode_bytes(data: bytes, name: str = "upload") -> np.ndarray:
    """Decode an image sent as bytes (PNG, JPEG or DICOM) through the same reader as files."""
    return decode_upload(data, name).grey


def decode_upload(
    data: bytes, name: str = "upload", *, max_pixels: int | None = None
) -> DecodedImage:
    """Decode uploaded bytes once: a DICOM (DICM magic) is parsed once, its declared size
    checked against ``max_pixels`` (when given) before its pixels are decoded, and its dataset
    kept for the markers and the results; PNG/JPEG go through the file reader."""
    if not has_dicom_magic(data):
        if max_pixels is not None:
            check_declared_size(data, max_pixels, name)
        return DecodedImage(_decode_via_file(data, name))
    ds = parse_dicom(io.BytesIO(data), name)
    if max_pixels is not None:
        _check_size(dicom_size(ds), max_pixels, name)
    grey = dicom_to_grey(ds, name)
    check_shape(grey, name, [])
    return DecodedImage(grey, ds)


def _decode_via_file(data: bytes, name: str) -> np.ndarray:
    """PNG/JPEG bytes through :func:`read_image` (a temporary file; errors name ``name``)."""
    import tempfile

    with tempfile.NamedTemporaryFile() as fh:
        fh.write(data)
        fh.flush()
        try:
            return read_image(Path(fh.name))
        except DataError as e:
            raise DataError(str(e).replace(fh.name, name)) from e


class ImageTooLarge(DataError):
    """An image whose declared pixel count exceeds the limit (refused before decoding)."""


def declared_size(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, frames) from the header alone (PNG/JPEG via PIL, DICOM via pydicom
    without pixel data); None when the header is not recognised (the decoder then says why)."""
    import warnings

    if has_dicom_magic(data):
        import pydicom

        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        except Exception:  # noqa: BLE001 - an unreadable header is for the decoder to report
            return None
        return dicom_size(ds)
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:  # lazy: reads the header only
                return img.size[0], img.size[1], int(getattr(img, "n_frames", 1) or 1)
    except Image.DecompressionBombError:  # over twice PIL's own limit: the caller refuses it
        raise
    except Exception:  # noqa: BLE001 - unknown formats are reported by the decoder
        return None


def dicom_size(ds: Dataset) -> tuple[int, int, int] | None:
    """(width, height, frames) a parsed DICOM declares (None: no usable Rows/Columns)."""
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        return int(ds.Columns), int(ds.Rows), max(frames, 1)
    except Exception:  # noqa: BLE001 - an unusable header is for the decoder to report
        return None


def check_declared_size(data: bytes, max_pixels: int, name: str = "upload") -> None:
    """Refuse an image whose header declares more than ``max_pixels`` pixels, before decoding."""
    from PIL import Image

    try:
        size = declared_size(data)
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(
            f"{name}: image declares over {2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f} MP, over "
            f"the {max_pixels / 1e6:.1f} MP limit (--max-pixels): refused before decoding as a "
            "possible decompression bomb"
        ) from e
    _check_size(size, max_pixels, name)


def _check_size(size: tuple[int, int, int] | None, max_pixels: int, name: str) -> None:
    if size is None:
        return
    width, height, frames = size
    pixels = width * height * frames
    if pixels > max_pixels:
        what = f"{width}x{height} px" + (f" x {frames} frames" if frames > 1 else "")
        raise ImageTooLarge(
            f"{name}: image declares {what} ({pixels / 1e6:.1f} MP), over the "
            f"{max_pixels / 1e6:.1f} MP limit (--max-pixels): refused before decoding as a "
            "possible decompression bomb"
        )


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


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive chunks of ``items`` of at most ``size``."""
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + size]


class CalibrationBatcher:
    """Full ``batch`` × C × H × W float32 batches of preprocessed site images, in order.

    INT8 calibration (onnxruntime's QDQ tools and TensorRT) feeds fixed-size batches: the last
    one is completed by repeating its images.
    """

    def __init__(
        self, paths: Sequence[Path], spec: InputSpec, *, batch: int, max_images: int = 256
    ) -> None:
        if batch < 1:
            raise EdgeError(f"calibration batch must be ≥ 1, got {batch}")
        self.paths, self.spec, self.batch = list(paths)[:max_images], spec, batch

    def __len__(self) -> int:
        return -(-len(self.paths) // self.batch)

    def __iter__(self) -> Iterator[np.ndarray]:
        for chunk in batches(self.paths, self.batch):
            x = np.stack([load(p, self.spec)[0] for p in chunk]).astype(np.float32)
            if len(x) < self.batch:
                x = np.concatenate([x, x[np.arange(self.batch - len(x)) % len(x)]])
            yield np.ascontiguousarray(x)
