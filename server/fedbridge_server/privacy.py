"""Differential privacy at the coordinator: site-level DP, and the record of record-level DP.

Record-level DP-SGD runs at the sites (``fedbridge_client.dp_sgd``); the coordinator only
records the ε each site reports (:func:`record_level`). Site-level DP, below:

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedbridge_server.config import DPConfig
from fedbridge_shared import dp_accounting as accounting
from fedbridge_shared.errors import FedbridgeError

ACCOUNTANT = "opacus RDP (Gaussian mechanism, site-level)"
RECORD_ACCOUNTANT = "opacus RDP (DP-SGD at each site, per patient, Poisson-sampled patients)"


def noise_multiplier(dp: DPConfig, *, rounds: int, sample_rate: float) -> float:
    """``dp.noise-multiplier`` when set (> 0), else the smallest σ reaching ``dp.target-epsilon``
    after ``rounds`` rounds at this sampling rate."""
    if dp.noise_multiplier > 0:
        return dp.noise_multiplier
    return accounting.noise_for(
        dp.target_epsilon, delta=dp.delta, sample_rate=sample_rate, steps=rounds,
        what="'dp.target-epsilon'", unit="round(s)",
    )  # fmt: skip


def epsilon(sigma: float, *, sample_rate: float, rounds: int, delta: float) -> float:
    """ε spent after ``rounds`` rounds of the Gaussian mechanism with noise multiplier σ."""
    return accounting.epsilon(sigma, sample_rate=sample_rate, steps=rounds, delta=delta)


def record_level(per_site: Mapping[str, Mapping], dp: DPConfig) -> dict | None:
    """A round's record-level DP record: the ε each site reported (cumulative, per patient)."""
    spent = {n: float(s["epsilon"]) for n, s in per_site.items() if s.get("epsilon")}
    if not spent:
        return None
    return {
        "level": "record",
        "epsilon": max(spent.values()),
        "epsilon_per_site": spent,
        "noise_multiplier_per_site": {
            n: float(per_site[n].get("noise_multiplier", 0.0)) for n in spent
        },
        "patients_per_site": {n: int(per_site[n].get("dp_patients", 0)) for n in spent},
        "delta": dp.delta,
        "max_grad_norm": dp.max_grad_norm,
        "accountant": RECORD_ACCOUNTANT,
    }


def record_total(rounds: Sequence[Mapping], dp: DPConfig) -> dict:
    """The run's record-level privacy: each site's largest reported ε over the rounds (ε only
    grows; a site that missed the last rounds keeps what it had spent)."""
    per_site: dict[str, float] = {}
    sigma: dict[str, float] = {}
    patients: dict[str, int] = {}
    for r in rounds:
        for name, eps in r.get("epsilon_per_site", {}).items():
            per_site[name] = max(per_site.get(name, 0.0), float(eps))
            sigma[name] = r["noise_multiplier_per_site"][name]
            patients[name] = r["patients_per_site"][name]
    return {
        "level": "record",
        "epsilon": max(per_site.values()),
        "epsilon_per_site": dict(sorted(per_site.items())),
        "noise_multiplier_per_site": dict(sorted(sigma.items())),
        "patients_per_site": dict(sorted(patients.items())),
        "delta": dp.delta,
        "max_grad_norm": dp.max_grad_norm,
        "rounds": len(rounds),
        "accountant": RECORD_ACCOUNTANT,
    }


def record_summary(total: Mapping) -> str:
    """One console line: the ε each site spent."""
    sites = ", ".join(f"{n} ε {e:.2f}" for n, e in total["epsilon_per_site"].items())
    return (
        f"privacy spent (DP-SGD per patient, δ {total['delta']:g}, {total['rounds']} round(s)): "
        f"{sites}"
    )


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
