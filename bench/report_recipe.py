"""BENCHMARKS.md section of ``bench/recipe.py`` (issue #16): recipe ablation and headline table."""

from __future__ import annotations

from typing import Any

import numpy as np

TARGETS = {"cxr": (0.95, 0.98), "oct": (0.985, 0.999)}
TITLES = {
    "central": "3-stage central (ImageNet → bridge → pooled target)",
    "central-all-kept": "central, all four kept components (LS + EMA + CLAHE + TTA; run before "
    "the tie rule, not used for any choice)",
    "fed-iid": "federated, 3 IID sites (FedAvg)",
    "fed-skew": "federated, 3 label-skewed sites (Dirichlet 0.5)",
    "fed-skew-fedprox": "federated, skewed sites, FedProx (μ 0.01)",
    "fed-skew-fedavgm": "federated, skewed sites, FedAvgM (server lr 1, momentum 0.9)",
    "local-iid": "local-only, IID sites (mean of 3 site models)",
    "local-skew": "local-only, skewed sites (mean of 3 site models)",
    "no-imagenet": "ablation: no ImageNet (random init → bridge → target)",
    "no-bridge": "ablation: no bridge (ImageNet → target)",
    "small-bridge": "ablation: small bridge (the split's own leftover part)",
    "no-augment": "ablation: no augmentation (no ×N, no online)",
}


def _pm(vals: list[float]) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "—"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f}"


def _ci(rows: list[dict], key: str) -> str:
    cis = [r["metrics"].get("ci95", {}).get(key) for r in rows]
    cis = [c for c in cis if isinstance(c, list | tuple)]
    if not cis:
        return "—"
    return f"[{np.mean([c[0] for c in cis]):.3f}, {np.mean([c[1] for c in cis]):.3f}]"


def _runs(d: dict, modality: str, arm: str) -> list[dict]:
    return [
        r for r in d.get("runs", [])
        if r["modality"] == modality and r["arm"] == arm and "metrics" in r
    ]  # fmt: skip


def render_recipe(d: dict) -> list[str]:
    from bench.report import header

    s = d["settings"]
    lines = [
        "## 0. Issue #16: the default model (MobileNetV2 @ 224) with the large bridge sets\n",
        header(d),
        f"Model **{s['arch']} @ {s['image_size']} px** (`../shared/weights`), batch "
        f"{s['batch_size']}, AdamW lr {s['lr']} (cosine); bridge {s['bridge_epochs']} epochs on "
        f"the large public set (`../shared/data/bridge`, disjoint by patient); target "
        f"{s['target_epochs']} epochs over the ×{s['augment_per_sample']}-expanded set; federated: "
        f"FedAvg {s['rounds']} rounds × {s['local_epochs']} local epoch (the same epoch budget; "
        "the sites' cosine schedule runs across rounds). CPU time = user + system seconds of the "
        "benchmark process and its children, summed over both cores; for federated arms it is not "
        "measured (Flower's simulation runs the sites in Ray worker processes that are not the "
        "benchmark's children), so their wall time is given.\n",
    ]
    lines += [f"*Note: {n}*\n" for n in d.get("notes", [])]
    if len(d.get("launches", [])) > 1:
        lines.append(f"*Launched {len(d['launches'])} times (`--resume` keeps finished arms): "
                     + ", ".join(d["launches"]) + ".*\n")  # fmt: skip
    for key, b in (d.get("bridges") or {}).items():
        lines.append(
            f"* bridge `{key}`: {b.get('images')} images from `{b.get('data')}`, "
            f"{b.get('cpu_s', 0) / 60:.1f} CPU-min ({b.get('wall_s', 0) / 60:.1f} min wall)"
            + (f"; retrained when a resumed run found it missing: "
               f"{b['retrained']['cpu_s'] / 60:.1f} CPU-min" if b.get("retrained") else "")
            + "."
        )  # fmt: skip
    lines.append("")
    for modality, rec in (d.get("recipes") or {}).items():
        lines += _recipe_table(modality, rec, s)
    for modality in dict.fromkeys(r["modality"] for r in d.get("runs", [])):
        lines += _headline(d, modality, s)
    return lines


