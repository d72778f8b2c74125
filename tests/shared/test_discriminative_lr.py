"""Discriminative learning rates (``backbone_lr_scale``): known answers from AdamW's first step."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from fedbridge_shared.engine import make_optimizer
from fedbridge_shared.errors import FedbridgeError
from fedbridge_shared.training import TrainConfig


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.features(x)))


def _first_step(scale: float, lr: float = 1e-2) -> tuple[Tiny, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = Tiny()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = make_optimizer(model, lr=lr, weight_decay=0.0, backbone_lr_scale=scale)
    loss = nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.tensor([0, 1] * 4))
    loss.backward()
    opt.step()
    return model, {k: (v.detach() - before[k]).abs() for k, v in model.named_parameters()}


def test_first_adamw_step_moves_backbone_by_scaled_lr_and_head_by_lr() -> None:
    # AdamW's first step (no weight decay) moves every weight by lr · |g| / (|g| + eps) ≈ lr
    model, moved = _first_step(0.1)
    grads_nonzero = {k: v > 0 for k, v in moved.items()}
    for name, delta in moved.items():
        want = 1e-2 if name.startswith("head.") else 1e-3
        d = delta[grads_nonzero[name]]
        assert d.numel() > 0
        torch.testing.assert_close(d, torch.full_like(d, want), rtol=1e-4, atol=0)


def test_scale_one_is_the_plain_optimizer() -> None:
    _, moved = _first_step(1.0)
    for delta in moved.values():
        d = delta[delta > 0]
        torch.testing.assert_close(d, torch.full_like(d, 1e-2), rtol=1e-4, atol=0)
    groups = make_optimizer(Tiny(), lr=1e-3, weight_decay=0.1).param_groups
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in groups] == [
        (1e-3, 0.1, 2),  # weights
        (1e-3, 0.0, 2),  # biases
    ]


def test_timm_classifier_is_the_head_group() -> None:
    model = timm.create_model("mobilenetv2_050", pretrained=False, num_classes=4)
    opt = make_optimizer(model, lr=1e-3, backbone_lr_scale=0.25)
    head = {id(p) for p in model.get_classifier().parameters()}
    for g in opt.param_groups:
        in_head = {id(p) in head for p in g["params"]}
        assert len(in_head) == 1
        assert g["lr"] == (1e-3 if in_head.pop() else 2.5e-4)
    n = sum(len(g["params"]) for g in opt.param_groups)
    assert n == sum(1 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("scale", [0.0, -0.1, 1.5, float("nan")])
def test_bad_scale_is_refused(scale: float) -> None:
    with pytest.raises(FedbridgeError, match="--backbone-lr-scale"):
        make_optimizer(Tiny(), lr=1e-3, backbone_lr_scale=scale)
    with pytest.raises(FedbridgeError, match="--backbone-lr-scale"):
        TrainConfig(backbone_lr_scale=scale)


def test_model_without_a_classifier_is_refused() -> None:
    with pytest.raises(FedbridgeError, match="no classifier"):
        make_optimizer(nn.Linear(2, 2), lr=1e-3, backbone_lr_scale=0.5)
