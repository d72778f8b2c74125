"""Nothing identifying leaves a site: identifier-like names planted in a site's folder names,
file names and DICOM tags (and an unreadable file named after a patient) are searched for in
every coordinator artefact of a real federation and the bedside model exported from it."""

from __future__ import annotations

import json
from pathlib import Path

from cli import ok
from planted import leaks, plant_site, plant_unreadable


def plant_sites(train: Path, root: Path) -> list[Path]:
    """Three sites from ``train``'s images (every third file), each with identifier-like names
    planted (see ``planted.plant_site``); site 3 also holds an unreadable file named after a
    patient."""
    classes = sorted(p for p in train.iterdir() if p.is_dir())
    sites = [
        plant_site({c.name: sorted(c.iterdir())[i - 1 :: 3] for c in classes}, root, i)
        for i in (1, 2, 3)
    ]
    plant_unreadable(sites[2])
    return sites


def test_planted_names_reach_no_coordinator_artefact_in_simulation(cxr_bundle, cxr_parts, tmp_path):
    sites = plant_sites(cxr_parts["train"], tmp_path / "sites")
    out = tmp_path / "coord" / "fed"
    site_args = [a for s in sites for a in ("--site", s)]
    # a small learning rate keeps the bridge's skill, so that the export can calibrate
    ok(
        "federate", "simulate", "--init", cxr_bundle, *site_args, "--out", out,
        "--rounds", "2", "--batch-size", "32", "--augment-per-sample", "0", "--lr", "1e-5",
        "--set", "min-train-sites=2", "--set", "min-evaluate-sites=2",
    )  # fmt: skip
    onnx = tmp_path / "coord" / "model.onnx"
    ok("export", "onnx", out, "--out", onnx, "--val-data", cxr_parts["val"])
    state = json.loads((out.parent / "fed-rounds" / "state.json").read_text())
    # the failure did reach the coordinator: as a code and a count, not as the file's name
    dropped = [d for row in state["history"] for d in row["dropped"]]
    assert len(dropped) == 4 and all("failed (unreadable_images: 1)" in d for d in dropped)
    artefacts = [p for p in (tmp_path / "coord").rglob("*") if p.is_file()]
    assert {p.name for p in artefacts} >= {"state.json", "model.json", "model.onnx"}
    assert len([p for p in artefacts if p.name == "model.json"]) == 3  # rounds 1, 2, final
    assert leaks(artefacts) == {}
