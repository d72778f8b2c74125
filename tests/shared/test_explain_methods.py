"""Attribution maps on a tiny model trained on real chest X-rays: shapes, oracles, sanity check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from fedbridge_shared.data.tensors import load_resized
from fedbridge_shared.errors import ConfigError
from fedbridge_shared.explain import methods as M
from fedbridge_shared.explain import sanity as S
from fedbridge_shared.explain.overlay import colour_scale, overlay_png
from fedbridge_shared.explain.run import resolve_target
from fedbridge_shared.spec import load_bundle
from fedbridge_shared.training import TrainConfig, run_stage

SIZE = 96  # test_efficientnet's last feature map is 3 × 3 at this size


def subset_tree(src: Path, dst: Path, per_class: int, skip: int = 0) -> Path:
    """Symlink ``per_class`` real images of each class folder of ``src`` into ``dst``."""
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[skip : skip + per_class]:
            (dst / cls.name / f.name).symlink_to(f.resolve())
    return dst


@pytest.fixture(scope="module")
def trained(cxr_root, tmp_path_factory):
    """A tiny timm model trained for a few seconds on 12 real CXR images per class."""
    root = tmp_path_factory.mktemp("explain-bundle")
    data = subset_tree(cxr_root, root / "data", 12)
    config = TrainConfig(
        epochs=5, batch_size=16, lr=3e-3, val_fraction=0.0, online_augment=False, preset="none"
    )
    path, _ = run_stage(
        "train", data, out=root / "bundle", init="none", config=config,
        arch="test_efficientnet", image_size=SIZE, device="cpu", console=Console(quiet=True),
    )  # fmt: skip
    return load_bundle(path)


@pytest.fixture(scope="module")
def images(cxr_root, oct_root):
    """Two held-out CXR (not in the training subset) and two OCT images at the model's size."""
    picks = [
        sorted((cxr_root / "COVID19").iterdir())[20],
        sorted((cxr_root / "NORMAL").iterdir())[20],
        sorted((oct_root / "CNV").iterdir())[0],
        sorted((oct_root / "DME").iterdir())[0],
    ]
    return [load_resized(p, SIZE) for p in picks]


@pytest.mark.parametrize("method", M.METHODS)
def test_map_has_input_shape_and_is_finite(trained, images, method):
    model = M.load_explainer(trained)
    x = M.images_to_batch(images, "cpu")
    maps = M.attribute(method, model, x, [0, 1, 2, 3])
    assert maps.shape == (len(images), SIZE, SIZE) and maps.dtype == np.float32
    assert np.isfinite(maps).all()
    assert np.abs(maps).sum(axis=(1, 2)).min() > 0  # every image gets a non-empty map
    if method in ("saliency", "gradcam"):
        assert (maps >= 0).all()


