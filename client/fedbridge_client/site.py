"""A hospital site: its own images, local training and evaluation. Knows nothing of Flower."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch

from fedbridge_shared.data.samples import check_labels
from fedbridge_shared.data.split import assign_parts
from fedbridge_shared.data.tensors import load_images, make_loader
from fedbridge_shared.engine import (
    CosineSchedule,
    fit,
    loss_and_accuracy,
    predict,
    proximal_penalty,
)
from fedbridge_shared.errors import DataError
from fedbridge_shared.models import build_model
from fedbridge_shared.protocol import EvalReply, LocalSettings, RoundTask, TrainReply
from fedbridge_shared.spec import ModelSpec
from fedbridge_shared.training import resolve_device, usable_index
from fedbridge_shared.weights import load_shared_state, shared_state


class Site:
    """One site's data, split by patient into local train and validation parts."""

    def __init__(self, data: Path, name: str) -> None:
        self.data, self.name = Path(data), name
        self.index = usable_index(self.data)
        self._cache: dict[tuple, tuple] = {}

    def check_labels(self, spec: ModelSpec) -> None:
        """Refuse, before any training, class folders the model does not know. A site that
        lacks some of the model's classes takes part with what it has (zero counts)."""
        check_labels(self.index, spec.labels, where=f"site {self.name}")

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
        self, task: RoundTask, state: dict[str, torch.Tensor] | np.ndarray
    ) -> tuple[dict[str, torch.Tensor], TrainReply]:
        """Local epochs from the global weights (a state dict or a packed vector), through the
        one training loop.

        The cosine learning-rate schedule spans the whole federation: this round trains the
        slice ``(round - 1) / rounds`` … ``round / rounds`` of it.
        """
        spec, settings = ModelSpec.from_dict(task.spec), task.settings
        (images, targets), _ = self._parts(spec, settings)
        if not images:
            raise DataError(f"site {self.name}: no training images")
        seed = self._seed(settings, task.server_round)
        if settings.threads > 0:
            torch.set_num_threads(settings.threads)
        torch.manual_seed(seed)
        device = resolve_device()
        model = build_model(spec)
        load_shared_state(model, state)
        model.to(device)
        loader = make_loader(
            images,
            targets,
            spec,
            batch_size=settings.batch_size,
            train=True,
            preset=settings.augment,
            augment_per_sample=settings.augment_per_sample,
            seed=settings.seed,
            shuffle_seed=seed,
            balanced=settings.balanced,
        )
        per_round = settings.local_epochs * len(loader)
        done = task.server_round - 1
        result = fit(
            model,
            loader,
            device=device,
            epochs=settings.local_epochs,
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            label_smoothing=settings.label_smoothing,
            schedule=CosineSchedule(
                total_steps=max(task.num_rounds, task.server_round) * per_round,
                start_step=done * per_round,
            ),
            epoch_offset=done * settings.local_epochs,
            penalty=proximal_penalty(model, settings.proximal_mu) if settings.proximal_mu else None,
            ema_decay=settings.ema_decay,
        )
        last = result.history[-1]
        reply = TrainReply(
            num_examples=len(images),
            train_loss=last["train_loss"],
            train_accuracy=last["train_accuracy"],
            seconds=sum(row["seconds"] for row in result.history),
            class_counts=_class_counts(targets, len(spec.labels)),
        )
        return shared_state(model), reply

    def evaluate(self, task: RoundTask, state: dict[str, torch.Tensor] | np.ndarray) -> EvalReply:
        """Loss, accuracy and per-class hits of the global weights on this site's validation
        patients (the same loss and accuracy as ``engine.evaluate``)."""
        spec = ModelSpec.from_dict(task.spec)
        _, (images, targets) = self._parts(spec, task.settings)
        if not images:
            return EvalReply(num_examples=0, class_counts=(0,) * len(spec.labels))
        model = build_model(spec)
        load_shared_state(model, state)
        device = resolve_device()
        loader = make_loader(images, targets, spec, batch_size=task.settings.batch_size)
        y, p = predict(model.to(device), loader, device)
        loss, accuracy = loss_and_accuracy(y, p)
        right = p.argmax(axis=1) == y
        k = len(spec.labels)
        return EvalReply(
            num_examples=len(images),
            val_loss=loss,
            val_accuracy=accuracy,
            class_counts=_class_counts(targets, k),
            class_correct=_class_counts(y[right], k),
        )


def _class_counts(targets: list[int] | np.ndarray, n_labels: int) -> tuple[int, ...]:
    """Images per label index (before augmentation)."""
    return tuple(
        int(n) for n in np.bincount(np.asarray(targets, dtype=np.int64), minlength=n_labels)
    )
