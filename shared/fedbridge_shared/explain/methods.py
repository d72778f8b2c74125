"""Attribution maps: Simonyan saliency, GradientShap, Integrated Gradients, Grad-CAM and CAM.

The four gradient methods come from captum. CAM is computed here from the last feature map and
the linear classifier: for a network ending in global average pooling + linear,
``CAM_k(h, w) = Σ_c W[k, c] · F_c(h, w)`` (no bias), so ``logit_k = mean_hw CAM_k + b_k``.
Grad-CAM on the same feature map weights channel ``c`` by ``mean_hw ∂logit_k/∂F_c = W[k, c]/(h·w)``
and so equals ``ReLU(CAM_k) / (h·w)`` exactly. Coarse maps (CAM, Grad-CAM) are upsampled to the
input size with bilinear interpolation (``align_corners=False``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedbridge_shared.errors import ConfigError
from fedbridge_shared.models import model_from_bundle
from fedbridge_shared.spec import Bundle, ModelSpec

METHODS: tuple[str, ...] = ("saliency", "shap", "ig", "gradcam", "cam")
SIGNED_METHODS = frozenset({"shap", "ig", "cam"})
"""Methods whose maps carry a sign (red = for the target class, blue = against it)."""

SHAP_SAMPLES = 20  # GradientShap: random baselines × noisy inputs per image
SHAP_STDEV = 0.09  # GradientShap: input noise, in greyscale units (0..1)
IG_STEPS = 32  # Integrated Gradients: Riemann steps from the black-image baseline


class _Features(nn.Module):
    """The timm model up to its last feature map (``forward_features``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats: torch.Tensor = self.model.forward_features(x)  # type: ignore[operator]  # timm method
        return feats


class GreyModel(nn.Module):
    """A timm classifier fed greyscale ``(B, 1, H, W)`` pixels in [0, 1], returning logits.

    The channel repetition and mean/std normalisation of :func:`~fedbridge_shared.data.tensors.
    to_tensor` happen inside, so attributions are per greyscale pixel (one channel) and the
    baseline 0 is a black image. ``features`` is the module whose output is the last feature map.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: nn.Module, spec: ModelSpec) -> None:
        super().__init__()
        self.model = model.eval()
        self.features = _Features(model)
        chans = spec.in_chans
        self.in_chans = chans
        self.register_buffer("mean", torch.tensor(spec.mean[:chans]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std[:chans]).view(1, -1, 1, 1))

    def normalise(self, grey: torch.Tensor) -> torch.Tensor:
        return (grey.expand(-1, self.in_chans, -1, -1) - self.mean) / self.std

    def forward(self, grey: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model.forward_head(self.features(self.normalise(grey)))  # type: ignore[operator]  # timm method
        return logits


def load_explainer(
    bundle: Bundle,
    device: torch.device | str = "cpu",
    state_dict: dict[str, Any] | None = None,
    *,
    model: nn.Module | None = None,
) -> GreyModel:
    """A :class:`GreyModel` in eval mode with the bundle's weights (or ``state_dict``);
    ``model``: the bundle's model when already built (not built again)."""
    model = model if model is not None else model_from_bundle(bundle)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return GreyModel(model, bundle.spec).to(device).eval()


def images_to_batch(images: Sequence[np.ndarray], device: torch.device | str) -> torch.Tensor:
    """Greyscale uint8 ``(H, W)`` images → float ``(B, 1, H, W)`` in [0, 1]."""
    arr = np.stack([np.asarray(img, dtype=np.float32) / 255.0 for img in images])
    return torch.from_numpy(arr).unsqueeze(1).to(device)


@torch.no_grad()
def predict_probs(model: GreyModel, x: torch.Tensor) -> torch.Tensor:
    """Softmax probabilities ``(B, K)``."""
    return torch.softmax(model(x), dim=1)


def captum_attr() -> Any:
    """The ``captum.attr`` module, or a ConfigError saying how to install it."""
    try:
        import captum.attr
    except ImportError as e:
        raise ConfigError(
            "captum is not installed; it comes with the explain extra: "
            "pip install 'fedbridge[explain]'"
        ) from e
    return captum.attr


def _upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, 1, h, w)`` → ``(B, H, W)`` by bilinear interpolation."""
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)[:, 0]


def check_cam_head(model: GreyModel, x: torch.Tensor) -> nn.Linear:
    """The linear classifier, after checking the head is global average pooling + linear."""
    head = model.model.get_classifier()  # type: ignore[operator]  # timm method
    if not isinstance(head, nn.Linear):
        raise ConfigError(
            f"CAM needs a linear classifier; {type(model.model).__name__} has "
            f"{type(head).__name__}: use --method gradcam"
        )
    with torch.no_grad():
        feats = model.features(model.normalise(x[:1]))
        pooled = model.model.forward_head(feats, pre_logits=True)  # type: ignore[operator]  # timm method
    if (
        feats.ndim != 4
        or pooled.shape != feats.shape[:2]
        or not torch.allclose(pooled, feats.mean(dim=(2, 3)), rtol=1e-4, atol=1e-5)
    ):
        raise ConfigError(
            f"CAM needs global average pooling before the classifier, which "
            f"{type(model.model).__name__} does not have: use --method gradcam"
        )
    return head


@torch.no_grad()
def class_activation_map(
    model: GreyModel, x: torch.Tensor, target: torch.Tensor, upsample: bool = True
) -> torch.Tensor:
    """CAM of class ``target[i]`` for each image: ``Σ_c W[k, c] F_c(h, w)`` (signed, no bias).

    Returns ``(B, H, W)`` at input size, or ``(B, h, w)`` at feature size when not ``upsample``.
    """
    head = check_cam_head(model, x)
    feats = model.features(model.normalise(x))  # (B, C, h, w)
    weights = head.weight[target]  # (B, C)
    cam = torch.einsum("bc,bchw->bhw", weights, feats).unsqueeze(1)
    return _upsample(cam, (x.shape[-2], x.shape[-1])) if upsample else cam[:, 0]


def grad_cam(
    model: GreyModel, x: torch.Tensor, target: torch.Tensor, upsample: bool = True
) -> torch.Tensor:
    """captum LayerGradCam on the last feature map, with ReLU (as Selvaraju et al.)."""
    attr = (
        captum_attr()
        .LayerGradCam(model, model.features)
        .attribute(x, target=target, relu_attributions=True)
    )
    return _upsample(attr, (x.shape[-2], x.shape[-1])) if upsample else attr[:, 0]


def attribute(
    method: str,
    model: GreyModel,
    x: torch.Tensor,
    target: torch.Tensor | Sequence[int],
    seed: int = 0,
) -> np.ndarray:
    """Maps ``(B, H, W)`` float32 of ``method`` for class ``target[i]`` of image ``x[i]``.

    ``x`` is ``(B, 1, H, W)`` greyscale in [0, 1]. saliency: ``|∂logit/∂pixel|`` (Simonyan
    et al.); shap: captum GradientShap with black, mid-grey and white baselines; ig: Integrated
    Gradients from a black image; gradcam: Grad-CAM (ReLU) on the last feature map; cam: the
    class activation map (signed). Logits, not probabilities, are explained.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    model.eval()
    target = torch.as_tensor(target, dtype=torch.long, device=x.device)
    x = x.detach().clone().requires_grad_(method != "cam")
    if method == "saliency":
        maps = captum_attr().Saliency(model).attribute(x, target=target, abs=True)[:, 0]
    elif method == "shap":
        baselines = torch.stack([torch.full_like(x[0], v) for v in (0.0, 0.5, 1.0)])
        shap = captum_attr().GradientShap(model)
        with torch.random.fork_rng(devices=[]):  # captum draws from torch's global RNG
            torch.manual_seed(seed)
            maps = shap.attribute(
                x, baselines=baselines, target=target, n_samples=SHAP_SAMPLES, stdevs=SHAP_STDEV
            )[:, 0]
    elif method == "ig":
        maps = (
            captum_attr()
            .IntegratedGradients(model)
            .attribute(x, baselines=torch.zeros_like(x), target=target, n_steps=IG_STEPS)[:, 0]
        )
    elif method == "gradcam":
        maps = grad_cam(model, x, target)
    else:
        maps = class_activation_map(model, x.detach(), target)
    out = maps.detach().float().cpu().numpy()
    maps_np: np.ndarray = np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
    return maps_np
