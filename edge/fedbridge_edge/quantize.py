"""Static INT8 quantization (QDQ) for CPU bedside boxes with onnxruntime's quantization tools.

Convolutions and the classifier (Gemm) are quantized — per-channel int8 weights, uint8
activations (the U8S8 kernels of AVX-512 VNNI) — the CAM 1×1 conv included. The OOD head (MatMul
on the pooled features) stays float so the Mahalanobis distance keeps its range. The same QDQ
graph is what TensorRT's explicit quantization consumes (see ``trt.py``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from fedbridge_edge.errors import EdgeError
from fedbridge_edge.preprocess import CalibrationBatcher, InputSpec


class ImageCalibrationReader:
    """onnxruntime ``CalibrationDataReader`` over a :class:`CalibrationBatcher`."""

    def __init__(self, batcher: CalibrationBatcher) -> None:
        self.batcher = batcher
        self._batches = iter(batcher)

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._batches, None)
        return None if x is None else {"input": x}

    def rewind(self) -> None:
        self._batches = iter(self.batcher)


def quantize_int8(
    data: bytes, calib: Sequence[Path], spec: InputSpec, batch: int | None = None
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """QDQ-quantize the fp32 edge graph in ``data``, calibrated on ``calib`` images."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calib) < 8:
        raise EdgeError(f"INT8 calibration needs at least 8 images, got {len(calib)}")
    model = onnx.load_from_string(data)
    keep_float = [n.name for n in model.graph.node if n.op_type == "MatMul"]
    reader = ImageCalibrationReader(CalibrationBatcher(calib, spec, batch=batch or 8))
    with tempfile.TemporaryDirectory(prefix="fedbridge-int8-") as tmp:
        fp32, pre, q = Path(tmp, "fp32.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        fp32.write_bytes(data)
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(q),
            reader,
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=CalibrationMethod.MinMax,
            op_types_to_quantize=["Conv", "Gemm"],
            nodes_to_exclude=keep_float,
        )
        quantized = onnx.load(str(q))
    info = {
        "method": "onnxruntime quantize_static, QDQ, U8 activations / S8 per-channel weights",
        "calibration": "MinMax",
        "calib_images": len(reader.batcher.paths),
        "calib_batch": reader.batcher.batch,
        "float_nodes": keep_float,
    }
    return quantized, info
