"""Source data set of each image: the team manifest's column, through a split's split.csv."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

from fedbridge_shared.data.samples import scan_folder
from fedbridge_shared.data.sources import sample_sources
from fedbridge_shared.data.split import split_folder


def test_sources_of_real_images_directly_and_through_a_split(cxr_root, tmp_path):
    manifest = cxr_root.parent / "MANIFEST.csv"
    rows = list(csv.DictReader(manifest.open()))
    want = Counter(r["source_dataset"] for r in rows if r["modality"] == "cxr")
    index = scan_folder(cxr_root)
    assert Counter(sample_sources(index.samples, index.manifest)) == want
    # a split's test part: split.csv names the original file, whose manifest has the source
    split = split_folder(cxr_root, tmp_path / "s", sites=2, bridge_fraction=0.1,
                         test_fraction=0.2, seed=3)  # fmt: skip
    test = scan_folder(split.out / "test")
    got = sample_sources(test.samples, test.manifest)
    by_name = {Path(r["path"]).name: r["source_dataset"] for r in rows}
    assert got == [by_name[s.path.name] for s in test.samples]
    assert set(got) == {"Kermany2018-ChestXRay", "ieee8023-covid-chestxray-dataset"}


def test_unknown_sources_are_none(tmp_path):
    (tmp_path / "A").mkdir()
    image = tmp_path / "A" / "a.png"
    image.write_bytes(b"")
    manifest = tmp_path / "MANIFEST.csv"
    manifest.write_text("path,label,patient_id\nA/a.png,A,p1\n")
    assert sample_sources([image], manifest) == [None]
    assert sample_sources([image], None) == [None]
