"""``fedbridge bridge | train | evaluate``: the central stages and the assessment."""

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from fedbridge.cli.options import (
    AllowManifestConflict,
    AllowSharedFiles,
    AllowSimilarLabels,
    AsJson,
    Augment,
    Device,
    Intensity,
    Manifest,
    Seed,
    StrEnum,
    Tracking,
    TrackingOpt,
    TrackingUri,
    TrainLabelMap,
    allowed,
    check_tracking,
    make_console,
    print_json,
    track,
)
from fedbridge_shared import defaults
from fedbridge_shared.errors import ConfigError

out = make_console()
err = make_console(stderr=True)


class Preset(StrEnum):
    cpu = "cpu"
    paper = "paper"


Data = Annotated[Path, typer.Argument(help="Folder of class folders.")]
Out = Annotated[Path, typer.Option("--out", help="Bundle folder to write.")]
Model = Annotated[
    str | None,
    typer.Option(
        "--model", help=f"timm model name (default {defaults.ARCH}; paper: inception_v4)."
    ),
]
Init = Annotated[
    str, typer.Option(help="none | imagenet | FILE.safetensors | BUNDLE folder to start from.")
]
ImageSize = Annotated[
    int | None, typer.Option(help="Input size in px (default: the model's or the bundle's).")
]
Epochs = Annotated[int, typer.Option(help="Maximum epochs (early stopping on validation).")]
BatchSize = Annotated[int, typer.Option(help="Images per batch.")]
Lr = Annotated[float, typer.Option(help="AdamW learning rate (cosine schedule).")]
PresetOpt = Annotated[
    Preset, typer.Option(help="cpu: MobileNetV2 @224; paper: Inception-V4 @299, ×10 expansion.")
]
ValFraction = Annotated[float, typer.Option(help="Share of patients held out for validation.")]
Patience = Annotated[int, typer.Option(help="Epochs without validation improvement to stop.")]
EmaDecay = Annotated[
    float,
    typer.Option(
        help="EMA of weights: validate and keep the EMA with this decay (0: off; not applied "
        "to a stage shorter than 1 / (1 − decay) steps)."
    ),
]
BackboneLrScale = Annotated[
    float,
    typer.Option(
        help="Discriminative learning rates: every layer but the classifier at this fraction "
        "of --lr (1: one learning rate)."
    ),
]
Balanced = Annotated[
    bool,
    typer.Option("--balanced", help="Class-balanced sampling (inverse class frequency)."),
]
IntensityOpt = Annotated[
    Intensity | None,
    typer.Option(
        "--intensity",
        help="Intensity normalisation recorded in the bundle: none | clahe "
        "(default: the --init bundle's, else none).",
    ),
]


class ModalityChoice(str, Enum):
    cxr = "cxr"
    oct = "oct"
    other = "other"


ModalityOpt = Annotated[
    ModalityChoice | None,
    typer.Option(
        "--modality",
        help="What the model reads, sealed in the bundle: cxr | oct | other (default: the "
        "--init bundle's, else the --augment preset's). Decides TTA views and bedside markers.",
    ),
]


