"""The end-to-end demo: split → bridge → target → evaluate, with a summary table."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedbridge_shared.data.split import split_folder
from fedbridge_shared.data.synthetic import make_phantom_dataset
from fedbridge_shared.errors import ConfigError
from fedbridge_shared.models import find_local_imagenet_weights
from fedbridge_shared.report import write_metrics
from fedbridge_shared.training import TrainConfig, evaluate_bundle, run_stage

DEMO_MARKER = ".fedbridge-demo"


@dataclass(frozen=True)
class DemoPlan:
    """Budget of one demo run; ``quick`` fits in a few minutes on a 2-core CPU."""

    image_size: int
    bridge_epochs: int
    target_epochs: int
    augment_per_sample: int
    phantom_per_class: int
    bootstrap: int

    @classmethod
    def for_mode(cls, quick: bool) -> DemoPlan:
        if quick:
            return cls(160, 4, 4, 4, 50, 300)
        return cls(224, 8, 6, 10, 80, 1000)


def run_demo(
    out: Path,
    data: Path | None,
    quick: bool,
    init: str = "imagenet",
    arch: str = "mobilenetv2_100",
    augment: str = "cxr",
    seed: int = 0,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run every central stage into ``out`` and return the summary it prints."""
    console = console or Console()
    plan = DemoPlan.for_mode(quick)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (out / DEMO_MARKER).exists():
            raise ConfigError(f"{out}: exists and is not a demo folder; choose another --out")
        shutil.rmtree(out)  # an earlier demo run's own folder
    out.mkdir(parents=True)
    (out / DEMO_MARKER).write_text("written by fedbridge demo; rerunning the demo replaces it\n")
    synthetic = data is None
    if synthetic:
        console.print("[bold yellow]SYNTHETIC[/] data: generating a phantom set (no real images)")
        data = make_phantom_dataset(out / "phantom-data", plan.phantom_per_class, seed=seed)
    split = split_folder(
        data, out / "split", sites=1, bridge_fraction=0.5, test_fraction=0.2, seed=seed
    )
    stage_config = TrainConfig(epochs=plan.bridge_epochs, preset=augment, seed=seed)

    def bridge_from(start: str):
        return run_stage(
            "bridge",
            split.out / "bridge",
            out / "bridge-bundle",
            start,
            stage_config,
            arch,
            plan.image_size,
            console=console,
        )

    try:
        bridge, bridge_val = bridge_from(init)
    except ConfigError as e:
        if init != "imagenet" or find_local_imagenet_weights(arch) is not None:
            raise
        console.print(f"[yellow]no ImageNet weights ({e}); the demo continues from random init[/]")
        init = "none"
        bridge, bridge_val = bridge_from(init)
    target_config = TrainConfig(
        epochs=plan.target_epochs,
        augment_per_sample=plan.augment_per_sample,
        preset=augment,
        seed=seed,
    )
    target, target_val = run_stage(
        "train",
        split.out / "site-1",
        out / "target-bundle",
        str(bridge),
        target_config,
        console=console,
    )
    rows = []
    for name, bundle in (("bridge only", bridge), ("bridge → target", target)):
        metrics, y, probs = evaluate_bundle(
            bundle, split.out / "test", n_bootstrap=plan.bootstrap, console=console
        )
        metrics["synthetic"] = synthetic
        report_dir = out / ("report-" + bundle.name.removesuffix("-bundle"))
        write_metrics(metrics, report_dir, y, probs)
        rows.append(
            {
                "model": name,
                "bundle": str(bundle),
                "report": str(report_dir),
                **{
                    k: metrics[k]
                    for k in (
                        "accuracy",
                        "macro_auc",
                        "sensitivity_mean",
                        "sensitivity_sd",
                        "f1_mean",
                        "f1_sd",
                        "n",
                    )
                },
                "accuracy_ci95": metrics["ci95"]["accuracy"],
            }
        )
    summary = {
        "synthetic": synthetic,
        "init": init,
        "data": str(Path(data).resolve()),
        "counts": {k: len(v) for k, v in split.parts.items()},
        "validation": {"bridge": bridge_val.get("accuracy"), "target": target_val.get("accuracy")},
        "test": rows,
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.print(summary_table(summary))
    return summary


def summary_table(summary: dict[str, Any]) -> Table:
    tag = "SYNTHETIC phantom data" if summary["synthetic"] else summary["data"]
    table = Table(title=f"fedbridge demo — test patients ({tag})")
    for col in ("model", "n", "accuracy (95% CI)", "macro AUC", "sensitivity", "F1"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in summary["test"]:
        lo, hi = r["accuracy_ci95"]
        auc = "n/a" if r["macro_auc"] is None else f"{r['macro_auc']:.3f}"
        table.add_row(
            r["model"],
            str(r["n"]),
            f"{r['accuracy']:.3f} ({lo:.3f}–{hi:.3f})",
            auc,
            f"{r['sensitivity_mean']:.3f} ± {r['sensitivity_sd']:.3f}",
            f"{r['f1_mean']:.3f} ± {r['f1_sd']:.3f}",
        )
    return table
