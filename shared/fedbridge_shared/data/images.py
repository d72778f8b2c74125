"""Read PNG, JPEG and DICOM files as 2-D uint8 greyscale arrays (single-channel luminance)."""

from __future__ import annotations

import hashlib
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fedbridge_shared.errors import DataError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".dcm", ".dicom"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
MAX_PIXELS = 100_000_000  # larger images are refused as possible decompression bombs
MIN_SIDE = 8  # smaller images carry no usable detail
MAX_ASPECT = 4.0  # a longer side over 4x the shorter is squashed noticeably by the square resize
EXIF_ORIENTATION = 0x0112
_TURNS = {2: "mirrored", 3: "rotated 180°", 4: "flipped", 5: "transposed", 6: "rotated 90°",
          7: "transversed", 8: "rotated 270°"}  # fmt: skip


def has_dicom_magic(head: bytes) -> bool:
    """A DICOM Part 10 file: ``DICM`` after the 128-byte preamble (``head`` = its first bytes)."""
    return head[128:132] == b"DICM"


@dataclass(frozen=True)
class DecodedImage:
    """An image decoded once: its greyscale pixels and, for a DICOM, the dataset they were
    decoded from (whose header gives markers and study UIDs without parsing the file again)."""

    grey: np.ndarray
    dicom: Dataset | None = None


def read_image(path: Path, *, notes: list[str] | None = None) -> np.ndarray:
    """Decode an image file fully and return it as a 2-D uint8 greyscale array (H, W).

    EXIF orientation is applied (the image as every viewer shows it); a 16-bit PNG is scaled
    by its real bit depth (sBIT, else the data range); a multi-frame DICOM is refused. What a
    user may want to know (orientation applied, bit depth, an extreme aspect ratio) is appended
    to ``notes`` as one-line texts without the path.
    """
    return decode_image(path, notes=notes).grey


def decode_image(path: Path, *, notes: list[str] | None = None) -> DecodedImage:
    """:func:`read_image`, keeping a DICOM's parsed dataset (the file is parsed once)."""
    path = Path(path)
    notes = [] if notes is None else notes
    try:
        if not path.is_file():
            raise DataError(f"{path}: not a file")
        if path.stat().st_size == 0:
            raise DataError(f"{path}: empty file")
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({_one_line(e)})") from e
    is_dicom = has_dicom_magic(head)
    if is_dicom or path.suffix.lower() in DICOM_SUFFIXES:
        ds = parse_dicom(path, path)
        if "PixelData" not in ds and not is_dicom:
            raise DataError(f"{path}: not a readable DICOM file (no DICM header, no pixel data)")
        decoded = DecodedImage(dicom_to_grey(ds, path), ds)
    else:
        decoded = DecodedImage(_read_pil(path, notes))
    check_shape(decoded.grey, path, notes)
    return decoded


def check_shape(arr: np.ndarray, name: str | Path, notes: list[str]) -> None:
    """Refuse an image with a side under :data:`MIN_SIDE`; note an extreme aspect ratio."""
    height, width = arr.shape
    if min(arr.shape) < MIN_SIDE:
        raise DataError(
            f"{name}: image too small ({width}x{height} px; each side needs at least {MIN_SIDE} px)"
        )
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT:
        notes.append(
            f"extreme aspect ratio {ratio:.3g}:1 ({width}x{height} px): the square resize "
            "distorts it; crop it to the region of interest"
        )


def file_sha256(path: Path, chunk_size: int = 1 << 20) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    try:
        with Path(path).open("rb") as fh:
            while chunk := fh.read(chunk_size):
                digest.update(chunk)
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({_one_line(e)})") from e
    return digest.hexdigest()