def stage_command(stage: str, *, augment_per_sample_default: int, ema_default: float, doc: str):
    """The ``bridge`` and ``train`` commands: the same options, declared once."""
    AugmentPerSample = Annotated[
        int | None,
        typer.Option(
            help="Offline expansion: N augmented variants per image "
            f"(default {augment_per_sample_default}; paper: 10)."
        ),
    ]

    def command(
        data: Annotated[
            list[Path],
            typer.Argument(
                help="Folder(s) of class folders; several are pooled, their labels united by "
                "name (e.g. a paediatric and an adult set)."
            ),
        ],
        out_dir: Out,
        init: Init = "imagenet",
        model: Model = None,
        image_size: ImageSize = None,
        epochs: Epochs = defaults.EPOCHS,
        batch_size: BatchSize = defaults.BATCH_SIZE,
        lr: Lr = defaults.LR,
        augment_per_sample: AugmentPerSample = None,
        augment: Annotated[
            Augment | None,
            typer.Option(
                "--augment",
                help="Augmentation preset (default: the modality's — the --init bundle's or "
                f"--modality's — else {defaults.AUGMENT}).",
            ),
        ] = None,
        preset: PresetOpt = Preset.cpu,
        val_fraction: ValFraction = defaults.VAL_FRACTION,
        patience: Patience = defaults.PATIENCE,
        ema_decay: EmaDecay = ema_default,
        balanced: Balanced = defaults.BALANCED,
        backbone_lr_scale: BackboneLrScale = defaults.BACKBONE_LR_SCALE,
        intensity: IntensityOpt = None,
        modality: ModalityOpt = None,
        seed: Seed = defaults.SEED,
        manifest: Manifest = None,
        device: Device = "auto",
        force: Annotated[
            bool, typer.Option("--force", help="Replace the model of an existing bundle at --out.")
        ] = False,
        as_json: AsJson = False,
        tracking: TrackingOpt = Tracking.none,
        tracking_uri: TrackingUri = None,
        allow_shared_files: AllowSharedFiles = False,
        allow_similar_labels: AllowSimilarLabels = False,
        allow_manifest_conflict: AllowManifestConflict = False,
        label_map: TrainLabelMap = None,
    ) -> None:
        check_tracking(tracking)
        allow = allowed(
            shared_files=allow_shared_files,
            similar_labels=allow_similar_labels,
            manifest_conflict=allow_manifest_conflict,
        )
        with err.status("loading torch"):  # seconds on a cold start
            from fedbridge_shared.shortcut import parse_label_map
            from fedbridge_shared.spec import IMAGE_SIZE_RANGE
            from fedbridge_shared.training import PAPER_PRESET, TrainConfig, run_stage

        low, high = IMAGE_SIZE_RANGE
        if image_size is not None and not low <= image_size <= high:
            raise ConfigError(f"--image-size {image_size}: must be in [{low}, {high}] pixels")
        per_sample = augment_per_sample_default
        if preset is Preset.paper:
            model = model or PAPER_PRESET["arch"]
            image_size = image_size or PAPER_PRESET["image_size"]
            per_sample = PAPER_PRESET["augment_per_sample"]
        config = TrainConfig(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            augment_per_sample=per_sample if augment_per_sample is None else augment_per_sample,
            augment=None if augment is None else augment.value,
            val_fraction=val_fraction,
            patience=patience,
            seed=seed,
            ema_decay=ema_decay,
            balanced=balanced,
            backbone_lr_scale=backbone_lr_scale,
            intensity=None if intensity is None else intensity.value,
            modality=None if modality is None else modality.value,
        )
        bundle, metrics = run_stage(
            stage, data, out=out_dir, init=init, config=config, arch=model,
            image_size=image_size, manifest=manifest, device=device, force=force, console=err,
            allow=allow, label_map=parse_label_map(label_map) if label_map else None,
        )  # fmt: skip
        if as_json:
            track(tracking, tracking_uri, bundle, console=err)
            print_json({"bundle": str(Path(bundle).resolve()), "validation": metrics or None})
            return
        line = f"wrote {bundle}"
        if metrics:
            line += (
                f" (validation: accuracy {metrics['accuracy']:.3f}, "
                f"macro AUC {_fmt(metrics.get('macro_auc'))}, n={metrics['n']})"
            )
        out.print(line)
        track(tracking, tracking_uri, bundle, console=out)

    command.__doc__ = doc
    return command


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def register(app: typer.Typer) -> None:
    app.command("bridge")(
        stage_command(
            "bridge",
            augment_per_sample_default=defaults.BRIDGE_AUGMENT_PER_SAMPLE,
            ema_default=defaults.BRIDGE_EMA_DECAY,
            doc="Stage 2: fine-tune on a large public dataset of the same modality.",
        )
    )
    app.command("train")(
        stage_command(
            "train",
            augment_per_sample_default=defaults.TARGET_AUGMENT_PER_SAMPLE,
            ema_default=defaults.EMA_DECAY,
            doc="Stage 3 (central) or a local-only baseline: train on the small target set.",
        )
    )

    @app.command()
    def evaluate(
        bundle: Annotated[Path, typer.Argument(help="Model bundle folder.")],
        data: Data,
        as_json: AsJson = False,
        out_dir: Annotated[
            Path | None,
            typer.Option(
                "--out",
                help="Write metrics.json, confusion_matrix.png, roc.png and report.html.",
            ),
        ] = None,
        bootstrap: Annotated[
            int, typer.Option(help="Bootstrap resamples for CIs.")
        ] = defaults.BOOTSTRAP,
        manifest: Manifest = None,
        device: Device = "auto",
        tta: Annotated[
            bool,
            typer.Option(
                "--tta",
                help="Test-time augmentation: average over shifted/scaled views "
                "(a left-right flip too, except for CXR).",
            ),
        ] = defaults.TTA,
        force: Annotated[
            bool,
            typer.Option("--force", help="Replace the report in an existing --out folder."),
        ] = False,
        label_map: Annotated[
            list[str] | None,
            typer.Option(
                "--label-map",
                help="A folder label that is not the model's → the model labels that count as "
                "correct, e.g. PNEUMONIA_UNSPECIFIED=BACTERIAL_PNEUMONIA|VIRAL_PNEUMONIA "
                "(repeatable).",
            ),
        ] = None,
        onnx: Annotated[
            Path | None,
            typer.Option(
                "--onnx",
                help="The bundle's bedside model: count the images its out-of-distribution "
                "tests would refuse.",
            ),
        ] = None,
        allow_shared_files: AllowSharedFiles = False,
        allow_similar_labels: AllowSimilarLabels = False,
        allow_manifest_conflict: AllowManifestConflict = False,
    ) -> None:
        """Assess a bundle on unseen patients with the paper's metrics and 95 % CIs."""
        from fedbridge_shared.metrics import format_metrics_table
        from fedbridge_shared.shortcut import parse_label_map

        if not 0 <= bootstrap <= 100_000:
            raise ConfigError(f"--bootstrap {bootstrap}: must be in [0, 100000]")
        declared = parse_label_map(label_map) if label_map else None
        if onnx is not None and not onnx.is_file():
            raise ConfigError(f"--onnx {onnx}: file not found")
        if out_dir is not None:
            _check_report_folder(out_dir, force=force)
            if out_dir.resolve().is_relative_to(data.resolve()):
                raise ConfigError(
                    f"--out {out_dir}: inside the data folder {data}; write the report elsewhere"
                )
        with err.status("loading torch"):
            from fedbridge_shared.assessment import assess

        result = assess(
            bundle,
            data,
            manifest=manifest,
            n_bootstrap=bootstrap,
            device=device,
            tta=tta,
            label_map=declared,
            console=err,
            allow=allowed(
                shared_files=allow_shared_files,
                similar_labels=allow_similar_labels,
                manifest_conflict=allow_manifest_conflict,
            ),
        )
        metrics = result.metrics
        if onnx is not None:
            _bedside_ood(onnx, result)
        if out_dir is not None:
            written = write_report(result, out_dir, warn=_warn)
            err.print("wrote " + ", ".join(str(out_dir / name) for name in written))
        if as_json:
            print_json(metrics)
        else:
            for renderable in _as_list(format_metrics_table(metrics)):
                out.print(renderable)
            for line in _audit_lines(metrics):
                out.print(line)


