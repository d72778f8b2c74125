"""Server optimisers (FedAdam, FedAvgM) over Flower's public FedAvg, with state fedbridge owns.

Flower's own FedAdam and FedAvgM keep their moments in undocumented attributes; reading them
would tie fedbridge to one Flower minor. Here FedAvg (public API: ``configure_train``,
``aggregate_train``) gives the weighted mean of the sites' packed weights and a step object
moves the global weights from it, with the same formulas as Flower's strategies
(Reddi et al. 2021 for Adam, Hsu et al. 2019 for momentum). The state is one vector per moment,
checkpointed by the round store and restored on resume.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedbridge_shared import protocol as P


@dataclass
class AdamStep:
    """FedAdam's server step: Adam on the pseudo-gradient (mean − current)."""

    eta: float
    beta_1: float
    beta_2: float
    tau: float
    state: dict[str, np.ndarray] = field(default_factory=dict)  # "m_t", "v_t"

    def __call__(self, current: np.ndarray, mean: np.ndarray, rnd: int) -> np.ndarray:
        delta = mean - current
        m = self.state.get("m_t", np.zeros_like(mean))
        v = self.state.get("v_t", np.zeros_like(mean))
        m = self.beta_1 * m + (1 - self.beta_1) * delta
        v = self.beta_2 * v + (1 - self.beta_2) * delta**2
        self.state = {"m_t": m, "v_t": v}
        eta_norm = (
            self.eta
            * np.sqrt(1 - np.power(self.beta_2, rnd + 1.0))
            / (1 - np.power(self.beta_1, rnd + 1.0))
        )
        return np.asarray(current + eta_norm * m / (np.sqrt(v) + self.tau))


@dataclass
class MomentumStep:
    """FedAvgM's server step: SGD with momentum on the pseudo-gradient (current − mean)."""

    lr: float
    momentum: float
    state: dict[str, np.ndarray] = field(default_factory=dict)  # "momentum_vector"

    def __call__(self, current: np.ndarray, mean: np.ndarray, rnd: int) -> np.ndarray:
        if self.momentum == 0.0 and self.lr == 1.0:
            return mean  # plain FedAvg, bit for bit
        grad = current - mean
        if self.momentum > 0.0:
            velocity = self.state.get("momentum_vector")
            grad = grad if velocity is None else self.momentum * velocity + grad
            self.state = {"momentum_vector": grad}
        return np.asarray(current - self.lr * grad)


class ServerOptStrategy(FedAvg):
    """FedAvg's weighted mean, then ``step`` from the weights sent this round."""

    def __init__(self, step: AdamStep | MomentumStep, **fedavg: Any) -> None:
        super().__init__(**fedavg)
        self.step = step
        self.current: np.ndarray | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = arrays[P.WEIGHTS].numpy()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        if self.current is None:
            raise RuntimeError("configure_train must send the weights before aggregate_train")
        mean = arrays[P.WEIGHTS].numpy()
        if mean.shape != self.current.shape:
            raise RuntimeError(f"aggregated weights {mean.shape} ≠ sent {self.current.shape}")
        self.current = self.step(self.current, mean, server_round)
        return ArrayRecord({P.WEIGHTS: Array(self.current)}), metrics
