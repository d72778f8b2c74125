"""The numpy preprocessing of the bedside box equals the training preprocessing (torch)."""

import numpy as np
import pytest

from fedbridge_edge.preprocess import InputSpec, batches, list_images, load
from fedbridge_shared.data.tensors import load_resized, to_tensor
from fedbridge_shared.spec import ModelSpec


@pytest.mark.parametrize("in_chans,size", [(3, 128), (1, 96)])
def test_numpy_preprocessing_matches_to_tensor_on_real_images(cxr_root, oct_root, in_chans, size):
    spec = ModelSpec(
        arch="x",
        labels=("a", "b"),
        image_size=size,
        in_chans=in_chans,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    )
    edge_spec = InputSpec.from_spec(spec.to_dict())
    paths = list_images([cxr_root])[::97] + list_images([oct_root])[::120]
    assert len(paths) >= 8
    for path in paths:
        x, grey = load(path, edge_spec)
        expected = to_tensor(load_resized(path, size), spec).numpy()
        assert x.dtype == np.float32 and x.shape == expected.shape == (in_chans, size, size)
        np.testing.assert_allclose(x, expected, rtol=0, atol=1e-6)
        assert grey.shape == (size, size) and grey.dtype == np.uint8


def test_monochrome1_dicom_gives_the_displayed_pixels(bad_inputs):
    """Rescale slope/intercept, VOI window and MONOCHROME1 inversion come out as the source."""
    from badinputs import dicom_oracle, source_grey

    from fedbridge_edge.preprocess import resize

    spec = InputSpec(image_size=32, in_chans=1, mean=(0.0,), std=(1.0,))
    x, grey = load(bad_inputs["dicom_mono1"], spec)
    expected = resize(np.uint8(dicom_oracle(source_grey())), 32)
    assert np.abs(grey.astype(int) - expected.astype(int)).max() <= 2
    np.testing.assert_allclose(x[0], grey / 255.0, atol=1e-6)


def test_batches_cover_every_item_once():
    chunks = list(batches(list(range(10)), 4))
    assert [len(c) for c in chunks] == [4, 4, 2]
    assert sum(chunks, []) == list(range(10))


def test_check_declared_size_reads_headers_only(bad_inputs, tmp_path):
    """PNG (IHDR), JPEG (SOF) and DICOM (Rows × Columns) sizes are refused above the limit."""
    import io

    import pydicom
    from badinputs import write_bomb_png
    from PIL import Image

    from fedbridge_edge.preprocess import ImageTooLarge, check_declared_size, declared_size

    dicom = bad_inputs["dicom_mono1"].read_bytes()
    ds = pydicom.dcmread(io.BytesIO(dicom))
    assert declared_size(dicom) == (ds.Columns, ds.Rows, 1)
    buf = io.BytesIO()
    Image.new("L", (300, 200)).save(buf, "JPEG")
    assert declared_size(buf.getvalue()) == (300, 200, 1)
    check_declared_size(buf.getvalue(), 300 * 200)  # at the limit: accepted
    for data, limit, needle in (
        (buf.getvalue(), 300 * 200 - 1, "300x200 px"),
        (dicom, ds.Columns * ds.Rows - 1, f"{ds.Columns}x{ds.Rows} px"),
        (write_bomb_png(tmp_path / "bomb.png", 20000).read_bytes(), 10**8, "over 179 MP"),
    ):
        with pytest.raises(ImageTooLarge, match="refused before decoding") as e:
            check_declared_size(data, limit, "scan.x")
        assert needle in str(e.value) and str(e.value).startswith("scan.x: ")
    assert declared_size(b"not an image" * 20) is None  # left to the decoder to explain
