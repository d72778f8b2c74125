"""Record-level differential privacy at a site: DP-SGD (Opacus) with one patient as the record.

Each step samples patients independently at rate ``q = batch-size / patients`` (Poisson), takes
one random image (one random augmented copy) of each sampled patient, clips each patient's
gradient to ``max-grad-norm`` and adds Gaussian noise ``N(0, (σ·max-grad-norm)²)`` to the sum.
A patient therefore touches at most one clipped gradient per step whatever their number of
images, and Opacus' RDP accountant for (σ, q, steps) bounds the privacy of a **patient**
(user-level DP). Patient ids come from the site's MANIFEST.csv / split.csv through its data
loader; an image the manifest does not list counts as its own patient (then ε is per image, and
a patient with k unlisted images is covered only at about kε).

BatchNorm is **frozen**, not replaced: its layers run in inference mode with the bridge's
statistics and affine weights, which stay untrained. Opacus' ``ModuleValidator.fix`` would swap
them for GroupNorm, a different architecture from the bridge bundle every site, the
coordinator and the bedside model share, whose BatchNorm weights could no longer be loaded;
and BatchNorm in training mode mixes patients within a batch (no per-patient gradient) and
writes their statistics into the model outside the clipped gradients.

The noise and the patient sampling draw from a generator seeded by the OS (``os.urandom``),
never from the run's seed: the coordinator knows that seed and could otherwise replay the noise.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate

from fedbridge_shared import dp_accounting as accounting
from fedbridge_shared.errors import ConfigError
from fedbridge_shared.protocol import RecordDP


@dataclass(frozen=True)
class Plan:
    """A site's DP-SGD for the whole run: the same σ and sampling rate every round."""

    patients: int
    sample_rate: float
    steps_per_epoch: int
    total_steps: int
    noise_multiplier: float
    delta: float
    max_grad_norm: float
    expected_batch: int

    def epsilon(self, steps: int) -> float:
        """ε per patient after ``steps`` DP-SGD steps (the accountant's bound)."""
        return accounting.epsilon(
            self.noise_multiplier, sample_rate=self.sample_rate, steps=steps, delta=self.delta
        )


def plan(dp: RecordDP, *, patients: int, batch_size: int, local_epochs: int, rounds: int) -> Plan:
    """σ and q for ``rounds`` × ``local_epochs`` epochs of ``ceil(patients / batch-size)`` steps;
    σ is ``dp.noise_multiplier`` or the smallest reaching ``dp.target_epsilon`` at this site."""
    if patients < 1:
        raise ConfigError("DP-SGD: the site has no training patients")
    expected = min(batch_size, patients)
    q = expected / patients
    per_epoch = math.ceil(patients / expected)
    total = rounds * local_epochs * per_epoch
    sigma = dp.noise_multiplier or accounting.noise_for(
        dp.target_epsilon, delta=dp.delta, sample_rate=q, steps=total,
        what=f"'dp.target-epsilon' (a site with {patients} patients)", unit="DP-SGD steps",
    )  # fmt: skip
    return Plan(patients, q, per_epoch, total, sigma, dp.delta, dp.max_grad_norm, expected)


def secret_generator() -> torch.Generator:
    """A generator the coordinator cannot reproduce."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))


class PatientSampler(Sampler[list[int]]):
    """Batches of dataset items: each patient joins a step with probability ``q`` and brings one
    uniformly chosen item of theirs. ``steps`` batches per epoch (some may be empty)."""

    def __init__(
        self, groups: Sequence[Sequence[int]], *, q: float, steps: int, generator: torch.Generator
    ) -> None:
        self.groups = [list(g) for g in groups if len(g)]
        self.q, self.steps, self.generator = q, steps, generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        sizes = torch.tensor([len(g) for g in self.groups])
        for _ in range(self.steps):
            chosen = torch.rand(len(self.groups), generator=self.generator) < self.q
            picks = (torch.rand(len(self.groups), generator=self.generator) * sizes).long()
            yield [self.groups[i][int(picks[i])] for i in torch.nonzero(chosen).flatten()]


def item_groups(patient_ids: Sequence[str], copies: int) -> list[list[int]]:
    """Dataset items per patient: image ``i`` is items ``i·copies … i·copies + copies − 1``
    (``ImageDataset``'s offline augmented copies)."""
    groups: dict[str, list[int]] = {}
    for i, patient in enumerate(patient_ids):
        groups.setdefault(patient, []).extend(range(i * copies, (i + 1) * copies))
    return [groups[p] for p in sorted(groups)]


def patient_loader(dataset: Dataset, groups: Sequence[Sequence[int]], p: Plan) -> DataLoader:
    """The site's training DataLoader under DP-SGD (Poisson-sampled patients; empty batches are
    zero-length tensors: such a step is noise only)."""
    x0, _ = dataset[groups[0][0]]
    empty = (torch.empty((0, *x0.shape)), torch.empty((0,), dtype=torch.long))

    def collate(batch):
        return default_collate(batch) if batch else empty

    sampler = PatientSampler(
        groups, q=p.sample_rate, steps=p.steps_per_epoch, generator=secret_generator()
    )
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)


class DPSGD:
    """The training loop's privacy hook (``engine.fit(privacy=…)``): Opacus' per-sample
    gradients, clipping and noise, with BatchNorm frozen."""

    def __init__(self, p: Plan) -> None:
        self.plan = p
        self._wrapped = None
        self._optimizer = None
        self._hooks: list = []

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        """(per-sample-gradient model, DP optimiser) to train with."""
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer
        from opacus.validators import ModuleValidator

        for m in model.modules():
            if isinstance(getattr(m, "inplace", None), bool):
                m.inplace = False  # Opacus' backward hooks forbid in-place activations
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for param in m.parameters(recurse=False):
                    param.requires_grad_(False)
                # inference mode at every forward, whatever model.train() set
                self._hooks.append(m.register_forward_pre_hook(_inference_mode))
        model.train()
        # the stem's input needs no gradient: Opacus' hook then says so at every backward
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise ConfigError(f"DP-SGD cannot train this model: {errors[0]}")
        self._wrapped = GradSampleModule(model, loss_reduction="mean")
        self._optimizer = DPOptimizer(
            optimizer, noise_multiplier=self.plan.noise_multiplier,
            max_grad_norm=self.plan.max_grad_norm, expected_batch_size=self.plan.expected_batch,
            generator=secret_generator(),
        )  # fmt: skip
        return self._wrapped, self._optimizer

    def empty_step(self) -> None:
        """A step whose Poisson sample drew nobody: the noise alone (the accountant counts it)."""
        for group in self._optimizer.param_groups:
            for param in group["params"]:
                if param.requires_grad:
                    param.grad_sample = torch.zeros((1, *param.shape), device=param.device)
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)

    def unwrap(self) -> None:
        """Remove Opacus' hooks (the plain model keeps its trained weights)."""
        if self._wrapped is not None:
            self._wrapped._close()
        for h in self._hooks:
            h.remove()
        self._wrapped, self._optimizer, self._hooks = None, None, []


def _inference_mode(module: nn.Module, _inputs) -> None:
    module.training = False
