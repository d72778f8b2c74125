"""EMA of weights: the closed form, and what ``fit`` validates and returns when it is on."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedbridge_shared.engine import fit, make_ema
from fedbridge_shared.errors import FedbridgeError


def closed_form(trajectory: list[torch.Tensor], decay: float) -> torch.Tensor:
    """ema_t = d·ema_{t−1} + (1−d)·w_t from ema_1 = w_1: d^{T−1} w_1 + Σ_{t≥2} (1−d) d^{T−t} w_t."""
    t = len(trajectory)
    out = decay ** (t - 1) * trajectory[0]
    for i, w in enumerate(trajectory[1:], start=2):
        out = out + (1 - decay) * decay ** (t - i) * w
    return out


def test_ema_of_a_fixed_sequence_of_weights_is_the_closed_form():
    model = nn.Linear(2, 1, bias=False)
    ema = make_ema(model, 0.9)
    sequence = [torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 4.0]])]
    for w in sequence:
        with torch.no_grad():
            model.weight.copy_(w)
        ema.update_parameters(model)
    # by hand: 0.81·(1, −2) + 0.09·(3, 0) + 0.1·(0, 4) = (1.08, −1.22)
    expected = torch.tensor([[1.08, -1.22]])
    assert torch.allclose(ema.module.weight, expected, atol=1e-6)
    assert torch.allclose(closed_form(sequence, 0.9), expected, atol=1e-6)


def _toy(n: int = 24) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    y = (x[:, 0] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)


def _fit(decay: float, *, val: bool) -> tuple[nn.Module, list[torch.Tensor], dict]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    seen: list[torch.Tensor] = []
    loader = _toy()
    result = fit(
        model, loader, device=torch.device("cpu"), epochs=2, lr=0.05, ema_decay=decay,
        val_loader=loader if val else None, patience=10,
        on_batch=lambda _: seen.append(model.weight.detach().clone()),
    )  # fmt: skip
    return model, seen, result


def test_fit_keeps_the_ema_of_every_step_it_took():
    model, trajectory, _ = _fit(0.8, val=False)
    assert len(trajectory) == 12  # 2 epochs × 6 batches
    assert torch.allclose(model.weight, closed_form(trajectory, 0.8), atol=1e-6)
    assert not torch.allclose(model.weight, trajectory[-1], atol=1e-4)  # not the raw weights


def test_fit_without_ema_keeps_the_raw_weights():
    model, trajectory, _ = _fit(0.0, val=False)
    assert torch.equal(model.weight, trajectory[-1])


def test_validation_scores_the_ema_weights():
    model, trajectory, result = _fit(0.8, val=True)
    best = result.best_epoch
    assert torch.allclose(model.weight, closed_form(trajectory[: 6 * best], 0.8), atol=1e-6)


@pytest.mark.parametrize("decay", [1.0, -0.1, 1.5])
def test_bad_decay_is_refused(decay):
    with pytest.raises(FedbridgeError, match="--ema-decay"):
        make_ema(nn.Linear(1, 1), decay)
