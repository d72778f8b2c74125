"""read_image: every file becomes 2-D uint8 luminance; broken files raise a one-line DataError."""

import csv
import hashlib

import numpy as np
import pydicom
import pytest
from badinputs import (
    BAD_KEYS,
    alpha_ramp,
    dicom_oracle,
    source_grey,
    write_dicom,
)
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLSLossless

from fedbridge_shared.data import images
from fedbridge_shared.data.images import IMAGE_SUFFIXES, file_sha256, read_image
from fedbridge_shared.errors import DataError


@pytest.fixture
def grey():
    """The 96x80 greyscale picture every unusual file in bad_inputs holds."""
    return source_grey().astype(np.int64)


def test_suffixes():
    assert sorted(IMAGE_SUFFIXES) == [".dcm", ".dicom", ".jpeg", ".jpg", ".png"]
    assert isinstance(IMAGE_SUFFIXES, frozenset)


def test_real_greyscale_jpeg_matches_pil(cxr_root):
    path = sorted((cxr_root / "NORMAL").glob("kermany_*.jp*g"))[0]
    arr = read_image(path)
    with Image.open(path) as img:
        expected = np.asarray(img.convert("L"))
    assert arr.dtype == np.uint8 and arr.ndim == 2
    np.testing.assert_array_equal(arr, expected)


def test_real_rgb_jpeg_becomes_luminance(data_root):
    rows = list(csv.DictReader((data_root / "MANIFEST.csv").open()))
    path = data_root / next(r["path"] for r in rows if r["mode"] == "RGB")
    arr = read_image(path)
    with Image.open(path) as img:
        assert img.mode == "RGB"
        rgb = np.asarray(img).astype(np.float64)
    assert arr.shape == rgb.shape[:2]
    luminance = rgb @ [0.299, 0.587, 0.114]
    assert np.abs(arr - luminance).max() <= 1


@pytest.mark.parametrize("key", sorted(BAD_KEYS))
def test_bad_file_raises_one_line_error_naming_the_file(bad_inputs, key):
    path = bad_inputs[key]
    with pytest.raises(DataError) as info:
        read_image(path)
    message = str(info.value)
    assert path.name in message and BAD_KEYS[key] in message
    assert "\n" not in message


def test_truncated_jpeg_is_not_silently_padded(bad_inputs):
    with pytest.raises(DataError, match="truncated.jpg: truncated or corrupt image"):
        read_image(bad_inputs["truncated_jpeg"])


def test_16_bit_png_is_scaled_not_truncated(bad_inputs, grey):
    with Image.open(bad_inputs["png16"]) as img:
        assert img.mode.startswith("I")  # really a 16-bit file
    arr = read_image(bad_inputs["png16"])
    assert arr.dtype == np.uint8
    assert np.abs(arr - grey).max() <= 1
    assert arr.max() > 200  # truncation to the low byte would scramble the range


def test_rgba_is_composited_on_black(bad_inputs, grey):
    arr = read_image(bad_inputs["rgba_png"])
    expected = grey * alpha_ramp(grey.shape).astype(np.float64) / 255
    assert np.abs(arr - expected).max() <= 1
    assert arr[:, 0].max() == 0  # fully transparent column -> black


def test_palette_png_reads_as_its_grey_values(bad_inputs, grey):
    with Image.open(bad_inputs["palette_png"]) as img:
        assert img.mode == "P"
    assert np.abs(read_image(bad_inputs["palette_png"]) - grey).max() <= 1


def test_cmyk_jpeg_reads_as_luminance(bad_inputs, grey):
    with Image.open(bad_inputs["cmyk_jpeg"]) as img:
        assert img.mode == "CMYK"
    diff = np.abs(read_image(bad_inputs["cmyk_jpeg"]) - grey)
    assert diff.mean() < 1.5 and diff.max() <= 8  # JPEG loss only


def test_la_png_is_composited_on_black(tmp_path):
    path = tmp_path / "la.png"
    pixels = np.dstack([np.full((16, 16), 200, np.uint8), np.full((16, 16), 128, np.uint8)])
    Image.fromarray(pixels, mode="LA").save(path)
    assert np.abs(read_image(path).astype(int) - 100).max() <= 1


