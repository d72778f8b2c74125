"""Central stages (bridge, target, local-only) and evaluation of a bundle on a class-folder tree."""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fedbridge_shared import defaults
from fedbridge_shared.data.samples import FolderIndex, Sample, scan_folder
from fedbridge_shared.data.split import assign_parts, copy_groups
from fedbridge_shared.data.tensors import images_per_epoch, load_images, make_loader
from fedbridge_shared.data.validate import validate_index
from fedbridge_shared.engine import fit, predict
from fedbridge_shared.errors import ConfigError, DataError
from fedbridge_shared.files import check_writable
from fedbridge_shared.metrics import compute_metrics
from fedbridge_shared.modality import augment_for, modality_for_stage
from fedbridge_shared.models import init_model
from fedbridge_shared.settings import TrainConfig
from fedbridge_shared.shortcut import check_mapped_folders, check_targets, mapped_labels
from fedbridge_shared.spec import is_bundle, read_bundle_record, save_bundle

PAPER_PRESET = {"arch": "inception_v4", "image_size": 299, "augment_per_sample": 10}
"""The paper's settings (Carr, Sami, Sanderson): Inception-V4 at 299 px, ×10 expansion."""


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N`` of a device that exists."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"--device {name!r}: not a device (auto | cpu | cuda | cuda:N)") from e
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ConfigError(f"--device {name!r}: this machine has {count} CUDA devices")
    elif device.type != "cpu":
        raise ConfigError(f"--device {name!r}: use auto, cpu, cuda or cuda:N")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
    )


def usable_index(
    data: Path,
    manifest: Path | None = None,
    *,
    allow: Iterable[str] = (),
    console: Console | None = None,
) -> FolderIndex:
    """Scan a training folder through the shared dataset validation (``allow`` waives kinds;
    waived problems are printed on ``console``), refusing empty class folders."""
    index = scan_folder(Path(data), manifest)
    for text in validate_index(index, allow=allow):
        if console is not None:
            console.print(f"[yellow]warning:[/] {escape(text)}", highlight=False)
    if index.empty_classes:
        raise DataError(f"{Path(data) / index.empty_classes[0]}: empty class folder")
    return index


def union_index(
    folders: Sequence[Path],
    manifest: Path | None = None,
    *,
    allow: Iterable[str] = (),
    console: Console | None = None,
) -> tuple[FolderIndex, list[dict[str, Any]]]:
    """Several class-folder trees as one: labels united by name, samples of every folder.

    Returns the merged index and one record per folder (path, labels, images per label,
    patients, where the ids came from). Images no manifest lists get their folder in their
    patient id, so two folders' loose files never merge into one patient.
    """
    folders = [Path(f) for f in folders]
    if not folders:
        raise ConfigError("give at least one data folder")
    if manifest is not None and len(folders) > 1:
        raise ConfigError("--manifest: only with one data folder (each folder finds its own)")
    resolved = [f.resolve() for f in folders]
    dupes = [str(f) for f, r in zip(folders, resolved, strict=True) if resolved.count(r) > 1]
    if dupes:
        raise ConfigError(f"{dupes[0]}: data folder given twice")
    indexes = [usable_index(f, manifest, allow=allow, console=console) for f in folders]
    records = [
        {"path": str(i.root), "labels": list(i.labels), "counts": i.counts(),
         "patients": len({s.patient_id for s in i.samples}), "patient_ids": i.patient_source}
        for i in indexes
    ]  # fmt: skip
    if len(indexes) == 1:
        return indexes[0], records
    samples = [
        s if not s.patient_id.startswith("file:")
        else dataclasses.replace(s, patient_id=f"file:{i.root.name}/{s.patient_id[5:]}")
        for i in indexes
        for s in i.samples
    ]  # fmt: skip
    merged = FolderIndex(
        root=indexes[0].root,
        labels=tuple(sorted({label for i in indexes for label in i.labels})),
        samples=tuple(samples),
        patient_source="; ".join(f"{i.root.name}: {i.patient_source}" for i in indexes),
    )
    return merged, records


def target_plan(
    folder_labels: Sequence[str],
    label_map: Mapping[str, Sequence[str]] | None,
    *,
    where: object,
    known: Iterable[str] = (),
) -> tuple[tuple[str, ...], dict[str, int], list[tuple[int, ...]]]:
    """The model's labels, each folder label's training target, and the label sets.

    Without a map the model's labels are the folders'. A mapped folder label is not a model
    label: it trains as its one target, or as target ``C + k`` (the k-th set) when it names
    several (:mod:`fedbridge_shared.losses`). A target must be an unmapped folder label or one
    of ``known`` (the ``--init`` bundle's labels): a typo never becomes a new class.
    """
    label_map = dict(label_map or {})
    check_mapped_folders(label_map, folder_labels, where=where)
    allowed = {x for x in folder_labels if x not in label_map} | set(known)
    check_targets(
        label_map, allowed, f"is neither a class folder of {where} nor a label of the --init bundle"
    )
    labels = mapped_labels(folder_labels, label_map)
    target_of, sets = set_targets(labels, label_map)
    return labels, target_of, sets


