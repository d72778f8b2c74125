"""The one training loop: bridge, central target and federated site training all call these."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from fedbridge_shared import defaults
from fedbridge_shared.errors import FedbridgeError
from fedbridge_shared.losses import hits, label_masks, make_criterion
from fedbridge_shared.metrics import cross_entropy
from fedbridge_shared.settings import TrainConfig, check

BatchHook = Callable[[int], None]
"""Called after each batch with the number of images it held (drives progress bars)."""


class PrivacyHook(Protocol):
    """Private training inside the one loop (``fedbridge_client.dp_sgd.DPSGD``)."""

    def wrap(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The model and optimiser to train with (per-sample clipping and noise)."""

    def empty_step(self) -> None:
        """A step on an empty (Poisson-sampled) batch: noise only."""

    def unwrap(self) -> None:
        """Undo ``wrap``: the plain model keeps the trained weights."""


@dataclass(frozen=True)
class EpochStats:
    loss: float
    accuracy: float
    n: int
    seconds: float


@dataclass
class FitResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False


@dataclass(frozen=True)
class CosineSchedule:
    """Cosine decay from the peak LR to 0 over ``total_steps``, entered at ``start_step``.

    A federated site continues one schedule across rounds: round r of R with E local epochs
    of S steps starts at ``(r - 1) * E * S`` of ``R * E * S``.
    """

    total_steps: int
    start_step: int = 0

    def factor(self, step: int) -> float:
        s = min(self.start_step + step, self.total_steps)
        return 0.5 * (1 + math.cos(math.pi * s / max(1, self.total_steps)))


