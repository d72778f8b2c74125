"""Central differential privacy at the coordinator, per site (site-level DP).

Each site's update (its weights minus the global weights) is clipped to an L2 norm ``C`` over the
**trainable weights only**; the clipped updates are averaged with equal weights and Gaussian
noise of standard deviation ``σ·C/m`` is added (``m`` = sites aggregated this round, so the noise
is calibrated to each round's real sensitivity). BatchNorm running statistics and integer
buffers are never noised: under DP they stay those of the initial (bridge) model, so nothing a
site computed from its patients outside the clipped weights reaches the released model.

The privacy spent, (ε, δ), comes from Opacus' RDP accountant for the noise multiplier, the
sampling rate of sites and the rounds run. ``σ`` is either given or derived from a target ε.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedbridge_server.config import DPConfig
from fedbridge_shared.errors import ConfigError, FedbridgeError

ACCOUNTANT = "opacus RDP (Gaussian mechanism, site-level)"


def _opacus():
    try:
        from opacus.accountants import RDPAccountant
        from opacus.accountants.utils import get_noise_multiplier
    except ModuleNotFoundError as e:  # pragma: no cover - opacus is in the [server] extra
        raise ConfigError(
            "dp.enabled needs the privacy accountant: pip install 'fedbridge[server]'"
        ) from e
    return RDPAccountant, get_noise_multiplier


def noise_multiplier(dp: DPConfig, *, rounds: int, sample_rate: float) -> float:
    """``dp.noise-multiplier`` when set (> 0), else the smallest σ reaching ``dp.target-epsilon``
    after ``rounds`` rounds at this sampling rate."""
    if dp.noise_multiplier > 0:
        return dp.noise_multiplier
    _, get_noise_multiplier = _opacus()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus' advice on its alpha orders
            sigma = float(
                get_noise_multiplier(
                    target_epsilon=dp.target_epsilon, target_delta=dp.delta,
                    sample_rate=sample_rate, steps=rounds, accountant="rdp",
                    epsilon_tolerance=0.01,
                )
            )  # fmt: skip
    except (ValueError, OverflowError, ZeroDivisionError) as e:
        raise ConfigError(
            f"run config: 'dp.target-epsilon' {dp.target_epsilon:g} at δ {dp.delta:g} cannot be "
            f"reached in {rounds} round(s) ({e}); raise it or set dp.noise-multiplier"
        ) from None
    if not math.isfinite(sigma) or sigma > 1e3:
        raise ConfigError(
            f"run config: 'dp.target-epsilon' {dp.target_epsilon:g} needs noise multiplier "
            f"{sigma:g} in {rounds} round(s): the model would learn nothing; raise it"
        )
    return sigma


def epsilon(sigma: float, *, sample_rate: float, rounds: int, delta: float) -> float:
    """ε spent after ``rounds`` rounds of the Gaussian mechanism with noise multiplier σ."""
    if rounds == 0:
        return 0.0
    rdp_accountant, _ = _opacus()
    accountant = rdp_accountant()
    accountant.history = [(sigma, sample_rate, rounds)]
    return float(accountant.get_epsilon(delta=delta))


@dataclass(frozen=True)
class RoundPrivacy:
    """What one private aggregation did (kept in the round history)."""

    sites: int
    noise_std: float
    update_norm_median: float
    clipped_fraction: float


def private_mean(
    global_state: Mapping[str, torch.Tensor],
    site_states: Sequence[Mapping[str, torch.Tensor]],
    *,
    trainable: set[str],
    clipping_norm: float,
    sigma: float,
    generator: torch.Generator,
) -> tuple[dict[str, torch.Tensor], RoundPrivacy]:
    """New global weights: global + mean of clipped site updates + N(0, (σC/m)²) noise on the
    trainable weights; every other tensor (BatchNorm statistics) stays the global one."""
    if not site_states:
        raise FedbridgeError("private aggregation needs at least one site update")
    keys = [k for k in global_state if k in trainable]
    if not keys:
        raise FedbridgeError("private aggregation: the model has no trainable weights")
    total = {k: torch.zeros_like(global_state[k], dtype=torch.float64) for k in keys}
    norms = []
    for state in site_states:
        delta = {k: state[k].double() - global_state[k].double() for k in keys}
        norm = math.sqrt(sum(float((d * d).sum()) for d in delta.values()))
        norms.append(norm)
        scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
        for k in keys:
            total[k] += delta[k] * scale
    m = len(site_states)
    std = sigma * clipping_norm / m
    new = dict(global_state)
    for k in keys:
        noise = torch.randn(total[k].shape, generator=generator, dtype=torch.float64) * std
        value = global_state[k].double() + total[k] / m + noise
        if not torch.isfinite(value).all():
            raise FedbridgeError(f"private aggregation: {k} is not finite; refusing the round")
        new[k] = value.to(global_state[k].dtype)
    norms.sort()
    return new, RoundPrivacy(
        sites=m,
        noise_std=std,
        update_norm_median=norms[m // 2] if m % 2 else (norms[m // 2 - 1] + norms[m // 2]) / 2,
        clipped_fraction=sum(n > clipping_norm for n in norms) / m,
    )