def _one_line(exc: BaseException) -> str:
    """Return an exception's text collapsed onto one line."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _check_pixel_count(path: str | Path, width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise DataError(
            f"{path}: image has {width}x{height} pixels, more than the limit of {MAX_PIXELS:,} "
            "(possible decompression bomb)"
        )


def _read_pil(path: Path, notes: list[str]) -> np.ndarray:
    """Open with PIL, decode every byte (so truncation is caught), apply the EXIF orientation
    and convert to luminance."""
    try:
        with warnings.catch_warnings():
            # PIL warns above its own limit; MAX_PIXELS below is the limit that applies here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                _check_pixel_count(path, *img.size)
                img.load()
                sbit = _png_sbit(path) if img.format == "PNG" else None
                upright = _exif_upright(img, notes)
                return _pil_to_grey(upright, sbit=sbit, notes=notes)
    except DataError as e:
        if str(e).startswith(str(path)):
            raise
        raise DataError(f"{path}: {e}") from e
    except Image.DecompressionBombError as e:
        raise DataError(
            f"{path}: image too large, possible decompression bomb ({_one_line(e)})"
        ) from e
    except UnidentifiedImageError as e:
        raise DataError(f"{path}: not a readable image (unknown or unsupported format)") from e
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        raise DataError(f"{path}: truncated or corrupt image ({_one_line(e)})") from e


def _exif_upright(img: Image.Image, notes: list[str]) -> Image.Image:
    """The image as viewers show it: its EXIF orientation (tag 274) applied."""
    try:
        orientation = int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # a malformed EXIF block: the pixels as stored
        return img
    if orientation not in _TURNS:
        return img
    notes.append(f"EXIF orientation {orientation} applied ({_TURNS[orientation]})")
    return ImageOps.exif_transpose(img)


def _png_sbit(path: Path) -> int | None:
    """The significant bits of a PNG's first channel from its sBIT chunk (None without one).

    PIL keeps no sBIT when reading, so the chunks before IDAT are walked here (bounded: at
    most 64 chunks, each length checked against the file).
    """
    try:
        with Path(path).open("rb") as fh:
            if fh.read(8) != b"\x89PNG\r\n\x1a\n":
                return None
            for _ in range(64):
                head = fh.read(8)
                if len(head) < 8:
                    return None
                length, kind = struct.unpack(">I4s", head)
                if kind == b"sBIT":
                    data = fh.read(min(length, 4))
                    return data[0] if data and 1 <= data[0] <= 16 else None
                if kind in (b"IDAT", b"IEND"):
                    return None
                fh.seek(length + 4, 1)
    except OSError:
        return None
    return None


def _pil_to_grey(
    img: Image.Image, *, sbit: int | None = None, notes: list[str] | None = None
) -> np.ndarray:
    """Convert any PIL mode to 8-bit luminance; alpha is composited on black."""
    mode = img.mode
    if mode == "L":
        return np.array(img, dtype=np.uint8)
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(img).astype(np.int64)
        if values.min() >= 0 and values.max() <= 65535:
            bits, source = _bit_depth(int(values.max()), sbit)
            if bits < 16 and notes is not None:
                notes.append(
                    f"16-bit PNG with {bits} significant bits ({source}): "
                    f"0..{(1 << bits) - 1} read as 0..255"
                )
            top = (1 << bits) - 1
            return ((np.minimum(values, top) * 255 + top // 2) // top).astype(np.uint8)
        return _minmax_uint8(values)
    if mode == "F":
        return _minmax_uint8(np.asarray(img, dtype=np.float64))
    if mode == "P":
        return np.array(img.convert("RGB").convert("L"), dtype=np.uint8)
    if "A" in img.getbands():  # RGBA, LA, PA, ...: composite on black
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return np.array(Image.alpha_composite(black, rgba).convert("L"), dtype=np.uint8)
    if mode in ("1", "RGB"):
        return np.array(img.convert("L"), dtype=np.uint8)
    # CMYK, YCbCr, LAB, HSV, RGBX, ...: go through RGB so each mode's own conversion applies.
    return np.array(img.convert("RGB").convert("L"), dtype=np.uint8)


def _bit_depth(peak: int, sbit: int | None) -> tuple[int, str]:
    """Significant bits of 16-bit data: the PNG's sBIT when the data fit it, else the fewest
    bits (at least 8) that hold the brightest pixel, as DICOM's BitsStored would say."""
    if sbit is not None and 8 <= sbit <= 16 and peak < (1 << sbit):
        return sbit, "sBIT"
    return max(8, peak.bit_length()), "data range"


def _minmax_uint8(values: np.ndarray) -> np.ndarray:
    """Scale an array linearly so its minimum is 0 and its maximum 255 (all values finite)."""
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise DataError(f"pixel values are NaN or infinite ({bad} of {values.size})")
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


def parse_dicom(source: Path | BinaryIO, name: str | Path) -> Dataset:
    """Parse a DICOM file or buffer once, pixels included (errors name ``name``)."""
    import pydicom

    try:
        return pydicom.dcmread(source, force=True)
    except Exception as e:
        raise DataError(f"{name}: not a readable DICOM file ({_one_line(e)})") from e


