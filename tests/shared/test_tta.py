"""Test-time augmentation: deterministic views, averaged probabilities, never a flipped CXR."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedbridge_shared.engine import predict
from fedbridge_shared.tta import VIEWS, apply_view, predict_tta, views_for

CXR = ("BACTERIAL_PNEUMONIA", "COVID19", "NORMAL", "VIRAL_PNEUMONIA")
OCT = ("CNV", "DME", "DRUSEN", "NORMAL")


class Probe(nn.Module):
    """A tiny classifier; ``symmetric`` makes it exactly left-right invariant (x + flip(x))."""

    def __init__(self, symmetric: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.symmetric = symmetric
        self.head = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.symmetric:
            x = x + torch.flip(x, dims=[3])  # a + b == b + a exactly in floating point
        return self.head(x.flatten(1))


def _loader() -> DataLoader:
    x = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return DataLoader(TensorDataset(x, torch.arange(10) % 4), batch_size=4)


def test_cxr_views_never_flip_and_oct_views_do():
    assert "hflip" not in views_for("cxr")
    assert "hflip" not in views_for("other")
    assert "hflip" in views_for("oct")
    assert views_for("cxr")[0] == "identity" and set(views_for("cxr")) == set(VIEWS) - {"hflip"}


def test_a_flip_invariant_model_gives_identical_probabilities_with_the_flip_view():
    model, cpu = Probe(symmetric=True), torch.device("cpu")
    _, plain = predict_tta(model, _loader(), cpu, views=("identity",))
    _, flipped = predict_tta(model, _loader(), cpu, views=("identity", "hflip"))
    np.testing.assert_array_equal(plain, flipped)
    _, other = predict_tta(Probe(symmetric=False), _loader(), cpu, views=("identity", "hflip"))
    assert not np.allclose(other, predict(Probe(symmetric=False), _loader(), cpu)[1])


def test_identity_alone_is_plain_prediction_and_views_average():
    model, cpu = Probe(symmetric=False), torch.device("cpu")
    y, p = predict_tta(model, _loader(), cpu, views=("identity",))
    y0, p0 = predict(model, _loader(), cpu)
    assert np.array_equal(y, y0)
    np.testing.assert_allclose(p, p0, atol=1e-7)
    views = views_for("oct")
    _, avg = predict_tta(model, _loader(), cpu, views=views)
    x = next(iter(_loader()))[0]
    by_hand = sum(torch.softmax(model(apply_view(x, v)), 1).double() for v in views) / len(views)
    np.testing.assert_allclose(avg[:4], by_hand.detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(avg.sum(1), 1.0, atol=1e-9)


def test_views_move_the_pixels_as_named():
    x = torch.zeros(1, 1, 20, 20)
    x[0, 0, 10, 10] = 1.0  # one bright pixel
    assert torch.equal(apply_view(x, "identity"), x)
    assert torch.equal(apply_view(x, "hflip")[0, 0, 10, 9], torch.tensor(1.0))
    for view, (row, col) in {"shift-left": (10, 9), "shift-right": (10, 11),
                             "shift-up": (9, 10), "shift-down": (11, 10)}.items():  # fmt: skip
        moved = apply_view(x, view)[0, 0]
        assert moved.argmax().item() == row * 20 + col, view
    scaled = apply_view(x, "scale")[0, 0]
    assert scaled.sum() > 1.0  # zoomed in: the pixel covers more than one output pixel


def test_an_unknown_view_is_refused():
    with pytest.raises(ValueError, match="TTA view 'rotate'"):
        apply_view(torch.zeros(1, 1, 4, 4), "rotate")
