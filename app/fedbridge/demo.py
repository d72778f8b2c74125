"""The end-to-end demo: split → bridge → target (federated, pooled, local) → assess.

The target stage runs three ways on the same three sites so the table answers the product's
question: federated (FedAvg, only weights leave a site) vs central with the sites' images
pooled vs each site alone. Every arm gets metrics, plots and an HTML report.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedbridge_shared import defaults
from fedbridge_shared.data.split import split_folder
from fedbridge_shared.data.synthetic import make_phantom_dataset
from fedbridge_shared.errors import ConfigError
from fedbridge_shared.files import atomic_write
from fedbridge_shared.models import find_local_imagenet_weights
from fedbridge_shared.training import TrainConfig, run_stage, usable_index

DEMO_MARKER = ".fedbridge-demo"
SITES = 3  # hospital sites the target set is split across


@dataclass(frozen=True)
class DemoPlan:
    """Budget of one demo run; ``quick`` fits in a few minutes on a 2-core CPU."""

    image_size: int
    bridge_epochs: int
    target_epochs: int
    augment_per_sample: int
    phantom_per_class: int
    bootstrap: int  # the same everywhere (defaults.BOOTSTRAP): one model, one CI
    bridge_per_class: int | None  # images per class taken from --bridge-data (None: all)

    @classmethod
    def for_mode(cls, quick: bool) -> DemoPlan:
        if quick:
            return cls(160, 2, 4, 4, 50, defaults.BOOTSTRAP, 200)
        return cls(224, 3, 6, 10, 80, defaults.BOOTSTRAP, None)


def run_demo(
    out: Path,
    data: Path | None,
    quick: bool,
    init: str = "imagenet",
    arch: str = defaults.ARCH,
    augment: str = "cxr",
    seed: int = 0,
    console: Console | None = None,
    image_size: int | None = None,
    force: bool = False,
    bridge_data: Path | None = None,
) -> dict[str, Any]:
    """Run every stage and arm into ``out`` and return the summary it prints.

    ``bridge_data``: a large public set of the same modality to bridge on (the paper's
    protocol; its labels may differ from the target's: shared classifier rows are carried by
    name); without it the bridge is the split's own bridge part. Every option is checked
    before the phantom set is generated or anything is written."""
    console = console or Console()
    plan = DemoPlan.for_mode(quick)
    if image_size is not None:
        if image_size < 32:
            raise ConfigError(f"--image-size {image_size}: use at least 32 pixels")
        plan = dataclasses.replace(plan, image_size=image_size)
    out = Path(out)
    _check_options(init, arch, augment)
    bridge_index = usable_index(Path(bridge_data)) if bridge_data is not None else None
    claim_demo_folder(out, force=force)
    synthetic = data is None
    if synthetic:
        console.print("[bold yellow]SYNTHETIC[/] data: generating a phantom set (no real images)")
        data = make_phantom_dataset(out / "phantom-data", plan.phantom_per_class, seed=seed)
    split = split_folder(
        data, out / "split", sites=SITES, bridge_fraction=0.5, test_fraction=0.2, seed=seed
    )
    stage_config = TrainConfig(
        epochs=plan.bridge_epochs, augment=augment, seed=seed, ema_decay=defaults.BRIDGE_EMA_DECAY
    )
    bridge_folder = split.out / "bridge"
    if bridge_index is not None:
        bridge_folder = _subset(bridge_index, out / "bridge-data", plan.bridge_per_class, seed)

    def bridge_from(start: str):
        return run_stage(
            "bridge",
            bridge_folder,
            out=out / "bridge-bundle",
            init=start,
            config=stage_config,
            arch=arch,
            image_size=plan.image_size,
            console=console,
        )

    where = f"{bridge_data} ({_count(bridge_folder)} images)" if bridge_index else "the public pool"
    console.rule(f"bridge: central fine-tuning on {where}")
    try:
        bridge, _ = bridge_from(init)
    except ConfigError as e:
        if init != "imagenet" or find_local_imagenet_weights(arch) is not None:
            raise
        console.print(f"[yellow]no ImageNet weights ({e}); the demo continues from random init[/]")
        init = "none"
        bridge, _ = bridge_from(init)
    target_config = TrainConfig(
        epochs=plan.target_epochs,
        augment_per_sample=plan.augment_per_sample,
        augment=augment,
        seed=seed,
    )
    sites = [split.out / f"site-{i}" for i in range(1, SITES + 1)]
    console.rule(f"target, federated: FedAvg over {SITES} sites, {plan.target_epochs} rounds")
    federated = _federate(bridge, sites, out / "federated-bundle", target_config, console)
    console.rule("target, central: all sites' images pooled (what federation avoids)")
    pooled = _pool(sites, out / "pooled-data")
    central, _ = run_stage(
        "train", pooled, out=out / "central-bundle", init=str(bridge), config=target_config,
        console=console,
    )  # fmt: skip
    locals_ = []
    for site in sites:
        console.rule(f"target, local only: {site.name} alone")
        bundle, _ = run_stage(
            "train", site, out=out / f"local-{site.name}-bundle", init=str(bridge),
            config=target_config, console=console,
        )  # fmt: skip
        locals_.append(bundle)

    arms = [("bridge only", bridge)] if _labels(bridge) == _labels(central) else []
    if not arms:
        console.print("[dim]bridge only: not assessed (the bridge set has other labels)[/]")
    arms += [("federated (3 sites)", federated), ("central pooled", central)]
    arms += [
        (f"local only: {b.name.removeprefix('local-').removesuffix('-bundle')}", b) for b in locals_
    ]
    rows = [_assess(name, bundle, split, plan, synthetic, out, console) for name, bundle in arms]

    def row(prefix: str) -> dict[str, Any]:
        return next(r for r in rows if r["model"].startswith(prefix))

    best_local = max((r for r in rows if r["model"].startswith("local only")), key=_acc)
    best_local["best_local"] = True
    summary = {
        "synthetic": synthetic,
        "init": init,
        "data": str(Path(data).resolve()),
        "bridge_data": str(Path(bridge_data).resolve()) if bridge_data else None,
        "bridge_images": _count(bridge_folder),
        "counts": {k: len(v) for k, v in split.parts.items()},
        "test": rows,
        "federated_minus_central": _acc(row("federated")) - _acc(row("central")),
        "federated_minus_best_local": _acc(row("federated")) - _acc(best_local),
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.print(summary_table(summary))
    console.print(f"HTML reports: {out}/report-*/report.html")
    return summary


def demo_entries() -> list[str]:
    """Every name the demo may write in its folder (the marker lists them; a rerun removes
    exactly these, so a file a person added there is kept)."""
    arms = ["bridge", "federated", "central", *(f"local-site-{i}" for i in range(1, SITES + 1))]
    return [
        DEMO_MARKER, "phantom-data", "split", "bridge-data", "pooled-data", "demo.json",
        "federated-bundle-rounds", *(f"{arm}-bundle" for arm in arms),
        *(f"report-{arm}" for arm in arms),
    ]  # fmt: skip


def claim_demo_folder(out: Path, *, force: bool) -> None:
    """Make ``out`` the demo's folder: new, empty, or (with ``force``) an earlier demo's (its
    marker present).

    An earlier demo's entries are removed, anything else in the folder is left alone."""
    marker = out / DEMO_MARKER
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: is a file, not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not marker.is_file():
            raise ConfigError(f"{out}: exists and is not a demo folder; choose another --out")
        if not force:
            raise ConfigError(f"{out}: holds an earlier demo run; add --force to replace it")
        for name in set(demo_entries()) - {DEMO_MARKER}:  # the names an earlier run wrote
            entry = out / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif entry.is_symlink() or entry.exists():
                entry.unlink()
    out.mkdir(parents=True, exist_ok=True)
    text = {"written_by": "fedbridge demo", "entries": demo_entries()}
    atomic_write(marker, (json.dumps(text, indent=2) + "\n").encode())