def dicom_to_grey(ds: Dataset, name: str | Path) -> np.ndarray:
    """The first frame of an already parsed DICOM dataset as display greyscale (uint8), so a
    caller holding the dataset (a DICOM listener) decodes it without writing or parsing again;
    errors name ``name``."""
    from pydicom.pixels import pixel_array  # type: ignore[attr-defined]  # pydicom.pixels has no __all__

    path = name
    if "PixelData" not in ds:
        raise DataError(f"{path}: DICOM has no pixel data")
    _check_dicom_kind(path, ds)
    frames = _int_or(ds.get("NumberOfFrames"), 1)
    if frames > 1:
        raise DataError(
            f"{path}: multi-frame DICOM ({frames} frames); fedbridge reads one image per file: "
            "save the frame you mean as its own single-frame file"
        )
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    _check_pixel_count(path, cols, rows)
    try:
        arr = pixel_array(ds, index=0)
    except Exception as e:
        meta = getattr(ds, "file_meta", None)
        syntax = meta.get("TransferSyntaxUID") if meta is not None else None
        name = f"{syntax.name} ({syntax})" if syntax else "unknown transfer syntax"
        raise DataError(f"{path}: cannot decode DICOM pixel data in {name} ({_one_line(e)})") from e
    try:
        grey = _dicom_to_grey(arr, ds)
    except DataError as e:
        if str(e).startswith(str(path)):
            raise
        raise DataError(f"{path}: {e}") from e
    except Exception as e:
        raise DataError(f"{path}: cannot apply the DICOM pixel transforms ({_one_line(e)})") from e
    if min(grey.shape) < MIN_SIDE:
        height, width = grey.shape
        raise DataError(
            f"{path}: image too small ({width}x{height} px; each side needs at least {MIN_SIDE} px)"
        )
    return grey


def _int_or(value: Any, default: int) -> int:
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


NOT_IMAGES = {
    "SEG": "a segmentation", "SR": "a structured report", "RTSTRUCT": "an RT structure set",
    "RTPLAN": "an RT plan", "RTDOSE": "an RT dose", "KO": "a key-object selection",
    "PR": "a presentation state", "DOC": "an encapsulated document", "REG": "a registration",
}  # fmt: skip
PHOTOMETRIC = {"MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL",
               "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420"}  # fmt: skip


def _check_dicom_kind(path: str | Path, ds: Dataset) -> None:
    """Refuse DICOM objects that are not images fedbridge can interpret, by name."""
    from pydicom.multival import MultiValue

    modality = str(ds.get("Modality", "")).upper()
    if modality in NOT_IMAGES:
        raise DataError(
            f"{path}: DICOM Modality {modality} is {NOT_IMAGES[modality]}, not an image"
        )
    if int(ds.get("BitsAllocated", 8) or 8) == 1:
        raise DataError(f"{path}: DICOM with 1-bit pixels (a mask or overlay), not an image")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in PHOTOMETRIC:
        raise DataError(f"{path}: DICOM PhotometricInterpretation {photometric} not supported")
    for tag in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        if tag in ds:
            value = ds.get(tag)
            if value is None or value == "":
                continue  # an empty optional attribute: as if absent
            values = list(value) if isinstance(value, MultiValue) else [value]
            if tag.startswith("Rescale") and len(values) != 1:
                raise DataError(f"{path}: DICOM {tag} has {len(values)} values; expected one")
            try:
                finite = all(np.isfinite(float(v)) for v in values)
            except (TypeError, ValueError):
                finite = False
            if not finite:
                raise DataError(f"{path}: DICOM {tag} {value} is not a finite number")
    if "RescaleSlope" in ds and float(ds.RescaleSlope) == 0:
        raise DataError(f"{path}: DICOM RescaleSlope is 0 (every pixel the same)")


def _dicom_to_grey(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Apply modality LUT/rescale, VOI LUT/window and MONOCHROME1 inversion; scale to uint8."""
    from pydicom.pixels import (  # type: ignore[attr-defined]  # pydicom.pixels has no __all__
        apply_color_lut,
        apply_modality_lut,
        apply_voi,
        apply_windowing,
    )

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.ndim == 3:  # colour (RGB after pydicom's YBR conversion): ITU-R 601 luminance
        rgb = arr[..., :3].astype(np.float64)
        return _minmax_uint8(rgb @ np.array([0.299, 0.587, 0.114]))
    values = apply_modality_lut(arr, ds)
    out_range: tuple[float, float] | None = None
    if ds.get("VOILUTSequence"):
        values = apply_voi(values, ds)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            windowed = apply_windowing(values, ds)
            ends = apply_windowing(np.array([-np.inf, np.inf]), ds)
        except ValueError:
            pass  # a malformed window (e.g. width 0) is ignored: full range shown instead
        else:
            values, out_range = windowed, (float(ends[0]), float(ends[1]))
    if out_range is not None and out_range[0] != out_range[1]:
        # Scale by the window's output range, not the image's, so the window is honoured.
        low, high = out_range
        unit = np.clip((values.astype(np.float64) - low) / (high - low), 0.0, 1.0)
    else:
        unit = _minmax_uint8(values).astype(np.float64) / 255.0
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit
    return np.rint(unit * 255.0).astype(np.uint8)
