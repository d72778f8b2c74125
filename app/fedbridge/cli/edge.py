"""``fedbridge export onnx`` and ``fedbridge edge build | predict | serve | bench``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fedbridge.cli.options import AsJson, StrEnum, make_console, print_json, shown
from fedbridge_shared.errors import ConfigError

out = make_console()
err = make_console(stderr=True)

export_app = typer.Typer(help="Export a bundle for deployment.", no_args_is_help=True)
edge_app = typer.Typer(
    help="The bedside device: build, predict, serve, listen, bench.", no_args_is_help=True
)


class Precision(StrEnum):
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"


class Int8Calibration(StrEnum):
    percentile = "percentile"
    entropy = "entropy"
    minmax = "minmax"


class Backend(StrEnum):
    auto = "auto"
    tensorrt = "tensorrt"
    onnxruntime = "onnxruntime"


ModelArg = Annotated[Path, typer.Argument(help="Edge model: .onnx from `export onnx` or .engine.")]
BackendOpt = Annotated[Backend, typer.Option(help="Inference backend (auto: by file type).")]
MapNormal = Annotated[
    bool,
    typer.Option(
        "--map-normal",
        help="Also draw the heat map for a class the model marks as normal (off: a normal "
        "prediction's hot spots would read as a lesion).",
    ),
]
Threads = Annotated[
    int | None,
    typer.Option(
        envvar="FEDBRIDGE_EDGE_THREADS", help="CPU threads for onnxruntime (default: all cores)."
    ),
]


@export_app.command("onnx")
def export_onnx(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder (model.json + model.safetensors).")],
    out_path: Annotated[Path, typer.Option("--out", help="ONNX file to write.")],
    val: Annotated[
        Path | None,
        typer.Option(
            "--val-data",
            help="Held-out images (class folders) to calibrate the OOD threshold and fit the "
            "scores' temperature (default: the bundle's training data, if present, for the OOD "
            "threshold only; the scores are then left uncalibrated).",
        ),
    ] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset (TensorRT 10 parses up to 20).")] = 17,
    batch: Annotated[
        int | None,
        typer.Option("--batch-size", help="Fixed batch size of the graph (default: dynamic)."),
    ] = None,
    fp16: Annotated[bool, typer.Option(help="Half-precision weights and compute.")] = False,
    int8: Annotated[
        bool, typer.Option(help="Static INT8 (QDQ) quantization; needs --calib.")
    ] = False,
    calib: Annotated[
        Path | None,
        typer.Option(help="Site images to calibrate INT8 activations on."),
    ] = None,
    int8_calibration: Annotated[
        Int8Calibration, typer.Option(help="How INT8 activation ranges are set.")
    ] = Int8Calibration.percentile,
    int8_fallback: Annotated[
        bool,
        typer.Option(
            "--int8-fallback",
            help="When INT8 loses accuracy or saliency on held-out --val-data images, write fp32 "
            "(with a loud warning) instead of refusing.",
        ),
    ] = False,
    ood_percentile: Annotated[
        float,
        typer.Option(help="OOD threshold: this percentile of out-of-fold validation scores."),
    ] = 99.0,  # fedbridge_edge.ood.DEFAULT_PERCENTILE
    cutoff: Annotated[
        str | None,
        typer.Option(
            "--cutoff",
            help="LABEL=RATE, e.g. COVID19=0.10: the bedside calls LABEL only at or above the "
            "score at which at most RATE of the --cutoff-data films that are not LABEL would be "
            "called LABEL (else the most probable other label).",
        ),
    ] = None,
    cutoff_data: Annotated[
        Path | None,
        typer.Option(
            "--cutoff-data",
            help="Held-out films (class folders, any names) the --cutoff is chosen on, e.g. adult "
            "normal and pneumonia films of the hospital's own population.",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")] = False,
) -> None:
    """Export BUNDLE to ONNX with `logits`, `cam` and `ood_score` outputs; checks parity."""
    if not 13 <= opset <= 20:
        raise ConfigError(f"--opset {opset}: must be in [13, 20] (TensorRT 10 parses up to 20)")
    if batch is not None and not 1 <= batch <= 1024:
        raise ConfigError(f"--batch-size {batch}: must be in [1, 1024]")
    if out_path.is_dir():
        raise ConfigError(f"--out {out_path}: is a folder; give the .onnx file to write")
    if out_path.exists() and not force:
        raise ConfigError(f"--out {out_path}: exists; add --force to replace it")
    if int8 and calib is None:
        raise ConfigError("--int8 needs --calib DIR (site images to calibrate on)")
    if int8 and fp16:
        raise ConfigError("--int8 and --fp16 exclude each other")
    if calib is not None and not int8:
        raise ConfigError("--calib is only used with --int8")
    if (cutoff is None) != (cutoff_data is None):
        raise ConfigError("--cutoff and --cutoff-data go together: give both or neither")
    if cutoff_data is not None and not cutoff_data.is_dir():
        raise ConfigError(f"--cutoff-data {cutoff_data}: not a folder of class folders")
    from fedbridge_edge import cutoff as decisions
    from fedbridge_edge.export import export_onnx as run_export
    from fedbridge_shared.files import check_writable

    check_writable(out_path)

    result = run_export(
        bundle,
        out_path,
        val=val,
        opset=opset,
        batch=batch,
        fp16=fp16,
        int8_calib=calib if int8 else None,
        int8_method=int8_calibration.value,
        int8_fallback=int8_fallback,
        ood_percentile=ood_percentile,
        cutoff=decisions.parse(cutoff) if cutoff is not None else None,
        cutoff_data=cutoff_data,
        console=err,
    )
    p = result.parity
    out.print(f"wrote {result.path}  ({result.path.stat().st_size / 1e6:.2f} MB)")
    out.print(
        f"parity onnxruntime vs PyTorch on {p['images']} real images: logits max abs diff "
        f"{p['logits_max_abs_diff']:.2e}, cam {p['cam_max_abs_diff']:.2e}, "
        f"ood_score {p['ood_score_max_abs_diff']:.2e}"
    )
    o = result.ood
    out.print(
        f"OOD threshold {o['threshold']:.3f} (p{o['percentile']:g} of out-of-fold Mahalanobis "
        f"scores on {o['n_val']} images in {o['data']})"
    )
    out.print(calibration_line(result.calibration))
    if result.decision is not None:
        d = result.decision
        out.print(
            f"cut-off: {d['label']} called at P ≥ {d['cutoff']:.3f}, chosen on {d['negatives']} "
            f"--cutoff-data films that are not {d['label']}: called {d['label']} "
            f"{d['argmax_false_rate']:.1%} → {d['false_rate']:.1%} (at most "
            f"{d['max_false_rate']:.0%})"
            + (f"; {d['label']} films recognised {d['recognised']:.1%}" if d["positives"] else "")
        )
    if result.int8:
        c = result.int8["held_out_check"]
        kept = "kept" if "refused" not in result.int8 else "REFUSED (fp32 written)"
        out.print(
            f"INT8 {kept} ({result.int8['calibration']} calibration on "
            f"{result.int8['calib_images']} images), on {c['images']} held-out --val-data images: "
            f"accuracy {c['accuracy_int8']:.3f} vs fp32 {c['accuracy_fp32']:.3f}, agreement "
            f"{c['top1_agreement']:.3f}, CAM rank correlation {c['cam_rank_corr_mean']:.3f}"
        )
    trt = result.tensorrt
    if trt["n_problems"]:
        err.print(
            f"[yellow]warning:[/] {trt['n_problems']} part(s) of the graph are not supported by "
            f"{trt['target']}: {shown(trt['problems'][0])}"
        )


def calibration_line(c: dict) -> str:
    """One line: the fitted temperature and ECE before → after, or that scores are uncalibrated."""
    if c.get("method") != "temperature":
        return "scores NOT calibrated (no --val-data): plain softmax of the logits"
    return (
        f"calibrated: temperature T={c['temperature']:.3f} on {c['images']} --val-data images, "
        f"ECE {c['ece_before']:.3f} → {c['ece_after']:.3f} (in-sample; NLL "
        f"{c['nll_before']:.3f} → {c['nll_after']:.3f})"
    )


@edge_app.command("build")
def build(
    model: Annotated[Path, typer.Argument(help="ONNX file from `fedbridge export onnx`.")],
    precision: Annotated[Precision, typer.Option(help="Engine precision.")] = Precision.fp16,
    calib: Annotated[
        Path | None,
        typer.Option(help="Site images for INT8 calibration of a float ONNX."),
    ] = None,
    workspace: Annotated[int, typer.Option(help="Builder workspace in MB.")] = 1024,
    max_batch: Annotated[int, typer.Option(help="Largest batch of the optimisation profile.")] = 8,
    out_path: Annotated[
        Path | None,
        typer.Option("--out", help="Engine file (default: MODEL with .engine)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing engine.")] = False,
) -> None:
    """Build a TensorRT engine ON THIS DEVICE (engines are not portable)."""
    target = out_path or model.with_suffix(".engine")
    if target.exists() and not force:
        raise ConfigError(f"--out {target}: exists; add --force to replace it")
    from fedbridge_edge.trt import build_engine

    path, header = build_engine(
        model, target, precision=precision.value, calib_dir=calib, workspace_mb=workspace,
        max_batch=max_batch,
    )  # fmt: skip
    d = header["device"]
    out.print(
        f"wrote {path} ({precision.value}) for {d['gpu_name']} sm {d['compute_capability']}, "
        f"TensorRT {d['tensorrt_version']}"
    )


@edge_app.command("predict")
def predict(
    model: ModelArg,
    inputs: Annotated[list[Path], typer.Argument(help="Images (PNG/JPEG/DICOM) or folders.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for JSON + overlay PNGs.")],
    backend: BackendOpt = Backend.auto,
    threads: Threads = None,
    dicom: Annotated[
        bool,
        typer.Option(
            "--dicom",
            help="For DICOM inputs also write IMAGE.sc.dcm (overlay, Secondary Capture) and "
            "IMAGE.sr.dcm (Comprehensive SR) in the input's study.",
        ),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an earlier run's predictions at --out.")
    ] = False,
    map_normal: MapNormal = False,
    as_json: AsJson = False,
) -> None:
    """Predict each image: IMAGE.json (label, scores, OOD, markers) and IMAGE.overlay.png;
    predictions.csv and predictions.jsonl summarise the run, one row per image."""
    from fedbridge_edge import outputs, summary
    from fedbridge_edge.errors import EdgeError
    from fedbridge_edge.preprocess import list_images
    from fedbridge_edge.runtime import Predictor, write_prediction
    from fedbridge_shared.errors import DataError
    from fedbridge_shared.files import atomic_dir

    outputs.check_out(out_dir, inputs, force=force)
    shown_on = err if as_json else out  # --json: the document alone on stdout
    images = list_images(inputs)
    if not images:
        raise ConfigError(f"no PNG/JPEG/DICOM images in {', '.join(map(str, inputs))}")
    if dicom and not any(_is_dicom(p) for p in images):
        raise ConfigError("--dicom: none of the inputs is a DICOM file")
    names = outputs.output_names(images, inputs)
    predictor = Predictor(model, backend.value, threads, map_normal=map_normal)
    if dicom:
        from fedbridge_edge import dicom_out
    failed, rows = 0, []
    before = outputs.written_before(out_dir)
    with atomic_dir(out_dir, replace=out_dir.exists()) as tmp:
        for path, stem in zip(images, names, strict=True):
            try:
                pred = predictor.predict_file(path)
                results = None
                if dicom and pred.dicom is not None:  # the dataset decoded, parsed once
                    results = dicom_out.build(
                        pred.record, pred.overlay_png(max_side=dicom_out.SC_MAX_SIDE), pred.dicom,
                        codes=predictor.codes, name=str(path),
                    )  # fmt: skip
            except (DataError, EdgeError) as e:
                if len(images) == 1:
                    raise
                failed += 1
                rows.append(summary.error_row(path, str(e), predictor.sha256))
                err.print(f"[red]skipped[/] {shown(e)}")
                continue
            write_prediction(pred, tmp, stem)
            if results is not None:
                dicom_out.write(*results, tmp, stem)
            rows.append(summary.row(pred.record, path))
            if as_json:
                rows[-1]["scores"] = pred.record.scores
            shown_on.print(f"{shown(path.name)}: {verdict(pred)}  {pred.latency_ms:.1f} ms")
        summary.write(rows, tmp)
        written = {p.name for p in tmp.iterdir()}
        outputs.write_marker(tmp, written)
    outputs.remove_stale(out_dir, before, written | {outputs.MARKER})
    shown_on.print(f"{len(images) - failed} predictions in {out_dir} ({predictor.backend})")
    if as_json:
        print_json(
            {
                "model": str(model.resolve()),
                "backend": predictor.backend,
                "out": str(out_dir.resolve()),
                "predictions": rows,
                "failed": failed,
            }
        )
    if failed:
        raise typer.Exit(1)


def _is_dicom(path: Path) -> bool:
    from fedbridge_edge.runtime import is_dicom_file

    return is_dicom_file(path)


def verdict(pred) -> str:
    """One console line's verdict: label and score, or why the label was withheld."""
    if pred.ood:
        return f"[bold yellow]not assessed: out of distribution[/] ({shown(pred.reason)})"
    return shown(pred.record.summary())


