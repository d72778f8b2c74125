"""The training loss: cross-entropy, and its partial-label form for films whose class is a set.

A film labelled with a *set* of classes (e.g. NIH "Pneumonia": bacterial or viral, organism not
known) is trained to put its probability mass on the set, not on one guessed member:
``−log Σ_{c∈S} p_c``. Targets ``0 … C−1`` are ordinary classes; target ``C + k`` is the k-th set.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def label_masks(num_classes: int, label_sets: Sequence[Sequence[int]]) -> torch.Tensor:
    """(C + K, C) boolean rows: row i < C is class i alone, row C + k the k-th set."""
    masks = torch.eye(num_classes, dtype=torch.bool)
    extra = torch.zeros(len(label_sets), num_classes, dtype=torch.bool)
    for k, members in enumerate(label_sets):
        extra[k, list(members)] = True
    return torch.cat([masks, extra])


class PartialLabelLoss(nn.Module):
    """Mean ``−log Σ_{c∈S(y)} softmax(logits)_c``; plain (smoothed) CE where S(y) is one class."""

    def __init__(self, masks: torch.Tensor, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.masks: torch.Tensor
        self.register_buffer("masks", masks)
        self.ce = nn.CrossEntropyLoss(label_smoothing=label_smoothing, reduction="none")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        c = logits.shape[1]
        single = target < c
        loss = torch.zeros(len(target), dtype=logits.dtype, device=logits.device)
        if single.any():
            loss[single] = self.ce(logits[single], target[single])
        if (~single).any():
            rows = self.masks[target[~single]].to(logits.device)
            part = logits[~single]
            inside = torch.logsumexp(part.masked_fill(~rows, float("-inf")), dim=1)
            loss[~single] = torch.logsumexp(part, dim=1) - inside
        return loss.mean()


def make_criterion(
    *, num_classes: int, label_smoothing: float, label_sets: Sequence[Sequence[int]] = ()
) -> nn.Module:
    """Cross-entropy, or :class:`PartialLabelLoss` when some targets are label sets."""
    if not label_sets:
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    return PartialLabelLoss(label_masks(num_classes, label_sets), label_smoothing)


def hits(logits: torch.Tensor, target: torch.Tensor, masks: torch.Tensor | None) -> int:
    """How many predictions fall in their target's class (or label set)."""
    pred = logits.argmax(1)
    if masks is None:
        return int((pred == target).sum().item())
    rows = masks.to(logits.device)[target]
    return int(rows.gather(1, pred[:, None]).sum().item())
