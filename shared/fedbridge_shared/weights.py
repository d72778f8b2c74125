"""The tensors that travel in a federation: the floating-point part of a model's state.

On the wire they travel packed as one flat vector (:func:`pack` / :func:`unpack`): Flower moves
every array of a message as a separate HTTP object, so a model's ~150 tensors cost ~150
requests per message and hop, ~850 per site and round through the SuperLink; one vector costs
one. The layout is the model's own (its spec gives it at both ends), in state-dict order.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from fedbridge_shared.errors import FedbridgeError


class WeightsError(FedbridgeError):
    """A set of weights does not fit the model (missing, extra, mis-shaped or non-finite)."""


def shared_state(
    model_or_state: nn.Module | dict[str, torch.Tensor],
) -> OrderedDict[str, torch.Tensor]:
    """Floating-point tensors of a state dict (integer counters such as BN's stay local)."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    return OrderedDict(
        (k, v.detach().cpu()) for k, v in state.items() if torch.is_floating_point(v)
    )


def check_state(reference: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> None:
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


def pack(state: Mapping[str, torch.Tensor]) -> np.ndarray:
    """Every tensor of ``state`` in order, flattened into one vector (float32 unless a tensor
    is wider)."""
    arrays = [torch.as_tensor(v).detach().cpu().numpy() for v in state.values()]
    if not arrays:
        return np.zeros(0, dtype=np.float32)
    dtype = np.result_type(np.float32, *(a.dtype for a in arrays))
    return np.concatenate([a.astype(dtype, copy=False).ravel() for a in arrays])


def unpack(
    flat: np.ndarray, reference: Mapping[str, torch.Tensor]
) -> OrderedDict[str, torch.Tensor]:
    """The state dict a :func:`pack` vector holds, in ``reference``'s layout and dtypes.

    Raises WeightsError when the vector does not fit the layout or holds NaN/Inf (named by layer).
    """
    flat = np.asarray(flat)
    sizes = [int(v.numel()) for v in reference.values()]
    if flat.ndim != 1 or flat.shape[0] != sum(sizes):
        raise WeightsError(
            f"packed weights: shape {tuple(flat.shape)}, expected ({sum(sizes)},) for the "
            f"model's {len(sizes)} tensors"
        )
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    start = 0
    for (name, ref), size in zip(reference.items(), sizes, strict=True):
        part = torch.from_numpy(np.array(flat[start : start + size])).reshape(ref.shape)
        out[name] = part.to(ref.dtype)
        start += size
    check_state(reference, out)
    return out


def load_shared_state(model: nn.Module, state: Mapping[str, torch.Tensor] | np.ndarray) -> None:
    """Load checked floating-point tensors (a state dict or a :func:`pack` vector) into
    ``model``; other buffers keep their values."""
    reference = shared_state(model)
    if isinstance(state, np.ndarray):
        state = unpack(state, reference)
    check_state(reference, state)
    model.load_state_dict({k: torch.as_tensor(state[k]) for k in reference}, strict=False)
