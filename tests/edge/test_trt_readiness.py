"""TensorRT readiness that can be checked without TensorRT (not installable here: its libraries
come from NVIDIA's index, and an engine build needs a CUDA GPU): `polygraphy check lint` and the
ONNX parser's documented op support for the Jetson target, on the exported fp32 and INT8 graphs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from fedbridge_edge import trt_ops
from fedbridge_edge.modelfile import read_edge_model
from fedbridge_edge.quantize import rank_correlation, verdict

POLYGRAPHY = Path(sys.executable).parent / "polygraphy"


def _lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(POLYGRAPHY), "check", "lint", str(path)], capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_exported_graphs_pass_polygraphy_lint_and_the_tensorrt_op_check(
    which, edge_onnx, int8_onnx
):
    path = edge_onnx if which == "fp32" else int8_onnx
    result = _lint(path)
    assert result.returncode == 0 and "PASSED" in result.stdout + result.stderr, result.stderr
    model = onnx.load(path)
    assert trt_ops.check(model) == []
    recorded = read_edge_model(path).edge["tensorrt"]
    assert recorded["n_problems"] == 0 and recorded["target"].startswith("TensorRT 10.3")
    if which == "int8":  # explicit quantization as TensorRT takes it: symmetric signed INT8
        zeros = [t for t in model.graph.initializer if t.name.endswith("_zero_point")]
        assert zeros and all(z.data_type == TensorProto.INT8 for z in zeros)


def _graph(op: str, opset: int = 17, **attrs) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node(op, ["x"], ["y"], name="n0", **attrs)
    return helper.make_model(
        helper.make_graph([node], "g", [x], [y]), opset_imports=[helper.make_opsetid("", opset)]
    )


def test_the_op_check_reports_what_the_parser_cannot_take():
    assert trt_ops.check(_graph("Relu")) == []
    (problem,) = trt_ops.check(_graph("Unique"))
    assert problem.op == "Unique" and "not supported" in problem.why
    assert any("opset 21" in p.why for p in trt_ops.check(_graph("Relu", opset=21)))
    # asymmetric uint8 Q/DQ (onnxruntime's CPU default) is not TensorRT's explicit quantization
    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    zero = helper.make_tensor("z", TensorProto.UINT8, [], [128])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    q = helper.make_tensor_value_info("q", TensorProto.UINT8, None)
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="quant")
    model = helper.make_model(
        helper.make_graph([node], "g", [x], [q], initializer=[scale, zero]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    whys = {p.why for p in trt_ops.check(model)}
    assert any("UINT8" in w for w in whys) and any("not 0" in w for w in whys)


def test_cam_rank_correlation_and_the_int8_verdict_have_known_answers():
    a = np.array([[0.1, 0.5, 0.2, 0.9], [1.0, 2.0, 3.0, 4.0]])
    np.testing.assert_allclose(rank_correlation(a, a * 3 + 1), [1.0, 1.0])
    np.testing.assert_allclose(rank_correlation(a, -a), [-1.0, -1.0])
    np.testing.assert_allclose(rank_correlation(a[:1], np.array([[0.9, 0.5, 0.2, 0.1]])), [-0.8])
    good = {"images": 100, "accuracy_fp32": 0.9, "accuracy_int8": 0.9, "accuracy_drop": 0.0,
            "cam_rank_corr_mean": 0.95}  # fmt: skip
    assert verdict(good) is None
    assert "drop of 1.0 points" in verdict({**good, "accuracy_int8": 0.89, "accuracy_drop": 0.01})
    assert "rank correlation 0.850" in verdict({**good, "cam_rank_corr_mean": 0.85})
