"""Edge speed (issue #6, part 2): prediction + saliency per image on this CPU.

onnxruntime fp32 and INT8 graphs from `fedbridge export onnx` (in-graph CAM, read with the edge
Predictor) against PyTorch eager + captum Saliency and eager + Grad-CAM (the product's
``explain.methods.attribute``), at batch 1 and 8; the CAM's cost against the same graph with the
``cam`` output cut off; the model's FLOPs and the floor they imply at this CPU's measured fp32
matmul rate; and the INT8 graph's accuracy against fp32 on held-out test patients.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import WORK, Results, log


def timeit(fn, iters: int, warmup: int = 3) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    a = np.asarray(ts)
    return {"p50_ms": float(np.median(a)), "p95_ms": float(np.percentile(a, 95)), "iters": iters}


def matmul_gflops(n: int = 1024, reps: int = 20) -> float:
    """Best fp32 GEMM rate of this CPU through torch (MKL/oneDNN), all threads."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def model_flops(model, size: int, chans: int) -> int:
    """FLOPs (2 × multiply-adds) of one forward pass at batch 1 (torch's FlopCounterMode)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, chans, size, size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def logits_only(src: Path, dst: Path) -> Path:
    """The same graph with the ``cam`` output (and the nodes only it needs) removed."""
    import onnx
    from onnx.utils import Extractor

    model = onnx.load(str(src))
    sub = Extractor(model).extract_model(["input"], ["logits", "ood_score"])
    onnx.save(sub, str(dst))
    return dst


def write_int8_anyway(fp32: Path, dst: Path, pool: Path, spec) -> None:
    """The INT8 graph export refused, sealed for the Predictor, so its speed can be measured."""
    from fedbridge_edge.modelfile import read_edge_model, seal
    from fedbridge_edge.preprocess import list_images
    from fedbridge_edge.quantize import quantize_int8

    model = read_edge_model(fp32)
    qmodel, info = quantize_int8(model.data, list_images([pool]), spec)
    edge = {**model.edge, "precision": "int8", "int8": {**info, "refused_by_export": True}}
    dst.write_bytes(seal(qmodel, model.record, edge))


def get_bundle(name: str, arch: str, size: int, mode: str, split: Path, pool: Path) -> Path:
    """The accuracy study's central CXR bundle when it exists, else a short `fedbridge train`."""
    from rich.console import Console

    from fedbridge_shared.spec import is_bundle
    from fedbridge_shared.training import TrainConfig, run_stage

    trained = WORK / f"acc-{mode}" / "cxr" / "seed0" / "central"
    if arch == "mobilenetv1_025":
        # the accuracy study's own central CXR seed-0 model, same recipe and cache path (the
        # accuracy run reuses it), so INT8 accuracy is measured on the model the study reports
        from bench import accuracy

        cfg = accuracy.QUICK if mode == "quick" else accuracy.FULL
        if not is_bundle(trained):
            log("edge: training the accuracy study's central CXR seed-0 bundle")
            base = trained.parent
            b, _ = accuracy.stage("bridge", split / "bridge", base / "bridge-imagenet", "imagenet",
                                  cfg, 0, "cxr", 0, cfg["bridge_epochs"])  # fmt: skip
            accuracy.stage("train", pool, trained, str(b), cfg, cfg["augment_per_sample"], "cxr",
                           0, cfg["target_epochs"])  # fmt: skip
        return trained
    out = WORK / f"edge-{mode}" / name / "bundle"
    if not is_bundle(out):
        log(f"edge: training a short {arch} @ {size} bundle (ImageNet → CXR target, 2 epochs)")
        cfg = TrainConfig(epochs=2, augment_per_sample=1, lr=2e-3, seed=0)
        run_stage("train", pool, out=out, init="imagenet", config=cfg, arch=arch,
                  image_size=size, console=Console(stderr=True, quiet=True))  # fmt: skip
    return out