def _check_options(init: str, arch: str, augment: str) -> None:
    """The options a later stage would refuse, refused now (no phantom set, no folder)."""
    import timm

    if augment not in defaults.AUGMENT_PRESETS:
        raise ConfigError(f"--augment {augment!r}: one of {', '.join(defaults.AUGMENT_PRESETS)}")
    if not timm.is_model(arch):
        raise ConfigError(f"--model {arch!r}: not a timm model name")
    if init not in ("none", "imagenet") and not Path(init).exists():
        raise ConfigError(f"--init {init!r}: not 'none', 'imagenet' or an existing file or bundle")


def _labels(bundle: Path) -> tuple[str, ...]:
    from fedbridge_shared.spec import load_bundle

    return load_bundle(bundle).spec.labels


def _acc(row: dict[str, Any]) -> float:
    return float(row["accuracy"])


def _federate(
    bridge: Path, sites: list[Path], out: Path, cfg: TrainConfig, console: Console
) -> Path:
    """The target stage through Flower's simulation: one round per central epoch."""
    from fedbridge.simulate import simulate

    flat = {
        "init": str(bridge.resolve()),
        "out": str(out.resolve()),
        "labels": ",".join(usable_index(sites[0]).labels),  # the bridge's may differ
        "num-server-rounds": cfg.epochs,
        "local-epochs": 1,
        "batch-size": cfg.batch_size,
        "lr": cfg.lr,
        "augment-per-sample": cfg.augment_per_sample,
        "augment": cfg.augment,
        "seed": cfg.seed,
        "label-smoothing": cfg.label_smoothing,
        "balanced": cfg.balanced,
        "min-train-sites": len(sites),
        "min-evaluate-sites": len(sites),
        "min-available-sites": len(sites),
    }
    simulate(flat, sites, out=console)
    return out


