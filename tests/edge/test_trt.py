"""Everything around the TensorRT calls, without TensorRT: plan, calibration, engine header."""

import json

import numpy as np
import pytest
from cli import assert_one_line_error, fedbridge

from fedbridge_edge import trt
from fedbridge_edge.errors import EdgeError, IntegrityError
from fedbridge_edge.modelfile import EdgeModel
from fedbridge_edge.preprocess import CalibrationBatcher, InputSpec, list_images

ORIN = trt.DeviceInfo("Orin", "8.7", "10.3.0")
SPEC = {"labels": ["a", "b"], "image_size": 32, "in_chans": 3}


def _model(path="m.onnx"):
    return EdgeModel(path, b"", "ab" * 32, {"spec": SPEC}, {"ood": {"threshold": 1.0}})


def _engine(tmp_path, device=ORIN, payload=b"serialized-engine"):
    header = {
        "device": vars(device),
        "onnx_sha256": "ab" * 32,
        "record": {"spec": SPEC},
        "edge": {"ood": {"threshold": 1.0}},
        "plan": {"profile": {"min": [1, 3, 32, 32], "max": [8, 3, 32, 32]}},
    }
    path = tmp_path / "model.engine"
    path.write_bytes(trt.pack_engine(payload, header))
    return path


def test_engine_header_roundtrip_and_same_device_loads(tmp_path):
    path = _engine(tmp_path)
    engine = trt.load_engine(path, device=ORIN)
    assert engine.engine == b"serialized-engine"
    assert engine.header["device"]["compute_capability"] == "8.7"
    assert engine.meta.labels == ["a", "b"] and engine.meta.sha256 == "ab" * 32


@pytest.mark.parametrize(
    "other",
    [
        trt.DeviceInfo("Orin", "8.7", "10.7.0"),
        trt.DeviceInfo("Orin", "7.2", "10.3.0"),
        trt.DeviceInfo("NVIDIA H100", "9.0", "10.3.0"),
    ],
)
def test_engine_from_another_device_is_refused(tmp_path, other):
    path = _engine(tmp_path)
    with pytest.raises(IntegrityError, match="rebuild it on this device") as info:
        trt.load_engine(path, device=other)
    assert "Orin (sm 8.7, TensorRT 10.3.0)" in str(info.value)
    assert other.describe() in str(info.value)


def test_modified_or_foreign_engine_is_refused(tmp_path):
    path = _engine(tmp_path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="do not match their sha256"):
        trt.load_engine(path, device=ORIN)
    path.write_bytes(b"\x00" * 64)  # a raw TensorRT plan without our header
    with pytest.raises(EdgeError, match="not a fedbridge TensorRT engine"):
        trt.load_engine(path, device=ORIN)
    path.write_bytes(trt.MAGIC + (10**6).to_bytes(4, "little") + b"{}")
    with pytest.raises(IntegrityError, match="truncated"):
        trt.load_engine(path, device=ORIN)


def test_cli_without_tensorrt_is_a_one_line_error(tmp_path, bad_inputs):
    path = _engine(tmp_path)
    result = fedbridge("edge", "predict", path, bad_inputs["png16"], "--out", tmp_path / "o")
    assert_one_line_error(result, "TensorRT is not installed")
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"not onnx")
    result = fedbridge("edge", "build", onnx_file, "--precision", "fp16")
    assert_one_line_error(result, str(onnx_file), "not an ONNX model")
    result = fedbridge("edge", "predict", onnx_file, bad_inputs["png16"], "--backend", "tensorrt",
                       "--out", tmp_path / "o")  # fmt: skip
    assert_one_line_error(result, "fedbridge edge build")