def _recipe_table(modality: str, rec: dict, s: dict) -> list[str]:
    lines = [
        f"\n### {modality}: recipe chosen on validation patients (never the test split)\n",
        f"Validation set: `{rec.get('validation')}` (patients disjoint from the sites and the "
        f"test set); bridge: **{rec.get('bridge')}**. Each component alone on top of the base "
        f"recipe; kept when it beats the base by ≥ {s.get('min_gain')} accuracy; several kept "
        "ones are combined only if the combination is at least as good as the best alone.\n",
        "| candidate | val accuracy | 95 % CI | val macro AUC | sens. mean | CPU-min |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rec.get("rows", {}).items():
        if r.get("late"):
            name += " (measured after the choice)"
        ci = (r.get("ci95") or {}).get("accuracy") or ["—", "—"]
        ci_text = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if isinstance(ci[0], float) else "—"
        auc = r.get("macro_auc")
        lines.append(
            f"| {name} | {r['accuracy']:.3f} | {ci_text} | "
            f"{'—' if auc is None else f'{auc:.3f}'} | {r.get('sensitivity_mean', 0):.3f} | "
            f"{r.get('cpu_s', 0) / 60:.1f} |"
        )
    final = rec.get("final")
    verdict = "not decided yet" if final is None else (", ".join(final) or "the base recipe")
    lines.append(f"\n**Chosen: {verdict}.** {rec.get('why', '')}\n")
    rows = rec.get("rows", {})
    chosen_name = final[0] if final and len(final) == 1 else "combined" if final else "base"
    # late candidates against the base and the chosen recipe retrained on their own bridge
    base = rows.get("late-base") or rows.get("base")
    chosen = rows.get(f"late-{chosen_name}") or rows.get(chosen_name)
    late = [n for n, r in rows.items() if r.get("late") and not n.startswith("late-")]
    if late and base and chosen:
        lines.append(
            "Measured after the recipe was fixed (never chosen; the headline arms do not use "
            "them), in accuracy points on validation against the base and the chosen recipe"
            + (" retrained on the same bridge (`late-*` rows)" if "late-base" in rows else "")
            + ": "
            + "; ".join(
                f"**{n}** {100 * (rows[n]['accuracy'] - base['accuracy']):+.1f} / "
                f"{100 * (rows[n]['accuracy'] - chosen['accuracy']):+.1f}"
                for n in late
            )
            + f". One validation image is {100 / max(1, base.get('n', 1)):.1f} points.\n"
        )
    return lines


def _headline(d: dict, modality: str, s: dict) -> list[str]:
    paper = (s.get("paper") or {}).get(modality)
    lines = [
        f"\n### {modality}: test patients, the chosen recipe\n",
        "| arm | seeds | accuracy | 95 % CI | macro AUC | 95 % CI | sens. mean | "
        "accuracy by source | CPU-min/seed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, title in TITLES.items():
        rows = _runs(d, modality, arm)
        failed = [
            r for r in d.get("runs", [])
            if r["modality"] == modality and r["arm"] == arm and "error" in r
        ]  # fmt: skip
        if not rows and not failed:
            continue
        ms = [r["metrics"] for r in rows]
        src: dict[str, list[float]] = {}
        for m in ms:
            for k, v in (m.get("accuracy_by_source") or {}).items():
                src.setdefault(k, []).append(v["accuracy"])
        src_text = ", ".join(f"{k} {np.mean(v):.3f}" for k, v in src.items()) or "—"
        err = f" ⚠ {len(failed)} failed: {failed[0]['error'][:100]}" if failed else ""
        cpu_text = f"{np.mean([r['cpu_s'] for r in rows]) / 60:.1f}" if rows else "—"
        if arm.startswith("fed-") and rows:  # Ray's workers are not this process's children
            cpu_text = f"not measured ({np.mean([r['seconds'] for r in rows]) / 60:.1f} min wall)"
            proxy = _same_budget_cpu(d, modality, arm, s)
            if proxy is not None:
                cpu_text += f"; ≈ {proxy / 60:.1f} machine CPU-min †"
        lines.append(
            f"| {title}{err} | {len(rows)} | {_pm([m['accuracy'] for m in ms])} | "
            f"{_ci(rows, 'accuracy')} | {_pm([m.get('macro_auc') for m in ms])} | "
            f"{_ci(rows, 'macro_auc')} | {_pm([m.get('sensitivity_mean') for m in ms])} | "
            f"{src_text} | {cpu_text} |"
        )
    if paper:
        lines.append(
            f"| **paper** (Inception-V4 @ 299) | — | {paper['accuracy']} | | "
            f"{paper['macro_auc']} | | | | |"
        )
    if any(r["arm"].startswith("val-fed-") and r.get("machine_cpu_s") for r in d["runs"]):
        lines.append(
            "\n† The same federation (seed 0's sites, the same rounds × local epochs) rerun "
            "alone and scored on validation patients: busy CPU of the whole machine "
            "(`/proc/stat`, the Ray workers included) over that run.\n"
        )
    lines += _per_class(d, modality)
    lines += _gaps(d, modality)
    lines += _schedules(d, modality)
    return lines


def _same_budget_cpu(d: dict, modality: str, arm: str, s: dict) -> float | None:
    """Machine CPU seconds of the validation rerun of ``arm`` (fed-iid / fed-skew) at the
    headline's rounds × local epochs, if it was measured."""
    name = f"val-{arm}-r{s['rounds']}e{s['local_epochs']}"
    for r in d.get("runs", []):
        if r["modality"] == modality and r["arm"] == name and r.get("machine_cpu_s"):
            return float(r["machine_cpu_s"])
    return None


def _schedules(d: dict, modality: str) -> list[str]:
    """Rounds × local epochs at the same site-epoch budget, scored on validation patients."""
    rows = [
        r for r in d.get("runs", [])
        if r["modality"] == modality and r["arm"].startswith("val-fed-")
    ]  # fmt: skip
    if not rows:
        return []
    lines = [
        f"\n#### {modality}: federated rounds × local epochs, same budget (validation patients)\n",
        "Seed 0's sites, scored on the validation quarter (never the test split); each row trains "
        "from the same bridge with the chosen recipe.\n",
        "| sites | rounds × local epochs | val accuracy | 95 % CI | val macro AUC | wall min | "
        "machine CPU-min |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kind = "IID" if "-iid-" in r["arm"] else "label-skewed (Dirichlet 0.5)"
        if "metrics" not in r:
            lines.append(f"| {kind} | {r['arm']} | ⚠ {r.get('error', '')[:100]} | | | | |")
            continue
        m = r["metrics"]
        ci = m.get("ci95", {}).get("accuracy") or [0.0, 0.0]
        auc = m.get("macro_auc")
        lines.append(
            f"| {kind} | {r['rounds']} × {r['local_epochs']} | {m['accuracy']:.3f} | "
            f"[{ci[0]:.3f}, {ci[1]:.3f}] | {'—' if auc is None else f'{auc:.3f}'} | "
            f"{r['seconds'] / 60:.1f} | {r.get('machine_cpu_s', 0) / 60:.1f} |"
        )
    return lines


def _per_class(d: dict, modality: str) -> list[str]:
    rows = _runs(d, modality, "central")
    if not rows:
        return []
    labels = rows[0]["metrics"].get("labels") or []
    cm = np.sum([np.array(r["metrics"]["confusion_matrix"]) for r in rows], axis=0)
    lines = [
        f"\nCentral arm, summed over {len(rows)} seed(s): per-class sensitivity (mean over seeds) "
        "and the confusion matrix (rows = truth, columns = prediction).\n",
        "| truth \\ predicted | " + " | ".join(labels) + " | sensitivity |",
        "|---" * (len(labels) + 2) + "|",
    ]
    for i, label in enumerate(labels):
        sens = [r["metrics"]["per_class"][label]["sensitivity"] for r in rows
                if label in r["metrics"].get("per_class", {})]  # fmt: skip
        lines.append(f"| {label} | " + " | ".join(str(int(x)) for x in cm[i]) + f" | {_pm(sens)} |")
    worst = max(
        ((i, j) for i in range(len(labels)) for j in range(len(labels)) if i != j),
        key=lambda ij: cm[ij],
        default=None,
    )
    if worst is not None and cm[worst] > 0:
        lines.append(
            f"\nMost frequent error: {labels[worst[0]]} called {labels[worst[1]]} "
            f"({int(cm[worst])} images over the seeds).\n"
        )
    return lines


def _gaps(d: dict, modality: str) -> list[str]:
    by: dict[int, dict[str, Any]] = {}
    for r in d.get("runs", []):
        if r["modality"] == modality and "metrics" in r:
            by.setdefault(r["seed"], {})[r["arm"]] = r["metrics"]
    out = []
    for arm, ref in (("fed-iid", "central"), ("fed-skew", "central")):
        diffs = [100 * (v[arm]["accuracy"] - v[ref]["accuracy"]) for v in by.values()
                 if arm in v and ref in v]  # fmt: skip
        if diffs:
            out.append(f"{arm} − central {_pts(diffs)} (target ≥ −1)")
    diffs = [
        100 * (v["fed-skew"]["accuracy"] - v["local-skew"]["best_site_accuracy"])
        for v in by.values()
        if "fed-skew" in v and "best_site_accuracy" in v.get("local-skew", {})
    ]
    if diffs:
        out.append(f"fed-skew − best local-only skewed site {_pts(diffs)} (target ≥ +10)")
    central = [v["central"] for v in by.values() if "central" in v]
    lines = []
    if out:
        lines.append("\nPaired by seed, accuracy points: " + "; ".join(out) + ".\n")
    if central and modality in TARGETS:
        acc, auc = (
            np.mean([m["accuracy"] for m in central]),
            np.mean([m["macro_auc"] for m in central if m.get("macro_auc") is not None] or [0.0]),
        )
        ta, tu = TARGETS[modality]
        lines.append(
            f"Targets {ta} / {tu}: central {acc:.3f} ({100 * (acc - ta):+.1f} points) / "
            f"{auc:.3f} ({auc - tu:+.3f}).\n"
        )
    return lines


def _pts(diffs: list[float]) -> str:
    if len(diffs) == 1:
        return f"{diffs[0]:+.1f}"
    return f"{np.mean(diffs):+.1f} ± {np.std(diffs, ddof=1):.1f} (n={len(diffs)})"
