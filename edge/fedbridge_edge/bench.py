"""``fedbridge edge bench``: latency percentiles and throughput of the loaded backend."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from fedbridge_edge.runtime import Predictor


def bench(
    predictor: Predictor, batches: tuple[int, ...] = (1, 8), iters: int = 50, warmup: int = 5
) -> dict[str, Any]:
    """Time ``predictor.run`` on fixed inputs; p50/p95 ms per batch and images per second."""
    spec = predictor.spec
    rng = np.random.default_rng(0)
    results: dict[str, Any] = {"backend": predictor.backend, "model_sha256": predictor.sha256}
    fixed = predictor.runner.fixed_batch
    for n in (fixed,) if fixed else batches:
        x = rng.standard_normal((n, spec.in_chans, spec.image_size, spec.image_size))
        x = x.astype(np.float32)
        for _ in range(warmup):
            predictor.run(x)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            predictor.run(x)
            times.append((time.perf_counter() - t0) * 1e3)
        ms = np.asarray(times)
        results[f"batch_{n}"] = {
            "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)),
            "images_per_s": float(n * 1e3 / ms.mean()),
            "iters": iters,
        }
    return results
