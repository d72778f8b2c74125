"""Will TensorRT on the Jetson parse this ONNX graph? A check that runs here, without TensorRT.

TensorRT cannot be installed on these machines (its libraries come from NVIDIA's own index, and
an engine build needs a CUDA GPU), so ``fedbridge edge build`` is not run in CI. What can be
checked here is the graph against the ONNX parser's documented support: every operator, the
opset range, and the restrictions that bite exported CNNs (Q/DQ zero points must be 0 with
signed INT8 — TensorRT's explicit quantization is symmetric; ``axes`` inputs must be constant).

Source: onnx/onnx-tensorrt ``docs/operators.md`` at release 10.1-GA (commit 96e7811), the
newest the project's mirror holds. The Jetson target, JetPack 6.1/6.2, ships TensorRT 10.3,
whose parser supports everything listed here, so the check is conservative.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

TARGET = "TensorRT 10.3 (JetPack 6.1/6.2)"
SOURCE = "onnx/onnx-tensorrt docs/operators.md, release 10.1-GA (96e7811)"
OPSET_RANGE = (9, 20)
_SUPPORTED_TEXT = """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
    Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
    CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand
    EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool
    GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU
    HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN
    LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization
    LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg
    NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear
    RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1
    ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
    ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan
    Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax
    Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
    Transpose Trilu Unsqueeze Upsample Where Xor
"""
SUPPORTED = frozenset(_SUPPORTED_TEXT.split())  # noqa: SIM905 (a copy of the doc's table)
CONSTANT_AXES = {"Slice": 3, "Squeeze": 1, "Unsqueeze": 1, "ReduceMean": 1, "Pad": 3}
"""Operators whose ``axes`` input (by position) must be an initializer or a Constant."""
SIGNED_INT8 = onnx.TensorProto.INT8


@dataclass(frozen=True)
class Problem:
    node: str
    op: str
    why: str

    def __str__(self) -> str:
        return f"{self.op} {self.node!r}: {self.why}"


def check(model: onnx.ModelProto) -> list[Problem]:
    """Everything in ``model`` that the TensorRT ONNX parser documents as unsupported."""
    problems: list[Problem] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        problems.append(Problem("(model)", "opset", f"opset {opset} outside {OPSET_RANGE}"))
    constants = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                constants[node.output[0]] = value
    for node in model.graph.node:
        where = node.name or node.output[0]
        if node.domain not in ("", "ai.onnx"):
            problems.append(Problem(where, node.op_type, f"custom domain {node.domain!r}"))
        elif node.op_type not in SUPPORTED:
            problems.append(Problem(where, node.op_type, "not supported by the parser"))
        position = CONSTANT_AXES.get(node.op_type)
        axes = node.input[position] if position is not None and len(node.input) > position else ""
        if axes and axes not in constants:
            problems.append(Problem(where, node.op_type, "axes input is not a constant"))
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            problems.extend(_qdq(node, where, constants))
    return problems


def _qdq(node: onnx.NodeProto, where: str, constants: dict[str, Any]) -> list[Problem]:
    """Explicit quantization in TensorRT: signed INT8 with zero point 0 (symmetric)."""
    if len(node.input) < 3 or not node.input[2]:
        return []  # no zero point: uint8 by ONNX default for Q, which TensorRT refuses
    zero = constants.get(node.input[2])
    if zero is None:
        return [Problem(where, node.op_type, "zero point is not a constant")]
    out = []
    if zero.data_type != SIGNED_INT8:
        kind = onnx.TensorProto.DataType.Name(zero.data_type)
        out.append(Problem(where, node.op_type, f"{kind} quantization (TensorRT needs INT8)"))
    if np.any(numpy_helper.to_array(zero) != 0):
        out.append(Problem(where, node.op_type, "zero point is not 0 (TensorRT is symmetric)"))
    return out


def summary(model: onnx.ModelProto) -> dict[str, Any]:
    """The record export writes into the edge metadata."""
    problems = check(model)
    ops = sorted({n.op_type for n in model.graph.node})
    return {
        "target": TARGET,
        "source": SOURCE,
        "ops": ops,
        "problems": [str(p) for p in problems[:50]],
        "n_problems": len(problems),
        "tensorrt_run_here": False,
    }
