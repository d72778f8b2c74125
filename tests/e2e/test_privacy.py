"""Nothing identifying leaves a site: identifier-like names planted in a site's folder names,
file names and DICOM tags (and an unreadable file named after a patient) are searched for in
every coordinator artefact of a real federation and the bedside model exported from it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from badinputs import write_edited_dicom
from cli import ok
from PIL import Image

PLANTED = "DOE_JOHN_MRN4471234_1961-02-03"
NEEDLES = (PLANTED, "DOE_JOHN", "DOE^JOHN", "MRN4471234", "4471234", "1961-02-03", "19610203")


def plant_sites(train: Path, root: Path) -> list[Path]:
    """Three sites from ``train``'s images (symlinks, every third file), each in a folder named
    after a patient, with a file named after one and a DICOM whose PatientName, PatientID and
    PatientBirthDate are one's; site 3 also holds an unreadable file with such a name."""
    sites = []
    for i in (1, 2, 3):
        site = root / f"{PLANTED}_site{i}"
        for cls in sorted(p for p in train.iterdir() if p.is_dir()):
            (site / cls.name).mkdir(parents=True)
            files = sorted(cls.iterdir())[i - 1 :: 3]
            for f in files[1:]:
                os.symlink(f.resolve(), site / cls.name / f.name)
            grey = np.asarray(Image.open(files[0]).convert("L").resize((64, 64)))
            Image.fromarray(grey).save(site / cls.name / f"{PLANTED}_{i}.png")
            write_edited_dicom(
                site / cls.name / f"MRN4471234_{i}.dcm", grey, PatientName="DOE^JOHN",
                PatientID="MRN4471234", PatientBirthDate="19610203",
            )  # fmt: skip
        sites.append(site)
    first_class = sorted(p for p in sites[2].iterdir() if p.is_dir())[0]
    (first_class / f"{PLANTED}.jpg").write_bytes(b"\xff\xd8 cut short at the site")
    return sites


def found(data: bytes) -> list[str]:
    return [n for n in NEEDLES if n.encode() in data]


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
    hits = {str(p): found(p.read_bytes()) for p in artefacts}
    assert {k: v for k, v in hits.items() if v} == {}
