"""``fedbridge export onnx``: a bundle → one ONNX graph with ``logits``, ``cam`` and ``ood_score``.

The CAM is exact for networks that end in global average pooling + linear:
``CAM_k = Σ_c w_kc · F_c`` is a 1×1 convolution of the last feature map with the classifier
weights (no einsum), so ``mean_hw(CAM_k) + b_k == logit_k``. It stays at feature-map resolution;
the host upsamples the one map it shows (measured faster than a Resize in the graph, see README).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from fedbridge_edge import cutoff as decisions
from fedbridge_edge import ood, trt_ops
from fedbridge_edge.errors import EdgeError
from fedbridge_edge.modelfile import OUTPUTS, seal
from fedbridge_edge.preprocess import InputSpec, list_images, normalise, resize
from fedbridge_shared import label_codes
from fedbridge_shared.files import atomic_write

if TYPE_CHECKING:
    from rich.console import Console

    from fedbridge_shared.spec import Bundle

DEFAULT_OPSET = 17
FP32_LOGITS_TOL = 1e-4
PARITY_IMAGES = 16


class EdgeHead(nn.Module):
    """Backbone + classifier returning (logits, cam, ood_score) in one forward pass."""

    cam_weight: torch.Tensor
    ood_means: torch.Tensor
    ood_whiten: torch.Tensor

    def __init__(
        self,
        model: nn.Module,
        gaussians: ood.Gaussians,
        *,
        fp16: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        classifier = model.get_classifier()  # type: ignore[operator]  # timm method
        if not isinstance(classifier, nn.Linear):
            raise EdgeError(f"{type(model).__name__}: classifier is not a linear layer; no CAM")
        self.register_buffer("cam_weight", classifier.weight.detach()[:, :, None, None].clone())
        self.register_buffer("ood_means", torch.as_tensor(gaussians.means, dtype=torch.float32))
        self.register_buffer("ood_whiten", torch.as_tensor(gaussians.whiten, dtype=torch.float32))
        self.fp16 = fp16

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.fp16:
            x = x.half()
        feats = self.model.forward_features(x)  # type: ignore[operator]  # timm method
        pooled = feats.mean(dim=(2, 3))
        logits = self.model.get_classifier()(pooled)  # type: ignore[operator]  # timm method
        cam = F.conv2d(feats, self.cam_weight)
        g = pooled.float() @ self.ood_whiten
        dist = ((g.unsqueeze(1) - self.ood_means.unsqueeze(0)) ** 2).sum(-1)
        score = dist.amin(dim=1) / pooled.shape[1]
        return logits.float(), cam.float(), score


@dataclass
class ExportResult:
    path: Path
    parity: dict[str, Any]
    ood: dict[str, Any]
    calibration: dict[str, Any] = field(default_factory=lambda: {"method": "none"})
    seconds: dict[str, float] = field(default_factory=dict)
    int8: dict[str, Any] | None = None
    tensorrt: dict[str, Any] = field(default_factory=dict)
    decision: dict[str, Any] | None = None  # the --cutoff rule (fedbridge_edge.cutoff)


def _torch_model(bundle_path: Path) -> tuple[Bundle, nn.Module]:
    from fedbridge_shared.models import model_from_bundle
    from fedbridge_shared.spec import load_bundle

    bundle = load_bundle(bundle_path)
    model = model_from_bundle(bundle)
    model.eval()
    probe = torch.linspace(-1, 1, 2 * bundle.spec.in_chans * 64 * 64).reshape(
        2, bundle.spec.in_chans, 64, 64
    )
    with torch.no_grad():
        try:
            pooled = model.forward_features(probe).mean(dim=(2, 3))  # type: ignore[operator]  # timm method
            exact = torch.allclose(model.get_classifier()(pooled), model(probe), atol=1e-5)  # type: ignore[operator]  # timm method
        except (RuntimeError, AttributeError, IndexError):  # e.g. a ViT's (N, L, C) tokens
            exact = False
    if not exact:
        raise EdgeError(
            f"{bundle_path}: {bundle.spec.arch} does not end in global average pooling + linear, "
            "so it has no exact one-pass CAM; use e.g. mobilenetv2_100, resnet or inception_v4"
        )
    return bundle, model


def _load_images(paths: list[Path], spec: InputSpec) -> tuple[np.ndarray, list[np.ndarray]]:
    """Network inputs (N, C, H, W) and the decoded greyscale images (for the input test)."""
    from fedbridge_shared.data.images import read_image

    greys = [read_image(p) for p in paths]
    x = np.stack([normalise(resize(g, spec.image_size), spec) for g in greys])
    return x.astype(np.float32), greys


MIN_ABOVE_CHANCE_P = 0.01
"""Calibration images must be labelled better than chance by the model (binomial p below this)."""


def _val_labels(paths: list[Path], labels: list[str], logits: np.ndarray, root: str) -> np.ndarray:
    """Class indices from the images' folders; refuses images that are not the bundle's kind."""
    from scipy.stats import binomtest

    folders = sorted({p.parent.name for p in paths})
    unknown = [f for f in folders if f not in labels]
    if unknown:
        raise EdgeError(
            f"--val-data {root}: class folders {', '.join(unknown)} are not labels of this model "
            f"({', '.join(labels)}); calibrate on held-out images of the modality it was "
            "trained on, one folder per label"
        )
    if len(folders) < 2:
        raise EdgeError(
            f"--val-data {root}: images of one label only ({folders[0]}); calibrate on held-out "
            f"images of at least two of the model's labels ({', '.join(labels)})"
        )
    y = np.array([labels.index(p.parent.name) for p in paths])
    correct = int((logits.argmax(1) == y).sum())
    chance = max(np.bincount(y, minlength=len(labels)).max() / len(y), 1 / len(labels))
    p_value = binomtest(correct, len(y), chance, alternative="greater").pvalue
    if p_value >= MIN_ABOVE_CHANCE_P:
        raise EdgeError(
            f"--val-data {root}: the model labels only {correct} of {len(y)} images correctly "
            f"(chance {chance:.2f}): either these are not images of the modality and labels it was "
            "trained on, or the model has not learnt them — refusing to calibrate its "
            "out-of-distribution test on them"
        )
    return y


def _features(model: nn.Module, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    feats, logits = [], []
    with torch.no_grad():
        for start in range(0, len(x), 32):
            pooled = model.forward_features(torch.from_numpy(x[start : start + 32])).mean((2, 3))  # type: ignore[operator]  # timm method
            feats.append(pooled)
            logits.append(model.get_classifier()(pooled))  # type: ignore[operator]  # timm method
    return torch.cat(feats).double().numpy(), torch.cat(logits).double().numpy()


def _val_images(val: Path | None, bundle: Bundle, console: Console) -> tuple[list[Path], str]:
    if val is None:
        data = Path(str(bundle.training.get("data", "")))
        if not bundle.training.get("data") or not data.is_dir():
            raise EdgeError(
                f"{bundle.path}: pass --val-data DIR (held-out images of the trained modality, one "
                "folder per class) to calibrate the out-of-distribution threshold"
            )
        console.print(f"[yellow]no --val-data: calibrating OOD on the training images in {data}[/]")
        val = data
    paths = list_images([val])
    if not paths:
        raise EdgeError(f"{val}: no PNG/JPEG/DICOM images to calibrate on")
    return paths, str(Path(val).resolve())


def export_onnx(
    bundle_path: Path,
    out: Path,
    *,
    val: Path | None = None,
    opset: int = DEFAULT_OPSET,
    batch: int | None = None,
    fp16: bool = False,
    int8_calib: Path | None = None,
    int8_method: str = "percentile",
    int8_fallback: bool = False,
    ood_percentile: float = ood.DEFAULT_PERCENTILE,
    cutoff: tuple[str, float] | None = None,
    cutoff_data: Path | None = None,
    console: Console | None = None,
) -> ExportResult:
    """Export, calibrate OOD, check (onnx.checker + onnxruntime parity) and write ``out``.

    ``cutoff`` (label, rate) with ``cutoff_data``: the bedside calls that label only at or
    above the probability chosen on those films (:mod:`fedbridge_edge.cutoff`).
    """
    from rich.console import Console

    if (cutoff is None) != (cutoff_data is None):
        raise EdgeError("--cutoff and --cutoff-data go together: give both or neither")
    console = console or Console(stderr=True, quiet=True)
    steps = 6 + (int8_calib is not None) + (cutoff is not None)
    with _Steps(console, total=steps) as step:
        return _export(
            bundle_path, out, val=val, opset=opset, batch=batch, fp16=fp16,
            int8_calib=int8_calib, int8_method=int8_method, int8_fallback=int8_fallback,
            ood_percentile=ood_percentile, cutoff=cutoff, cutoff_data=cutoff_data,
            console=console, step=step,
        )  # fmt: skip


class _Steps:
    """One progress bar over export's named steps (each takes seconds), on ``console``."""

    def __init__(self, console: Console, *, total: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._bar = Progress(
            TextColumn("[bold]export[/] {task.description}"), BarColumn(),
            MofNCompleteColumn(), TimeElapsedColumn(), console=console,
        )  # fmt: skip
        self._task = self._bar.add_task("", total=total)
        self._started = False

    def __enter__(self) -> _Steps:
        self._bar.start()
        return self

    def __call__(self, name: str) -> None:
        """Start step ``name`` (the previous one is done)."""
        if self._started:
            self._bar.advance(self._task)
        self._started = True
        self._bar.update(self._task, description=name)

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            self._bar.update(self._task, advance=1, description="done")
        self._bar.stop()


def _export(
    bundle_path: Path,
    out: Path,
    *,
    val: Path | None,
    opset: int,
    batch: int | None,
    fp16: bool,
    int8_calib: Path | None,
    int8_method: str,
    int8_fallback: bool,
    ood_percentile: float,
    cutoff: tuple[str, float] | None,
    cutoff_data: Path | None,
    console: Console,
    step: Callable[[str], None],
) -> ExportResult:
    t0 = time.perf_counter()
    step("loading the bundle")
    bundle, model = _torch_model(bundle_path)
    if cutoff is not None:  # a wrong label fails before any image is read
        decisions.check_label(cutoff[0], list(bundle.spec.labels))
    spec = InputSpec.from_spec(bundle.spec.to_dict())
    paths, val_root = _val_images(val, bundle, console)
    step(f"reading {len(paths)} validation images")
    x_val, greys = _load_images(paths, spec)
    step("calibrating the OOD score")
    feats, logits = _features(model, x_val)
    labels = list(bundle.spec.labels)
    y = _val_labels(paths, labels, logits, val_root)
    gaussians, _, ood_record = ood.calibrate(feats, y, len(labels), ood_percentile)
    calibration = _calibrate(logits, y, held_out=val is not None, root=val_root)
    input_test, input_record = ood.fit_inputs(greys)
    ood_record.update(data=val_root, class_source="folders", inputs=input_record)
    ood_record["input_test"] = input_test.to_json()
    cam_reference = _cam_reference(model, x_val, gaussians)
    decision = None
    if cutoff is not None and cutoff_data is not None:
        step("choosing the cut-off")
        decision = _decision(model, cutoff, cutoff_data, spec, labels, calibration)
    seconds = {"load_and_calibrate": time.perf_counter() - t0}

    t1 = time.perf_counter()
    step("tracing the ONNX graph")
    head = EdgeHead(model, gaussians, fp16=fp16).eval()
    if fp16:
        head = head.half()
        head.ood_means.data, head.ood_whiten.data = (
            head.ood_means.float(),
            head.ood_whiten.float(),
        )
    onnx_model = _trace(head, spec, opset, batch)
    seconds["export"] = time.perf_counter() - t1
    parity_x = x_val[:PARITY_IMAGES] if batch is None else x_val[:batch]
    with torch.no_grad():
        reference = [t.numpy() for t in head(torch.from_numpy(parity_x))] if not fp16 else None
        if reference is None:  # fp16: the reference is the fp32 head
            ref_head = EdgeHead(model.float(), gaussians).eval()
            reference = [t.numpy() for t in ref_head(torch.from_numpy(parity_x))]
    edge: dict[str, Any] = {
        "outputs": list(OUTPUTS),
        "input": "input",
        "precision": "fp16" if fp16 else "fp32",
        "opset": opset,
        "batch": batch if batch else "dynamic",
        "cam": {
            "resolution": "features",
            "formula": "CAM_k = sum_c w_kc F_c (1x1 conv of the classifier weights, no bias)",
            "bias": model.get_classifier().bias.detach().tolist(),  # type: ignore[operator]  # timm method
            "reference": cam_reference,
        },
        "ood": ood_record,
        "modality": bundle.spec.modality,
        "label_codes": label_codes.to_json(label_codes.default_codes(labels)),
        "bundle_weights_sha256": bundle.sha256,
        "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if decision is not None:
        edge["decision"] = decision
    record = _bundle_record(bundle)
    data = seal(onnx_model, record, edge)
    step("checking onnxruntime against PyTorch")
    parity = _parity(data, parity_x, reference, tol=None if fp16 else FP32_LOGITS_TOL)
    edge["parity"] = parity
    result = ExportResult(
        path=Path(out), parity=parity, ood=ood_record, calibration=calibration, seconds=seconds,
        decision=decision,
    )  # fmt: skip
    edge["calibration"] = calibration
    edge["tensorrt"] = trt_ops.summary(onnx_model)
    if int8_calib is not None:
        t2 = time.perf_counter()
        step("quantizing to INT8, checking it on held-out images")
        int8 = _int8(
            data, calib_dir=int8_calib, spec=spec, batch=batch, method=int8_method,
            held_out=[(p, x, t) for p, x, t in zip(paths, x_val, y, strict=True)],
        )  # fmt: skip
        seconds["quantize"] = time.perf_counter() - t2
        result.int8 = int8.info
        if int8.refused is None:
            edge.update(precision="int8", int8=int8.info, tensorrt=trt_ops.summary(int8.model))
            data = seal(int8.model, record, edge)
            int8.info["vs_fp32"] = _parity(data, parity_x, reference, tol=None)
        elif int8_fallback:
            int8.info["refused"] = int8.refused
            console.print(f"[bold red]INT8 REFUSED, writing fp32 instead:[/] {int8.refused}")
            edge["int8"] = int8.info
            data = seal(onnx.load_from_string(data), record, edge)
        else:
            raise EdgeError(
                f"--int8: {int8.refused}; not writing {out} (add --int8-fallback to write fp32 "
                "instead, or try --int8-calibration entropy and more --calib images)"
            )
    else:
        data = seal(onnx.load_from_string(data), record, edge)  # parity recorded inside
    result.tensorrt = edge["tensorrt"]
    step(f"writing {Path(out).name}")
    atomic_write(Path(out), data)
    seconds["total"] = time.perf_counter() - t0
    return result


UNCALIBRATED_REASON = (
    "no --val-data: temperature scaling needs held-out images (fitted on the training images an "
    "over-confident model would look calibrated); scores are the plain softmax of the logits"
)


def _calibrate(logits: np.ndarray, y: np.ndarray, *, held_out: bool, root: str) -> dict[str, Any]:
    """``edge["calibration"]``: T fitted on the fp32 logits of the held-out --val-data images.

    Calibrated: ``{"method": "temperature", "temperature": T, "images", "data", "ece_bins",
    "ece_before", "ece_after", "nll_before", "nll_after", "in_sample": True, "applies"}``;
    the runtime's probabilities are ``softmax(logits / T)``. ECE and NLL are measured on the
    images T was fitted on, so "after" is optimistic (see bench/calibration.py for held-out
    test patients). Without --val-data: ``{"method": "none", "temperature": None, "reason"}``.
    """
    from fedbridge_shared.calibration import T_MAX, T_MIN, temperature_record

    if not held_out:
        return {"method": "none", "temperature": None, "reason": UNCALIBRATED_REASON}
    try:
        record = temperature_record(logits, y)
    except ValueError as e:
        raise EdgeError(f"--val-data {root}: cannot calibrate the scores: {e}") from e
    t = record["temperature"]
    if not (np.isfinite(t) and T_MIN < t < T_MAX):  # fit_temperature refuses these already
        raise EdgeError(f"--val-data {root}: fitted temperature {t} is outside ({T_MIN}, {T_MAX})")
    record.update(
        data=root,
        in_sample=True,
        applies="probabilities = softmax(logits / temperature)",
    )
    return record


def _decision(
    model: nn.Module,
    cutoff: tuple[str, float],
    data: Path,
    spec: InputSpec,
    labels: list[str],
    calibration: dict[str, Any],
) -> dict[str, Any]:
    """``edge["decision"]``: the cut-off chosen on the probabilities the bedside will show
    (``softmax(logits / T)`` when calibrated) of the --cutoff-data films."""
    from fedbridge_shared.calibration import softmax

    paths = list_images([data])
    if not paths:
        raise EdgeError(f"--cutoff-data {data}: no PNG/JPEG/DICOM images in class folders")
    x, _ = _load_images(paths, spec)
    _, logits = _features(model, x)
    probs = softmax(logits, calibration.get("temperature") or 1.0)
    return decisions.record(
        probs, [p.parent.name for p in paths], label=cutoff[0], labels=labels, rate=cutoff[1],
        root=str(Path(data).resolve()),
    )  # fmt: skip


CAM_REFERENCE_PERCENTILE = 99.0


def _cam_reference(model: nn.Module, x: np.ndarray, gaussians: ood.Gaussians) -> float:
    """The overlay's fixed colour scale: p99 of the predicted-class CAM on calibration images.

    Every overlay divides by this one number, so a weak map looks weak and an image the model
    has never seen the like of does not look as "hot" as a real finding.
    """
    head = EdgeHead(model, gaussians).eval()
    maps = []
    with torch.no_grad():
        for start in range(0, len(x), 32):
            logits, cam, _ = head(torch.from_numpy(x[start : start + 32]))
            k = logits.argmax(1)
            maps.append(cam[torch.arange(len(k)), k].clamp_min(0).flatten().numpy())
    reference = float(np.percentile(np.concatenate(maps), CAM_REFERENCE_PERCENTILE))
    return reference if np.isfinite(reference) and reference > 0 else 1.0


@dataclass
class _Int8:
    model: onnx.ModelProto
    info: dict[str, Any]
    refused: str | None


def _int8(
    fp32: bytes,
    *,
    calib_dir: Path,
    spec: InputSpec,
    batch: int | None,
    method: str,
    held_out: list[tuple[Path, np.ndarray, int]],
) -> _Int8:
    """Quantize, then compare INT8 with fp32 on labelled images that calibration did not see."""
    import onnxruntime as ort

    from fedbridge_edge.quantize import MIN_CHECK_IMAGES, compare, quantize_int8, verdict

    calib = list_images([calib_dir])
    if not calib:
        raise EdgeError(f"{calib_dir}: no PNG/JPEG/DICOM images to calibrate INT8 on")
    seen = {p.resolve() for p in calib}
    check = [(x, t) for p, x, t in held_out if p.resolve() not in seen]
    if len(check) < MIN_CHECK_IMAGES:
        raise EdgeError(
            f"--int8: only {len(check)} --val-data images are not among the --calib images; INT8 "
            f"is checked against fp32 on at least {MIN_CHECK_IMAGES} held-out labelled images"
        )
    model, info = quantize_int8(fp32, calib, spec, batch, method=method)
    x = np.stack([c[0] for c in check]).astype(np.float32)
    y = np.array([c[1] for c in check])
    outputs = []
    for graph in (fp32, model.SerializeToString()):
        session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
        outputs.append(dict(zip(OUTPUTS, session.run(list(OUTPUTS), {"input": x}), strict=True)))
    info["held_out_check"] = compare(outputs[0], outputs[1], y)
    return _Int8(model=model, info=info, refused=verdict(info["held_out_check"]))


def _bundle_record(bundle: Bundle) -> dict[str, Any]:
    """The bundle's model.json as read (spec, training, metrics) plus its weights hash."""
    import json

    from fedbridge_shared.layout import SPEC_FILE

    record: dict[str, Any] = json.loads((bundle.path / SPEC_FILE).read_text())
    record["spec"] = bundle.spec.to_dict()
    return record


def _trace(head: nn.Module, spec: InputSpec, opset: int, batch: int | None) -> onnx.ModelProto:
    n = batch or 2
    dummy = torch.zeros(n, spec.in_chans, spec.image_size, spec.image_size)
    dynamic = None if batch else {name: {0: "batch"} for name in ("input", *OUTPUTS)}
    buffer = io.BytesIO()
    try:
        torch.onnx.export(
            head,
            (dummy,),
            buffer,  # type: ignore[arg-type]  # a file object works; torch types a path
            input_names=["input"],
            output_names=list(OUTPUTS),
            dynamic_axes=dynamic,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    except Exception as e:  # the exporter raises many types for unsupported ops / opsets
        raise EdgeError(f"ONNX export failed at opset {opset}: {' '.join(str(e).split())}") from e
    model = onnx.load_from_string(buffer.getvalue())
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise EdgeError(f"exported graph fails onnx.checker: {' '.join(str(e).split())}") from e
    return model


def _parity(
    data: bytes, x: np.ndarray, reference: list[np.ndarray], tol: float | None
) -> dict[str, Any]:
    """Max abs differences between onnxruntime (CPU) and PyTorch on real images."""
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run(list(OUTPUTS), {"input": x})
    diffs = {
        f"{name}_max_abs_diff": float(np.abs(g - r).max())
        for name, g, r in zip(OUTPUTS, got, reference, strict=True)
    }
    parity = {"images": int(len(x)), **diffs, "logits_tolerance": tol}
    if tol is not None and diffs["logits_max_abs_diff"] > tol:
        raise EdgeError(
            f"onnxruntime logits differ from PyTorch by {diffs['logits_max_abs_diff']:.2e} "
            f"(> {tol:.0e}) on real images; not writing the model"
        )
    return parity
