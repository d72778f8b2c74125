"""A hospital site: its own images, local training and evaluation. Knows nothing of Flower."""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from fedbridge_shared.data.split import assign_parts
from fedbridge_shared.data.tensors import ImageDataset, load_images
from fedbridge_shared.engine import evaluate, make_optimizer, train_one_epoch
from fedbridge_shared.errors import DataError
from fedbridge_shared.models import build_model
from fedbridge_shared.spec import ModelSpec
from fedbridge_shared.training import resolve_device, usable_index
from fedbridge_shared.weights import load_shared_state, shared_state


@dataclass(frozen=True)
class LocalSettings:
    """What the server asks a site to do in one round (sent as kebab-case config keys)."""

    local_epochs: int = 1
    batch_size: int = 16
    lr: float = 5e-4
    weight_decay: float = 1e-4
    augment_per_sample: int = 10
    augment: str = "cxr"
    val_fraction: float = 0.15
    seed: int = 0
    proximal_mu: float = 0.0
    # torch CPU threads while training (0: torch's default). Floating-point sums depend on the
    # thread count, so bitwise-identical reruns need the same value on the same site.
    threads: int = 0

    def to_config(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LocalSettings:
        """Pick this dataclass's keys out of a round config (other keys are ignored)."""
        values = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key in config:
                values[f.name] = type(getattr(cls(), f.name))(config[key])
        return cls(**values)


class Site:
    """One site's data, split by patient into local train and validation parts."""

    def __init__(self, data: Path, name: str) -> None:
        self.data, self.name = Path(data), name
        self.index = usable_index(self.data)
        self._cache: dict[tuple, tuple] = {}

    def check_labels(self, spec: ModelSpec) -> None:
        """Refuse, before any training, class folders that differ from the model's labels."""
        if set(self.index.labels) != set(spec.labels):
            raise DataError(
                f"site {self.name}: class folders {list(self.index.labels)} differ from the "
                f"model's labels {list(spec.labels)}"
            )

    def _parts(self, spec: ModelSpec, settings: LocalSettings):
        """Decoded train/val images and targets, cached per input size and split settings."""
        key = (spec.image_size, spec.labels, settings.val_fraction, settings.seed)
        if key not in self._cache:
            self.check_labels(spec)
            weights = {"train": 1 - settings.val_fraction, "val": settings.val_fraction}
            parts = assign_parts(self.index.samples, weights, settings.seed)
            target = {label: i for i, label in enumerate(spec.labels)}
            self._cache[key] = tuple(
                (load_images(parts[p], spec.image_size), [target[s.label] for s in parts[p]])
                for p in ("train", "val")
            )
        return self._cache[key]

    def _seed(self, settings: LocalSettings, server_round: int) -> int:
        return zlib.crc32(f"{settings.seed}/{server_round}/{self.name}".encode())

    def train(
        self,
        spec: ModelSpec,
        state: dict[str, torch.Tensor],
        settings: LocalSettings,
        server_round: int,
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Local epochs from the global weights; returns new weights and training metrics."""
        (images, targets), _ = self._parts(spec, settings)
        if not images:
            raise DataError(f"site {self.name}: no training images")
        seed = self._seed(settings, server_round)
        if settings.threads > 0:
            torch.set_num_threads(settings.threads)
        torch.manual_seed(seed)
        model = build_model(spec)
        load_shared_state(model, state)
        device = resolve_device()
        model.to(device)
        ds = ImageDataset(
            images,
            targets,
            spec,
            settings.augment,
            settings.augment_per_sample,
            online=True,
            seed=settings.seed,
        )
        loader = DataLoader(
            ds,
            batch_size=settings.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
            drop_last=len(ds) > settings.batch_size,
        )
        optimizer = make_optimizer(model, settings.lr, settings.weight_decay)
        penalty = None
        if settings.proximal_mu > 0:
            anchor = [p.detach().clone() for p in model.parameters()]

            def penalty() -> torch.Tensor:
                return (
                    settings.proximal_mu
                    / 2
                    * sum(
                        (p - a).pow(2).sum()
                        for p, a in zip(model.parameters(), anchor, strict=True)
                    )
                )

        stats = None
        for epoch in range(settings.local_epochs):
            ds.set_epoch(server_round * 1000 + epoch)
            stats = train_one_epoch(model, loader, optimizer, device, penalty=penalty)
        metrics = {
            "num-examples": len(images),
            "train-loss": stats.loss,
            "train-accuracy": stats.accuracy,
            "seconds": stats.seconds,
        }
        return shared_state(model), metrics

    def evaluate(
        self, spec: ModelSpec, state: dict[str, torch.Tensor], settings: LocalSettings
    ) -> dict[str, float]:
        """Loss and accuracy of the global weights on this site's validation patients."""
        _, (images, targets) = self._parts(spec, settings)
        model = build_model(spec)
        load_shared_state(model, state)
        if not images:
            return {"num-examples": 0, "val-loss": 0.0, "val-accuracy": 0.0}
        loader = DataLoader(ImageDataset(images, targets, spec), batch_size=settings.batch_size)
        stats = evaluate(model.to(resolve_device()), loader, resolve_device())
        return {"num-examples": len(images), "val-loss": stats.loss, "val-accuracy": stats.accuracy}


def as_float_metrics(metrics: dict[str, float]) -> dict[str, float | int]:
    """Plain Python numbers for a Flower MetricRecord."""
    return {k: int(v) if k == "num-examples" else float(np.asarray(v)) for k, v in metrics.items()}
