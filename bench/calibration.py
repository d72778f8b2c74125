"""Calibrated scores (issue #27): temperature fitted at export, ECE on held-out test patients.

For each model and split seed: a patient-level split of ../shared/data/cxr (train 50 % / val 20 %
/ test 30 % of the patients, stratified by class, ``assign_parts``), an ImageNet-initialised
model fine-tuned on the train patients (``run_stage``, the function behind ``fedbridge train``),
``export_onnx(..., val=val)`` (the function behind ``fedbridge export onnx --val-data``), which
fits T on the val patients' logits and seals it in the ONNX; then the exported graph's logits on
the TEST patients (onnxruntime, the runtime's own image loader) give the top-label ECE
(10 equal bins) of ``softmax(logits)`` before and ``softmax(logits / T)`` after. The test
patients are seen neither by training nor by the fit, so these are the honest figures (the ECE
in the ONNX metadata is in-sample, measured on the images T was fitted on).

``--quick``: MobileNet-V1 0.25 @ 128 px with the test suite's 3-epoch recipe, 3 split seeds.
Full: also MobileNet-V1 0.25 @ 128 px with the default ``fedbridge train`` settings
(``TrainConfig()``: 8 epochs, CXR augmentation, EMA, early stopping on 15 % of the train patients),
3 seeds, and MobileNet-V2 1.0 @ 224 px with the default settings, seed 0.

The ECE of a finite test set is not 0 even for a perfectly calibrated model; ``test_ece_floor``
is its expectation here (labels drawn from the calibrated probabilities themselves, 500 draws), so
the measured ECE can be read against what sampling noise alone gives.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import WEIGHTS, WORK, Results, log

DATA_CXR = WEIGHTS.parent / "data" / "cxr"
PARTS = {"train": 0.5, "val": 0.2, "test": 0.3}
BOOTSTRAP = 2000
GOAL_ECE = 0.05

V1 = str(WEIGHTS / "mobilenetv1_025_tfslim_quant_in1k_128.safetensors")
V2 = str(WEIGHTS / "mobilenetv2_100_tfslim_quant_in1k.safetensors")
MODELS = {
    "mobilenetv1_025@128 test-recipe": {
        "arch": "mobilenetv1_025", "size": 128,
        "init": V1,
        "config": {"epochs": 3, "batch_size": 32, "lr": 2e-3, "val_fraction": 0.0,
                   "online_augment": False, "preset": "none"},
    },
    "mobilenetv1_025@128 default": {"arch": "mobilenetv1_025", "size": 128, "init": V1,
                                    "config": {}},
    "mobilenetv2_100@224 default": {"arch": "mobilenetv2_100", "size": 224, "init": V2,
                                    "config": {}},
}  # fmt: skip


def split(seed: int, root: Path) -> dict[str, Path]:
    """Patient-disjoint class-folder trees of symlinks (no copies of the team data)."""
    from fedbridge_shared.data.samples import scan_folder
    from fedbridge_shared.data.split import assign_parts

    parts = assign_parts(scan_folder(DATA_CXR).samples, PARTS, seed=seed)
    out: dict[str, Path] = {}
    for name, samples in parts.items():
        part = root / name
        if not part.is_dir():
            for s in samples:
                (part / s.label).mkdir(parents=True, exist_ok=True)
                os.symlink(s.path, part / s.label / s.path.name)
        out[name] = part
    out["patients"] = {n: len({s.patient_id for s in ss}) for n, ss in parts.items()}  # type: ignore[assignment]
    return out


def bootstrap_ece(logits: np.ndarray, y: np.ndarray, t: float, seed: int = 0) -> list[float]:
    """95 % percentile interval of the test ECE over image resamples."""
    from fedbridge_shared.calibration import softmax
    from fedbridge_shared.metrics import calibration

    p = softmax(logits, t)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(BOOTSTRAP):
        i = rng.integers(0, len(y), len(y))
        values.append(calibration(y[i], p[i])["ece"])
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def ece_floor(logits: np.ndarray, t: float, draws: int = 500) -> float:
    """Mean ECE of a perfectly calibrated model with these probabilities on this many images."""
    from fedbridge_shared.calibration import softmax
    from fedbridge_shared.metrics import calibration

    p = softmax(logits, t)
    cum = np.cumsum(p, axis=1)
    rng = np.random.default_rng(0)
    values = []
    for _ in range(draws):
        y = np.minimum((rng.random(len(p))[:, None] > cum).sum(1), p.shape[1] - 1)
        values.append(calibration(y, p)["ece"])
    return float(np.mean(values))


def arm(name: str, seed: int, mode: str) -> dict[str, Any]:
    import onnxruntime as ort
    from rich.console import Console

    from fedbridge_edge.export import export_onnx
    from fedbridge_edge.modelfile import read_edge_model
    from fedbridge_edge.preprocess import InputSpec, list_images, load
    from fedbridge_shared.calibration import ece, nll, softmax
    from fedbridge_shared.spec import is_bundle
    from fedbridge_shared.training import TrainConfig, run_stage

    m = MODELS[name]
    base = WORK / f"calibration-{mode}" / f"seed{seed}"
    parts = split(seed, base / "split")
    bundle = base / name.replace(" ", "-") / "bundle"
    t0 = time.perf_counter()
    if not is_bundle(bundle):
        log(f"calibration: training {name} on the seed-{seed} train patients")
        run_stage("target", parts["train"], out=bundle, init=m["init"],
                  config=TrainConfig(**m["config"], seed=seed), arch=m["arch"],
                  image_size=m["size"], device="cpu",
                  console=Console(stderr=True, quiet=True))  # fmt: skip
    train_s = time.perf_counter() - t0
    onnx_path = bundle.parent / "model.onnx"
    t1 = time.perf_counter()
    export_onnx(bundle, onnx_path.with_suffix(".tmp.onnx"), val=parts["val"])
    os.replace(onnx_path.with_suffix(".tmp.onnx"), onnx_path)
    export_s = time.perf_counter() - t1
    edge = read_edge_model(onnx_path)
    cal = edge.edge["calibration"]
    t = cal["temperature"]
    test = list_images([parts["test"]])
    spec = InputSpec.from_spec(edge.spec)
    x = np.stack([load(p, spec)[0] for p in test]).astype(np.float32)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"input": x})[0].astype(np.float64)
    y = np.array([edge.labels.index(p.parent.name) for p in test])
    r = {
        "model": name, "seed": seed, "patients": parts["patients"],
        "val_images": cal["images"], "test_images": len(y),
        "temperature": t,
        "val_in_sample": {k: cal[k] for k in ("ece_before", "ece_after", "nll_after")},
        "test_accuracy": float((logits.argmax(1) == y).mean()),
        "test_ece_before": ece(logits, y), "test_ece_after": ece(logits, y, t),
        "test_ece_before_ci95": bootstrap_ece(logits, y, 1.0),
        "test_ece_after_ci95": bootstrap_ece(logits, y, t),
        "test_ece_floor": ece_floor(logits, t),
        "test_nll_before": nll(logits, y), "test_nll_after": nll(logits, y, t),
        "test_mean_confidence_before": float(softmax(logits).max(1).mean()),
        "test_mean_confidence_after": float(softmax(logits, t).max(1).mean()),
        "train_s": round(train_s, 1), "export_s": round(export_s, 1),
        "config": m["config"],
    }  # fmt: skip
    log(f"calibration {name} seed {seed}: T={t:.3f}, test ECE {r['test_ece_before']:.3f} → "
        f"{r['test_ece_after']:.3f} (floor {r['test_ece_floor']:.3f}, accuracy "
        f"{r['test_accuracy']:.3f}, {len(y)} images)")  # fmt: skip
    return r


def summary(arms: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in dict.fromkeys(a["model"] for a in arms):
        mine = [a for a in arms if a["model"] == name and "error" not in a]
        if not mine:
            continue
        out[name] = {
            "seeds": [a["seed"] for a in mine],
            "temperature_mean": float(np.mean([a["temperature"] for a in mine])),
            "test_ece_before_mean": float(np.mean([a["test_ece_before"] for a in mine])),
            "test_ece_after_mean": float(np.mean([a["test_ece_after"] for a in mine])),
            "test_ece_after_max": float(np.max([a["test_ece_after"] for a in mine])),
            "test_ece_floor_mean": float(np.mean([a["test_ece_floor"] for a in mine])),
            "meets_goal": bool(all(a["test_ece_after"] <= GOAL_ECE for a in mine)),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    mode = "quick" if args.quick else "full"
    plan = [("mobilenetv1_025@128 test-recipe", s) for s in (0, 1, 2)]
    if not args.quick:
        plan += [("mobilenetv1_025@128 default", s) for s in (0, 1, 2)]
        plan.append(("mobilenetv2_100@224 default", 0))
    settings = {
        "data": str(DATA_CXR), "parts": PARTS, "ece_bins": 10, "bootstrap": BOOTSTRAP,
        "goal_test_ece": GOAL_ECE, "plan": [f"{n} seed {s}" for n, s in plan],
    }  # fmt: skip
    res = Results("calibration", mode, settings)
    arms: list[dict[str, Any]] = []
    for name, seed in plan:
        try:
            arms.append(arm(name, seed, mode))
        except Exception as e:  # noqa: BLE001 - record and go on with the next arm
            arms.append({"model": name, "seed": seed, "error": f"{type(e).__name__}: {e}"})
            log(f"calibration {name} seed {seed} FAILED: {arms[-1]['error']}")
        res["arms"] = arms
        res["summary"] = summary(arms)
    res.done()
    log(f"calibration ({mode}) done in {res['wall_s']:.0f}s → {res.path}")


if __name__ == "__main__":
    main()
