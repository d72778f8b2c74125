"""Packed weights: one vector per message instead of one HTTP object per tensor."""

import numpy as np
import pytest
import torch

from fedbridge_shared.models import init_model
from fedbridge_shared.weights import WeightsError, pack, shared_state, unpack


@pytest.fixture(scope="module")
def state():
    model, _ = init_model("none", ["a", "b", "c"], "test_efficientnet", 32)
    return shared_state(model)


def test_pack_then_unpack_gives_back_every_tensor_exactly_in_order(state):
    flat = pack(state)
    assert flat.ndim == 1 and flat.dtype == np.float32
    assert flat.size == sum(v.numel() for v in state.values())
    back = unpack(flat, state)
    assert list(back) == list(state)
    assert all(torch.equal(back[k], state[k]) and back[k].dtype == state[k].dtype for k in state)
    first = next(iter(state))
    assert np.array_equal(flat[: state[first].numel()], state[first].numpy().ravel())


def test_a_weighted_mean_of_packed_vectors_is_the_per_tensor_weighted_mean(state):
    """What FedAvg does to the one packed array equals what it did to each tensor."""
    other = {k: v + torch.randn_like(v) for k, v in state.items()}
    mean = unpack((3 * pack(state) + 1 * pack(other)) / 4, state)
    for k in state:
        assert torch.allclose(mean[k], (3 * state[k] + other[k]) / 4, atol=1e-6)


def test_a_vector_that_does_not_fit_or_holds_nan_is_refused_by_name(state):
    flat = pack(state)
    expected = rf"shape \({flat.size - 1},\), expected \({flat.size},\)"
    with pytest.raises(WeightsError, match=expected):
        unpack(flat[:-1], state)
    with pytest.raises(WeightsError, match="shape"):
        unpack(flat.reshape(1, -1), state)
    bad = flat.copy()
    last = list(state)[-1]
    bad[-1] = np.inf
    with pytest.raises(WeightsError, match=f"layer {last}: contains NaN or Inf"):
        unpack(bad, state)