def _count(folder: Path) -> int:
    return len(usable_index(folder).samples)


def _subset(index, out: Path, per_class: int | None, seed: int) -> Path:
    """Up to ``per_class`` images of each class of ``index`` (drawn by whole patients, seeded),
    copied into ``out`` with a patient manifest; ``per_class`` None: all of them."""
    import random

    by_label: dict[str, dict[str, list]] = {}
    for sample in index.samples:
        by_label.setdefault(sample.label, {}).setdefault(sample.patient_id, []).append(sample)
    chosen = []
    for label in index.labels:
        patients = sorted(by_label.get(label, {}))
        random.Random(f"{seed}/{label}").shuffle(patients)
        taken: list = []
        for patient in patients:
            if per_class is not None and len(taken) >= per_class:
                break
            taken += by_label[label][patient]
        chosen += taken
    return _write_tree([(Path(s.label) / s.path.name, s) for s in chosen], out)


def _write_tree(items: list[tuple[Path, Any]], out: Path) -> Path:
    """Copy each (relative path, sample) into ``out`` and write its MANIFEST.csv."""
    rows = []
    for rel, sample in items:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(sample.path, out / rel)
        rows.append((rel.as_posix(), sample.label, sample.patient_id))
    with open(out / "MANIFEST.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "patient_id"])
        writer.writerows(rows)
    return out


def _pool(sites: list[Path], out: Path) -> Path:
    """Copy every site's images into one class-folder tree with a patient manifest."""
    items = [
        (Path(sample.label) / f"{site.name}-{sample.path.name}", sample)
        for site in sites
        for sample in usable_index(site).samples
    ]
    return _write_tree(items, out)


def _assess(
    name: str, bundle: Path, split, plan: DemoPlan, synthetic: bool, out: Path, console: Console
) -> dict[str, Any]:
    """Test metrics, PNG plots and the HTML report of one arm (the folder appears whole)."""
    from fedbridge_shared.assessment import assess, write_assessment

    result = assess(bundle, split.out / "test", n_bootstrap=plan.bootstrap, console=console)
    metrics = result.metrics
    metrics["synthetic"] = synthetic
    report_dir = out / ("report-" + bundle.name.removesuffix("-bundle"))
    write_assessment(
        result,
        report_dir,
        title=f"fedbridge demo: {name}",
        config={"demo_arm": name, "synthetic": synthetic},
        counts={
            part: dict(Counter(s.label for s in samples)) for part, samples in split.parts.items()
        },
        warn=lambda text: console.print(f"[yellow]{text}[/]"),
    )
    return {
        "model": name,
        "bundle": str(bundle),
        "report": str(report_dir),
        **{
            k: metrics[k]
            for k in ("accuracy", "macro_auc", "sensitivity_mean", "sensitivity_sd",
                      "f1_mean", "f1_sd", "n")
        },
        "accuracy_ci95": metrics["ci95"]["accuracy"],
    }  # fmt: skip


def summary_table(summary: dict[str, Any]) -> Table:
    tag = "SYNTHETIC phantom data" if summary["synthetic"] else summary["data"]
    table = Table(title=f"fedbridge demo — test patients ({tag})")
    for col in ("model", "n", "accuracy (95% CI)", "macro AUC", "sensitivity", "F1"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in summary["test"]:
        lo, hi = r["accuracy_ci95"]
        auc = "n/a" if r["macro_auc"] is None else f"{r['macro_auc']:.3f}"
        table.add_row(
            r["model"] + (" [bold](best local)[/]" if r.get("best_local") else ""),
            str(r["n"]),
            f"{r['accuracy']:.3f} ({lo:.3f}–{hi:.3f})",
            auc,
            f"{r['sensitivity_mean']:.3f} ± {r['sensitivity_sd']:.3f}",
            f"{r['f1_mean']:.3f} ± {r['f1_sd']:.3f}",
        )
    table.caption = (
        f"federated − central pooled: {summary['federated_minus_central']:+.3f} accuracy; "
        f"federated − best local-only site: {summary['federated_minus_best_local']:+.3f}"
    )
    return table
