"""Site-level DP: clipping and noise on trainable weights only, ε from Opacus' accountant."""

import math

import pytest
import torch

from fedbridge_server.config import DPConfig
from fedbridge_server.privacy import epsilon, noise_multiplier, private_mean
from fedbridge_shared.errors import FedbridgeError

GLOBAL = {"conv.weight": torch.zeros(4, 3), "bn.running_var": torch.ones(4)}
TRAINABLE = {"conv.weight"}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_without_noise_it_is_the_mean_of_the_clipped_updates_and_buffers_are_kept():
    small = {"conv.weight": torch.full((4, 3), 0.1), "bn.running_var": torch.full((4,), -5.0)}
    big = {"conv.weight": torch.full((4, 3), 3.0), "bn.running_var": torch.full((4,), 9.0)}
    new, info = private_mean(
        GLOBAL, [small, big], trainable=TRAINABLE, clipping_norm=1.0, sigma=0.0, generator=_gen()
    )
    # small: norm 0.1·√12 ≈ 0.35 < 1, kept; big: norm 3·√12 ≈ 10.4, scaled to norm 1
    expected = (0.1 + 3.0 / (3.0 * math.sqrt(12))) / 2
    assert torch.allclose(new["conv.weight"], torch.full((4, 3), expected))
    assert torch.equal(new["bn.running_var"], GLOBAL["bn.running_var"])  # never from sites
    assert info.clipped_fraction == 0.5 and info.sites == 2 and info.noise_std == 0.0


def test_noise_has_the_calibrated_standard_deviation_on_trainable_weights_only():
    shape = (200, 500)
    base = {"w": torch.zeros(shape), "bn.running_mean": torch.zeros(10)}
    sites = [{"w": torch.zeros(shape), "bn.running_mean": torch.ones(10)} for _ in range(4)]
    new, info = private_mean(
        base, sites, trainable={"w"}, clipping_norm=2.0, sigma=1.5, generator=_gen(3)
    )
    assert info.noise_std == pytest.approx(1.5 * 2.0 / 4)
    assert float(new["w"].std()) == pytest.approx(0.75, rel=0.02)
    assert torch.equal(new["bn.running_mean"], torch.zeros(10))
    again, _ = private_mean(
        base, sites, trainable={"w"}, clipping_norm=2.0, sigma=1.5, generator=_gen(3)
    )
    assert torch.equal(again["w"], new["w"])  # reproducible for a seed (bitwise resume)


def test_a_non_finite_result_is_refused():
    bad = {"conv.weight": torch.full((4, 3), float("inf")), "bn.running_var": torch.ones(4)}
    with pytest.raises(FedbridgeError, match="conv.weight is not finite"):
        private_mean(
            GLOBAL, [bad], trainable=TRAINABLE, clipping_norm=1.0, sigma=0.0, generator=_gen()
        )


def test_epsilon_matches_the_gaussian_mechanism_rdp_bound():
    """With every site in every round (q = 1) the RDP of R Gaussian mechanisms is
    R·α/(2σ²); the classic conversion ε ≤ RDP(α) + log(1/δ)/(α−1) bounds Opacus' (tighter)."""
    sigma, rounds, delta = 1.0, 4, 1e-5
    got = epsilon(sigma, sample_rate=1.0, rounds=rounds, delta=delta)
    classic = min(
        rounds * a / (2 * sigma**2) + math.log(1 / delta) / (a - 1)
        for a in [1 + x / 10 for x in range(1, 1000)]
    )
    assert 0.8 * classic < got <= classic
    assert epsilon(sigma, sample_rate=1.0, rounds=0, delta=delta) == 0.0
    assert epsilon(2 * sigma, sample_rate=1.0, rounds=rounds, delta=delta) < got


def test_the_noise_multiplier_reaches_the_target_epsilon():
    dp = DPConfig(enabled=True, target_epsilon=3.0)
    sigma = noise_multiplier(dp, rounds=5, sample_rate=1.0)
    spent = epsilon(sigma, sample_rate=1.0, rounds=5, delta=dp.delta)
    assert 2.9 <= spent <= 3.0 + 0.02
    assert noise_multiplier(DPConfig(noise_multiplier=0.7), rounds=5, sample_rate=1.0) == 0.7