def set_targets(
    labels: Sequence[str], label_map: Mapping[str, Sequence[str]]
) -> tuple[dict[str, int], list[tuple[int, ...]]]:
    """Each label's training target under the model's ``labels``: its index; a mapped folder
    label's one target, or ``C + k`` for the k-th label set (:mod:`fedbridge_shared.losses`)."""
    target_of = {label: i for i, label in enumerate(labels)}
    sets: list[tuple[int, ...]] = []
    for name, targets in label_map.items():
        idx = tuple(sorted(target_of[t] for t in targets))
        if len(idx) == 1:
            target_of[name] = idx[0]
        else:
            target_of[name] = len(labels) + len(sets)
            sets.append(idx)
    return target_of, sets


def sets_never_validate(
    parts: dict[str, list[Sample]], target_of: Mapping[str, int], n_labels: int
) -> dict[str, list[Sample]]:
    """``parts`` with every patient who has a set-labelled film (target ≥ ``n_labels``) moved
    whole from validation to training: validation needs one true class, and no patient may
    be on both sides."""
    moved = {s.patient_id for s in parts["val"] if target_of[s.label] >= n_labels}
    if not moved:
        return parts
    return {
        **parts,
        "train": parts["train"] + [s for s in parts["val"] if s.patient_id in moved],
        "val": [s for s in parts["val"] if s.patient_id not in moved],
    }


def decode(
    samples: Sequence[Sample], size: int, *, console: Console, what: str
) -> list[np.ndarray]:
    """Decode and resize every image with a progress bar; a bad file stops with DataError."""
    with progress(console) as bar:
        task = bar.add_task(f"reading {what}", total=len(samples), info="")
        return load_images(samples, size, on_image=lambda: bar.advance(task))