def _bedside_ood(onnx: Path, result) -> None:
    """Run the bedside Predictor's out-of-distribution tests on every image assessed."""
    from collections import Counter

    from fedbridge_edge.runtime import Predictor

    metrics = result.metrics
    predictor = Predictor(onnx)
    if predictor.meta.record.get("weights_sha256") != metrics["bundle"]["sha256"]:
        err.print(f"[yellow]--onnx {onnx}: holds other weights than the bundle[/]")
    refused: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    for sample in result.index.samples:
        totals[sample.label] += 1
        refused[sample.label] += predictor.predict_file(sample.path).ood
    n, k = sum(totals.values()), sum(refused.values())
    ood = {
        "measured": True, "onnx": str(onnx.resolve()), "onnx_sha256": predictor.sha256,
        "refused": k, "n": n, "rate": k / n if n else None,
        "per_label": {label: {"refused": refused[label], "n": totals[label]} for label in totals},
        "text": f"{k} of {n} refused as out of distribution by the bedside",
    }  # fmt: skip
    metrics.setdefault("external", {})["ood"] = ood


def _audit_lines(metrics: dict) -> list[str]:
    """The shortcut audit and the external scores in a few lines for the terminal."""
    from fedbridge_shared.report_sections import audit_summary

    return audit_summary(metrics)


def _check_report_folder(out_dir: Path, *, force: bool) -> None:
    """Before any work: the folder can be written, and an earlier report is kept unless --force."""
    from fedbridge_shared.files import check_writable

    check_writable(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ConfigError(
            f"{out_dir}: folder exists and is not empty; add --force to replace the report "
            "(files evaluate did not write are kept)"
        )


def _warn(text: str) -> None:
    err.print(f"[yellow]{text}[/]")


def write_report(result, out_dir: Path, *, warn) -> list[str]:
    """``evaluate --out``'s folder: metrics, plots and report.html, at once or not at all."""
    from fedbridge_shared.assessment import write_assessment

    data = result.data
    return write_assessment(
        result,
        out_dir,
        title=f"fedbridge assessment: {result.bundle.path.name} on {data.name}",
        config={"data": str(data.resolve()), "patient_ids": result.index.patient_source},
        counts={f"test: {data.name}": result.index.counts()},
        test_name=f"test: {data.name}",
        warn=warn,
    )


def _as_list(x):
    return x if isinstance(x, list | tuple) else [x]
