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
