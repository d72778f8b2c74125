"""Generated test inputs: broken image files, valid-but-unusual ones, and small class-folder trees.

Everything is written into a directory the caller owns (a pytest ``tmp_path``); nothing from
``../shared/data`` is modified. Reuse ``make_class_tree`` for CLI tests.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"

# Files read_image must refuse with a DataError (key -> words expected in the message).
BAD_KEYS = {
    "truncated_jpeg": "truncated or corrupt",
    "empty_png": "empty file",
    "text_png": "not a readable image",
    "dicom_no_pixels": "no pixel data",
    "tiny_png": "too small",
}
# Valid files in unusual encodings that read_image must decode.
UNUSUAL_KEYS = ("png16", "rgba_png", "palette_png", "cmyk_jpeg", "dicom_mono1")

# The MONOCHROME1 DICOM: stored = source_grey * 16 (12 bits), modality = stored * SLOPE + INTERCEPT,
# displayed through a LINEAR window (CENTER, WIDTH), then inverted.
DICOM_SLOPE = 2.0
DICOM_INTERCEPT = -1000.0
DICOM_CENTER = 3000.0
DICOM_WIDTH = 4000.0


def default_source() -> Path | None:
    """Return one real greyscale JPEG from ../shared/data, or None when the folder is absent."""
    folder = DATA / "cxr" / "NORMAL"
    if not folder.is_dir():
        return None
    jpegs = sorted(folder.glob("kermany_*.jp*g"))
    return jpegs[0] if jpegs else None


def source_grey(source: Path | None = None, size: tuple[int, int] = (96, 80)) -> np.ndarray:
    """Return the source image as uint8 greyscale resized to ``size`` (W, H); synthetic if None."""
    source = source or default_source()
    if source is None:
        yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
        return ((xx * 7 + yy * 3) % 256).astype(np.uint8)
    with Image.open(source) as img:
        return np.asarray(img.convert("L").resize(size, Image.Resampling.BILINEAR))


def alpha_ramp(shape: tuple[int, int]) -> np.ndarray:
    """Return the alpha channel used by the RGBA PNG: 0 at the left edge, 255 at the right."""
    height, width = shape
    ramp = np.rint(np.linspace(0, 255, width)).astype(np.uint8)
    return np.broadcast_to(ramp, (height, width)).copy()


def dicom_oracle(grey: np.ndarray) -> np.ndarray:
    """Return the uint8 display a correct reader must produce for ``write_dicom(..., grey)``."""
    modality = grey.astype(np.float64) * 16 * DICOM_SLOPE + DICOM_INTERCEPT
    # DICOM PS3.3 C.11.2.1.2.1 (LINEAR): c' = c - 0.5, w' = w - 1, output in [0, 1].
    center, width = DICOM_CENTER - 0.5, DICOM_WIDTH - 1
    unit = np.clip((modality - center) / width + 0.5, 0.0, 1.0)
    return np.rint((1.0 - unit) * 255).astype(np.uint8)


def write_dicom(path: Path, grey: np.ndarray | None, *, monochrome1: bool = True) -> Path:
    """Write an uncompressed 12-bit DICOM (rescale + window); ``grey=None`` omits pixel data."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = "TEST-0001"
    ds.Modality = "DX"
    if grey is not None:
        stored = grey.astype(np.uint16) * 16
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
        ds.RescaleSlope = DICOM_SLOPE
        ds.RescaleIntercept = DICOM_INTERCEPT
        ds.WindowCenter = DICOM_CENTER
        ds.WindowWidth = DICOM_WIDTH
        ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def make_bad_inputs(directory: Path, source: Path | None = None) -> dict[str, Path]:
    """Write every file in BAD_KEYS and UNUSUAL_KEYS into ``directory``; return key -> path.

    ``source`` is a real JPEG (default: one from ../shared/data; a synthetic pattern if absent).
    The unusual files all hold ``source_grey(source)`` (96x80) so a reader can be checked.
    """
    directory.mkdir(parents=True, exist_ok=True)
    source = source or default_source()
    grey = source_grey(source)
    files: dict[str, Path] = {}

    jpeg_bytes = source.read_bytes() if source else _jpeg_bytes(grey)
    files["truncated_jpeg"] = directory / "truncated.jpg"
    files["truncated_jpeg"].write_bytes(jpeg_bytes[: len(jpeg_bytes) // 2])
    files["empty_png"] = directory / "empty.png"
    files["empty_png"].write_bytes(b"")
    files["text_png"] = directory / "notes.png"
    files["text_png"].write_text("this is a text file, not an image\n")
    files["dicom_no_pixels"] = write_dicom(directory / "no_pixels.dcm", None)
    files["tiny_png"] = directory / "tiny.png"
    Image.new("L", (1, 1), 128).save(files["tiny_png"])

    files["png16"] = directory / "sixteen_bit.png"
    Image.fromarray(grey.astype(np.uint16) * 257).save(files["png16"])  # 8-bit v -> 16-bit v*257
    files["rgba_png"] = directory / "rgba.png"
    rgba = np.dstack([grey, grey, grey, alpha_ramp(grey.shape)])
    Image.fromarray(rgba, mode="RGBA").save(files["rgba_png"])
    files["palette_png"] = directory / "palette.png"
    Image.fromarray(grey).convert("RGB").quantize(256).save(files["palette_png"])
    files["cmyk_jpeg"] = directory / "cmyk.jpg"
    Image.fromarray(grey).convert("RGB").convert("CMYK").save(files["cmyk_jpeg"], quality=98)
    files["dicom_mono1"] = write_dicom(directory / "mono1.dcm", grey)
    return files


def _jpeg_bytes(grey: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_class_tree(
    directory: Path,
    src_root: Path,
    per_class: int = 4,
    bad: bool = False,
    empty_class: str | None = None,
) -> Path:
    """Copy the first ``per_class`` images of each class folder of ``src_root`` into ``directory``.

    ``bad=True`` adds the BAD_KEYS files (named ``bad_<key>.<ext>``) to the first class;
    ``empty_class`` adds an empty class folder of that name. Returns ``directory``.
    """
    classes = sorted(p for p in src_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for cls in classes:
        target = directory / cls.name
        target.mkdir(parents=True, exist_ok=True)
        images = sorted(p for p in cls.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
        for image in images[:per_class]:
            shutil.copy(image, target / image.name)
    if bad:
        files = make_bad_inputs(directory / ".bad-tmp")
        for key in BAD_KEYS:
            shutil.move(files[key], directory / classes[0].name / f"bad_{key}{files[key].suffix}")
        shutil.rmtree(directory / ".bad-tmp")
    if empty_class:
        (directory / empty_class).mkdir(parents=True, exist_ok=True)
    return directory


# More bad inputs for the reliability suite (tests/reliability/): files and folder layouts that
# every command reading a dataset must refuse with one line naming the file (key -> words).
MORE_BAD_KEYS = {
    "bomb_png": "decompression bomb",
    "dicom_jpegls": "cannot decode DICOM pixel data",
    "nonutf8_name": "not valid UTF-8",
    "nan_float_tiff": "NaN or infinite",
    "dicom_nan_slope": "RescaleSlope NaN is not a finite number",
    "dicom_inf_window": "WindowWidth inf is not a finite number",
    "dicom_seg": "DICOM Modality SEG is a segmentation",
    "dicom_1bit": "1-bit pixels",
    "dicom_two_slopes": "RescaleSlope has 2 values",
}
BOMB_SIDE = 20_000  # 400 M pixels claimed by a PNG of under 1 kB


def write_bomb_png(path: Path, side: int = BOMB_SIDE) -> Path:
    """A tiny PNG whose header claims ``side`` x ``side`` greyscale pixels (a decompression bomb).

    The IHDR chunk of a real 8x8 PNG is rewritten (with its CRC), so the file parses as a PNG
    and only a reader that checks the size before decoding refuses it cheaply.
    """
    import io
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.new("L", (8, 8), 0).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", side, side)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def write_jpegls_dicom(path: Path, grey: np.ndarray) -> Path:
    """A DICOM that declares JPEG-LS Lossless pixel data (garbage; no decoder is installed)."""
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless

    write_dicom(path, grey)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\x00\x01" * 64])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def write_nan_float_tiff(path: Path, grey: np.ndarray) -> Path:
    """A 32-bit float TIFF (PIL mode F) with one NaN pixel, saved under a .png name."""
    values = grey.astype(np.float32)
    values[3, 5] = np.nan
    Image.fromarray(values, mode="F").save(path, format="TIFF")
    return path


def write_edited_dicom(path: Path, grey: np.ndarray, **attrs) -> Path:
    """The test DICOM with some attributes overwritten (e.g. RescaleSlope='NaN')."""
    import pydicom

    write_dicom(path, grey)
    ds = pydicom.dcmread(path)
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_1bit_dicom(path: Path, grey: np.ndarray, *, modality: str = "OT") -> Path:
    """A 1-bit mask DICOM (as a DICOM SEG stores its frames)."""
    import pydicom

    write_dicom(path, grey)
    ds = pydicom.dcmread(path)
    bits = np.packbits((grey > 127).astype(np.uint8), bitorder="little")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    for tag in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        delattr(ds, tag)
    ds.Modality = modality
    ds.PixelData = bits.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def nonutf8_name(stem: str = "scan", suffix: str = ".jpg") -> str:
    """A file name whose bytes are not UTF-8 (Latin-1 'é'), as Python sees it on Linux."""
    return os.fsdecode(stem.encode() + b"-\xe9" + suffix.encode())


def make_more_bad_inputs(directory: Path, source: Path | None = None) -> dict[str, Path]:
    """Write every file in MORE_BAD_KEYS into ``directory``; return key -> path."""
    directory.mkdir(parents=True, exist_ok=True)
    source = source or default_source()
    grey = source_grey(source)
    files = {
        "bomb_png": write_bomb_png(directory / "bomb.png"),
        "dicom_jpegls": write_jpegls_dicom(directory / "jpegls.dcm", grey),
        "nan_float_tiff": write_nan_float_tiff(directory / "nan-float.png", grey),
        "dicom_nan_slope": write_edited_dicom(
            directory / "nan-slope.dcm", grey, RescaleSlope="NaN"
        ),
        "dicom_inf_window": write_edited_dicom(
            directory / "inf-window.dcm", grey, WindowWidth="inf"
        ),
        "dicom_seg": write_1bit_dicom(directory / "seg.dcm", grey, modality="SEG"),
        "dicom_1bit": write_1bit_dicom(directory / "mask.dcm", grey),
        "dicom_two_slopes": write_edited_dicom(
            directory / "two-slopes.dcm", grey, RescaleSlope=["1", "2"]
        ),
    }
    files["nonutf8_name"] = directory / nonutf8_name()
    files["nonutf8_name"].write_bytes(_jpeg_bytes(grey))
    return files


def add_outside_symlink(data: Path, outside: Path, label: str | None = None) -> Path:
    """Put a symlink into a class folder of ``data`` that points at ``outside`` (a file)."""
    label = label or sorted(p.name for p in data.iterdir() if p.is_dir())[0]
    link = data / label / f"link-{outside.name}"
    link.symlink_to(outside)
    return link


def write_manifest(data: Path, rows: list[tuple[str, str, str]]) -> Path:
    """``data/MANIFEST.csv`` with (path, label, patient_id) rows, e.g. a ``../`` path."""
    lines = ["path,label,patient_id", *(",".join(r) for r in rows)]
    manifest = data / "MANIFEST.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


# ---------------------------------------------------------------- malformed MedMNIST archives

BAD_NPZ = {
    "huge_label": "means 1000000001 classes",
    "huge_header": "declares shape (100000000, 10000, 10000)",
    "not_npy_member": "train_images is not a .npy array",
    "zero_height": "are 0x28 pixels",
    "one_pixel": "are 1x1 pixels",
    "all_empty": "every split is empty",
}


def write_bad_npz(path: Path, kind: str) -> Path:
    """A .npz that np.load accepts (or nearly) but fedbridge must refuse by name (BAD_NPZ)."""
    import io
    import zipfile

    images = np.zeros((4, 28, 28), np.uint8)
    labels = np.array([0, 1, 0, 1], np.int64)
    if kind == "huge_label":
        labels = np.array([0, 1, 0, 10**9], np.int64)
    elif kind == "zero_height":
        images = np.zeros((4, 0, 28), np.uint8)
    elif kind == "one_pixel":
        images = np.zeros((4, 1, 1), np.uint8)
    elif kind == "all_empty":
        images, labels = np.zeros((0, 28, 28), np.uint8), np.zeros((0,), np.int64)
    if kind in ("huge_header", "not_npy_member"):
        with zipfile.ZipFile(path, "w") as zf:
            if kind == "huge_header":  # a valid .npy header claiming 8.9 PiB, no data
                head = io.BytesIO()
                np.lib.format.write_array_header_1_0(
                    head, {"descr": "|u1", "fortran_order": False, "shape": (10**8, 10**4, 10**4)}
                )
                zf.writestr("train_images.npy", head.getvalue())
            else:
                zf.writestr("train_images.npy", b"this is not an array")
            for name, array in (
                ("train_labels", labels),
                *(
                    (f"{split}_{what}", value)
                    for split in ("val", "test")
                    for what, value in (("images", images), ("labels", labels))
                ),
            ):
                buffer = io.BytesIO()
                np.save(buffer, array)
                zf.writestr(f"{name}.npy", buffer.getvalue())
        return path
    splits = {f"{split}_{what}": value for split in ("train", "val", "test")
              for what, value in (("images", images), ("labels", labels))}  # fmt: skip
    np.savez(path, **splits)
    return path


# Images that viewers show differently from their raw pixels (issue #30), made from real data.


def write_exif_rotated_png(path: Path, *, orientation: int = 6) -> Path:
    """The real source image stored so that EXIF ``orientation`` makes it upright: with 6 the
    pixels are stored turned 90° counter-clockwise (a viewer turns them back clockwise)."""
    grey = source_grey(size=(96, 64))
    turn = {1: None, 3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90,
            8: Image.Transpose.ROTATE_270}[orientation]  # fmt: skip
    img = Image.fromarray(grey)
    stored = img.transpose(turn) if turn is not None else img
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, exif=exif.tobytes())
    return path


def write_12bit_png(path: Path, *, sbit: int | None = 12) -> tuple[Path, np.ndarray]:
    """The real source image as 12-bit values (0..4095) in a 16-bit PNG, with an sBIT chunk
    saying 12 significant bits (or none). Returns the path and the 8-bit source."""
    from PIL.PngImagePlugin import PngInfo

    grey = source_grey(size=(96, 80))
    values = np.rint(grey.astype(np.float64) * 4095 / 255).astype(np.uint16)
    values[0, 0] = 4095  # the data range reaches 12 bits whatever the source's brightest pixel
    grey = grey.copy()
    grey[0, 0] = 255
    info = PngInfo()
    if sbit is not None:
        info.add(b"sBIT", bytes([sbit]))
    Image.fromarray(values).save(path, pnginfo=info)  # uint16: a 16-bit greyscale PNG
    return path, grey


def write_multiframe_dicom(path: Path, *, frames: int = 3) -> Path:
    """The test DICOM with ``frames`` frames: the real image, then black frames."""
    import pydicom

    grey = source_grey()
    write_dicom(path, grey)
    ds = pydicom.dcmread(path)
    stored = np.zeros((frames, *grey.shape), dtype=np.uint16)
    stored[0] = grey.astype(np.uint16) * 16
    ds.NumberOfFrames = frames
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_wide_png(path: Path, *, size: tuple[int, int] = (20000, 8)) -> Path:
    """The real source image stretched to ``size`` (W, H): an extreme aspect ratio."""
    Image.fromarray(source_grey(size=size)).save(path)
    return path
