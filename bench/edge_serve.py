"""Edge serve (issue #14): the HTTP API's cost over bare inference, on loopback, on this CPU.

``fedbridge edge serve`` (the real CLI, its own process) is driven with ``requests`` on a real
chest X-ray (raw body): p50/p95 latency at 1 and 8 concurrent clients and images/s, against
``Predictor.run`` on a preprocessed batch of 1 and against decode + ``predict_array`` in-process
(the same model, threads and image, in the same run); failed requests at 64 concurrent clients;
and the server's peak RSS (VmHWM) before and after a stream of 20 decompression-bomb PNGs
(16-bit 10000², 100 MP, a few hundred KB each).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import DATA, WORK, Results, log


def stats(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"p50_ms": float(np.median(a)), "p95_ms": float(np.percentile(a, 95)), "n": len(a)}


def find_model(mode: str) -> Path:
    """The edge benchmark's fp32 MobileNet-V1 0.25 @128 graph, exported when missing."""
    for m in (mode, "full", "quick"):
        p = WORK / f"edge-{m}" / "mobilenetv1_025@128" / "fp32.onnx"
        if p.is_file():
            return p
    from bench import accuracy, edge_speed
    from fedbridge_edge.export import export_onnx

    accuracy.ACC["dir"] = WORK / f"acc-{mode}"
    split = accuracy.make_split("cxr", 0, None)
    bundle = edge_speed.get_bundle(
        "mobilenetv1_025@128", "mobilenetv1_025", 128, mode, split, accuracy.pooled(split)
    )
    out = WORK / f"edge-{mode}" / "mobilenetv1_025@128" / "fp32.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(bundle, out, val=split / "bridge")
    return out


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(model: Path, threads: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    with open(log_path, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedbridge", "edge", "serve", str(model), "--port", "0",
             "--threads", threads],
            stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "300"},
        )  # fmt: skip
    import requests

    for _ in range(1200):  # bounded: the URL is printed once it listens, /ready once warm
        text = log_path.read_text()
        if proc.poll() is not None:
            raise RuntimeError(f"edge serve exited: {text[-2000:]}")
        if "http://127.0.0.1:" in text:
            url = "http://" + text.split("http://", 1)[1].split()[0]
            if requests.get(f"{url}/ready", timeout=30).status_code == 200:
                return proc, url
        time.sleep(0.1)
    raise RuntimeError("edge serve did not become ready")


def clients(url: str, data: bytes, *, n_clients: int, per_client: int) -> dict[str, Any]:
    import requests

    def run(_: int) -> tuple[list[float], int]:
        ms, failed = [], 0
        with requests.Session() as s:
            for _ in range(per_client):
                t0 = time.perf_counter()
                try:
                    ok = s.post(f"{url}/predict", data=data, timeout=300).status_code == 200
                except requests.RequestException:
                    ok = False
                ms.append((time.perf_counter() - t0) * 1e3)
                failed += not ok
        return ms, failed

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n_clients) as pool:
        parts = list(pool.map(run, range(n_clients)))
    wall = time.perf_counter() - t0
    ms = [m for p, _ in parts for m in p]
    return {
        **stats(ms),
        "clients": n_clients,
        "requests": len(ms),
        "failed": sum(f for _, f in parts),
        "images_per_s": len(ms) / wall,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--model", type=Path, help="ONNX to serve (default: the edge benchmark's)")
    args = p.parse_args()
    mode = "quick" if args.quick else "full"
    iters = 40 if args.quick else 200
    threads = os.environ["FEDBRIDGE_BENCH_THREADS"]
    res = Results("edge_serve", mode, {"iters": iters, "threads": threads, "bombs": 20})
    import requests
    from PIL import Image

    from fedbridge_edge.preprocess import decode_bytes, list_images, load
    from fedbridge_edge.runtime import Predictor

    model = args.model or find_model(mode)
    image = list_images([DATA / "cxr"])[0]
    data = image.read_bytes()
    res["model"], res["image"] = str(model), {"path": image.name, "bytes": len(data)}

    pred = Predictor(model, threads=int(threads))
    x = load(image, pred.spec)[0][None].astype(np.float32)
    for _ in range(5):
        pred.run(x)

    def timed(fn, n: int) -> dict[str, float]:
        ms = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ms.append((time.perf_counter() - t0) * 1e3)
        return stats(ms)

    inference = timed(lambda: pred.run(x), iters)
    in_process = timed(lambda: pred.predict_array(decode_bytes(data), "x"), iters)
    res["session_run_b1"], res["decode_and_predict_in_process"] = inference, in_process
    log(f"serve: session.run p50 {inference['p50_ms']:.2f} ms, decode+predict "
        f"{in_process['p50_ms']:.2f} ms")  # fmt: skip

    work = WORK / f"edge-serve-{mode}"
    work.mkdir(parents=True, exist_ok=True)
    proc, url = start_server(model, threads, work / "serve.log")
    try:
        clients(url, data, n_clients=1, per_client=5)  # warm the connection path
        api = {}
        for n in (1, 8):
            api[f"clients_{n}"] = row = clients(url, data, n_clients=n, per_client=iters // n)
            log(f"serve: {n} client(s) p50 {row['p50_ms']:.2f} ms p95 {row['p95_ms']:.2f} ms "
                f"{row['images_per_s']:.0f} images/s, {row['failed']} failed")  # fmt: skip
        res["api"] = api
        res["overhead_ratio_vs_session_run"] = (
            api["clients_1"]["p50_ms"] - inference["p50_ms"]
        ) / inference["p50_ms"]
        res["overhead_ratio_vs_decode_and_predict"] = (
            api["clients_1"]["p50_ms"] - in_process["p50_ms"]
        ) / in_process["p50_ms"]
        res["concurrent_64"] = c64 = clients(url, data, n_clients=64, per_client=1)
        log(f"serve: 64 concurrent clients, {c64['failed']} failed")

        bomb = work / "bomb.png"
        if not bomb.is_file():
            Image.new("I;16", (10000, 10000)).save(bomb)
        bomb_bytes = bomb.read_bytes()
        before = vm_hwm_mb(proc.pid)
        codes = []
        for _ in range(20):
            codes.append(requests.post(f"{url}/predict", data=bomb_bytes, timeout=120).status_code)
        after = vm_hwm_mb(proc.pid)
        res["bombs"] = {
            "bytes": len(bomb_bytes),
            "declared_pixels": 10000 * 10000,
            "statuses": sorted(set(codes)),
            "vm_hwm_before_mb": before,
            "vm_hwm_after_mb": after,
            "vm_hwm_growth_mb": after - before,
        }
        log(f"serve: 20 bombs → {sorted(set(codes))}, VmHWM {before:.0f} → {after:.0f} MB")
    finally:
        from fedbridge_shared.processes import stop

        stop([proc])
    res.done()
    log(f"edge serve ({mode}) done in {res['wall_s']:.0f}s → {res.path}")


if __name__ == "__main__":
    main()
