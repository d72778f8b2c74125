"""The HTTP API's reply models and the Open Inference Protocol (KServe v2) messages.

Every JSON body ``fedbridge edge serve`` sends is one of these pydantic models, and
``/openapi.json`` is generated from them (:func:`component_schemas`), so the published schema
and the replies cannot drift apart. No torch here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from fedbridge_edge.record import ApiErrorBody, FileError, PredictionRecord

REF = "#/components/schemas/{model}"


class PredictReply(PredictionRecord):
    """``/predict`` and each ``/predict/batch`` entry: the record plus what was asked for."""

    overlay_png_base64: str | None = Field(default=None, description="?overlay=png")
    overlay_dicom_base64: str | None = Field(
        default=None, description="?overlay=dicom: the Secondary Capture of the overlay"
    )
    report_dicom_base64: str | None = Field(
        default=None, description="?overlay=dicom: the Structured Report"
    )
    study_instance_uid: str | None = Field(default=None, description="a DICOM upload's study")
    sop_instance_uid: str | None = Field(default=None, description="a DICOM upload's instance")


class Health(BaseModel):
    """``/health``."""

    status: Literal["ok"]
    ready: bool
    model_sha256: str
    labels: list[str]
    modality: str
    calibrated: bool
    backend: str
    version: str
    max_bytes: int
    max_pixels: int


class Ready(BaseModel):
    """``/ready`` when ready."""

    status: Literal["ready"]


# ---- Open Inference Protocol (KServe v2), JSON/REST ------------------------------------------


class ServerMetadata(BaseModel):
    """``GET /v2``."""

    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    """``GET /v2/models/{name}``."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] = Field(default_factory=dict)


class RequestInput(BaseModel):
    """One input tensor: ``image`` as BYTES (base64 PNG/JPEG/DICOM files, shape [N]) or UINT8
    greyscale pixels (shape [H, W] or [1, H, W])."""

    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any]


class InferRequest(BaseModel):
    """``POST /v2/models/{name}/infer``."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput]
    outputs: list[dict[str, Any]] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any]


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


SCHEMA_MODELS: tuple[type[BaseModel], ...] = (
    PredictReply, FileError, ApiErrorBody, Health, Ready, ServerMetadata, ModelMetadata,
    InferRequest, InferResponse,
)  # fmt: skip


def component_schemas() -> dict[str, Any]:
    """JSON Schemas of every body the API sends or takes, keyed by model name."""
    _, top = models_json_schema(
        [(m, "validation" if m is InferRequest else "serialization") for m in SCHEMA_MODELS],
        ref_template=REF,
    )
    return dict(top.get("$defs", {}))


def ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}
