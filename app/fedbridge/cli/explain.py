"""``fedbridge explain``: attribution maps, region summary and the randomisation sanity check."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedbridge.cli.options import AsJson, Device, Seed, StrEnum, make_console, print_json

out = make_console()
err = make_console(stderr=True)


class Method(StrEnum):
    saliency = "saliency"
    shap = "shap"
    ig = "ig"
    gradcam = "gradcam"
    cam = "cam"


def register(app: typer.Typer) -> None:
    @app.command()
    def explain(
        bundle: Annotated[Path, typer.Argument(help="Model bundle folder.")],
        images: Annotated[
            list[Path], typer.Argument(help="Image files (PNG, JPEG, DICOM) or folders of them.")
        ],
        out_dir: Annotated[Path, typer.Option("--out", help="Folder to write maps into.")],
        method: Annotated[
            list[Method] | None,
            typer.Option(
                "--method",
                help="saliency (Simonyan), shap (GradientShap), ig (Integrated Gradients), "
                "gradcam, cam; repeat for several (default saliency).",
            ),
        ] = None,
        target: Annotated[
            str | None,
            typer.Option(help="Class to explain (default: each image's predicted class)."),
        ] = None,
        sanity: Annotated[
            bool,
            typer.Option(
                "--sanity", help="Also compare maps with those of a weight-randomised model."
            ),
        ] = False,
        sanity_images: Annotated[
            int, typer.Option(help="Images used by --sanity (the first N).", min=1)
        ] = 8,
        batch_size: Annotated[int, typer.Option(help="Images per batch.", min=1)] = 8,
        seed: Seed = 0,
        device: Device = "auto",
        force: Annotated[
            bool, typer.Option("--force", help="Replace an earlier explain run at --out.")
        ] = False,
        as_json: AsJson = False,
    ) -> None:
        """Explain predictions: a heat map per image and method, where the model looks, and
        whether each method passes the model-randomisation sanity check."""
        from fedbridge_shared.files import check_writable

        with err.status("loading torch and captum"):  # seconds on a cold start
            from fedbridge_shared.explain.run import explain_images, region_table, sanity_table

        check_writable(out_dir)
        methods = [m.value for m in method] if method else ["saliency"]
        record = explain_images(
            bundle,
            images,
            out_dir,
            methods,
            target=target,
            sanity=sanity,
            sanity_images=sanity_images,
            device=device,
            batch_size=batch_size,
            seed=seed,
            force=force,
            console=err,
        )
        if as_json:
            print_json(record)
            return
        out.print(region_table(record))
        if "sanity" in record:
            out.print(sanity_table(record["sanity"]))
        out.print(
            f"wrote {record['n_images']} image(s) × {len(methods)} method(s) to {out_dir} "
            f"(explain.json, explanations.csv, class_summary.csv"
            + (", sanity.json" if "sanity" in record else "")
            + ")"
        )