def bench_model(name: str, bundle: Path, split: Path, pool: Path, iters: int, mode: str) -> dict:
    import cv2
    import onnxruntime as ort
    import torch

    from fedbridge_edge.preprocess import InputSpec, list_images, load
    from fedbridge_edge.runtime import Predictor
    from fedbridge_shared.explain.methods import attribute, load_explainer, predict_probs
    from fedbridge_shared.models import build_model
    from fedbridge_shared.spec import load_bundle

    work = WORK / f"edge-{mode}" / name
    work.mkdir(parents=True, exist_ok=True)
    b = load_bundle(bundle)
    spec = InputSpec.from_spec(b.spec.to_dict())
    out: dict[str, Any] = {
        "bundle": str(bundle),
        "arch": b.spec.arch,
        "image_size": spec.image_size,
    }
    from fedbridge_edge.export import export_onnx as export

    paths = {"fp32": work / "fp32.onnx", "int8": work / "int8.onnx"}
    t0 = time.perf_counter()
    export(bundle, paths["fp32"], val=split / "bridge")
    out["export_fp32_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    res8 = export(bundle, paths["int8"], val=split / "bridge", int8_calib=pool, int8_fallback=True)
    out["export_int8_s"] = time.perf_counter() - t0
    out["int8_held_out_check"] = res8.int8["held_out_check"]
    out["int8_refused"] = res8.int8.get("refused")
    out["int8_vs_fp32_parity"] = res8.int8.get("vs_fp32")
    if out["int8_refused"]:  # export wrote fp32; time the INT8 graph it refused all the same
        log(f"edge: export refused INT8 ({out['int8_refused']}); timing that graph anyway")
        write_int8_anyway(paths["fp32"], paths["int8"], pool, spec)
    paths["fp32-logits-only"] = logits_only(paths["fp32"], work / "fp32-nocam.onnx")
    out["onnx_bytes"] = {k: p.stat().st_size for k, p in paths.items()}

    # test images, preprocessed the edge way
    test_paths = list_images([split / "test"])
    x_test = np.stack([load(p, spec)[0] for p in test_paths]).astype(np.float32)
    y_test = np.array([b.spec.labels.index(p.parent.name) for p in test_paths])
    rng = np.random.default_rng(0)
    pick = rng.choice(len(x_test), size=8, replace=False)

    import os

    threads = int(os.environ["FEDBRIDGE_BENCH_THREADS"])
    torch.set_num_threads(threads)
    predictors = {k: Predictor(paths[k], threads=threads) for k in ("fp32", "int8")}
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    nocam = ort.InferenceSession(
        str(paths["fp32-logits-only"]), options, providers=["CPUExecutionProvider"]
    )
    acc = {}
    for k, pr in predictors.items():
        logits = np.concatenate(
            [pr.run(x_test[i : i + 32])["logits"] for i in range(0, len(x_test), 32)]
        )
        acc[k] = float((logits.argmax(1) == y_test).mean())
    out["test_accuracy"] = {
        **acc,
        "n": int(len(y_test)),
        "int8_minus_fp32_points": 100 * (acc["int8"] - acc["fp32"]),
    }

    explainer = load_explainer(b)
    model = build_model(b.spec)
    model.load_state_dict(b.state_dict)
    model.eval()
    out["flops"] = model_flops(model, spec.image_size, spec.in_chans)
    grey_all = torch.from_numpy(np.stack([x[0] for x in x_test[pick]]))  # normalised channel 0
    grey_all = (grey_all * spec.std[0] + spec.mean[0]).clamp(0, 1)[:, None]  # back to [0, 1]

    timings: dict[str, dict] = {}
    for n in (1, 8):
        x = np.ascontiguousarray(x_test[pick[:n]])
        g = grey_all[:n].contiguous()

        def ort_cam(pr=predictors["fp32"], x=x):
            o = pr.run(x)
            k = o["logits"].argmax(1)
            for i in range(len(x)):  # host upsamples the one map it shows
                cv2.resize(o["cam"][i, k[i]], (spec.image_size, spec.image_size))

        def ort_int8(pr=predictors["int8"], x=x):
            o = pr.run(x)
            k = o["logits"].argmax(1)
            for i in range(len(x)):
                cv2.resize(o["cam"][i, k[i]], (spec.image_size, spec.image_size))

        def ort_fp32_graph(pr=predictors["fp32"], x=x):
            pr.run(x)

        def ort_nocam(x=x):
            nocam.run(["logits", "ood_score"], {"input": x})

        def eager_logits(g=g):
            with torch.no_grad():
                explainer(g)

        def eager_saliency(g=g):
            target = predict_probs(explainer, g).argmax(1)
            attribute("saliency", explainer, g, target)

        def eager_gradcam(g=g):
            target = predict_probs(explainer, g).argmax(1)
            attribute("gradcam", explainer, g, target)

        for key, fn, it in (
            ("ort_fp32_cam", ort_cam, iters),
            ("ort_int8_cam", ort_int8, iters),
            ("ort_fp32_graph_only", ort_fp32_graph, iters),
            ("ort_fp32_logits_only", ort_nocam, iters),
            ("eager_logits", eager_logits, max(10, iters // 4)),
            ("eager_saliency", eager_saliency, max(10, iters // 4)),
            ("eager_gradcam", eager_gradcam, max(10, iters // 4)),
        ):
            t = timeit(fn, it)
            t["ms_per_image"] = t["p50_ms"] / n
            timings[f"{key}/b{n}"] = t
            log(f"edge {name} b{n} {key}: {t['ms_per_image']:.2f} ms/image")
    out["timings"] = timings
    # CAM overhead: the same session type and options for both graphs (bare session.run),
    # interleaved repeats so drift from the shared CPU hits both alike
    full_sess = predictors["fp32"].runner.session
    x1 = np.ascontiguousarray(x_test[pick[:1]])
    with_cam, without = [], []
    for _ in range(7):
        t = timeit(lambda: full_sess.run(["logits", "cam", "ood_score"], {"input": x1}), iters)
        with_cam.append(t["p50_ms"])
        t = timeit(lambda: nocam.run(["logits", "ood_score"], {"input": x1}), iters)
        without.append(t["p50_ms"])
    out["cam_overhead"] = {
        "with_cam_ms": float(np.median(with_cam)),
        "logits_only_ms": float(np.median(without)),
        "overhead_pct": float(100 * (np.median(with_cam) / np.median(without) - 1)),
        "method": "median of 7 interleaved p50s, batch 1, fp32, session.run on both graphs",
    }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    mode = "quick" if args.quick else "full"
    iters = 20 if args.quick else 100
    models = [("mobilenetv1_025@128", "mobilenetv1_025", 128)]
    if not args.quick:
        models.append(("mobilenetv2_100@224", "mobilenetv2_100", 224))
    settings = {
        "iters": iters,
        "models": [m[0] for m in models],
        "threads": "FEDBRIDGE_BENCH_THREADS (see machine.threads_per_process)",
    }
    res = Results("edge_speed", mode, settings)
    from bench import accuracy

    accuracy.ACC["dir"] = WORK / f"acc-{mode}"
    split = accuracy.make_split("cxr", 0, None)
    pool = accuracy.pooled(split)
    log("edge: measuring this CPU's fp32 matmul rate")
    gflops = matmul_gflops()
    res["matmul_gflops_fp32"] = gflops
    res["models"] = {}
    for name, arch, size in models:
        try:
            bundle = get_bundle(name, arch, size, mode, split, pool)
            r = bench_model(name, bundle, split, pool, iters, mode)
            r["flop_floor_ms"] = r["flops"] / (gflops * 1e9) * 1e3
        except Exception as e:  # noqa: BLE001 - record and go on with the next model
            r = {"error": f"{type(e).__name__}: {e}"}
            log(f"edge {name} FAILED: {r['error']}")
        res["models"] = {**res["models"], name: r}
    res.done()
    log(f"edge speed ({mode}) done in {res['wall_s']:.0f}s → {res.path}")


if __name__ == "__main__":
    main()
