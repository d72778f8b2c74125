"""(ε, δ) of the subsampled Gaussian mechanism: Opacus' RDP accountant, for both DP levels.

Site-level DP (the coordinator noises the sites' clipped updates) and record-level DP-SGD (each
site noises its patients' clipped gradients) are the same mechanism: ``steps`` Gaussian
releases with noise multiplier σ, each on a Poisson sample at rate ``q``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from fedbridge_shared.errors import ConfigError

MAX_NOISE = 1e3
"""σ beyond this drowns any update; Opacus' search tops out near it."""


def _opacus() -> tuple[Any, Any]:
    try:
        from opacus.accountants import RDPAccountant
        from opacus.accountants.utils import get_noise_multiplier
    except ModuleNotFoundError as e:  # pragma: no cover - opacus is in the server/client extras
        raise ConfigError(
            "differential privacy needs the privacy accountant: pip install opacus"
        ) from e
    return RDPAccountant, get_noise_multiplier


def epsilon(sigma: float, *, sample_rate: float, steps: int, delta: float) -> float:
    """ε spent after ``steps`` subsampled Gaussian releases with noise multiplier σ."""
    if steps == 0:
        return 0.0
    rdp_accountant, _ = _opacus()
    accountant = rdp_accountant()
    accountant.history = [(sigma, sample_rate, steps)]
    return float(accountant.get_epsilon(delta=delta))


def noise_for(
    target_epsilon: float, *, delta: float, sample_rate: float, steps: int, what: str, unit: str
) -> float:
    """The smallest σ that keeps ``steps`` releases at rate ``sample_rate`` within the target.

    ``what`` names the setting in the error (``'dp.target-epsilon'``), ``unit`` the steps
    (``"round(s)"``); an unreachable budget is one ConfigError line, never Opacus' traceback.
    """
    _, get_noise_multiplier = _opacus()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus' advice on its alpha orders
            sigma = float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon, target_delta=delta,
                    sample_rate=sample_rate, steps=steps, accountant="rdp",
                    epsilon_tolerance=0.01,
                )
            )  # fmt: skip
    except (ValueError, OverflowError, ZeroDivisionError) as e:
        raise ConfigError(
            f"run config: {what} {target_epsilon:g} at δ {delta:g} cannot be reached in "
            f"{steps} {unit} ({e}); raise it or set the noise multiplier"
        ) from None
    if not math.isfinite(sigma) or sigma > MAX_NOISE:
        raise ConfigError(
            f"run config: {what} {target_epsilon:g} needs noise multiplier {sigma:g} in "
            f"{steps} {unit}: the model would learn nothing; raise it"
        )
    return sigma
