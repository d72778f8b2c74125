"""Every hospital can take part: on real OCT, a site without DRUSEN trains on what it has;
and an OCT bridge bundle gives the federation OCT augmentation when --augment is not given."""

import shutil

from badinputs import make_class_tree
from cli import ok

from fedbridge_shared.spec import load_bundle


def test_a_site_without_drusen_takes_part_and_the_oct_bridge_sets_the_augmentation(
    oct_root, tmp_path
):
    sites = [make_class_tree(tmp_path / f"site-{i}", oct_root, per_class=8) for i in (1, 2)]
    for i, site in enumerate(sites):  # different images at each site
        for img in sorted(site.rglob("*.jpg"))[i::2]:
            img.unlink()
    shutil.rmtree(sites[1] / "DRUSEN")
    bridge = tmp_path / "bridge"
    ok(
        "bridge", make_class_tree(tmp_path / "public", oct_root, per_class=6), "--out", bridge,
        "--model", "test_efficientnet", "--init", "none", "--image-size", "32", "--epochs", "1",
        "--batch-size", "16", "--modality", "oct",
    )  # fmt: skip
    assert load_bundle(bridge).spec.modality == "oct"
    out = tmp_path / "fed"
    ok(
        "federate", "simulate", "--init", bridge, "--site", sites[0], "--site", sites[1],
        "--out", out, "--rounds", "1", "--augment-per-sample", "1", "--batch-size", "8",
    )  # fmt: skip
    training = load_bundle(out).training
    assert training["config"]["augment"] == "oct"  # not the chest X-ray default
    row = training["history"][0]
    assert row["sites"] == ["site-1", "site-2"] and not row["dropped"]
    counts = row["per_site"]["site-2"]["train_counts"]
    assert counts["DRUSEN"] == 0 and min(counts[k] for k in ("CNV", "DME", "NORMAL")) > 0
    assert row["per_site"]["site-1"]["train_counts"]["DRUSEN"] > 0
    assert load_bundle(out).spec.labels == ("CNV", "DME", "DRUSEN", "NORMAL")
