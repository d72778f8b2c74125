"""The one prediction record: CLI JSON, HTTP replies (and their OpenAPI schema), overlay, SC, SR.

A typed pydantic model, so the published schema is generated from the same class the code
fills, never re-typed. Out of distribution nothing diagnostic is set: ``label``, ``scores``
and ``cam_label`` are None and ``reason`` says which test failed. ``scores`` are called
probabilities (``score_kind == "probability"``) only when the model was calibrated at export.
No torch here.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, computed_field


class Status(str, Enum):
    """Whether the image was assessed."""

    OK = "ok"
    OUT_OF_DISTRIBUTION = "out_of_distribution"


class ScoreKind(str, Enum):
    """``probability`` when temperature-calibrated at export, else an uncalibrated ``score``."""

    PROBABILITY = "probability"
    SCORE = "score"


class Markers(BaseModel):
    """The patient-side letter the overlay prints at each side of the screen."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    left: str = Field(description="letter at the viewer's left edge, e.g. R")
    right: str = Field(description="letter at the viewer's right edge, e.g. L")


class ModelIdentity(BaseModel):
    """Which model answered: name, seal (sha256 over weights and spec), modality, version."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="architecture, e.g. mobilenetv2_100")
    sha256: str = Field(description="the bundle's seal, carried in the ONNX metadata")
    modality: str = Field(description="cxr | oct | other, sealed in the model spec")
    version: str = Field(description="fedbridge version that ran it")
    calibrated: bool = Field(description="temperature scaling fitted at export")
    cutoff: dict[str, float] | None = Field(
        default=None,
        description="a label called only at or above this score, chosen at export on films that "
        "are not it (e.g. {'COVID19': 0.38}); None: the most probable label is called",
    )


class PredictionRecord(BaseModel):
    """One image's result."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image: str = Field(description="the image's name (file path or upload name)")
    status: Status
    label: str | None = Field(description="predicted class; None out of distribution")
    scores: dict[str, float] | None = Field(
        description="per-class scores (probabilities when calibrated); None out of distribution"
    )
    score_kind: ScoreKind
    reason: str | None = Field(description="why the image was not assessed; None when ok")
    ood_score: float = Field(description="feature-level out-of-distribution score")
    ood_threshold: float
    input_distance: float | None = Field(
        default=None, description="input-level pixel-statistics distance (None: old model)"
    )
    input_orientation: float | None = Field(
        default=None, description="input-level orientation score (None: old model)"
    )
    energy: float = Field(description="free energy of the logits (reported, not used)")
    markers: Markers | None = Field(
        description="laterality letters at the screen's left/right, from DICOM "
        "PatientOrientation; None when the image does not say"
    )
    markers_source: str = Field(description="where the markers came from, or why there are none")
    cam_label: str | None = Field(
        description="the class the heat map explains; None when no map is drawn"
    )
    model: ModelIdentity
    backend: str
    latency_ms: float
    inference_ms: float

    # pydantic's documented pattern; mypy does not follow decorators over @property
    @computed_field(description="status == out_of_distribution (derived here only)")  # type: ignore[prop-decorator]
    @property
    def ood(self) -> bool:
        return self.status is Status.OUT_OF_DISTRIBUTION

    @computed_field(description="model.sha256, at the top level for clients that index by it")  # type: ignore[prop-decorator]
    @property
    def model_sha256(self) -> str:
        return self.model.sha256

    @property
    def top_score(self) -> float | None:
        """The predicted class's score (None out of distribution)."""
        if self.label is None or self.scores is None:
            return None
        return self.scores[self.label]

    def summary(self) -> str:
        """One line: ``LABEL 0.934 (probability)``, or why there is none."""
        if self.ood:
            return "not assessed: out of distribution" + (
                f" ({self.reason})" if self.reason else ""
            )
        return f"{self.label} {self.top_score:.3f} ({self.score_kind.value})"

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class FileError(BaseModel):
    """A file in a batch that could not be predicted."""

    image: str
    error: str


class ApiErrorBody(BaseModel):
    """Every HTTP error's body."""

    error: str
