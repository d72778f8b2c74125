"""The tensors that travel in a federation: the floating-point part of a model's state."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from fedbridge_shared.errors import FedbridgeError


class WeightsError(FedbridgeError):
    """A set of weights does not fit the model (missing, extra, mis-shaped or non-finite)."""


def shared_state(model_or_state: nn.Module | dict[str, torch.Tensor]) -> OrderedDict:
    """Floating-point tensors of a state dict (integer counters such as BN's stay local)."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    return OrderedDict(
        (k, v.detach().cpu()) for k, v in state.items() if torch.is_floating_point(v)
    )


def check_state(reference: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """Raise WeightsError naming the first tensor that is missing, extra, mis-shaped or NaN."""
    missing = [k for k in reference if k not in state]
    extra = [k for k in state if k not in reference]
    if missing or extra:
        raise WeightsError(
            f"weights do not fit the model (missing {missing[:3]}, extra {extra[:3]})"
        )
    for name, ref in reference.items():
        t = torch.as_tensor(state[name])
        if tuple(t.shape) != tuple(ref.shape):
            raise WeightsError(f"layer {name}: shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        if not torch.isfinite(t).all():
            raise WeightsError(f"layer {name}: contains NaN or Inf")


def load_shared_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load checked floating-point tensors into ``model``; other buffers keep their values."""
    reference = shared_state(model)
    check_state(reference, state)
    model.load_state_dict({k: torch.as_tensor(state[k]) for k in reference}, strict=False)
