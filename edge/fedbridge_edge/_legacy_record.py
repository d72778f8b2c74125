"""A PredictionRecord from today's ``runtime.Prediction`` — until runtime carries ``.record``.

The DICOM writers take the typed record; the callers (listen, serve, ``edge predict --dicom``)
build it here from ``pred.to_json()`` and the predictor's metadata. Delete this module when
``runtime.Prediction`` has ``.record``. No torch here.
"""

from __future__ import annotations

from typing import Any

from fedbridge_edge.record import ModelIdentity, PredictionRecord, ScoreKind, Status
from fedbridge_shared import __version__, label_codes
from fedbridge_shared.label_codes import LabelCode


def model_identity(predictor: Any) -> ModelIdentity:  # until runtime carries .record
    edge = predictor.meta.edge
    modality = str(edge.get("modality", "other"))
    calibrated = bool(edge.get("calibration") or edge.get("temperature"))
    return ModelIdentity(
        name=str(predictor.meta.spec.get("arch", "model")),
        sha256=str(predictor.sha256),
        modality=modality if modality in ("cxr", "oct") else "other",
        version=__version__,
        calibrated=calibrated,
    )


def codes_of(predictor: Any) -> dict[str, LabelCode]:
    """The bundle's label code table (its defaults for bundles exported without one)."""
    return label_codes.from_edge(predictor.meta.edge, list(predictor.labels))


def record_of(pred: Any, model: ModelIdentity) -> PredictionRecord:  # until runtime carries .record
    j = pred.to_json()
    ood = j["status"] != Status.OK.value
    return PredictionRecord(
        image=str(j["image"]),
        status=Status.OUT_OF_DISTRIBUTION if ood else Status.OK,
        label=None if ood else j["label"],
        scores=None if ood else dict(j["probabilities"]),
        score_kind=ScoreKind.PROBABILITY if model.calibrated else ScoreKind.SCORE,
        reason=j.get("reason") if ood else None,
        ood_score=float(j["ood_score"]),
        ood_threshold=float(j["ood_threshold"]),
        input_distance=j.get("input_distance"),
        input_orientation=j.get("input_orientation"),
        energy=float(j["energy"]),
        markers=None,
        markers_source="not read (until runtime carries .record)",
        cam_label=None if ood else j["label"],
        model=model,
        backend=str(j["backend"]),
        latency_ms=float(j["latency_ms"]),
        inference_ms=float(j["inference_ms"]),
    )
