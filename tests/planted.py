"""Identifier-like names planted at a site, and the search for them in coordinator files.

Hospitals' file names, folder names and DICOM tags carry names, record numbers and birth
dates; none of that may reach the coordinator (tests/e2e/test_identifiers_stay_at_sites.py
in simulation, tests/e2e/test_federate_deploy.py deployed)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from badinputs import write_edited_dicom
from PIL import Image

PLANTED = "DOE_JOHN_MRN4471234_1961-02-03"
NEEDLES = (PLANTED, "DOE_JOHN", "DOE^JOHN", "MRN4471234", "4471234", "1961-02-03", "19610203")


def plant_site(classes: dict[str, list[Path]], root: Path, i: int) -> Path:
    """Site ``i`` in ``root/PLANTED_site{i}`` (a folder named after a patient): per class,
    symlinks to its files but the first, which becomes a PNG named after a patient and a DICOM
    whose PatientName, PatientID and PatientBirthDate are one's."""
    site = root / f"{PLANTED}_site{i}"
    for label, files in classes.items():
        folder = site / label
        folder.mkdir(parents=True)
        for f in files[1:]:
            os.symlink(Path(f).resolve(), folder / Path(f).name)
        grey = np.asarray(Image.open(files[0]).convert("L").resize((64, 64)))
        Image.fromarray(grey).save(folder / f"{PLANTED}_{i}.png")
        write_edited_dicom(
            folder / f"MRN4471234_{i}.dcm", grey, PatientName="DOE^JOHN",
            PatientID="MRN4471234", PatientBirthDate="19610203",
        )  # fmt: skip
    return site


def plant_copy(src: Path, root: Path, i: int) -> Path:
    """:func:`plant_site` from the class folders of the site folder ``src``."""
    classes = {c.name: sorted(c.iterdir()) for c in sorted(src.iterdir()) if c.is_dir()}
    return plant_site(classes, root, i)


def plant_unreadable(site: Path) -> Path:
    """A file named after a patient in the site's first class folder that cannot be decoded:
    the site refuses every round, and its error message names the file."""
    first = sorted(p for p in site.iterdir() if p.is_dir())[0]
    bad = first / f"{PLANTED}.jpg"
    bad.write_bytes(b"\xff\xd8 cut short at the site")
    return bad


def found(data: bytes) -> list[str]:
    return [n for n in NEEDLES if n.encode() in data]


def leaks(files: Iterable[Path]) -> dict[str, list[str]]:
    """The planted identifiers in each of ``files`` that holds any."""
    hits = {str(p): found(Path(p).read_bytes()) for p in files}
    return {k: v for k, v in hits.items() if v}
