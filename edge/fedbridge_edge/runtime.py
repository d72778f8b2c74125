"""The bedside runtime: verified model → one prediction record (and its map) per image.

No torch here. Backends: onnxruntime (any CPU/GPU box) and TensorRT (a Jetson engine built on
the device by ``fedbridge edge build``, imported only from ``fedbridge_edge.trt``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedbridge_edge import cutoff, fingerprint, laterality, overlay, scores
from fedbridge_edge.errors import EdgeError
from fedbridge_edge.modelfile import OUTPUTS, EdgeModel, read_edge_model
from fedbridge_edge.preprocess import InputSpec, normalise, resize
from fedbridge_edge.record import Markers, ModelIdentity, PredictionRecord, ScoreKind, Status
from fedbridge_shared import __version__, label_codes
from fedbridge_shared.errors import FedbridgeError
from fedbridge_shared.files import atomic_write
from fedbridge_shared.modality import MODALITIES

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from fedbridge_shared.data.images import DecodedImage

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


@dataclass
class Prediction:
    """One image's result: the typed :class:`~fedbridge_edge.record.PredictionRecord` every
    output is built from, plus what the overlay needs (the decoded image and the class map)."""

    record: PredictionRecord
    cam: np.ndarray | None
    """The map of ``record.cam_label`` (None: no map drawn)."""
    grey: np.ndarray
    style: OverlayStyle
    dicom: Dataset | None = None
    """The DICOM dataset the image was decoded from (None: PNG/JPEG or an array), parsed once:
    its header is what the SC and SR results are built from."""

    @property
    def image(self) -> str:
        return self.record.image

    @property
    def label(self) -> str | None:
        return self.record.label

    @property
    def ood(self) -> bool:
        return self.record.ood

    @property
    def reason(self) -> str | None:
        return self.record.reason

    @property
    def latency_ms(self) -> float:
        return self.record.latency_ms

    def to_json(self) -> dict[str, Any]:
        return self.record.to_json()

    def caption(self) -> overlay.Caption:
        record = self.record
        if record.ood:
            verdict, detail = "NOT ASSESSED: out of distribution", _short(record.reason or "")
        else:
            kind = "p" if record.score_kind is ScoreKind.PROBABILITY else "score"
            verdict, detail = f"{record.label}  {kind} {record.top_score:.2f}", ""
            if record.cam_label is None:
                detail = f"no heat map for {record.label} (a normal class)"
        markers = record.markers
        return overlay.Caption(
            verdict=verdict, ood=record.ood, model=self.style.model, detail=detail,
            map_label=record.cam_label,
            markers=None if markers is None else (markers.left, markers.right),
        )  # fmt: skip

    def overlay_png(self, max_side: int = overlay.MAX_SIDE) -> bytes:
        image = overlay.render(
            self.grey, self.cam, caption=self.caption(), reference=self.style.reference,
            max_side=max_side,
        )  # fmt: skip
        return overlay.png_bytes(image)


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class OverlayStyle:
    """Per-model overlay settings read from the edge metadata."""

    model: str
    reference: float

    @classmethod
    def from_meta(cls, edge: dict[str, Any], spec: dict[str, Any], sha256: str) -> OverlayStyle:
        reference = float(edge.get("cam", {}).get("reference") or 0.0)
        return cls(
            model=f"{spec.get('arch', 'model')} · sha {sha256[:12]}",
            reference=reference if reference > 0 else 1.0,
        )


def temperature_of(edge: dict[str, Any], path: Path) -> float | None:
    """The softmax temperature fitted at export (None: the model was not calibrated)."""
    record = edge.get("calibration") or {}
    if record.get("method") != "temperature":
        return None
    t = record.get("temperature")
    if not isinstance(t, int | float) or not math.isfinite(t) or not 0 < t < 1e3:
        raise EdgeError(f"{path}: its calibration temperature {t!r} is not a positive number")
    return float(t)


MAX_THREADS = 256


class Predictor:
    """Load and verify a model (ONNX or TensorRT engine) and predict images with it."""

    def __init__(
        self,
        model_path: Path,
        backend: str = "auto",
        threads: int | None = None,
        *,
        map_normal: bool = False,
    ) -> None:
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
            self.runner: trt.TensorRTRunner | OnnxRuntimeRunner = trt.TensorRTRunner(engine)
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
        self.temperature = temperature_of(self.meta.edge, model_path)
        self.cutoff = cutoff.from_edge(self.meta.edge, list(self.labels), model_path)
        try:
            self.codes = label_codes.from_edge(self.meta.edge, list(self.labels))
        except FedbridgeError as e:
            raise EdgeError(f"{model_path}: {e}") from e
        self.normal = frozenset(label for label, code in self.codes.items() if code.normal)
        """Classes the bundle marks as normal/negative: no heat map is drawn for them."""
        self.map_normal = map_normal
        modality = str(self.meta.edge.get("modality") or self.meta.spec.get("modality") or "")
        self.identity = ModelIdentity(
            name=str(self.meta.spec.get("arch", "model")),
            sha256=self.sha256,
            modality=modality if modality in MODALITIES else "other",
            version=__version__,
            calibrated=self.temperature is not None,
            cutoff=None if self.cutoff is None else {self.cutoff.label: self.cutoff.value},
        )

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
        self,
        grey: np.ndarray,
        name: str,
        started: float | None = None,
        *,
        markers: tuple[Markers | None, str] = (None, "none: no orientation given"),
    ) -> Prediction:
        """Predict one decoded greyscale uint8 image; ``markers`` from its DICOM header."""
        started = time.perf_counter() if started is None else started
        reason, input_scores = (
            self.input_test.check(grey) if self.input_test is not None else (None, {})
        )
        x = normalise(resize(grey, self.spec.image_size), self.spec)[None]
        t0 = time.perf_counter()
        out = self.run(x)
        inference_ms = (time.perf_counter() - t0) * 1e3
        logits = out["logits"].astype(np.float64)
        probs = scores.softmax(logits if self.temperature is None else logits / self.temperature)[0]
        k = int(probs.argmax()) if self.cutoff is None else self.cutoff.decide(probs)
        score = float(out["ood_score"][0])
        if reason is None and score > self.threshold:
            reason = (
                f"the model's features are unlike every class it was trained on (score "
                f"{score:.2f} > {self.threshold:.2f})"
            )
        ood = reason is not None
        label = None if ood else self.labels[k]
        mapped = label is not None and (self.map_normal or label not in self.normal)
        record = PredictionRecord(
            image=name,
            status=Status.OUT_OF_DISTRIBUTION if ood else Status.OK,
            label=label,
            scores=None
            if ood
            else {lab: float(p) for lab, p in zip(self.labels, probs, strict=True)},
            score_kind=ScoreKind.SCORE if self.temperature is None else ScoreKind.PROBABILITY,
            reason=reason,
            ood_score=score,
            ood_threshold=self.threshold,
            input_distance=input_scores.get("input_distance"),
            input_orientation=input_scores.get("input_orientation"),
            energy=float(scores.energy(logits)[0]),
            markers=markers[0],
            markers_source=markers[1],
            cam_label=label if mapped else None,
            model=self.identity,
            backend=self.backend,
            latency_ms=round((time.perf_counter() - started) * 1e3, 3),
            inference_ms=round(inference_ms, 3),
        )
        return Prediction(
            record=record, cam=out["cam"][0, k] if mapped else None, grey=grey, style=self.style
        )

    def predict_file(self, path: Path) -> Prediction:
        """Decode (a DICOM parsed once) and predict one image file."""
        from fedbridge_shared.data.images import decode_image

        started = time.perf_counter()
        return self.predict_image(decode_image(Path(path)), str(path), started)

    def predict_image(
        self, image: DecodedImage, name: str, started: float | None = None
    ) -> Prediction:
        """Predict a decoded image; a DICOM's markers come from the dataset it was decoded from
        (kept on the prediction as ``dicom``)."""
        markers = laterality.markers_from_dataset(image.dicom)
        pred = self.predict_array(image.grey, name, started, markers=markers)
        pred.dicom = image.dicom
        return pred


def is_dicom_file(path: Path) -> bool:
    """A DICOM input by the same rule the image reader uses: suffix or DICM magic."""
    from fedbridge_shared.data.images import DICOM_SUFFIXES, has_dicom_magic

    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as fh:
            return has_dicom_magic(fh.read(132))
    except OSError:
        return False


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
    """Write ``stem.json`` (the record and its overlay's name) and ``stem.overlay.png``."""
    png = atomic_write(out / f"{stem}.overlay.png", pred.overlay_png())
    record = {**pred.to_json(), "overlay": png.name}
    js = atomic_write(out / f"{stem}.json", (json.dumps(record, indent=2) + "\n").encode())
    return js, png
