"""``fedbridge data``: check, split and import datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedbridge.cli.options import (
    AllowManifestConflict,
    AllowSharedFiles,
    AllowSimilarLabels,
    AsJson,
    Manifest,
    Seed,
    allowed,
    make_console,
    print_json,
    shown,
)

app = typer.Typer(help="Check, split and import image datasets.", no_args_is_help=True)
out = make_console()
err = make_console(stderr=True)


@app.command()
def check(
    data: Annotated[Path, typer.Argument(help="Folder of class folders.")],
    manifest: Manifest = None,
    as_json: AsJson = False,
    allow_shared_files: AllowSharedFiles = False,
    allow_similar_labels: AllowSimilarLabels = False,
    allow_manifest_conflict: AllowManifestConflict = False,
) -> None:
    """Count images per class, find unreadable files, duplicates and patient leakage."""
    from rich.progress import Progress

    from fedbridge_shared.data.checks import check_folder

    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("checking images", total=None)
        report = check_folder(
            data,
            manifest,
            progress=lambda i, n: bar.update(task, completed=i, total=n),
            allow=allowed(
                shared_files=allow_shared_files,
                similar_labels=allow_similar_labels,
                manifest_conflict=allow_manifest_conflict,
            ),
        )
    index = report.index
    if as_json:
        print_json(_check_record(data, report))
        if report.errors:
            raise typer.Exit(1)
        return
    table = Table(title=f"{shown(data)} - {len(index.samples)} images, {len(index.labels)} classes")
    table.add_column("class")
    table.add_column("images", justify="right")
    table.add_column("patients", justify="right")
    for label in index.labels:
        samples = index.by_label(label)
        table.add_row(shown(label), str(len(samples)), str(len({s.patient_id for s in samples})))
    out.print(table)
    out.print(f"patient ids: {index.patient_source}")
    ipp = report.images_per_patient
    if ipp:
        out.print(
            "images per patient: "
            + ", ".join(
                f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in ipp.items()
            )
        )
    for f in report.findings:
        colour = {"error": "red", "warning": "yellow"}.get(f.level, "cyan")
        where = f"{shown(f.path)}: " if f.path else ""
        out.print(
            f"[{colour}]{f.level}[/]: {where}{shown(f.message)}", soft_wrap=True, highlight=False
        )
    out.print(f"{len(report.errors)} errors, {len(report.warnings)} warnings")
    if report.errors:
        raise typer.Exit(1)


def _check_record(data: Path, report) -> dict:
    """``data check --json``: counts per class, patient-id source and every finding."""
    index = report.index
    return {
        "data": str(Path(data).resolve()),
        "images": len(index.samples),
        "classes": {
            label: {
                "images": len(index.by_label(label)),
                "patients": len({s.patient_id for s in index.by_label(label)}),
            }
            for label in index.labels
        },
        "patient_ids": index.patient_source,
        "images_per_patient": report.images_per_patient,
        "findings": [
            {"level": f.level, "path": str(f.path) if f.path else None, "message": f.message}
            for f in report.findings
        ],
        "errors": len(report.errors),
        "warnings": len(report.warnings),
        "ok": not report.errors,
    }


@app.command()
def split(
    data: Annotated[Path, typer.Argument(help="Folder of class folders.")],
    out_dir: Annotated[Path, typer.Option("--out", help="New folder for the parts.")],
    sites: Annotated[int, typer.Option(help="Number of hospital sites.")] = 3,
    bridge_fraction: Annotated[float, typer.Option(help="Share of patients for bridge.")] = 0.0,
    test_fraction: Annotated[float, typer.Option(help="Share of patients for test.")] = 0.2,
    seed: Seed = 0,
    manifest: Manifest = None,
    skew: Annotated[
        float | None,
        typer.Option(
            "--skew",
            metavar="ALPHA",
            help="Label-skewed sites: each site's class proportions drawn from a Dirichlet "
            "with concentration ALPHA (0.5: strong skew). Bridge and test stay as without it.",
        ),
    ] = None,
    allow_shared_files: AllowSharedFiles = False,
    allow_similar_labels: AllowSimilarLabels = False,
    allow_manifest_conflict: AllowManifestConflict = False,
) -> None:
    """Patient-disjoint, class-stratified split into bridge / site-1..N / test folders."""
    from fedbridge_shared.data.split import split_folder
    from fedbridge_shared.files import check_writable

    check_writable(out_dir)
    allow = allowed(
        shared_files=allow_shared_files,
        similar_labels=allow_similar_labels,
        manifest_conflict=allow_manifest_conflict,
    )
    result = split_folder(
        data, out_dir, sites, bridge_fraction, test_fraction, seed, manifest, skew=skew,
        allow=allow,
    )  # fmt: skip
    for text in result.warnings:
        err.print(f"[yellow]warning:[/] {shown(text)}", highlight=False)
    if result.copies:
        err.print(
            f"note: {result.copies} files are byte-identical copies of each other; each copy "
            "was kept in the same part as its original"
        )
    table = Table(title=f"split of {shown(data)} -> {shown(result.out)}")
    labels = sorted({s.label for part in result.parts.values() for s in part})
    table.add_column("part")
    for label in labels:
        table.add_column(label, justify="right")
    table.add_column("images", justify="right")
    table.add_column("patients", justify="right")
    for name, samples in result.parts.items():
        counts = [sum(s.label == label for s in samples) for label in labels]
        table.add_row(
            name, *map(str, counts), str(len(samples)), str(len({s.patient_id for s in samples}))
        )
    out.print(table)
    out.print(f"wrote {result.out / 'split.csv'}")


@app.command("import-npz")
def import_npz(
    npz: Annotated[Path, typer.Argument(help="MedMNIST-format .npz file.")],
    out_dir: Annotated[Path, typer.Option("--out", help="New folder of class folders.")],
    labels: Annotated[
        str | None,
        typer.Option(help="Comma-separated class names in label-index order."),
    ] = None,
) -> None:
    """Convert MedMNIST arrays to class folders with a MANIFEST.csv."""
    from fedbridge_shared.data.npz import import_npz as run

    names = [x.strip() for x in labels.split(",")] if labels else None
    counts = run(npz, out_dir, names)
    out.print(f"wrote {sum(counts.values())} images to {out_dir}: {counts}")
