"""A hospital site: its own images, local training and evaluation. Knows nothing of Flower."""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from fedbridge_client import dp_sgd
from fedbridge_shared.data.samples import check_labels
from fedbridge_shared.data.split import assign_parts
from fedbridge_shared.data.tensors import load_resized, make_loader
from fedbridge_shared.engine import (
    CosineSchedule,
    fit,
    loss_and_accuracy,
    predict,
    proximal_penalty,
)
from fedbridge_shared.errors import ConfigError, DataError, FedbridgeError
from fedbridge_shared.models import build_model
from fedbridge_shared.protocol import (
    EvalReply,
    LocalSettings,
    RoundTask,
    SiteErrorCode,
    SiteFailure,
    TrainReply,
)
from fedbridge_shared.shortcut import check_mapped_folders, resolve_label_map
from fedbridge_shared.spec import ModelSpec
from fedbridge_shared.training import (
    resolve_device,
    set_targets,
    sets_never_validate,
    usable_index,
)
from fedbridge_shared.weights import load_shared_state, shared_state


class Site:
    """One site's data, split by patient into local train and validation parts.

    ``label_map`` (the site's own declaration, e.g. ``{"PNEUMONIA_UNSPECIFIED":
    ("BACTERIAL_PNEUMONIA", "VIRAL_PNEUMONIA")}``): a class folder whose films are known only as
    one of several model labels trains with the partial-label loss and never validates, as in
    ``fedbridge train --label-map``. Only counts of the model's own labels leave the site.
    """

    def __init__(
        self, data: Path, name: str, label_map: Mapping[str, Sequence[str]] | None = None
    ) -> None:
        self.data, self.name = Path(data), name
        self.label_map = {k: tuple(v) for k, v in (label_map or {}).items()}
        try:
            self.index = usable_index(self.data)
        except DataError as e:
            empty = "empty class folder" in str(e)
            code = SiteErrorCode.EMPTY_CLASS_FOLDER if empty else SiteErrorCode.DATA_FOLDER
            raise SiteFailure(str(e), code=code) from None
        try:
            check_mapped_folders(self.label_map, self.index.labels, where=self.data)
        except ConfigError as e:
            raise SiteFailure(f"site {name}: {e}", code=SiteErrorCode.LABELS_DIFFER) from None
        self._cache: dict[tuple, tuple] = {}
        self._patients: dict[tuple, list[str]] = {}

    def check_labels(self, spec: ModelSpec) -> None:
        """Refuse, before any training, class folders the model does not know (unless the
        site's label map declares them). A site that lacks some of the model's classes takes
        part with what it has (zero counts)."""
        try:
            if self.label_map:
                resolve_label_map(
                    self.index.labels, spec.labels, self.label_map, where=f"site {self.name}"
                )
            else:
                check_labels(self.index, spec.labels, where=f"site {self.name}")
        except FedbridgeError as e:
            raise SiteFailure(str(e), code=SiteErrorCode.LABELS_DIFFER) from None

    def label_sets(self, spec: ModelSpec) -> list[tuple[int, ...]]:
        """The partial-label sets of this site's label map under the model's labels."""
        return set_targets(spec.labels, self.label_map)[1]

    def _parts(self, spec: ModelSpec, settings: LocalSettings):
        """Decoded train/val images and targets, cached per input size and split settings."""
        key = (spec.image_size, spec.labels, settings.val_fraction, settings.seed)
        if key not in self._cache:
            self.check_labels(spec)
            weights = {"train": 1 - settings.val_fraction, "val": settings.val_fraction}
            parts = assign_parts(self.index.samples, weights, settings.seed)
            target, _ = set_targets(spec.labels, self.label_map)
            parts = sets_never_validate(parts, target, len(spec.labels))
            self._cache[key] = tuple(
                (_decode(parts[p], spec.image_size), [target[s.label] for s in parts[p]])
                for p in ("train", "val")
            )
            self._patients[key] = [s.patient_id for s in parts["train"]]
        return self._cache[key]

    def train_patients(self, spec: ModelSpec, settings: LocalSettings) -> list[str]:
        """The patient id of each training image (MANIFEST.csv / split.csv; else the file)."""
        self._parts(spec, settings)
        return self._patients[(spec.image_size, spec.labels, settings.val_fraction, settings.seed)]

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
            raise SiteFailure(f"site {self.name}: no training images", code=SiteErrorCode.NO_IMAGES)
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
        private = None
        if task.dp is not None:  # record-level DP-SGD: Poisson-sampled patients (dp_sgd.py)
            groups = dp_sgd.item_groups(self.train_patients(spec, settings), loader.dataset.copies)
            plan = dp_sgd.plan(
                task.dp, patients=len(groups), batch_size=settings.batch_size,
                local_epochs=settings.local_epochs, rounds=max(task.num_rounds, task.server_round),
            )  # fmt: skip
            loader = dp_sgd.patient_loader(loader.dataset, groups, plan)
            private = dp_sgd.DPSGD(plan)
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
            privacy=private,
            label_sets=self.label_sets(spec),
        )
        last = result.history[-1]
        spent = {}
        if private is not None:  # ε after every round so far (an upper bound if one was missed)
            steps = task.server_round * settings.local_epochs * private.plan.steps_per_epoch
            spent = {
                "epsilon": private.plan.epsilon(steps),
                "noise_multiplier": private.plan.noise_multiplier,
                "dp_patients": private.plan.patients,
            }
        reply = TrainReply(
            num_examples=len(images),
            train_loss=last["train_loss"],
            train_accuracy=last["train_accuracy"],
            seconds=sum(row["seconds"] for row in result.history),
            class_counts=_class_counts(targets, len(spec.labels)),
            **spent,
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


def _decode(samples, size: int) -> list[np.ndarray]:
    """Every image decoded; the files that cannot be are counted (the names stay here)."""
    images, bad = [], []
    for s in samples:
        try:
            images.append(load_resized(s.path, size))
        except DataError as e:
            bad.append(str(e))
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise SiteFailure(bad[0] + more, code=SiteErrorCode.UNREADABLE_IMAGES, count=len(bad))
    return images


def _class_counts(targets: list[int] | np.ndarray, n_labels: int) -> tuple[int, ...]:
    """Images per label index (before augmentation); a label set's films are not counted."""
    counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=n_labels)
    return tuple(int(n) for n in counts[:n_labels])
