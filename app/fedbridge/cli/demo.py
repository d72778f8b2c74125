"""``fedbridge demo``: the whole pipeline on a phantom set or on real class folders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedbridge.cli.options import Augment, AugmentOpt, Seed, make_console
from fedbridge_shared import defaults


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        data: Annotated[
            Path | None,
            typer.Option(help="Real class folders; default: a generated SYNTHETIC phantom set."),
        ] = None,
        bridge_data: Annotated[
            Path | None,
            typer.Option(
                help="A large public set of the same modality to bridge on (e.g. "
                "../shared/data/bridge/cxr; --quick takes 200 images per class); default: the "
                "split's own bridge part."
            ),
        ] = None,
        out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("runs/demo"),
        quick: Annotated[bool, typer.Option(help="Small budget: minutes on a CPU.")] = False,
        init: Annotated[str, typer.Option(help="none | imagenet | FILE.safetensors")] = "imagenet",
        model: Annotated[str, typer.Option(help="timm model name.")] = defaults.ARCH,
        image_size: Annotated[
            int | None,
            typer.Option(help="Input size in pixels (default: 160 quick, 224 full)."),
        ] = None,
        augment: AugmentOpt = Augment.cxr,
        seed: Seed = 0,
        force: Annotated[
            bool, typer.Option("--force", help="Replace an earlier demo run at --out.")
        ] = False,
    ) -> None:
        """Split → bridge → target (federated, pooled, local-only) → assess, with HTML reports."""
        from fedbridge.demo import run_demo

        run_demo(
            out_dir,
            data,
            quick,
            init,
            model,
            augment.value,
            seed,
            make_console(),
            image_size=image_size,
            force=force,
            bridge_data=bridge_data,
        )