def test_build_plan_dynamic_profile_and_flags():
    plan = trt.plan_build(_model(), ["batch", 3, 224, 224], "fp16", workspace_mb=512, max_batch=8)
    assert plan.profile == {
        "min": (1, 3, 224, 224),
        "opt": (1, 3, 224, 224),
        "max": (8, 3, 224, 224),
    }
    assert plan.flags == ("FP16",) and plan.workspace_bytes == 512 << 20
    assert not plan.calibrate and not plan.explicit_quantization
    fixed = trt.plan_build(_model(), [4, 3, 64, 64], "fp32")
    assert fixed.profile["min"] == fixed.profile["opt"] == fixed.profile["max"] == (4, 3, 64, 64)
    assert fixed.flags == ()


def test_build_plan_int8_explicit_vs_calibrated(tmp_path):
    qdq = trt.plan_build(_model(), ["batch", 3, 64, 64], "int8", has_qdq=True)
    assert qdq.explicit_quantization and not qdq.calibrate and "INT8" in qdq.flags
    calibrated = trt.plan_build(_model(), ["batch", 3, 64, 64], "int8", calib=[tmp_path / "x.png"])
    assert calibrated.calibrate and not calibrated.explicit_quantization
    with pytest.raises(EdgeError, match="--calib"):
        trt.plan_build(_model(), ["batch", 3, 64, 64], "int8")
    with pytest.raises(EdgeError, match="Q/DQ"):
        trt.plan_build(_model(), ["batch", 3, 64, 64], "fp16", has_qdq=True)
    with pytest.raises(EdgeError, match="--precision"):
        trt.plan_build(_model(), ["batch", 3, 64, 64], "int4")
    with pytest.raises(EdgeError, match="--workspace"):
        trt.plan_build(_model(), ["batch", 3, 64, 64], "fp32", workspace_mb=1)


def test_calibration_batches_are_full_and_preprocessed(cxr_root):
    spec = InputSpec(image_size=48, in_chans=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    paths = list_images([cxr_root / "NORMAL"])[:11]
    batcher = CalibrationBatcher(paths, spec, batch=4)
    got = list(batcher)
    assert len(batcher) == len(got) == 3
    assert all(b.shape == (4, 3, 48, 48) and b.dtype == np.float32 for b in got)
    assert all(b.flags["C_CONTIGUOUS"] for b in got)
    np.testing.assert_array_equal(got[2][3], got[2][0])  # last batch of 3 padded by repetition
    assert got[0].min() >= -1.0 and got[0].max() <= 1.0
    with pytest.raises(EdgeError):
        CalibrationBatcher(paths, spec, batch=0)


def test_calibration_cache_key_follows_model_images_and_batch(cxr_root, tmp_path):
    spec = InputSpec(image_size=48, in_chans=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    paths = list_images([cxr_root / "NORMAL"])[:5]
    key = trt.calibration_cache_key("a" * 64, paths, 8, spec)
    assert key == trt.calibration_cache_key("a" * 64, list(reversed(paths)), 8, spec)
    assert key != trt.calibration_cache_key("b" * 64, paths, 8, spec)
    assert key != trt.calibration_cache_key("a" * 64, paths[:4], 8, spec)
    assert key != trt.calibration_cache_key("a" * 64, paths, 4, spec)
    other_spec = InputSpec(image_size=64, in_chans=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert key != trt.calibration_cache_key("a" * 64, paths, 8, other_spec)
    copy = tmp_path / paths[0].name  # same name, different bytes
    copy.write_bytes(paths[1].read_bytes())
    assert key != trt.calibration_cache_key("a" * 64, [copy, *paths[1:]], 8, spec)
    cache = trt.calibration_cache_path(tmp_path / "model.engine", key)
    assert cache.name == f"model.engine.calib-{key[:16]}.cache"


def test_engine_header_is_json_with_the_device_record(tmp_path):
    data = _engine(tmp_path).read_bytes()
    size = int.from_bytes(data[8:12], "little")
    header = json.loads(data[12 : 12 + size])
    assert header["format"] == trt.ENGINE_FORMAT
    assert set(header["device"]) == {"gpu_name", "compute_capability", "tensorrt_version"}
