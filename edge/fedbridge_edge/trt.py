"""TensorRT 10: build an engine on the device, and run it. The only module importing tensorrt.

Engine file = ``FBTRTENG`` + 4-byte header length + JSON header + serialized engine. The header
records the GPU name, compute capability and TensorRT version it was built with (engines are not
portable), the engine's sha256, the source ONNX's content hash, and the model record (labels,
preprocessing, OOD threshold) so the device needs only the engine file. Everything except the
calls into tensorrt / CUDA is plain Python and tested without them.

INT8: an ONNX exported with ``--int8`` carries Q/DQ nodes (explicit quantization, what NVIDIA
recommends); it is built with the INT8 flag and no calibrator. A float ONNX with
``--precision int8`` uses implicit quantization with ``IInt8EntropyCalibrator2`` (deprecated in
TensorRT 10, still available) over ``--calib`` images, with a cache keyed on model + images.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from fedbridge_edge.errors import EdgeError, IntegrityError
from fedbridge_edge.modelfile import OUTPUTS, EdgeModel, read_edge_model
from fedbridge_edge.preprocess import CalibrationBatcher, InputSpec
from fedbridge_shared.files import atomic_write

MAGIC = b"FBTRTENG"
ENGINE_FORMAT = "fedbridge-trt-engine/1"
PRECISIONS = ("fp32", "fp16", "int8")
MAX_HEADER = 16 << 20


def import_tensorrt() -> Any:
    """``import tensorrt`` or a one-line error saying where it comes from."""
    try:
        import tensorrt
    except ImportError as e:
        raise EdgeError(
            "TensorRT is not installed: it ships with JetPack on a Jetson (use the "
            "deploy/jetson container); on a CPU box use --backend onnxruntime"
        ) from e
    return tensorrt


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as e:
            raise EdgeError("cuda-python is not installed (pip install cuda-python)") from e
    return cudart


def _check_cuda(result: Any) -> Any:
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise EdgeError(f"CUDA call failed: {err}")
    return rest[0] if len(rest) == 1 else rest


@dataclass(frozen=True)
class DeviceInfo:
    """Where an engine was built / is loaded: it must match exactly to load."""

    gpu_name: str
    compute_capability: str
    tensorrt_version: str

    def describe(self) -> str:
        return f"{self.gpu_name} (sm {self.compute_capability}, TensorRT {self.tensorrt_version})"


def current_device() -> DeviceInfo:
    """This machine's GPU 0 and TensorRT version."""
    trt = import_tensorrt()
    cudart = _cudart()
    props = _check_cuda(cudart.cudaGetDeviceProperties(0))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return DeviceInfo(name.strip("\x00 "), f"{props.major}.{props.minor}", trt.__version__)


def check_device(header: dict[str, Any], device: DeviceInfo, path: Path) -> None:
    """Refuse an engine built on another GPU, compute capability or TensorRT version."""
    built = DeviceInfo(**header["device"])
    if built != device:
        raise IntegrityError(
            f"{path}: engine was built for {built.describe()} but this device is "
            f"{device.describe()}; engines are not portable — rebuild it on this device with "
            "`fedbridge edge build MODEL.onnx`"
        )


# ---- build plan (pure) ------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildPlan:
    """Everything ``build_engine`` sets on the builder, decided without tensorrt."""

    precision: str
    flags: tuple[str, ...]
    workspace_bytes: int
    profile: dict[str, tuple[int, ...]]
    explicit_quantization: bool
    calibrate: bool


def plan_build(
    model: EdgeModel,
    input_shape: Sequence[int | str],
    precision: str,
    workspace_mb: int = 1024,
    max_batch: int = 8,
    opt_batch: int | None = None,
    has_qdq: bool = False,
    calib: Sequence[Path] = (),
) -> BuildPlan:
    """Flags, optimisation profile and calibration needs for a build (raises EdgeError)."""
    if precision not in PRECISIONS:
        raise EdgeError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if workspace_mb < 16:
        raise EdgeError(f"--workspace must be at least 16 MB, got {workspace_mb}")
    if has_qdq and precision != "int8":
        raise EdgeError(f"{model.path}: holds Q/DQ (INT8) nodes; build it with --precision int8")
    calibrate = precision == "int8" and not has_qdq
    if calibrate and not calib:
        raise EdgeError(
            f"{model.path}: float model and --precision int8 need --calib DIR of site images "
            "(or export with `fedbridge export onnx --int8 --calib DIR` for explicit Q/DQ)"
        )
    _, c, h, w = input_shape
    fixed = input_shape[0] if isinstance(input_shape[0], int) and input_shape[0] > 0 else None
    if fixed:
        lo = opt = hi = fixed
    else:
        if max_batch < 1:
            raise EdgeError(f"--max-batch must be ≥ 1, got {max_batch}")
        lo, hi = 1, max_batch
        opt = min(max(1, opt_batch or 1), hi)
    profile: dict[str, tuple[int, ...]] = {
        name: (n, int(c), int(h), int(w)) for name, n in (("min", lo), ("opt", opt), ("max", hi))
    }
    flags = {"fp32": (), "fp16": ("FP16",), "int8": ("INT8", "FP16")}[precision]
    return BuildPlan(precision, flags, workspace_mb << 20, profile, has_qdq, calibrate)


