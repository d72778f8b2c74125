"""Shared helpers for the benchmark scripts: machine record, result files, timing, console."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SHARED = Path(os.environ.get("FEDBRIDGE_SHARED", ROOT.parent / "shared")).resolve()
DATA = SHARED / "data"
WEIGHTS = SHARED / "weights"
WORK = Path(os.environ.get("FEDBRIDGE_BENCH_WORK", "/tmp/fedbridge-bench")).resolve()
"""Scratch folder OUTSIDE the repository (splits copy images; the team data is never copied in)."""

os.environ.setdefault("FEDBRIDGE_WEIGHTS_DIR", str(WEIGHTS))


def _threads() -> str:
    """CPU threads per process: $FEDBRIDGE_BENCH_THREADS, else 1 when the machine is already
    busier than its core count (measured here: 2 threads per process on an overloaded 2-core
    machine ran 3× slower than 1, from OpenMP threads waiting on each other), else all cores."""
    if os.environ.get("FEDBRIDGE_BENCH_THREADS"):
        return os.environ["FEDBRIDGE_BENCH_THREADS"]
    busy = os.getloadavg()[0] > (os.cpu_count() or 1)
    return "1" if busy else str(os.cpu_count() or 1)


# Set before torch / onnxruntime load, and inherited by the subprocesses (federate simulate,
# its Ray workers) so every process of a run uses the same thread count.
os.environ["FEDBRIDGE_BENCH_THREADS"] = _threads()
os.environ["OMP_NUM_THREADS"] = os.environ["FEDBRIDGE_BENCH_THREADS"]
os.environ["MKL_NUM_THREADS"] = os.environ["FEDBRIDGE_BENCH_THREADS"]
os.environ.setdefault("FEDBRIDGE_EDGE_THREADS", os.environ["FEDBRIDGE_BENCH_THREADS"])
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def log(msg: str) -> None:
    """Progress line on the console (stderr), with the wall clock."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in flags if f.startswith(("avx512", "avx2", "amx")))
    except OSError:
        pass
    return []


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        mem = Path("/proc/meminfo").read_text().split("\n")[0].split()
        info["memory_gib"] = round(int(mem[1]) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    for mod in ("torch", "timm", "onnxruntime", "onnx", "flwr", "captum", "albumentations"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is recorded, not fatal
            info[mod] = None
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    info["load_average_at_start"] = list(os.getloadavg())
    info["threads_per_process"] = int(os.environ["FEDBRIDGE_BENCH_THREADS"])
    return info


def command() -> str:
    """The exact command line, plus the make target when run from make."""
    cmd = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    target = os.environ.get("BENCH_MAKE_TARGET")
    return f"make {target} → {cmd}" if target else cmd


class Results:
    """One JSON file in bench/results, rewritten after every arm so partial runs are usable."""

    def __init__(self, name: str, mode: str, settings: dict[str, Any]) -> None:
        self.path = RESULTS / f"{name}-{mode}.json"
        self.data: dict[str, Any] = {
            "benchmark": name,
            "mode": mode,
            "command": command(),
            "started": now(),
            "finished": None,
            "complete": False,
            "machine": machine(),
            "settings": settings,
        }
        self.save()

    @staticmethod
    def load(name: str, mode: str) -> dict[str, Any] | None:
        """An earlier run's JSON (to resume from), or None."""
        path = RESULTS / f"{name}-{mode}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.save()

    def setdefault(self, key: str, value: Any) -> Any:
        return self.data.setdefault(key, value)

    def save(self) -> None:
        self.data["updated"] = now()
        self.data["wall_s"] = round(time.time() - _START, 1)
        RESULTS.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=_default) + "\n")
        os.replace(tmp, self.path)

    def done(self) -> None:
        self.data["finished"] = now()
        self.data["complete"] = True
        self.save()


def _default(x: Any) -> Any:
    try:
        import numpy as np

        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
    except ImportError:
        pass
    return str(x)


_START = time.time()


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def mode_from_argv(default: str = "full") -> str:
    return "quick" if "--quick" in sys.argv else default
