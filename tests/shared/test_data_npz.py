"""import_npz: MedMNIST arrays -> class folders + MANIFEST.csv; bad archives are refused."""

import csv

import numpy as np
import pytest
from PIL import Image

from fedbridge_shared.data.checks import check_folder
from fedbridge_shared.data.npz import import_npz
from fedbridge_shared.data.samples import scan_folder
from fedbridge_shared.errors import ConfigError, DataError

OCT = ("CNV", "DME", "DRUSEN", "NORMAL")


@pytest.fixture(scope="module")
def arrays(oct_root):
    """3 real OCT scans per class at 28x28: image i of each class goes to split i."""
    out = {f"{s}_{kind}": [] for s in ("train", "val", "test") for kind in ("images", "labels")}
    for k, label in enumerate(OCT):
        for split, path in zip(
            ("train", "val", "test"), sorted((oct_root / label).iterdir())[:3], strict=True
        ):
            with Image.open(path) as img:
                small = img.convert("L").resize((28, 28), Image.Resampling.BILINEAR)
            out[f"{split}_images"].append(np.asarray(small))
            out[f"{split}_labels"].append([k])
    return {key: np.asarray(v, dtype=np.uint8) for key, v in out.items()}


def _save(path, **arrays):
    np.savez_compressed(path, **arrays)
    return path


def test_import_writes_pngs_manifest_and_is_scannable(arrays, tmp_path):
    npz = _save(tmp_path / "octmnist.npz", **arrays)
    out = tmp_path / "out"
    assert import_npz(npz, out, labels=OCT) == {"train": 4, "val": 4, "test": 4}
    assert sorted(p.name for p in out.iterdir()) == sorted([*OCT, "MANIFEST.csv"])
    with (out / "MANIFEST.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12
    first = {"path": "CNV/train_00000.png", "label": "CNV", "patient_id": "npz:train_0"}
    assert rows[0] == first | {"split": "train"}
    for row in rows:
        split, index = row["patient_id"].removeprefix("npz:").split("_")
        with Image.open(out / row["path"]) as img:
            assert img.mode == "L"
            np.testing.assert_array_equal(np.asarray(img), arrays[f"{split}_images"][int(index)])
        assert OCT[arrays[f"{split}_labels"][int(index)][0]] == row["label"]
    index = scan_folder(out)
    assert index.labels == OCT and len(index.samples) == 12 and index.unlisted == ()
    assert check_folder(out).ok


def test_default_class_names_rgb_images_and_chosen_splits(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28, 3), dtype=np.uint8)
    npz = _save(tmp_path / "rgb.npz", train_images=images, train_labels=np.array([0, 2, 2, 1, 0]))
    out = tmp_path / "out"
    assert import_npz(npz, out, splits=("train",)) == {"train": 5}
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["class_0", "class_1", "class_2"]
    with Image.open(out / "class_2" / "train_00002.png") as img:
        assert img.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(img), images[2])


@pytest.mark.parametrize(
    "change, words",
    [
        ({"val_labels": None}, "missing array(s) val_labels"),
        ({"test_labels": np.zeros((3, 1), np.uint8)}, "test_labels has shape (3, 1) but"),
        ({"train_labels": np.full((4, 1), 7, np.uint8)}, "label index 7, outside 0..3"),
        ({"train_labels": np.zeros((4, 3), np.uint8)}, "multi-label"),
        ({"train_images": np.zeros((4, 28, 28), np.float32)}, "must be uint8"),
        ({"val_images": np.zeros((4, 28), np.uint8)}, "expected (N, H, W) or (N, H, W, 3)"),
    ],
)
def test_bad_archives_are_refused(arrays, tmp_path, change, words):
    content = {k: v for k, v in arrays.items() if change.get(k, v) is not None}
    content |= {k: v for k, v in change.items() if v is not None}
    npz = _save(tmp_path / "bad.npz", **content)
    with pytest.raises(DataError) as info:
        import_npz(npz, tmp_path / "out", labels=OCT)
    assert "bad.npz" in str(info.value) and words in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz"]  # nothing written


def test_not_an_npz(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("not numpy")
    with pytest.raises(DataError, match="notes.npz: not a readable .npz"):
        import_npz(text, tmp_path / "out")
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(DataError, match="single array"):
        import_npz(single, tmp_path / "out")
    with pytest.raises(DataError, match="does not exist"):
        import_npz(tmp_path / "missing.npz", tmp_path / "out")


def test_bad_names_and_existing_output(arrays, tmp_path):
    npz = _save(tmp_path / "ok.npz", **arrays)
    with pytest.raises(ConfigError, match="folder name"):
        import_npz(npz, tmp_path / "out", labels=["CNV", "../x", "DRUSEN", "NORMAL"])
    with pytest.raises(ConfigError, match="unique"):
        import_npz(npz, tmp_path / "out", labels=["A", "A", "B", "C"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        import_npz(npz, tmp_path / "out", labels=OCT)
