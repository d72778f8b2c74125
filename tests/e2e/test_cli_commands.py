"""The remaining commands through the real CLI: import-npz, split errors, --preset paper."""

import json
from pathlib import Path

import numpy as np
import pytest
from badinputs import make_class_tree
from cli import assert_one_line_error, fedbridge, ok
from PIL import Image


def _octmnist(oct_root, path, per_class=8):
    """A MedMNIST-format archive (28×28) made from real OCT scans."""
    images, labels = [], []
    for k, cls in enumerate(("CNV", "DME", "DRUSEN", "NORMAL")):
        for p in sorted((oct_root / cls).iterdir())[:per_class]:
            with Image.open(p) as img:
                images.append(np.asarray(img.convert("L").resize((28, 28))))
            labels.append([k])
    n = len(images)
    np.savez(
        path,
        train_images=np.stack(images),
        train_labels=np.array(labels, np.uint8),
        val_images=np.zeros((0, 28, 28), np.uint8),
        val_labels=np.zeros((0, 1), np.uint8),
        test_images=np.stack(images[: n // 4]),
        test_labels=np.array(labels[: n // 4]),
    )
    return path


def test_import_npz_then_train_on_it(oct_root, tmp_path):
    npz = _octmnist(oct_root, tmp_path / "octmnist.npz")
    out = tmp_path / "oct"
    result = ok("data", "import-npz", npz, "--out", out, "--labels", "CNV,DME,DRUSEN,NORMAL")
    assert "wrote 40 images" in result.stdout
    # the test split holds the first 8 images, all CNV: 8 train + 8 test
    assert len(list((out / "CNV").glob("*.png"))) == 16
    assert len(list((out / "DME").glob("*.png"))) == 8
    ok(
        "train",
        out,
        "--out",
        tmp_path / "b",
        "--model",
        "test_efficientnet",
        "--init",
        "none",
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--augment",
        "oct",
        "--augment-per-sample",
        "1",
    )
    record = json.loads((tmp_path / "b" / "model.json").read_text())
    assert record["spec"]["labels"] == ["CNV", "DME", "DRUSEN", "NORMAL"]


def test_import_npz_refuses_a_non_archive(tmp_path):
    bad = tmp_path / "x.npz"
    bad.write_text("not a zip")
    result = fedbridge("data", "import-npz", bad, "--out", tmp_path / "o")
    assert_one_line_error(result, "x.npz")
    assert not (tmp_path / "o").exists()


def test_split_refuses_an_existing_output_folder(cxr_root, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    result = fedbridge("data", "split", cxr_root, "--out", tmp_path / "out")
    assert_one_line_error(result, "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


@pytest.mark.slow
def test_preset_paper_trains_inception_v4_with_tenfold_expansion(cxr_root, tmp_path):
    data = make_class_tree(tmp_path / "data", cxr_root, per_class=2)
    out = tmp_path / "paper"
    # a small input size keeps Inception-V4 affordable on a CPU; everything else is the preset
    ok(
        "train",
        data,
        "--out",
        out,
        "--preset",
        "paper",
        "--init",
        "none",
        "--image-size",
        "96",
        "--epochs",
        "1",
        "--val-fraction",
        "0",
        "--batch-size",
        "8",
    )
    record = json.loads((out / "model.json").read_text())
    assert record["spec"]["arch"] == "inception_v4"
    assert record["training"]["config"]["augment_per_sample"] == 10
    assert record["training"]["counts"]["train"] == {c: 2 for c in record["spec"]["labels"]}


def test_a_missing_extra_is_named_in_one_line():
    from fedbridge.cli.extras import missing_extra_message

    line = missing_extra_message("torch", ["train", "data", "--out", "x"])
    assert line == (
        "`fedbridge train data` needs the 'train' extra (missing module torch): "
        "pip install 'fedbridge[train]'"
    )
    assert "'simulation' extra" in missing_extra_message("ray._private", ["federate", "simulate"])
    assert "'client' extra" in missing_extra_message("flwr", ["site", "join"])
    assert "'export' extra" in missing_extra_message("torch", ["export", "onnx", "b"])
    assert "'edge' extra" in missing_extra_message("onnxruntime", ["edge", "predict"])
    assert missing_extra_message("yaml", ["data", "check"]) is None  # not ours: a real bug


def test_version_prints_the_package_version_and_exits_zero():
    from fedbridge_shared import __version__

    result = ok("--version")
    assert result.stdout.strip() == f"fedbridge {__version__}"
    metadata = Path(__file__).resolve().parents[2] / "pyproject.toml"
    assert f'version = "{__version__}"' in metadata.read_text()  # one version, not two


def test_site_join_refuses_a_label_map_naming_no_class_folder_before_connecting(cxr_root, tmp_path):
    result = fedbridge(
        "site", "join", "--superlink", "127.0.0.1:9", "--data", cxr_root, "--name", "a",
        "--insecure", "--label-map", "ADULT_PNEUMONIA=BACTERIAL_PNEUMONIA|VIRAL_PNEUMONIA",
        "--log", tmp_path / "a.log",
    )  # fmt: skip
    assert_one_line_error(result, "--label-map ADULT_PNEUMONIA", "no class folder")
    assert not (tmp_path / "a.log").exists()  # nothing started
