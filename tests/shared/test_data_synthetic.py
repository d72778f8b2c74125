"""make_phantom_dataset: a labelled SYNTHETIC set that is learnable, but not from global stats."""

import csv
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image

from fedbridge_shared.data.checks import check_folder
from fedbridge_shared.data.synthetic import CLASSES, make_phantom_dataset
from fedbridge_shared.errors import ConfigError


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom") / "data"
    make_phantom_dataset(out)  # defaults: 30 per class, 160 px, seed 0
    return out


def test_layout_manifest_and_readme(phantom):
    out = phantom
    assert sorted(p.name for p in out.iterdir()) == sorted([*CLASSES, "MANIFEST.csv", "README.txt"])
    assert "SYNTHETIC" in (out / "README.txt").read_text()
    with (out / "MANIFEST.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 120 and {r["synthetic"] for r in rows} == {"1"}
    assert Counter(r["label"] for r in rows) == dict.fromkeys(CLASSES, 30)
    films = defaultdict(list)
    for row in rows:
        films[row["patient_id"]].append(row)
        name = row["path"].split("/")[1]
        assert name.startswith("phantom_") and name.endswith(".png")
        assert (out / row["path"]).is_file()
    assert {len(f) for f in films.values()} == {1, 2}
    assert all(len({r["label"] for r in f}) == 1 for f in films.values())
    with Image.open(out / rows[0]["path"]) as img:
        assert img.mode == "L" and img.size == (160, 160)


def test_check_and_patient_ids(phantom):
    out = phantom
    report = check_folder(out)
    assert report.ok and report.findings == []
    assert report.images_per_patient["max"] == 2
    assert all(s.patient_id.startswith("phantom-") for s in report.index.samples)


def test_deterministic_per_seed(phantom, tmp_path):
    out = phantom
    same = make_phantom_dataset(tmp_path / "same", n_per_class=30, seed=0)
    other = make_phantom_dataset(tmp_path / "other", n_per_class=30, seed=1)
    name = "NORMAL/phantom_0001_1.png"
    assert (same / name).read_bytes() == (out / name).read_bytes()
    assert (same / "MANIFEST.csv").read_text() == (out / "MANIFEST.csv").read_text()
    assert (other / name).read_bytes() != (out / name).read_bytes()


def test_learnable_but_not_from_global_statistics(phantom):
    from sklearn.linear_model import RidgeClassifier
    from sklearn.model_selection import GroupKFold, cross_val_score
    from sklearn.tree import DecisionTreeClassifier

    out = phantom
    with (out / "MANIFEST.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    pixels = []
    for row in rows:
        with Image.open(out / row["path"]) as img:
            pixels.append(np.asarray(img.resize((32, 32), Image.Resampling.BILINEAR)) / 255)
    x = np.stack(pixels).reshape(len(rows), -1)
    y = [r["label"] for r in rows]
    groups = [r["patient_id"] for r in rows]
    cv = GroupKFold(4)
    pixel_acc = cross_val_score(RidgeClassifier(alpha=10), x, y, groups=groups, cv=cv).mean()
    stats = np.stack([x.mean(1), x.std(1)], axis=1)
    tree = DecisionTreeClassifier(max_depth=3, random_state=0)
    stats_acc = cross_val_score(tree, stats, y, groups=groups, cv=cv).mean()
    assert pixel_acc > 0.4  # chance is 0.25; a CNN does far better than this linear probe
    assert stats_acc < 0.45  # brightness/contrast alone do not give the class away


def test_bad_arguments_and_existing_output(tmp_path):
    with pytest.raises(ConfigError, match="n_per_class"):
        make_phantom_dataset(tmp_path / "a", n_per_class=0)
    with pytest.raises(ConfigError, match="size"):
        make_phantom_dataset(tmp_path / "a", size=16)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        make_phantom_dataset(tmp_path / "full", n_per_class=1)