# ---- calibration (pure parts) ------------------------------------------------------------------


def calibration_cache_key(
    model_sha256: str, paths: Sequence[Path], batch: int, spec: InputSpec
) -> str:
    """sha256 over the model, each image (name, size, content hash), batch and preprocessing."""
    from fedbridge_shared.data.images import file_sha256

    digest = hashlib.sha256()
    digest.update(json.dumps([model_sha256, batch, asdict(spec)], sort_keys=True).encode())
    for p in sorted(Path(p) for p in paths):
        digest.update(f"{p.name}\0{p.stat().st_size}\0{file_sha256(p)}\n".encode())
    return digest.hexdigest()


def calibration_cache_path(engine_out: Path, key: str) -> Path:
    return Path(engine_out).with_name(f"{Path(engine_out).name}.calib-{key[:16]}.cache")


def make_calibrator(trt: Any, batcher: CalibrationBatcher, cache: Path) -> Any:
    """An ``IInt8EntropyCalibrator2`` feeding ``batcher`` through one device buffer."""
    cudart = _cudart()

    # tensorrt ships no stubs: its base class is Any here
    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.batches = iter(batcher)
            first = batcher.spec
            nbytes = batcher.batch * first.in_chans * first.image_size**2 * 4
            self.device = _check_cuda(cudart.cudaMalloc(nbytes))

        def get_batch_size(self) -> int:
            return batcher.batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            x = next(self.batches, None)
            if x is None:
                return None
            kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            _check_cuda(cudart.cudaMemcpy(self.device, x.ctypes.data, x.nbytes, kind))
            return [int(self.device)]

        def read_calibration_cache(self) -> bytes | None:
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, data: Any) -> None:
            atomic_write(cache, bytes(data))

    return EntropyCalibrator()


# ---- engine file --------------------------------------------------------------------------------


def pack_engine(engine: bytes, header: dict[str, Any]) -> bytes:
    header = {
        **header,
        "format": ENGINE_FORMAT,
        "engine_sha256": hashlib.sha256(engine).hexdigest(),
    }
    blob = json.dumps(header, sort_keys=True, default=str).encode()
    return MAGIC + struct.pack("<I", len(blob)) + blob + engine