def test_dicom_monochrome1_rescale_and_window_match_oracle(bad_inputs, grey):
    arr = read_image(bad_inputs["dicom_mono1"])
    expected = dicom_oracle(grey)
    assert arr.shape == grey.shape
    assert np.abs(arr.astype(int) - expected).max() <= 1
    # The window clips both ends, and MONOCHROME1 puts the brightest stored values at black.
    assert (expected == 0).any() and (expected == 255).any()
    assert arr[grey == grey.max()].max() == 0


def test_dicom_monochrome2_is_the_inverse_of_monochrome1(tmp_path, grey):
    mono1 = read_image(write_dicom(tmp_path / "m1.dcm", grey.astype(np.uint8)))
    mono2 = read_image(write_dicom(tmp_path / "m2.dcm", grey.astype(np.uint8), monochrome1=False))
    assert np.abs(mono1.astype(int) + mono2 - 255).max() <= 1


def test_dicom_is_recognised_by_content_whatever_the_suffix(bad_inputs, tmp_path):
    disguised = tmp_path / "scan.png"
    disguised.write_bytes(bad_inputs["dicom_mono1"].read_bytes())
    np.testing.assert_array_equal(read_image(disguised), read_image(bad_inputs["dicom_mono1"]))


def test_multiframe_dicom_is_refused_not_read_as_its_first_frame(bad_inputs, tmp_path, grey):
    ds = pydicom.dcmread(bad_inputs["dicom_mono1"])
    frames = np.stack([grey, 255 - grey]).astype(np.uint16)
    ds.NumberOfFrames = 2
    ds.PhotometricInterpretation = "MONOCHROME2"
    for keyword in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        delattr(ds, keyword)
    ds.PixelData = frames.tobytes()
    path = tmp_path / "multi.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DataError, match=r"multi.dcm: multi-frame DICOM \(2 frames\)"):
        read_image(path)  # issue #30: frame 1 was used silently


def test_rgb_dicom_becomes_luminance(bad_inputs, tmp_path, grey):
    ds = pydicom.dcmread(bad_inputs["dicom_mono1"])
    rgb = np.dstack([grey, 255 - grey, np.zeros_like(grey)]).astype(np.uint8)
    ds.SamplesPerPixel, ds.PlanarConfiguration, ds.PhotometricInterpretation = 3, 0, "RGB"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    for keyword in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        delattr(ds, keyword)
    ds.PixelData = rgb.tobytes()
    path = tmp_path / "rgb.dcm"
    ds.save_as(path, enforce_file_format=True)
    luminance = rgb.astype(np.float64) @ [0.299, 0.587, 0.114]
    expected = (luminance - luminance.min()) * 255 / (luminance.max() - luminance.min())
    assert np.abs(read_image(path) - expected).max() <= 1


def test_undecodable_compressed_dicom_names_the_transfer_syntax(bad_inputs, tmp_path):
    ds = pydicom.dcmread(bad_inputs["dicom_mono1"])
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\x00\x01" * 64])
    ds["PixelData"].VR = "OB"
    path = tmp_path / "jpegls.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DataError, match="jpegls.dcm: cannot decode DICOM pixel data") as info:
        read_image(path)
    assert "JPEG-LS Lossless" in str(info.value) and "\n" not in str(info.value)


def test_text_file_named_dcm_is_not_a_dicom(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("hello\n")
    with pytest.raises(DataError, match="notes.dcm: not a readable DICOM"):
        read_image(path)


def test_decompression_bomb_limits(bad_inputs, monkeypatch):
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    with pytest.raises(DataError, match="decompression bomb"):
        read_image(bad_inputs["png16"])
    with pytest.raises(DataError, match="decompression bomb"):
        read_image(bad_inputs["dicom_mono1"])
    monkeypatch.setattr(images, "MAX_PIXELS", 10**9)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL's own guard fires at 2x
    with pytest.raises(DataError, match="decompression bomb"):
        read_image(bad_inputs["png16"])


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(DataError, match="nope.png: not a file"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(DataError, match="not a file"):
        read_image(tmp_path)


def test_file_sha256_matches_manifest(data_root, tmp_path):
    row = next(csv.DictReader((data_root / "MANIFEST.csv").open()))
    assert file_sha256(data_root / row["path"]) == row["sha256"]
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * 10_000)  # several chunks
    assert file_sha256(big, chunk_size=4096) == hashlib.sha256(big.read_bytes()).hexdigest()
