"""The bedside runtime: verified model → (label, probabilities, OOD flag, CAM) per image.

No torch here. Backends: onnxruntime (any CPU/GPU box) and TensorRT (a Jetson engine built on
the device by ``fedbridge edge build``, imported only from ``fedbridge_edge.trt``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedbridge_edge import fingerprint, overlay, scores
from fedbridge_edge.errors import EdgeError
from fedbridge_edge.modelfile import OUTPUTS, EdgeModel, read_edge_model
from fedbridge_edge.preprocess import InputSpec, normalise, resize
from fedbridge_shared.files import atomic_write

BACKENDS = ("auto", "onnxruntime", "tensorrt")
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


class OnnxRuntimeRunner:
    """onnxruntime session over the verified bytes (never re-read from disk)."""

    name = "onnxruntime"

    def __init__(self, model: EdgeModel, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = [
            p
            for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
            if p in ort.get_available_providers()
        ]
        try:
            self.session = ort.InferenceSession(model.data, options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise EdgeError(f"{model.path}: onnxruntime cannot load it ({e})") from e
        shape = self.session.get_inputs()[0].shape
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(OUTPUTS, self.session.run(list(OUTPUTS), {"input": x}), strict=True))


OK = "ok"
OUT_OF_DISTRIBUTION = "out_of_distribution"


@dataclass
class Prediction:
    """One image's result; ``to_json`` gives the per-image JSON the CLI, API and DICOM write.

    Out of distribution, nothing diagnostic leaves: ``label`` and ``probabilities`` are None,
    ``status`` is ``"out_of_distribution"`` and ``reason`` says which test failed and why.
    """

    image: str
    status: str
    label: str | None
    probabilities: dict[str, float] | None
    reason: str | None
    ood_score: float
    ood_threshold: float
    input_scores: dict[str, float]
    energy: float
    cam: np.ndarray | None
    grey: np.ndarray
    latency_ms: float
    inference_ms: float
    backend: str
    model_sha256: str
    overlay: OverlayStyle

    @property
    def ood(self) -> bool:
        return self.status == OUT_OF_DISTRIBUTION

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "status": self.status,
            "label": self.label,
            "probabilities": self.probabilities,
            "reason": self.reason,
            "ood": self.ood,
            "ood_score": self.ood_score,
            "ood_threshold": self.ood_threshold,
            **self.input_scores,
            "energy": self.energy,
            "model_sha256": self.model_sha256,
            "backend": self.backend,
            "latency_ms": round(self.latency_ms, 3),
            "inference_ms": round(self.inference_ms, 3),
        }

    def caption(self) -> overlay.Caption:
        style = self.overlay
        if self.ood:
            verdict, detail = "NOT ASSESSED: out of distribution", _short(self.reason or "")
        else:
            assert self.label is not None and self.probabilities is not None
            verdict = f"{self.label}  {self.probabilities[self.label]:.2f}"
            detail = ""
        return overlay.Caption(
            verdict=verdict, ood=self.ood, model=style.model, modality=style.modality,
            detail=detail,
        )  # fmt: skip

    def overlay_png(self) -> bytes:
        image = overlay.render(
            self.grey, self.cam, caption=self.caption(), reference=self.overlay.reference
        )
        return overlay.png_bytes(image)


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class OverlayStyle:
    """Per-model overlay settings read from the edge metadata."""

    model: str
    modality: str
    reference: float

    @classmethod
    def from_meta(cls, edge: dict[str, Any], spec: dict[str, Any], sha256: str) -> OverlayStyle:
        reference = float(edge.get("cam", {}).get("reference") or 0.0)
        return cls(
            model=f"{spec.get('arch', 'model')} · sha {sha256[:12]}",
            modality=str(edge.get("modality", "unknown")),
            reference=reference if reference > 0 else 1.0,
        )


MAX_THREADS = 256


class Predictor:
    """Load and verify a model (ONNX or TensorRT engine) and predict images with it."""

    def __init__(self, model_path: Path, backend: str = "auto", threads: int | None = None) -> None:
        model_path = Path(model_path)
        if backend not in BACKENDS:
            raise EdgeError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if threads is not None and not 1 <= threads <= MAX_THREADS:
            raise EdgeError(
                f"--threads {threads}: must be in [1, {MAX_THREADS}] (leave it out for all cores)"
            )
        is_engine = model_path.suffix.lower() in ENGINE_SUFFIXES
        if backend == "onnxruntime" and is_engine:
            raise EdgeError(f"{model_path}: a TensorRT engine; use --backend tensorrt or auto")
        if backend == "tensorrt" and not is_engine:
            raise EdgeError(
                f"{model_path}: --backend tensorrt needs an engine; build one on this device "
                f"with `fedbridge edge build {model_path}`"
            )
        if is_engine:
            from fedbridge_edge import trt

            engine = trt.load_engine(model_path)
            self.meta = engine.meta
            self.runner = trt.TensorRTRunner(engine)
        else:
            model = read_edge_model(model_path)
            self.meta = model
            self.runner = OnnxRuntimeRunner(model, threads)
        self.spec = InputSpec.from_spec(self.meta.spec)
        self.labels = self.meta.labels
        self.threshold = float(self.meta.edge["ood"]["threshold"])
        self.sha256 = self.meta.sha256
        self.input_test = _input_test(self.meta.edge, model_path)
        self.style = OverlayStyle.from_meta(self.meta.edge, self.meta.spec, self.sha256)

    @property
    def backend(self) -> str:
        return self.runner.name

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Raw outputs for a batch (padded to a fixed batch size when the graph has one)."""
        n, fixed = len(x), self.runner.fixed_batch
        if fixed and n != fixed:
            if n > fixed:
                parts = [self.run(x[i : i + fixed]) for i in range(0, n, fixed)]
                return {k: np.concatenate([p[k] for p in parts])[:n] for k in OUTPUTS}
            x = np.concatenate([x, np.repeat(x[-1:], fixed - n, axis=0)])
        out = self.runner.run(np.ascontiguousarray(x, dtype=np.float32))
        return {k: v[:n] for k, v in out.items()}

    def predict_array(
        self, grey: np.ndarray, name: str, started: float | None = None
    ) -> Prediction:
        """Predict one decoded greyscale uint8 image."""
        started = time.perf_counter() if started is None else started
        reason, input_scores = (
            self.input_test.check(grey) if self.input_test is not None else (None, {})
        )
        x = normalise(resize(grey, self.spec.image_size), self.spec)[None]
        t0 = time.perf_counter()
        out = self.run(x)
        inference_ms = (time.perf_counter() - t0) * 1e3
        logits = out["logits"].astype(np.float64)
        probs = scores.softmax(logits)[0]
        k = int(probs.argmax())
        score = float(out["ood_score"][0])
        if reason is None and score > self.threshold:
            reason = (
                f"the model's features are unlike every class it was trained on (score "
                f"{score:.2f} > {self.threshold:.2f})"
            )
        ood = reason is not None
        return Prediction(
            image=name,
            status=OUT_OF_DISTRIBUTION if ood else OK,
            label=None if ood else self.labels[k],
            probabilities=None
            if ood
            else {lab: float(p) for lab, p in zip(self.labels, probs, strict=True)},
            reason=reason,
            ood_score=score,
            ood_threshold=self.threshold,
            input_scores=input_scores,
            energy=float(scores.energy(logits)[0]),
            cam=None if ood else out["cam"][0, k],
            grey=grey,
            latency_ms=(time.perf_counter() - started) * 1e3,
            inference_ms=inference_ms,
            backend=self.backend,
            model_sha256=self.sha256,
            overlay=self.style,
        )

    def predict_file(self, path: Path) -> Prediction:
        from fedbridge_shared.data.images import read_image

        started = time.perf_counter()
        return self.predict_array(read_image(Path(path)), str(path), started)


def _input_test(edge: dict[str, Any], path: Path) -> fingerprint.InputTest | None:
    """The input-level OOD test of models exported by fedbridge ≥ 0.2 (None for older ones)."""
    record = edge.get("ood", {}).get("input_test")
    if record is None:
        return None
    try:
        return fingerprint.InputTest.from_json(record)
    except (KeyError, TypeError, ValueError) as e:
        raise EdgeError(f"{path}: its input-level OOD test cannot be read ({e})") from e


def write_prediction(pred: Prediction, out: Path, stem: str) -> tuple[Path, Path]:
    """Write ``stem.json`` and ``stem.overlay.png`` into ``out`` (atomically)."""
    png = atomic_write(out / f"{stem}.overlay.png", pred.overlay_png())
    record = {**pred.to_json(), "overlay": png.name}
    js = atomic_write(out / f"{stem}.json", (json.dumps(record, indent=2) + "\n").encode())
    return js, png


def unique_stems(paths: list[Path]) -> list[str]:
    """Output names: the file stem, with ``-2``, ``-3``… for repeated stems."""
    seen: dict[str, int] = {}
    stems = []
    for p in paths:
        base = p.stem or "image"
        seen[base] = seen.get(base, 0) + 1
        stems.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return stems
