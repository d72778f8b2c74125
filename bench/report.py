"""Render BENCHMARKS.md from the JSON files in bench/results/ (full run first, then quick)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import RESULTS, ROOT, log

GOALS = {"accuracy": 0.95, "macro_auc": 0.98}
ARM_TITLES = {
    "central": "3-stage central (ImageNet → bridge → target)",
    "no-imagenet": "ablation: no ImageNet init",
    "no-bridge": "ablation: no bridge stage",
    "no-augment": "ablation: no augmentation",
    "fed-iid": "federated, 3 IID sites (FedAvg)",
    "fed-skew": "federated, 3 label-skewed sites (α = 0.5)",
    "local-iid": "local-only, IID sites (mean of 3)",
    "local-skew": "local-only, skewed sites (mean of 3)",
}
PAPER_NAMES = {"cxr": "CXR", "oct": "OCT"}


from bench.report_recipe import render_recipe  # noqa: E402


def load(name: str, mode: str) -> dict | None:
    path = RESULTS / f"{name}-{mode}.json"
    return json.loads(path.read_text()) if path.exists() else None


def header(d: dict) -> str:
    state = "complete" if d.get("complete") else "**PARTIAL (stopped or still running)**"
    return (
        f"*{d['mode']} run, {state}. Command: `{d['command']}`. Started {d['started']}, "
        f"last written {d.get('updated')}, wall {d.get('wall_s', 0):.0f} s. "
        f"Machine: {machine_line(d['machine'])}.*\n"
    )


def machine_line(m: dict) -> str:
    return (
        f"{m.get('cpu')}, {m.get('cores')} cores ({', '.join(m.get('cpu_flags', [])[:4])}…), "
        f"{m.get('memory_gib')} GiB, load average at start "
        f"{m.get('load_average_at_start', [0])[0]:.1f}; "
        f"Python {m.get('python')}, torch {m.get('torch')}, timm {m.get('timm')}, "
        f"onnxruntime {m.get('onnxruntime')}, flwr {m.get('flwr')}, captum {m.get('captum')}"
    )


def ms(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def pm(vals: list[float]) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "—"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f}"


# ---------------------------------------------------------------- accuracy


def accuracy_summary(d: dict) -> dict[tuple[str, str], dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in d.get("runs", []):
        key = (r["modality"], r["arm"])
        s = out.setdefault(
            key,
            {
                "acc": [],
                "auc": [],
                "sens": [],
                "f1": [],
                "ci": [],
                "seeds": [],
                "errors": [],
                "src": {},
                "seconds": [],
            },
        )
        if "metrics" not in r:
            s["errors"].append(r.get("error", "no metrics"))
            continue
        m = r["metrics"]
        s["seeds"].append(r["seed"])
        s["acc"].append(m.get("accuracy"))
        s["auc"].append(m.get("macro_auc"))
        s["sens"].append(m.get("sensitivity_mean"))
        s["f1"].append(m.get("f1_mean"))
        s["seconds"].append(r.get("seconds"))
        if "ci95" in m:
            s["ci"].append(m["ci95"])
        srcs = m.get("accuracy_by_source") or {}
        if not srcs and r.get("per_site"):
            srcs = {}
        for k, v in srcs.items():
            s["src"].setdefault(k, []).append(v["accuracy"])
    return out


def ci_text(cis: list[dict], key: str) -> str:
    rows = [c.get(key) for c in cis if isinstance(c.get(key), list | tuple)]
    if not rows:
        return "—"
    lo, hi = np.mean([r[0] for r in rows]), np.mean([r[1] for r in rows])
    return f"[{lo:.3f}, {hi:.3f}]"


def render_accuracy(d: dict) -> list[str]:
    s = d["settings"]
    lines = ["## 1. Accuracy on real images (../shared/data)\n", header(d)]
    lines.append(
        f"Model **{s['arch']} @ {s['image_size']} px** (local ImageNet weights), batch "
        f"{s['batch_size']}, AdamW lr {s['lr']}; bridge {s['bridge_epochs']} epochs; target "
        f"**{s['target_epochs']} epochs over the ×{s['augment_per_sample']}-expanded set** "
        f"(+ online augmentation); federated: FedAvg, {s['rounds']} rounds × "
        f"{s['local_epochs']} local epoch (same epoch budget); skewed sites: "
        f"`--skew {s['skew_alpha']}`. Seeds: {s['seeds']}. Metrics on held-out test patients; "
        f"CI = mean over seeds of the 95 % percentile-bootstrap interval ({s['bootstrap']} "
        "resamples). Local-only rows average the three site models.\n"
    )
    summ = accuracy_summary(d)
    paper = s.get("paper", {})
    for modality in dict.fromkeys(k[0] for k in summ):
        lines.append(f"\n### {modality}\n")
        split = (d.get("splits") or {}).get(f"{modality}/seed0/iid")
        if split:
            parts = ", ".join(
                f"{k} {v['patients']} patients / {v['images']} images" for k, v in split.items()
            )
            lines.append(f"Split (seed 0): {parts}.\n")
        skew = (d.get("splits") or {}).get(f"{modality}/seed0/skew")
        if skew:
            mix = "; ".join(
                f"{k}: " + " ".join(f"{lab[:4]} {n}" for lab, n in sorted(v["labels"].items()))
                for k, v in skew.items()
                if k.startswith("site-")
            )
            lines.append(f"Skewed sites (seed 0, images per class): {mix}.\n")
        lines.append(
            "| arm | seeds | accuracy | 95 % CI | macro AUC | 95 % CI | sens. mean | "
            "F1 mean | s/seed |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        central = summ.get((modality, "central"))
        for (mod, arm), v in summ.items():
            if mod != modality:
                continue
            err = f" ⚠ {len(v['errors'])} failed: {v['errors'][0][:120]}" if v["errors"] else ""
            lines.append(
                f"| {ARM_TITLES.get(arm, arm)}{err} | {len(v['seeds'])} | {pm(v['acc'])} | "
                f"{ci_text(v['ci'], 'accuracy')} | {pm(v['auc'])} | {ci_text(v['ci'], 'macro_auc')}"
                f" | {pm(v['sens'])} | {pm(v['f1'])} | "
                f"{np.mean([x for x in v['seconds'] if x]) if v['seconds'] else 0:.0f} |"
            )
        if modality in paper:
            p = paper[modality]
            lines.append(
                f"| **paper** (Inception-V4 @ 299, {PAPER_NAMES[modality]}) | — | "
                f"{p['accuracy']} | | {p['macro_auc']} | | | | |"
            )
        if central and central["acc"]:
            gaps = []
            for arm in ("fed-iid", "fed-skew", "local-iid", "local-skew"):
                v = summ.get((modality, arm))
                if v and v["acc"]:
                    paired = _paired(d, modality, arm)
                    gaps.append(f"{arm} − central: {paired}")
            if gaps:
                lines.append(
                    "\nAccuracy gap to pooled central training (points, paired by "
                    "seed, mean ± sd): " + "; ".join(gaps) + ".\n"
                )
            if central["src"]:
                src = ", ".join(f"{k} {pm(v)}" for k, v in central["src"].items())
                lines.append(f"\nCentral arm accuracy by image source on the test set: {src}.\n")
    return lines


def _paired(d: dict, modality: str, arm: str) -> str:
    by = {}
    for r in d.get("runs", []):
        if r["modality"] == modality and "metrics" in r:
            by.setdefault(r["seed"], {})[r["arm"]] = r["metrics"]["accuracy"]
    diffs = [100 * (v[arm] - v["central"]) for v in by.values() if arm in v and "central" in v]
    if not diffs:
        return "—"
    if len(diffs) == 1:
        return f"{diffs[0]:+.1f}"
    return f"{np.mean(diffs):+.1f} ± {np.std(diffs, ddof=1):.1f} (n={len(diffs)})"


def gap_values(d: dict, modality: str, arm: str) -> list[float]:
    by = {}
    for r in d.get("runs", []):
        if r["modality"] == modality and "metrics" in r:
            by.setdefault(r["seed"], {})[r["arm"]] = r["metrics"]["accuracy"]
    return [100 * (v[arm] - v["central"]) for v in by.values() if arm in v and "central" in v]


# ---------------------------------------------------------------- edge


EDGE_ROWS = (
    ("ort_fp32_cam", "onnxruntime fp32, logits + in-graph CAM (+ host upsample of 1 map)"),
    ("ort_int8_cam", "onnxruntime INT8 (QDQ), logits + in-graph CAM (+ upsample)"),
    ("ort_fp32_graph_only", "onnxruntime fp32 graph alone (logits, cam, ood_score)"),
    ("ort_fp32_logits_only", "onnxruntime fp32, same graph without the CAM output"),
    ("eager_logits", "PyTorch eager, logits only (no saliency)"),
    ("eager_saliency", "PyTorch eager predict + captum Saliency"),
    ("eager_gradcam", "PyTorch eager predict + captum Grad-CAM"),
)


def render_edge(d: dict) -> list[str]:
    lines = ["## 2. Edge speed: prediction + saliency per image\n", header(d)]
    g = d.get("matmul_gflops_fp32")
    lines.append(
        f"This CPU's measured fp32 matmul rate (torch, 1024² GEMM, best of 20, "
        f"with the run's threads per process): "
        f"**{g:.0f} GFLOP/s**. Timings: median of {d['settings']['iters']} runs (eager: a quarter "
        "as many), ms per image; ratio = eager + Saliency time / this row's time.\n"
    )
    for name, m in (d.get("models") or {}).items():
        lines.append(f"\n### {name}\n")
        if "error" in m:
            lines.append(f"Failed: `{m['error'][:300]}`\n")
            continue
        floor = m.get("flop_floor_ms")
        lines.append(
            f"Bundle `{Path(m['bundle']).name}` ({m['bundle']}); forward FLOPs at batch 1: "
            f"**{m['flops'] / 1e6:.1f} MFLOP** → fp32 floor on this CPU **{floor:.3f} ms/image**."
            " ONNX sizes: "
            + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in m["onnx_bytes"].items())
            + ".\n"
        )
        t = m["timings"]
        lines.append(
            "| method | batch 1 ms/img | ×floor | vs eager+Saliency | batch 8 ms/img "
            "| vs eager+Saliency |"
        )
        lines.append("|---|---|---|---|---|---|")
        for key, title in EDGE_ROWS:
            b1, b8 = t.get(f"{key}/b1"), t.get(f"{key}/b8")
            s1, s8 = t.get("eager_saliency/b1"), t.get("eager_saliency/b8")
            r1 = s1["ms_per_image"] / b1["ms_per_image"] if b1 and s1 else None
            r8 = s8["ms_per_image"] / b8["ms_per_image"] if b8 and s8 else None
            lines.append(
                f"| {title} | {ms(b1 and b1['ms_per_image'])} | "
                f"{(b1['ms_per_image'] / floor) if b1 and floor else 0:.1f} | "
                f"{'' if r1 is None else f'{r1:.1f}×'} | {ms(b8 and b8['ms_per_image'])} | "
                f"{'' if r8 is None else f'{r8:.1f}×'} |"
            )
        c = m["cam_overhead"]
        a = m["test_accuracy"]
        lines.append(
            f"\nCAM overhead (batch 1, fp32): {c['with_cam_ms']:.3f} ms with vs "
            f"{c['logits_only_ms']:.3f} ms without → **{c['overhead_pct']:+.1f} %** "
            f"({c['method']}).\n"
            f"Test accuracy (n = {a['n']}, edge preprocessing): fp32 {a['fp32']:.3f}, INT8 "
            f"{a['int8']:.3f} → INT8 − fp32 = **{a['int8_minus_fp32_points']:+.1f} points**.\n"
        )
        chk = m.get("int8_held_out_check")
        if chk:
            lines.append(
                f"Export's INT8 check on {chk['images']} held-out images: accuracy "
                f"{chk['accuracy_int8']:.3f} vs fp32 {chk['accuracy_fp32']:.3f}, agreement "
                f"{chk['top1_agreement']:.3f}, CAM rank correlation "
                f"{chk['cam_rank_corr_mean']:.3f} → "
                + (
                    f"**refused** ({m['int8_refused']}); the rows above time the refused graph.\n"
                    if m.get("int8_refused")
                    else "**kept**.\n"
                )
            )
    return lines


def render_serve(d: dict) -> list[str]:
    """``bench/edge_serve.py``: the HTTP API against ``session.run`` in the same run."""
    lines = ["## 2b. Edge HTTP API (`edge serve`) against `session.run`\n", header(d)]
    a, s, f = d["api"], d["session_run_b1"], d["decode_and_predict_in_process"]
    lines.append(
        f"Model `{Path(d['model']).name}` ({d['model']}), a {d['image']['bytes']} B CXR JPEG.\n"
    )
    lines.append("| path | p50 ms | p95 ms | images/s | failed |")
    lines.append("|---|---|---|---|---|")
    lines.append(f"| `session.run`, batch 1 | {s['p50_ms']:.2f} | {s['p95_ms']:.2f} | | |")
    lines.append(f"| decode + predict, in process | {f['p50_ms']:.2f} | {f['p95_ms']:.2f} | | |")
    for key in ("clients_1", "clients_8"):
        r = a[key]
        lines.append(
            f"| API, {r['clients']} client(s) | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | "
            f"{r['images_per_s']:.0f} | {r['failed']} |"
        )
    c = d["concurrent_64"]
    lines.append(
        f"| API, 64 concurrent clients | {c['p50_ms']:.2f} | {c['p95_ms']:.2f} | "
        f"{c['images_per_s']:.0f} | {c['failed']} |"
    )
    b = d["bombs"]
    ratio = d["overhead_ratio_vs_session_run"]
    lines.append(
        f"\nAPI overhead over `session.run` at batch 1: (API p50 − inference p50) / inference p50 "
        f"= **{ratio:.1f}×** (goal ≤ 0.2: missed; against decode + predict in process "
        f"{d['overhead_ratio_vs_decode_and_predict']:.2f}×, so most of it is JPEG decode and "
        "preprocessing, which this small model's inference barely outweighs). "
        f"{d['settings']['bombs']} decompression bombs ({b['bytes']} B, "
        f"{b['declared_pixels'] / 1e6:.0f} MP declared): statuses {b['statuses']}, server peak "
        f"RSS {b['vm_hwm_before_mb']:.1f} → {b['vm_hwm_after_mb']:.1f} MB "
        f"(**+{b['vm_hwm_growth_mb']:.1f} MB**; the bound: `--max-pixels` × 2 decodes at once).\n"
    )
    return lines


# ---------------------------------------------------------------- throughput & federation


def render_throughput(d: dict) -> list[str]:
    s = d["settings"]
    lines = ["## 3. Training throughput: target stage vs a bare timm loop\n", header(d)]
    lines.append(
        f"{s['arch']} @ {s['image_size']} px, batch {s['batch_size']}, ×{s['augment_per_sample']} "
        f"expansion, {s['torch_threads']} torch threads.\n"
    )
    lines.append("| loop | img/s | ratio to bare |")
    lines.append("|---|---|---|")
    bare = d.get("bare", {}).get("img_per_s")
    for key, title in (
        (
            "run_stage",
            "`fedbridge train` end to end (its data pipeline: offline ×N + online "
            "augmentation per item)",
        ),
        ("engine", "product loop `engine.train_one_epoch` on the same materialised tensors"),
        ("bare", "bare timm loop (fwd, CE loss, backward, AdamW step) on those tensors"),
    ):
        v = d.get(key, {}).get("img_per_s")
        lines.append(f"| {title} | {v or 0:.1f} | {(v / bare) if v and bare else 0:.2f} |")
    if "materialise_s_per_image_ms" in d:
        lines.append(
            f"\nMaterialising one item (decode cache → offline + online augmentation → "
            f"tensor) costs {d['materialise_s_per_image_ms']:.2f} ms.\n"
        )
    return lines


def render_federation(d: dict, acc: dict | None) -> list[str]:
    lines = ["## 4. Federation cost\n", header(d)]
    w = d.get("weights", {})
    if w:
        lines.append(
            "Bytes a site receives and sends per round (float32 state of the model, "
            "`shared_state`): "
            + "; ".join(
                f"{k}: {v['bytes'] / 1e6:.2f} MB ({v['parameters'] / 1e6:.2f} M params)"
                for k, v in w.items()
            )
            + ".\n"
        )
    rows = []
    if acc:
        for r in acc.get("runs", []):
            for c in (r.get("cost") or {}).get("rounds", []):
                if c.get("round_s"):
                    rows.append(
                        {**c, "modality": r["modality"], "arm": r["arm"], "seed": r["seed"]}
                    )
    if rows:
        lines.append(
            "\nRound wall time (server: send → 3 sites train → aggregate → federated evaluation) "
            "vs the slowest site's local training time, from the accuracy study's federated arms "
            f"(`{acc['mode']}` run, Flower simulation, 3 SuperNodes on {acc['machine']['cores']} "
            "cores). Bytes up per site per round from the sites' audit logs.\n"
        )
        lines.append(
            "| modality | round | n | round wall s | slowest site train s | Σ site train s"
            " | overhead vs slowest | bytes up / site |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        for mod in dict.fromkeys(r["modality"] for r in rows):
            for rnd in sorted({r["round"] for r in rows if r["modality"] == mod}):
                sel = [r for r in rows if r["modality"] == mod and r["round"] == rnd]
                rw = np.median([r["round_s"] for r in sel])
                sl = np.median([r["slowest_site_train_s"] for r in sel])
                sm = np.median([sum(r["site_train_s"]) for r in sel])
                by = int(np.median([b for r in sel for b in r["bytes_per_site"]] or [0]))
                lines.append(
                    f"| {mod} | {rnd} | {len(sel)} | {rw:.1f} | {sl:.1f} | {sm:.1f} | "
                    f"{100 * (1 - sl / rw):.0f} % | {by / 1e6:.2f} MB |"
                )
    sc = d.get("scaling", [])
    if sc:
        lines.append(
            f"\nSimulated sites with a tiny model ({d['settings']['tiny_model']}, random "
            "init, OCT images split over the sites, 1 round, time limit "
            f"{d['settings']['limit_s']} s):\n"
        )
        lines.append("| sites | finished | wall s | round s | lowest MemAvailable MiB | note |")
        lines.append("|---|---|---|---|---|---|")
        for r in sc:
            lines.append(
                f"| {r['sites']} | {'yes' if r.get('ok') else 'no'} | "
                f"{r.get('wall_s', '—')} | {r.get('round_s', '—')} | "
                f"{r.get('min_mem_available_mib', '—')} | {r.get('error', '')[:200]} |"
            )
    return lines


# ---------------------------------------------------------------- differential privacy


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f} %"


def _eps(x: float | None) -> str:
    return "∞ (DP off)" if x is None else f"{x:g}"


def render_dp(d: dict) -> list[str]:
    s = d["settings"]
    lines = [
        "## 5. Differential privacy (issue #12): federated OCT accuracy vs ε\n",
        header(d),
    ]
    split = d.get("split") or {}
    parts = ", ".join(f"{k} {v['patients']} patients / {v['images']} images"
                      for k, v in split.items())  # fmt: skip
    b = d.get("bridge") or {}
    lines.append(
        f"OCT, one patient-level split (seed {s['seed']}: {parts}); one bridge model "
        f"({s['arch']} @ {s['image_size']} px, ImageNet init, {s['bridge_epochs']} epochs, "
        f"test accuracy {b.get('accuracy', 0):.3f}), then the same federation per ε: FedAvg, "
        f"{s['sites']} sites, {s['rounds']} rounds × {s['local_epochs']} local epoch, "
        f"×{s['augment_per_sample']} expansion, lr {s['lr']}, seed {s['seed']}. DP: site-level "
        f"central DP (server clips each site's update of the {d.get('trainable_parameters', 0):,} "
        f"trainable weights to C = {s['clipping_norm']:g}, averages, adds N(0, (σC/m)²)); σ "
        f"derived from the target ε by the Opacus RDP accountant at δ = {s['delta']:g}. "
        "Update norm = median over sites and rounds of the L2 norm of a site's update; clipped = "
        "fraction of site updates above C (for ε = ∞ the fraction that *would* be clipped). "
        f"Test metrics with {s['bootstrap']}-resample bootstrap CIs. CPU s = driver + every "
        "process it started (Ray workers), federation only.\n"
    )
    lines.append(
        "| ε target | ε spent | σ | noise std / coord. | accuracy | 95 % CI | Δ acc vs ∞ (pt) "
        "| macro AUC | Δ AUC vs ∞ | update norm (median) | clipped | best round | CPU s |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    runs = d.get("runs", [])
    ref = next((r["metrics"] for r in runs if not r.get("dp") and "metrics" in r), None)
    for r in runs:
        if "metrics" not in r:
            lines.append(f"| {_eps(r.get('epsilon_target'))} | ⚠ failed: "
                         f"{r.get('error', '')[:150]} |||||||||||")  # fmt: skip
            continue
        m, pv, rows = r["metrics"], r.get("privacy") or {}, r.get("rounds", [])
        norms = [n for x in rows for n in x.get("site_update_norms", [])]
        med = float(np.median(norms)) if norms else None
        clipped = sum(n > s["clipping_norm"] for n in norms) / len(norms) if norms else None
        acc_d = f"{100 * (m['accuracy'] - ref['accuracy']):+.1f}" if ref else "—"
        auc_d = (
            f"{m['macro_auc'] - ref['macro_auc']:+.3f}"
            if ref and m.get("macro_auc") is not None and ref.get("macro_auc") is not None
            else "—"
        )
        spent = f"{pv['epsilon']:.2f}" if pv else "∞"
        clip = "—" if clipped is None else f"{100 * clipped:.0f} %"
        lines.append(
            f"| {_eps(r.get('epsilon_target'))} | {spent} | {pv.get('noise_multiplier', 0):.3f} "
            f"| {r.get('noise_std_per_coordinate', 0):.3f} | {m['accuracy']:.3f} "
            f"| {ci_text([m.get('ci95', {})], 'accuracy')} | {acc_d} "
            f"| {m.get('macro_auc') or 0:.3f} | {auc_d} | {ms(med)} | {clip} "
            f"| {r.get('best_round')} | {r.get('cpu_s', 0):.0f} |"
        )
    if runs and any(r.get("rounds") for r in runs):
        lines.append("\nPer round: median site update norm / fraction of site updates above C.\n")
        n_rounds = max(len(r.get("rounds", [])) for r in runs)
        lines.append(
            "| ε target | " + " | ".join(f"round {i}" for i in range(1, n_rounds + 1)) + " |"
        )
        lines.append("|---|" + "---|" * n_rounds)
        for r in runs:
            rr = r.get("rounds", [])
            cells = [f"{ms(x.get('update_norm_median'))} / {_pct(x.get('clipped_fraction'))}"
                     for x in rr]  # fmt: skip
            if cells:
                lines.append(f"| {_eps(r.get('epsilon_target'))} | " + " | ".join(cells) + " |")
    return lines


def render_rounds(d: dict) -> list[str]:
    s, arms = d["settings"], d.get("arms", {})
    lines = [
        "## 6. Deployed rounds vs simulated rounds (issue #12)\n",
        header(d),
        f"OCT, {s['sites']} sites, {s['arch']} @ {s['size']} px from one bridge bundle, "
        f"{s['rounds']} rounds × 1 local epoch, ×{s['augment']} expansion (the product's "
        "default), batch 32. Simulated: `fedbridge federate simulate` (Flower's simulation "
        "engine). Deployed: `fedbridge server start` (TLS, site keys, nginx front) and three "
        "`fedbridge site join` processes on loopback, each with its site worker. Round time = "
        "the coordinator's own (bundle `training.history[].seconds`: training tasks sent → last "
        "evaluation reply). Both arms share the same machine, one after the other. Goal: "
        "deployed / simulated ≤ 1.2 in the steady state (rounds ≥ 2).\n",
        "| arm | "
        + " | ".join(f"round {i}" for i in range(1, s["rounds"] + 1))
        + " | median of rounds ≥ 2 | wall |",
        "|---|" + "---|" * (s["rounds"] + 2),
    ]
    for name in ("simulated", "deployed"):
        a = arms.get(name)
        if a:
            cells = " | ".join(f"{x:.1f} s" for x in a["round_s"])
            lines.append(
                f"| {name} | {cells} | {a['steady_median_s']:.1f} s | {a['wall_s']:.0f} s |"
            )
    if "ratio_steady" in d:
        goal = "met" if d["ratio_steady"] <= 1.2 else "MISSED"
        lines.append(
            f"\nDeployed / simulated: **{d['ratio_steady']:.2f}×** in the steady state (goal "
            f"≤ 1.2: {goal}); round 1 (each site decodes its images): {d['ratio_round1']:.2f}×. "
            "Before the site worker, a flwr-clientapp process per message re-imported torch and "
            "re-decoded the site's images: 238 s per round of a tiny model here (issue #12).\n"
        )
    return lines


# ---------------------------------------------------------------- goals


def goals(mode: str) -> list[str]:
    acc, edge = load("accuracy", mode), load("edge_speed", mode)
    thr, fed = load("train_throughput", mode), load("federation_cost", mode)
    rows = []
    if acc:
        summ = accuracy_summary(acc)
        for mod in ("cxr", "oct"):
            v = summ.get((mod, "central"))
            if v and v["acc"]:
                a, u = np.mean(v["acc"]), np.mean([x for x in v["auc"] if x is not None])
                rows.append(
                    (
                        f"{mod}: accuracy ≥ 0.95, AUC ≥ 0.98 (central)",
                        f"{a:.3f} / {u:.3f}",
                        _ok(a >= 0.95 and u >= 0.98),
                        f"{100 * (a - 0.95):+.1f} pt / {u - 0.98:+.3f}",
                    )
                )
            for arm, what in (("fed-iid", "IID"), ("fed-skew", "skewed")):
                gv = gap_values(acc, mod, arm)
                if gv:
                    g = float(np.mean(gv))
                    rows.append(
                        (
                            f"{mod}: federated within 1 point of pooled ({what})",
                            f"{g:+.1f} pt",
                            _ok(g >= -1.0),
                            f"{g + 1:+.1f} pt beyond" if g < -1 else "",
                        )
                    )
    if edge:
        for name, m in (edge.get("models") or {}).items():
            if "error" in m:
                continue
            t, floor = m["timings"], m["flop_floor_ms"]
            best = min(t["ort_fp32_cam/b1"]["ms_per_image"], t["ort_int8_cam/b1"]["ms_per_image"])
            rows.append(
                (
                    f"{name}: edge predict + saliency b1 ≤ fp32 FLOP floor",
                    f"{best:.3f} ms vs floor {floor:.3f} ms",
                    _ok(best <= floor),
                    f"{best / floor:.1f}× the floor",
                )
            )
            r = t["eager_saliency/b1"]["ms_per_image"] / best
            rows.append(
                (f"{name}: ≥ 30× faster than eager + Saliency (b1)", f"{r:.1f}×", _ok(r >= 30), "")
            )
            dl = m["test_accuracy"]["int8_minus_fp32_points"]
            rows.append(
                (
                    f"{name}: INT8 accuracy loss ≤ 0.5 point",
                    f"{dl:+.1f} pt",
                    _ok(dl >= -0.5),
                    f"n = {m['test_accuracy']['n']}",
                )
            )
            c = m["cam_overhead"]["overhead_pct"]
            rows.append((f"{name}: CAM overhead ≤ 2 %", f"{c:+.1f} %", _ok(c <= 2), ""))
    if thr and thr.get("bare"):
        for key, what in (
            ("ratio_run_stage_vs_bare", "end to end"),
            ("ratio_engine_vs_bare", "loop on same tensors"),
        ):
            if key in thr:
                rows.append(
                    (
                        f"training ≥ 0.9× bare loop ({what})",
                        f"{thr[key]:.2f}×",
                        _ok(thr[key] >= 0.9),
                        "",
                    )
                )
    if acc:
        ov = []
        for r in acc.get("runs", []):
            for c in (r.get("cost") or {}).get("rounds", []):
                if c.get("round_s") and c["round"] > 1:
                    ov.append(100 * (1 - c["slowest_site_train_s"] / c["round_s"]))
        if ov:
            o = float(np.median(ov))
            rows.append(
                (
                    "round overhead ≤ 10 % (rounds ≥ 2, median)",
                    f"{o:.0f} %",
                    _ok(o <= 10),
                    f"{o - 10:+.0f} pt",
                )
            )
    if fed and fed.get("scaling"):
        okn = [r["sites"] for r in fed["scaling"] if r.get("ok")]
        rows.append(
            (
                "largest simulated site count (tiny model)",
                str(max(okn) if okn else 0),
                "info",
                ", ".join(
                    f"{r['sites']}: {'ok' if r.get('ok') else 'failed'}" for r in fed["scaling"]
                ),
            )
        )
    if not rows:
        return []
    out = [
        f"### Goals ({mode} run)\n",
        "| goal | measured | met? | by how much |",
        "|---|---|---|---|",
    ]
    out += [f"| {a} | {b} | {c} | {e} |" for a, b, c, e in rows]
    return out + [""]


def _ok(b: bool) -> str:
    return "✅ yes" if b else "❌ no"


def main() -> None:
    lines = [
        "# fedbridge benchmarks\n",
        "Generated by `bench/report.py` from `bench/results/*.json` (`make bench` = full run, "
        "`make bench-quick` = reduced run). Every table says which run produced it, the exact "
        "command, the date and the machine. Goals are reported, never asserted in tests.\n",
    ]
    current = ROOT / "bench" / "CURRENT.md"  # the current results, newest first
    if current.exists():
        lines.append(current.read_text())
    lines.append(
        "\n---\n\n# Earlier runs\n\nEverything below is older: the runs of issues #6–#16 "
        "(November – 2026-12-03) and the tables `make bench` renders from `bench/results/`.\n"
    )
    notes = ROOT / "bench" / "NOTES.md"
    if notes.exists():
        lines.append(notes.read_text())
    for mode in ("full", "quick"):
        found = [
            load(n, mode) for n in ("accuracy", "edge_speed", "train_throughput", "federation_cost")
        ]
        dp, rounds = load("dp_accuracy", mode), load("deployed_rounds", mode)
        serve, recipe = load("edge_serve", mode), load("recipe", mode)
        if not any(found) and not dp and not rounds and not serve and not recipe:
            continue
        run = load("run", mode)
        lines.append(
            "\n# "
            + ("Full run (`make bench`)" if mode == "full" else "Quick run (`make bench-quick`)")
            + "\n"
        )
        if run:
            steps = ", ".join(
                f"{s['script']} {s['wall_s']:.0f} s (exit {s['rc']})" for s in run.get("steps", [])
            )
            lines.append(
                f"Run wall time {run.get('wall_s', 0):.0f} s"
                f"{'' if run.get('complete') else ' (INCOMPLETE)'}: {steps}.\n"
            )
        lines += goals(mode)
        acc, edge, thr, fed = found
        if recipe:
            lines += render_recipe(recipe)
        if acc:
            lines += render_accuracy(acc)
        if edge:
            lines += render_edge(edge)
        if serve:
            lines += render_serve(serve)
        if thr:
            lines += render_throughput(thr)
        if fed:
            lines += render_federation(fed, acc)
        if dp:
            lines += render_dp(dp)
        if rounds:
            lines += render_rounds(rounds)
    (ROOT / "BENCHMARKS.md").write_text("\n".join(lines) + "\n")
    log(f"wrote {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