def test_grey_model_matches_the_bundle_model_on_normalised_tensors(trained, images):
    """GreyModel folds to_tensor's channel repeat + normalisation in: same logits."""
    from fedbridge_shared.data.tensors import to_tensor
    from fedbridge_shared.models import build_model

    grey = M.load_explainer(trained)
    plain = build_model(trained.spec)
    plain.load_state_dict(trained.state_dict)
    plain.eval()
    with torch.no_grad():
        a = grey(M.images_to_batch(images, "cpu"))
        b = plain(torch.stack([to_tensor(img, trained.spec) for img in images]))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cam_agrees_with_grad_cam_on_the_last_feature_map(trained, images):
    """What is compared, exactly.

    The head is global average pooling + linear, so logit_k = mean_hw Σ_c W[k,c] F_c(h,w) + b_k
    and CAM_k(h,w) = Σ_c W[k,c] F_c(h,w). Grad-CAM on the last feature map F weights channel c
    by α_c = mean_hw ∂logit_k/∂F_c(h,w) = W[k,c]/(h·w), so Grad-CAM_k = ReLU(CAM_k)/(h·w).
    We compare ReLU(CAM) from the classifier weights with captum's LayerGradCam (ReLU on), both
    at the feature map's resolution and after the same bilinear upsampling to the input size
    (ReLU first, then upsampling), after dividing each map by its maximum: they agree to 1e-5.
    The unnormalised maps differ by the factor h·w exactly. We also check the CAM oracle
    mean_hw CAM_k + b_k = logit_k.
    """
    model = M.load_explainer(trained)
    x = M.images_to_batch(images, "cpu")
    with torch.no_grad():
        logits = model(x)
    target = logits.argmax(dim=1)
    head = model.model.get_classifier()

    cam = M.class_activation_map(model, x, target, upsample=False)  # (B, h, w)
    gcam = M.grad_cam(model, x.clone().requires_grad_(True), target, upsample=False).detach()
    h, w = cam.shape[-2:]
    torch.testing.assert_close(
        cam.mean(dim=(1, 2)) + head.bias[target], logits[torch.arange(len(x)), target],
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip
    torch.testing.assert_close(gcam * (h * w), torch.relu(cam), rtol=1e-4, atol=1e-5)

    def unit(a: torch.Tensor) -> torch.Tensor:
        peak = a.flatten(1).amax(dim=1).view(-1, 1, 1)
        assert (peak > 0).all()
        return a / peak

    torch.testing.assert_close(unit(gcam), unit(torch.relu(cam)), rtol=0, atol=1e-5)
    # Bilinear upsampling is linear, so it keeps the equality; ReLU comes before it (as in
    # Grad-CAM), hence upsample(ReLU(CAM)), not ReLU of the upsampled signed CAM.
    up_cam = M.attribute("cam", model, x, target)
    up_gcam = torch.from_numpy(M.attribute("gradcam", model, x, target))
    assert up_cam.shape == up_gcam.shape == x.shape[:1] + x.shape[2:]
    relu_cam_up = M._upsample(torch.relu(cam).unsqueeze(1), (SIZE, SIZE))
    torch.testing.assert_close(unit(up_gcam), unit(relu_cam_up), rtol=0, atol=1e-5)
    torch.testing.assert_close(
        torch.from_numpy(up_cam), M._upsample(cam.unsqueeze(1), (SIZE, SIZE)),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip


def test_trained_saliency_differs_from_randomised_model_saliency(trained, images):
    """Adebayo's check on the true class of held-out CXR images: the maps must change."""
    result = S.sanity_check(trained, images[:2], ["saliency"], seed=0)
    res = result["methods"]["saliency"]
    assert res["mean_abs_rho"] < S.SANITY_THRESHOLD and not res["fails"], res
    trained_model = M.load_explainer(trained)
    random_model = S.randomised_explainer(trained, "cpu", seed=0)
    x = M.images_to_batch(images[:2], "cpu")
    target = [1, 2]  # COVID19, NORMAL: the true classes
    a = M.attribute("saliency", trained_model, x, target)
    b = M.attribute("saliency", random_model, x, target)
    for i in range(2):
        rho = S.rank_correlation(a[i], b[i])
        assert rho is not None and rho < 0.6, rho
        na, nb = a[i] / a[i].sum(), b[i] / b[i].sum()
        assert np.abs(na - nb).sum() > 0.3  # total-variation distance of the normalised maps


def test_sanity_check_flags_maps_that_do_not_change(trained, images, monkeypatch):
    """With the 'randomised' model replaced by the trained one, rho = 1 and the flag is raised."""
    monkeypatch.setattr(S, "randomised_explainer", lambda b, d, seed=0: M.load_explainer(b, d))
    result = S.sanity_check(trained, images[:2], ["saliency", "cam"])
    for res in result["methods"].values():
        assert res["mean_abs_rho"] == pytest.approx(1.0) and res["fails"]
    assert "all layers" in result["randomisation"] and result["threshold"] == S.SANITY_THRESHOLD


def test_randomised_model_has_different_weights(trained):
    random_model = S.randomised_explainer(trained, "cpu", seed=0)
    state = random_model.model.state_dict()
    changed = [k for k, v in trained.state_dict.items() if v.is_floating_point()]
    assert all(not torch.equal(state[k], trained.state_dict[k]) for k in changed if "weight" in k)


def test_rank_correlation_edge_cases():
    a = np.arange(16.0).reshape(4, 4)
    assert S.rank_correlation(a, -a) == pytest.approx(1.0)  # absolute maps are compared
    assert S.rank_correlation(a, np.zeros_like(a)) == 0.0
    assert S.rank_correlation(np.zeros_like(a), np.zeros_like(a)) is None


def test_cam_refuses_a_head_that_is_not_gap_linear(trained, images):
    model = M.load_explainer(trained)
    model.model.classifier = torch.nn.Sequential(model.model.classifier)
    with pytest.raises(ConfigError, match="gradcam"):
        M.attribute("cam", model, M.images_to_batch(images[:1], "cpu"), [0])


def test_target_must_be_a_label_of_the_bundle(trained):
    labels = trained.spec.labels
    assert resolve_target(None, labels) is None
    assert resolve_target("NORMAL", labels) == labels.index("NORMAL")
    with pytest.raises(ConfigError, match="'PNEUMONIA' is not a class.*COVID19"):
        resolve_target("PNEUMONIA", labels)


def test_overlay_scales(images):
    signed = colour_scale(np.array([[-4.0, 1.0], [2.0, 0.0]]), signed=True)
    assert signed.vmin == -signed.vmax and signed.vmax > 0
    assert colour_scale(np.zeros((2, 2)), signed=False).vmax == 1.0
    png = overlay_png(images[0], np.random.default_rng(0).normal(size=(SIZE, SIZE)), "shap", "t")
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