@edge_app.command("serve")
def serve(
    model: ModelArg,
    host: Annotated[str, typer.Option(help="Address to bind (keep loopback).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: any free port).")] = 8080,
    max_bytes: Annotated[int, typer.Option(help="Largest request body in bytes.")] = 32 << 20,
    max_pixels: Annotated[
        int, typer.Option(help="Largest image (width × height × frames), checked before decoding.")
    ] = 40_000_000,
    concurrency: Annotated[
        int, typer.Option(help="POST requests in flight at once; beyond: 503 JSON.")
    ] = 128,
    timeout: Annotated[
        float, typer.Option(help="Seconds a client has to send its headers, and its body.")
    ] = 30.0,
    max_files: Annotated[int, typer.Option(help="Files per /predict/batch request.")] = 16,
    backend: BackendOpt = Backend.auto,
    threads: Threads = None,
    map_normal: MapNormal = False,
) -> None:
    """HTTP API: POST /predict, /predict/batch; GET /health, /ready, /openapi.json."""
    import math

    from fedbridge_edge.runtime import Predictor
    from fedbridge_edge.serve import make_server

    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: must be in [0, 65535] (0: any free port)")
    if max_bytes < 1:
        raise ConfigError(f"--max-bytes {max_bytes}: must be ≥ 1")
    if max_pixels < 64:
        raise ConfigError(f"--max-pixels {max_pixels}: must be ≥ 64")
    if not 1 <= concurrency <= 100_000:
        raise ConfigError(f"--concurrency {concurrency}: must be in [1, 100000]")
    if not (math.isfinite(timeout) and 0 < timeout <= 3600):
        raise ConfigError(f"--timeout {timeout}: must be in (0, 3600] seconds")
    if not 1 <= max_files <= 1000:
        raise ConfigError(f"--max-files {max_files}: must be in [1, 1000]")
    predictor = Predictor(model, backend.value, threads, map_normal=map_normal)
    server = make_server(
        predictor, host, port, max_bytes, max_pixels=max_pixels, concurrency=concurrency,
        timeout=timeout, max_files=max_files,
    )  # fmt: skip
    out.print(
        f"serving {model} ({predictor.backend}) on http://{host}:{server.server_port} "
        "— POST /predict, /predict/batch; GET /health, /ready, /openapi.json",
        soft_wrap=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@edge_app.command("listen")
def listen(
    model: ModelArg,
    out_dir: Annotated[
        Path, typer.Option("--out", help="Folder for results: OUT/<StudyInstanceUID>/….")
    ],
    port: Annotated[int, typer.Option(help="TCP port (0: any free port).")] = 11112,
    host: Annotated[str, typer.Option(help="Address to bind (keep loopback).")] = "127.0.0.1",
    ae_title: Annotated[str, typer.Option(help="This listener's AE title.")] = "FEDBRIDGE",
    forward: Annotated[
        str | None,
        typer.Option(help="Send each SC + SR by C-STORE to this PACS: HOST:PORT[:AET]."),
    ] = None,
    timeout: Annotated[
        float, typer.Option(help="Seconds each DICOM network step may take (ACSE, DIMSE, TCP).")
    ] = 10.0,
    retention: Annotated[
        float | None,
        typer.Option(
            help="Delete this listener's own result files (input copy, SC, SR, overlay, JSON) "
            "DAYS after they were written, once delivered; folders it emptied too. "
            "Default: keep everything.",
            metavar="DAYS",
        ),
    ] = None,
    max_pixels: Annotated[
        int,
        typer.Option(
            help="Largest image (rows × columns × frames); a dataset over 2 bytes a pixel at "
            "this limit (+16 MiB) is cut while it arrives, a larger image is refused before "
            "decoding."
        ),
    ] = 40_000_000,
    max_associations: Annotated[
        int, typer.Option(help="Associations open at once; beyond, connections are closed.")
    ] = 16,
    max_per_peer: Annotated[
        int, typer.Option(help="Associations open at once from one peer address.")
    ] = 4,
    max_association_s: Annotated[
        float, typer.Option(help="Seconds an association may stay open in all.")
    ] = 600.0,
    backend: BackendOpt = Backend.auto,
    threads: Threads = None,
) -> None:
    """DICOM C-STORE SCP: predict every original CR/DX image received; write its SC + SR durably;
    forward them through a persistent outbox (OUT/outbox/, status in OUT/outbox/status.json)."""
    import logging
    import os
    import signal
    import threading

    from fedbridge_edge.dicom_guard import Bounds
    from fedbridge_edge.listen import Destination, Listener, check_ae_title, max_dataset_bytes
    from fedbridge_edge.outbox import private_dir
    from fedbridge_edge.runtime import Predictor
    from fedbridge_shared.files import check_writable

    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: must be in [0, 65535] (0: any free port)")
    if not 0 < timeout <= 600:
        raise ConfigError(f"--timeout {timeout}: must be in (0, 600] seconds")
    if retention is not None and not 0 < retention <= 36500:
        raise ConfigError(f"--retention {retention}: must be in (0, 36500] days")
    if not 64 <= max_pixels <= 1_000_000_000:
        raise ConfigError(f"--max-pixels {max_pixels}: must be in [64, 1000000000]")
    if not 1 <= max_associations <= 1000:
        raise ConfigError(f"--max-associations {max_associations}: must be in [1, 1000]")
    if not 1 <= max_per_peer <= max_associations:
        raise ConfigError(
            f"--max-per-peer {max_per_peer}: must be in [1, --max-associations {max_associations}]"
        )
    if not timeout < max_association_s <= 86400:
        raise ConfigError(
            f"--max-association-s {max_association_s}: must be in (--timeout {timeout}, 86400]"
        )
    check_ae_title(ae_title, option="--ae-title")
    dest = Destination.parse(forward) if forward is not None else None
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir}: is a file; give a folder")
    os.umask(0o077)  # patient data: whatever this process writes is the service user's alone
    private_dir(out_dir)
    check_writable(out_dir / "probe", option="--out")
    predictor = Predictor(model, backend.value, threads)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("fedbridge.edge.listen")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # ours says it in one line
    bounds = Bounds(
        timeout=timeout, lifetime=max_association_s, max_associations=max_associations,
        per_peer=max_per_peer, max_bytes=max_dataset_bytes(max_pixels),
    )  # fmt: skip
    listener = Listener(
        predictor, out=out_dir, ae_title=ae_title, forward=dest, timeout=timeout,
        retention_days=retention, max_pixels=max_pixels, bounds=bounds,
    )  # fmt: skip
    if listener.outbox is not None:
        waiting = listener.outbox.status()
        if waiting["pending"]:
            out.print(f"{listener.outbox.describe(waiting)}; resending", soft_wrap=True)
    bound_host, bound_port = listener.start(host, port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    where = f", forwarding to {dest}" if dest else ""
    out.print(
        f"listening on {bound_host}:{bound_port} as {shown(ae_title)} ({predictor.backend}); "
        f"results in {shown(out_dir)}{where}"
    )
    out.file.flush()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        listener.stop()
    if listener.outbox is not None:
        out.print(listener.outbox.describe(listener.outbox.write_status()), soft_wrap=True)
    out.print("stopped")


@edge_app.command("bench")
def bench(
    model: ModelArg,
    backend: BackendOpt = Backend.auto,
    threads: Threads = None,
    iters: Annotated[int, typer.Option(help="Timed runs per batch size.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Latency p50/p95 and throughput at batch 1 and 8."""
    from fedbridge_edge.bench import bench as run_bench
    from fedbridge_edge.runtime import Predictor

    if iters < 1:
        raise ConfigError(f"--iters must be ≥ 1, got {iters}")
    result = run_bench(Predictor(model, backend.value, threads), iters=iters)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    out.print(f"{model} on {result['backend']}")
    for key, row in result.items():
        if key.startswith("batch_"):
            out.print(
                f"  {key.replace('_', ' ')}: p50 {row['p50_ms']:.2f} ms  p95 {row['p95_ms']:.2f} ms"
                f"  {row['images_per_s']:.0f} images/s"
            )


def register(app: typer.Typer) -> None:
    app.add_typer(export_app, name="export")
    app.add_typer(edge_app, name="edge")