def run_stage(
    stage: str,
    data: Path | Sequence[Path],
    *,
    out: Path,
    init: str,
    config: TrainConfig,
    arch: str | None = None,
    image_size: int | None = None,
    manifest: Path | None = None,
    device: str = "auto",
    force: bool = False,
    console: Console | None = None,
    allow: Iterable[str] = (),
    label_map: Mapping[str, Sequence[str]] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Train one central stage on a class-folder tree and write a bundle to ``out``.

    ``data`` may be several trees (:func:`union_index`: the labels' union by name; each folder
    recorded in ``training["folders"]``). Validation images are held out by patient; early
    stopping keeps the best validation loss.
    ``label_map``: a folder label → the model labels it stands for (:func:`target_plan`); a
    set-labelled film trains with the partial-label loss and never validates.
    Nothing is written unless training finishes. Returns the bundle path and validation metrics.
    """
    console = console or Console(stderr=True)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is a file; choose another --out")
    if out.exists() and not is_bundle(out) and any(out.iterdir()):
        raise ConfigError(f"{out}: exists and is not a bundle; choose another --out")
    if is_bundle(out) and not force:
        raise ConfigError(
            f"{out}: a bundle is already there; pass --force to replace its model "
            "(other files in the folder are kept)"
        )
    check_writable(out)
    started = time.perf_counter()
    dev = resolve_device(device)  # a bad --device fails before any image is read
    folders = [Path(data)] if isinstance(data, str | Path) else [Path(d) for d in data]
    index, folder_records = union_index(folders, manifest, allow=allow, console=console)
    seed_everything(config.seed)
    known: list[str] = []  # the --init bundle's labels, from model.json alone (no weights)
    if label_map and is_bundle(Path(init)):
        known = list(read_bundle_record(Path(init))["spec"].get("labels", []))
    model_labels, target_of, label_sets = target_plan(
        index.labels, label_map, where=folders[0], known=known
    )
    model, spec = init_model(init, model_labels, arch, image_size)
    if config.intensity is not None:
        spec = dataclasses.replace(spec, intensity=config.intensity)
    modality = modality_for_stage(
        requested=config.modality, inherited=spec.modality, augment=config.augment or ""
    )
    spec = dataclasses.replace(spec, modality=modality)
    if config.augment is None:  # the modality's own augmentation, never another's by default
        config = config.replace(augment=augment_for(modality, defaults.AUGMENT))

    parts = {"train": list(index.samples), "val": []}
    if config.val_fraction > 0:
        parts = assign_parts(
            index.samples,
            {"train": 1 - config.val_fraction, "val": config.val_fraction},
            config.seed,
            group_of=copy_groups(index.samples)[0],  # a copy never validates its original
        )
    parts = sets_never_validate(parts, target_of, len(spec.labels))
    if len(parts["val"]) < 2:
        parts = {"train": list(index.samples), "val": []}
    train_imgs = decode(
        parts["train"], spec.image_size, console=console, what=f"{stage} training images"
    )
    val_imgs = decode(parts["val"], spec.image_size, console=console, what="validation images")
    train_loader = make_loader(
        train_imgs,
        [target_of[s.label] for s in parts["train"]],
        spec,
        batch_size=config.batch_size,
        train=True,
        preset=config.augment or defaults.AUGMENT,  # resolved above, never None here
        augment_per_sample=config.augment_per_sample,
        online=config.online_augment,
        seed=config.seed,
        balanced=config.balanced,
    )
    val_loader = None
    if val_imgs:
        val_loader = make_loader(
            val_imgs, [target_of[s.label] for s in parts["val"]], spec, batch_size=config.batch_size
        )
    train_ds = train_loader.dataset
    console.print(
        f"[bold]{stage}[/]: {spec.arch} @ {spec.image_size}px, init {spec.init.get('kind')}, "
        f"{len(parts['train'])} training images (×{1 + config.augment_per_sample} = "
        f"{len(train_ds)}), {len(parts['val'])} validation, device {dev}"  # type: ignore[arg-type]  # a sized Dataset
    )
    with progress(console) as bar:
        total = images_per_epoch(train_loader)  # the last partial batch is dropped
        task = bar.add_task(f"{stage} epoch 1/{config.epochs}", total=total, info="")

        def on_epoch(row: dict[str, Any]) -> None:
            info = f"loss {row['train_loss']:.3f}"
            if "val_loss" in row:
                info += f"  val loss {row['val_loss']:.3f} acc {row['val_accuracy']:.3f}"
            bar.update(task, info=info)
            if row["epoch"] < config.epochs:
                bar.update(
                    task,
                    completed=0,
                    description=f"{stage} epoch {row['epoch'] + 1}/{config.epochs}",
                )
            console.print(f"  epoch {row['epoch']}: {info}")

        ema = ema_plan(config.ema_decay, steps=config.epochs * len(train_loader))
        if config.ema_decay and not ema["applied"]:
            console.print(
                f"[yellow]--ema-decay {config.ema_decay:g} not applied: this stage takes "
                f"{ema['steps']} optimiser steps, fewer than the EMA's horizon of "
                f"{ema['horizon']} (1 / (1 − decay)); the raw weights are kept[/]"
            )
        result = fit(
            model,
            train_loader,
            val_loader=val_loader,
            device=dev,
            epochs=config.epochs,
            lr=config.lr,
            weight_decay=config.weight_decay,
            patience=config.patience,
            label_smoothing=config.label_smoothing,
            ema_decay=config.ema_decay if ema["applied"] else 0.0,
            backbone_lr_scale=config.backbone_lr_scale,
            on_batch=lambda n: bar.advance(task, n),
            on_epoch=on_epoch,
            label_sets=label_sets,
        )
    val_metrics: dict[str, Any] = {}
    if val_loader is not None:
        y, probs = predict(model, val_loader, dev)
        val_metrics = compute_metrics(y, probs, spec.labels, n_bootstrap=200, seed=config.seed)
    training = {
        "stage": stage,
        "data": " + ".join(r["path"] for r in folder_records),
        "folders": folder_records,
        "patient_ids": index.patient_source,
        "counts": {k: dict(Counter(s.label for s in v)) for k, v in parts.items()},
        "patients": {k: len({s.patient_id for s in v}) for k, v in parts.items()},
        "config": config.model_dump(),
        "label_map": {k: list(v) for k, v in (label_map or {}).items()},
        "device": str(dev),
        "history": result.history,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "ema": ema,
        "seconds": round(time.perf_counter() - started, 1),
    }
    save_bundle(out, spec, model.state_dict(), training, {"validation": val_metrics})
    return out, val_metrics


def ema_plan(decay: float, *, steps: int) -> dict[str, Any]:
    """Whether a stage of ``steps`` optimiser steps runs the EMA of ``decay``: only when it
    takes at least the EMA's horizon 1 / (1 − decay) steps. A shorter run's EMA would be mostly
    its first weights (0.99 over 30 steps keeps 75 % of step 1); the raw weights are better."""
    horizon = math.ceil(round(1 / (1 - decay), 6)) if decay else 0  # 1/(1-0.9) is 10.000…02
    return {"decay": decay, "steps": steps, "horizon": horizon,
            "applied": bool(decay) and steps >= horizon}  # fmt: skip


def scored_samples(
    samples: Sequence[Sample], mapping: Mapping[str, Sequence[str]] | None
) -> list[Sample]:
    """The samples :func:`fedbridge_shared.assessment.assess`'s paper metrics cover: all of them
    without a mapping, else those whose folder label maps to exactly one model label."""
    if mapping is None:
        return list(samples)
    return [s for s in samples if len(mapping.get(s.label, (s.label,))) == 1]


def training_data_overlap(training: dict[str, Any], data: Path) -> str | None:
    """A warning when ``data`` is (inside, or holds) the folder the bundle was trained on, as
    recorded in model.json; None otherwise (federated bundles record no site paths)."""
    recorded = training.get("data")
    if not recorded:
        return None
    here = Path(data).resolve()
    for folder in str(recorded).split(" + "):  # a bridge on several folders joins them
        trained = Path(folder).resolve()
        if here == trained or here.is_relative_to(trained) or trained.is_relative_to(here):
            return (
                f"evaluated on {here}, which overlaps the bundle's own training data {trained} "
                "(recorded in model.json): these numbers measure memory, not performance on "
                "new patients"
            )
    return None