def read_engine_file(path: Path) -> tuple[dict[str, Any], bytes]:
    """Header and engine bytes; refuses other files and engines whose bytes changed."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise EdgeError(f"{path}: cannot read engine ({e.strerror or e})") from e
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        raise EdgeError(
            f"{path}: not a fedbridge TensorRT engine; build one with `fedbridge edge build`"
        )
    (size,) = struct.unpack("<I", data[len(MAGIC) : len(MAGIC) + 4])
    start = len(MAGIC) + 4
    if size > MAX_HEADER or start + size > len(data):
        raise IntegrityError(f"{path}: engine header is truncated or corrupt")
    try:
        header = json.loads(data[start : start + size])
        expected = header["engine_sha256"]
        header["device"], header["record"], header["edge"]  # noqa: B018
    except (KeyError, TypeError, ValueError) as e:
        raise IntegrityError(f"{path}: engine header is malformed ({e!r})") from e
    engine = data[start + size :]
    if header.get("format") != ENGINE_FORMAT:
        raise EdgeError(f"{path}: engine format {header.get('format')!r} is not {ENGINE_FORMAT}")
    if hashlib.sha256(engine).hexdigest() != expected:
        raise IntegrityError(f"{path}: engine bytes do not match their sha256; rebuild it")
    return header, engine


@dataclass(frozen=True)
class EngineFile:
    path: Path
    header: dict[str, Any]
    engine: bytes

    @property
    def meta(self) -> EdgeModel:
        h = self.header
        return EdgeModel(self.path, b"", h["onnx_sha256"], h["record"], h["edge"])


def load_engine(path: Path, device: DeviceInfo | None = None) -> EngineFile:
    """Read, verify and check that the engine was built on this kind of device."""
    header, engine = read_engine_file(path)
    check_device(header, device or current_device(), Path(path))
    return EngineFile(Path(path), header, engine)


# ---- build and run (need tensorrt + CUDA) -------------------------------------------------------


def build_engine(
    onnx_path: Path,
    out: Path,
    *,
    precision: str = "fp16",
    calib_dir: Path | None = None,
    workspace_mb: int = 1024,
    max_batch: int = 8,
    opt_batch: int | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Parse the verified ONNX, build a serialized engine with ``plan_build``, write it."""
    import onnx

    from fedbridge_edge.preprocess import list_images

    model = read_edge_model(onnx_path)
    graph = onnx.load_from_string(model.data).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
    has_qdq = any(n.op_type == "QuantizeLinear" for n in graph.node)
    calib = list_images([calib_dir]) if calib_dir else []
    plan = plan_build(model, shape, precision, workspace_mb, max_batch, opt_batch, has_qdq, calib)

    trt = import_tensorrt()
    device = current_device()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.data):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EdgeError(f"{onnx_path}: TensorRT cannot parse the ONNX graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    profile = builder.create_optimization_profile()
    profile.set_shape("input", plan.profile["min"], plan.profile["opt"], plan.profile["max"])
    config.add_optimization_profile(profile)
    for flag in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    calibration: dict[str, Any] = {}
    if plan.calibrate:
        spec = InputSpec.from_spec(model.spec)
        batch = plan.profile["opt"][0] if plan.profile["min"] == plan.profile["max"] else 8
        batch = min(batch, plan.profile["max"][0])
        key = calibration_cache_key(model.sha256, calib, batch, spec)
        cache = calibration_cache_path(out, key)
        config.int8_calibrator = make_calibrator(
            trt, CalibrationBatcher(calib, spec, batch=batch, max_images=512), cache
        )
        config.set_calibration_profile(profile)
        calibration = {"images": len(calib), "batch": batch, "cache": cache.name, "key": key}
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgeError(f"{onnx_path}: TensorRT failed to build the engine (see the log above)")
    header = {
        "device": asdict(device),
        "onnx_sha256": model.sha256,
        "precision": precision,
        "plan": asdict(plan),
        "calibration": calibration,
        "record": model.record,
        "edge": model.edge,
        "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write(out, pack_engine(bytes(serialized), header))
    return Path(out), header


class TensorRTRunner:
    """Execute an engine with the TensorRT 10 tensor API (set_input_shape / execute_async_v3)."""

    name = "tensorrt"

    def __init__(self, engine_file: EngineFile) -> None:
        trt = import_tensorrt()
        self.cudart = _cudart()
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(engine_file.engine)
        if self.engine is None:
            raise EdgeError(f"{engine_file.path}: TensorRT could not deserialize the engine")
        self.context = self.engine.create_execution_context()
        profile = engine_file.header["plan"]["profile"]
        self.max_batch = int(profile["max"][0])
        self.fixed_batch = self.max_batch if profile["min"] == profile["max"] else None
        self.stream = _check_cuda(self.cudart.cudaStreamCreate())
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _check_cuda(self.cudart.cudaFree(ptr))
            ptr = _check_cuda(self.cudart.cudaMalloc(nbytes))
            self.buffers[name] = (ptr, nbytes)
        return ptr

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        if len(x) > self.max_batch:
            parts = [self.run(x[i : i + self.max_batch]) for i in range(0, len(x), self.max_batch)]
            return {k: np.concatenate([p[k] for p in parts]) for k in OUTPUTS}
        cu = self.cudart
        h2d, d2h = (
            cu.cudaMemcpyKind.cudaMemcpyHostToDevice,
            cu.cudaMemcpyKind.cudaMemcpyDeviceToHost,
        )
        self.context.set_input_shape("input", tuple(x.shape))
        ptr = self._buffer("input", x.nbytes)
        _check_cuda(cu.cudaMemcpyAsync(ptr, x.ctypes.data, x.nbytes, h2d, self.stream))
        self.context.set_tensor_address("input", ptr)
        outputs = {}
        for name in OUTPUTS:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = np.empty(shape, dtype=np.float32)
            self.context.set_tensor_address(name, self._buffer(name, outputs[name].nbytes))
        if not self.context.execute_async_v3(self.stream):
            raise EdgeError("TensorRT execution failed")
        for name, host in outputs.items():
            ptr = self.buffers[name][0]
            _check_cuda(cu.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, d2h, self.stream))
        _check_cuda(cu.cudaStreamSynchronize(self.stream))
        return outputs
