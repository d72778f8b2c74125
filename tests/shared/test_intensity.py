"""CLAHE intensity normalisation: OpenCV's result, recorded in the spec, the same at the bedside."""

import cv2
import numpy as np
import pytest
import torch

from fedbridge_edge.preprocess import InputSpec, list_images, load
from fedbridge_shared.data.images import read_image
from fedbridge_shared.data.pixels import intensity, normalise, resize
from fedbridge_shared.data.tensors import ImageDataset, load_resized, to_tensor
from fedbridge_shared.errors import BundleError
from fedbridge_shared.spec import ModelSpec, load_bundle, read_bundle_record, save_bundle

CLAHE = ModelSpec(arch="test_efficientnet", labels=("NORMAL", "COVID19"), image_size=64,
                  intensity="clahe")  # fmt: skip


def test_clahe_equals_opencv_on_a_real_radiograph(cxr_root):
    img = resize(read_image(list_images([cxr_root])[0]), 128)
    expected = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(img)
    out = intensity(img, "clahe")
    assert out.dtype == np.uint8 and np.array_equal(out, expected)
    assert not np.array_equal(out, img)  # it changed the pixels
    assert intensity(img, "none") is img


def test_normalise_applies_the_spec_intensity(cxr_root):
    img = resize(read_image(list_images([cxr_root])[5]), 64)
    spec = InputSpec(64, 1, (0.0,), (1.0,), "clahe")
    x = normalise(img, spec)
    np.testing.assert_array_equal(x[0], intensity(img, "clahe").astype(np.float32) / 255)


def test_training_and_the_bedside_preprocess_a_clahe_bundle_identically(cxr_root, tmp_path):
    save_bundle(tmp_path / "b", CLAHE, {"w": torch.zeros(1)})
    record = read_bundle_record(tmp_path / "b")
    assert record["spec"]["intensity"] == "clahe"
    spec = load_bundle(tmp_path / "b").spec
    edge_spec = InputSpec.from_spec(record["spec"])  # what the ONNX metadata carries
    assert spec.intensity == edge_spec.intensity == "clahe"
    paths = list_images([cxr_root])[::150]
    assert len(paths) >= 3
    images = [load_resized(p, 64) for p in paths]
    dataset = ImageDataset(images, [0] * len(images), spec)  # the training loader's items
    for i, path in enumerate(paths):
        x, _ = load(path, edge_spec)
        np.testing.assert_array_equal(x, to_tensor(images[i], spec).numpy())
        np.testing.assert_array_equal(x, dataset[i][0].numpy())
        plain = to_tensor(images[i], ModelSpec(arch="x", labels=("a", "b"), image_size=64))
        assert not np.array_equal(x, plain.numpy())


def test_a_spec_without_intensity_reads_as_none_and_keeps_its_seal(tmp_path):
    plain = ModelSpec(arch="test_efficientnet", labels=("A", "B"), image_size=32)
    assert "intensity" not in plain.to_dict()  # old model.json files have no such key
    save_bundle(tmp_path / "b", plain, {"w": torch.zeros(1)})
    assert load_bundle(tmp_path / "b").spec.intensity == "none"
    assert InputSpec.from_spec(plain.to_dict()).intensity == "none"


def test_an_unknown_intensity_is_refused():
    with pytest.raises(BundleError, match="intensity 'gamma'"):
        ModelSpec(arch="x", labels=("a", "b"), image_size=32, intensity="gamma")
    with pytest.raises(ValueError, match="intensity 'gamma'"):
        intensity(np.zeros((4, 4), np.uint8), "gamma")


def test_a_clahe_bridge_makes_a_clahe_target(tmp_path):
    import dataclasses

    from fedbridge_shared.models import init_model

    model, spec = init_model("none", ("NORMAL", "VIRAL_PNEUMONIA"), "test_efficientnet", 32)
    bridge = save_bundle(
        tmp_path / "bridge", dataclasses.replace(spec, intensity="clahe"), model.state_dict()
    )
    _, target = init_model(str(bridge), ("COVID19", "NORMAL", "VIRAL_PNEUMONIA"))
    assert target.intensity == "clahe" and target.init["head"] == "mapped"


def test_explain_feeds_a_clahe_model_the_pixels_training_did(cxr_root, tmp_path):
    """explain hands GreyModel intensity(load_resized(...)): the logits of training's input."""
    import dataclasses

    from fedbridge_shared.explain.methods import images_to_batch, load_explainer
    from fedbridge_shared.models import build_model, init_model

    torch.manual_seed(0)
    model, spec = init_model("none", ("NORMAL", "COVID19"), "test_efficientnet", 64)
    spec = dataclasses.replace(spec, intensity="clahe")
    bundle = load_bundle(save_bundle(tmp_path / "b", spec, model.state_dict()))
    images = [load_resized(p, 64) for p in list_images([cxr_root])[::200]]
    plain = build_model(spec)
    plain.load_state_dict(bundle.state_dict)
    with torch.no_grad():
        grey = load_explainer(bundle)(
            images_to_batch([intensity(i, "clahe") for i in images], "cpu")
        )
        trained = plain.eval()(torch.stack([to_tensor(i, spec) for i in images]))
    torch.testing.assert_close(grey, trained, rtol=1e-5, atol=1e-5)
