"""The recipe components end to end on real CXR: EMA + balanced + CLAHE in training, TTA at
evaluation, each recorded where a later step (or a reader) finds it."""

import json

from cli import assert_one_line_error, fedbridge, json_out


def test_train_with_ema_balanced_clahe_then_evaluate_with_tta(cxr_parts, tmp_path):
    bundle = tmp_path / "model"
    json_out(
        "train", cxr_parts["train"], "--out", bundle, "--init", "none",
        "--model", "test_efficientnet", "--image-size", "64", "--epochs", "2",
        "--batch-size", "32", "--augment-per-sample", "0", "--val-fraction", "0.2",
        "--ema-decay", "0.9", "--balanced", "--intensity", "clahe", "--device", "cpu", "--json",
    )  # fmt: skip
    record = json.loads((bundle / "model.json").read_text())
    assert record["spec"]["intensity"] == "clahe"
    config = record["training"]["config"]
    assert config["ema_decay"] == 0.9 and config["balanced"] is True
    assert config["intensity"] == "clahe"
    assert all("val_loss" in row for row in record["training"]["history"])  # the EMA validated

    common = ("evaluate", bundle, cxr_parts["test"], "--bootstrap", "0", "--device", "cpu")
    plain = json_out(*common, "--json")
    tta = json_out(*common, "--tta", "--json")
    assert "tta" not in plain
    assert tta["tta"][0] == "identity" and "hflip" not in tta["tta"]  # CXR is never flipped
    assert len(tta["tta"]) == 6 and tta["n"] == plain["n"] > 100
    assert 0 <= tta["accuracy"] <= 1


def test_bad_recipe_options_are_one_line_errors(cxr_parts, tmp_path):
    base = ("train", cxr_parts["train"], "--out", tmp_path / "m", "--init", "none",
            "--model", "test_efficientnet", "--image-size", "32", "--device", "cpu")  # fmt: skip
    assert_one_line_error(fedbridge(*base, "--ema-decay", "1.0"), "--ema-decay 1.0")
    result = fedbridge(*base, "--intensity", "gamma")
    assert result.returncode != 0 and "gamma" in result.stderr
    assert not (tmp_path / "m").exists()