def proximal_penalty(model: nn.Module, mu: float) -> Callable[[], torch.Tensor]:
    """FedProx's term μ/2 · ||w − w_global||², anchored at the model's current weights."""
    anchor = [p.detach().clone() for p in model.parameters()]

    def penalty() -> torch.Tensor:
        terms = ((p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
        return cast(torch.Tensor, mu / 2 * sum(terms))  # a sum of tensors

    return penalty


def make_ema(model: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of ``model``'s weights and buffers (BatchNorm statistics).

    After steps to weights w_1..w_T: ema_1 = w_1, ema_t = d · ema_{t-1} + (1 − d) · w_t, d = decay.
    """
    check(TrainConfig, "ema_decay", decay)
    if decay == 0:
        raise FedbridgeError("--ema-decay 0: no EMA to make (0 is off)")
    ema_fn = get_ema_multi_avg_fn(decay)  # type: ignore[no-untyped-call]  # torch leaves it untyped
    return AveragedModel(model, multi_avg_fn=ema_fn, use_buffers=True)


def make_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = defaults.WEIGHT_DECAY,
    backbone_lr_scale: float = defaults.BACKBONE_LR_SCALE,
) -> torch.optim.Optimizer:
    """AdamW without weight decay on norms and biases.

    ``backbone_lr_scale`` < 1 gives discriminative learning rates: the classifier (timm's
    ``get_classifier()``) learns at ``lr``, every other layer at ``lr * backbone_lr_scale``.
    """
    check(TrainConfig, "backbone_lr_scale", backbone_lr_scale)
    head: set[int] = set()
    if backbone_lr_scale != 1:
        if not hasattr(model, "get_classifier"):
            raise FedbridgeError(
                f"--backbone-lr-scale: {type(model).__name__} has no classifier to tell apart"
            )
        head = {id(p) for p in model.get_classifier().parameters()}  # type: ignore[operator]  # timm method
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((id(p) in head, p.ndim <= 1), []).append(p)
    return torch.optim.AdamW(
        [
            {
                "params": params,
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr": lr if is_head else lr * backbone_lr_scale,
            }
            for (is_head, no_decay), params in sorted(groups.items())
        ],
        lr=lr,
    )


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader[Any],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    label_smoothing: float = 0.0,
    on_batch: BatchHook | None = None,
    penalty: Callable[[], torch.Tensor] | None = None,
    ema: AveragedModel | None = None,
    privacy: PrivacyHook | None = None,
    label_sets: Sequence[Sequence[int]] = (),
) -> EpochStats:
    """One pass over ``loader``; raises if the loss stops being finite.

    ``penalty`` is added to every batch loss (e.g. FedProx's proximal term); ``ema`` is updated
    after every optimiser step; ``privacy``: the hook ``model`` and ``optimizer`` were wrapped by
    (an empty batch is then a noise-only step).
    """
    model.train()
    criterion: nn.Module | None = None  # built at the first batch, when the classes are known
    masks: torch.Tensor | None = None
    total_loss, correct, n, start = 0.0, 0, 0, time.perf_counter()
    for x, y in loader:
        if privacy is not None and not len(y):
            privacy.empty_step()
            if scheduler is not None:
                scheduler.step()
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        if criterion is None:
            criterion = make_criterion(
                num_classes=logits.shape[1], label_smoothing=label_smoothing, label_sets=label_sets
            )
            masks = label_masks(logits.shape[1], label_sets) if label_sets else None
        loss = criterion(logits, y)
        if penalty is not None:
            loss = loss + penalty()
        if not torch.isfinite(loss):
            raise FedbridgeError(
                f"training diverged: loss is {loss.item()} after {n} images; lower --lr"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update_parameters(model)
        if scheduler is not None:
            scheduler.step()
        total_loss += loss.item() * len(y)
        correct += hits(logits, y, masks)
        n += len(y)
        if on_batch:
            on_batch(len(y))
    n = max(n, 1)
    return EpochStats(total_loss / n, correct / n, n, time.perf_counter() - start)


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: DataLoader[Any],
    device: torch.device,
    on_batch: BatchHook | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """True class indices and softmax probabilities (N, K) for every item of ``loader``."""
    model.eval()
    ys, ps = [], []
    for x, y in loader:
        ps.append(torch.softmax(model(x.to(device)), dim=1).cpu())
        ys.append(torch.as_tensor(y))
        if on_batch:
            on_batch(len(y))
    return torch.cat(ys).numpy(), torch.cat(ps).double().numpy()


def evaluate(model: nn.Module, loader: DataLoader[Any], device: torch.device) -> EpochStats:
    """Mean cross-entropy and accuracy over ``loader``."""
    start = time.perf_counter()
    y, p = predict(model, loader, device)
    loss, acc = loss_and_accuracy(y, p)
    return EpochStats(loss, acc, len(y), time.perf_counter() - start)


def loss_and_accuracy(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """Mean cross-entropy ``-log p(true class)`` and accuracy of predictions (0, 0 when empty)."""
    if not len(y):
        return 0.0, 0.0
    return cross_entropy(y, p), float((p.argmax(1) == y).mean())


def fit(
    model: nn.Module,
    train_loader: DataLoader[Any],
    *,
    device: torch.device,
    epochs: int,
    lr: float,
    val_loader: DataLoader[Any] | None = None,
    weight_decay: float = defaults.WEIGHT_DECAY,
    patience: int = defaults.PATIENCE,
    label_smoothing: float = defaults.LABEL_SMOOTHING,
    schedule: CosineSchedule | None = None,
    epoch_offset: int = 0,
    penalty: Callable[[], torch.Tensor] | None = None,
    ema_decay: float = 0.0,
    backbone_lr_scale: float = defaults.BACKBONE_LR_SCALE,
    on_batch: BatchHook | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    privacy: PrivacyHook | None = None,
    label_sets: Sequence[Sequence[int]] = (),
) -> FitResult:
    """Train for ``epochs`` with AdamW and a cosine LR; keep the weights of the best val loss.

    ``schedule`` defaults to one cosine over these epochs; a federated site passes the slice of
    the federation's schedule for this round. ``epoch_offset`` numbers epochs globally (the
    online augmentation is redrawn per global epoch). ``penalty`` is added to every batch loss
    (FedProx). Stops early when the validation loss has not improved for ``patience`` epochs;
    without a validation loader every epoch runs and the last weights are kept.
    ``ema_decay`` > 0 keeps an EMA of the weights (:func:`make_ema`): validation, early stopping
    and the weights left in ``model`` are then the EMA's. ``backbone_lr_scale``: see
    :func:`make_optimizer`. ``privacy``: private training (record-level DP-SGD) through this
    same loop; ``train_loader`` is then the hook's (Poisson-sampled) loader. ``label_sets``:
    see :func:`train_one_epoch` (validation holds ordinary labels only).
    """
    model.to(device)
    optimizer = make_optimizer(
        model, lr=lr, weight_decay=weight_decay, backbone_lr_scale=backbone_lr_scale
    )
    ema = make_ema(model, ema_decay) if ema_decay else None
    kept = ema.module if ema is not None else model  # the weights validated and returned
    schedule = schedule or CosineSchedule(max(1, epochs * len(train_loader)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor)
    trained = model
    if privacy is not None:
        trained, optimizer = privacy.wrap(model, optimizer)
    try:
        result = _epochs(
            model=model, trained=trained, train_loader=train_loader, optimizer=optimizer,
            scheduler=scheduler, ema=ema, kept=kept, device=device, epochs=epochs,
            val_loader=val_loader, patience=patience,
            label_smoothing=label_smoothing, epoch_offset=epoch_offset, penalty=penalty,
            on_batch=on_batch, on_epoch=on_epoch, privacy=privacy, label_sets=label_sets,
        )  # fmt: skip
    finally:
        if privacy is not None:
            privacy.unwrap()
    return result


def _epochs(
    *, model: nn.Module, trained: nn.Module, train_loader: DataLoader[Any],
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
    ema: AveragedModel | None, kept: nn.Module, device: torch.device, epochs: int,
    val_loader: DataLoader[Any] | None, patience: int, label_smoothing: float, epoch_offset: int,
    penalty: Callable[[], torch.Tensor] | None, on_batch: BatchHook | None,
    on_epoch: Callable[[dict[str, Any]], None] | None, privacy: PrivacyHook | None,
    label_sets: Sequence[Sequence[int]],
) -> FitResult:  # fmt: skip
    """``fit``'s epochs: ``trained`` is ``model`` or its private wrapper."""
    result = FitResult()
    best_loss, best_state, stale = math.inf, None, 0
    for epoch in range(1, epochs + 1):
        dataset = train_loader.dataset
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch_offset + epoch)
        train = train_one_epoch(
            trained,
            train_loader,
            optimizer,
            device,
            scheduler=scheduler,
            label_smoothing=label_smoothing,
            on_batch=on_batch,
            penalty=penalty,
            ema=ema,
            privacy=privacy,
            label_sets=label_sets,
        )
        row = {
            "epoch": epoch_offset + epoch,
            "train_loss": train.loss,
            "train_accuracy": train.accuracy,
            "n": train.n,
            "seconds": train.seconds,
        }
        if val_loader is not None:
            val = evaluate(kept, val_loader, device)
            row.update(val_loss=val.loss, val_accuracy=val.accuracy)
            if val.loss < best_loss - 1e-6:
                best_loss, stale, result.best_epoch = val.loss, 0, epoch
                best_state = copy.deepcopy(kept.state_dict())
            else:
                stale += 1
        else:
            result.best_epoch = epoch
        result.history.append(row)
        if on_epoch:
            on_epoch(row)
        if val_loader is not None and stale >= patience:
            result.stopped_early = True
            break
    if best_state is None and ema is not None:
        best_state = ema.module.state_dict()
    if best_state is not None:
        model.load_state_dict(best_state)
    return result
