"""The recipe components end to end on real CXR: EMA + balanced + CLAHE + discriminative LRs in
training, TTA at evaluation, each recorded where a later step (or a reader) finds it."""

import json

from cli import assert_one_line_error, fedbridge, json_out, ok

WEIGHTS_NAME = "mobilenetv1_025_tfslim_quant_in1k_128.safetensors"  # as tests/conftest.py


def test_train_with_ema_balanced_clahe_then_evaluate_with_tta(cxr_parts, weights_root, tmp_path):
    """A tiny ImageNet MobileNet-V1 0.25 @ 64 px (export refuses a model at chance level)."""
    weights = weights_root / WEIGHTS_NAME
    bundle = tmp_path / "model"
    json_out(
        "train", cxr_parts["train"], "--out", bundle, "--init", weights,
        "--model", "mobilenetv1_025", "--image-size", "64", "--epochs", "3", "--lr", "2e-3",
        "--batch-size", "32", "--augment-per-sample", "0", "--val-fraction", "0.2",
        "--ema-decay", "0.9", "--balanced", "--intensity", "clahe", "--backbone-lr-scale", "0.5",
        "--device", "cpu", "--json",
    )  # fmt: skip
    record = json.loads((bundle / "model.json").read_text())
    assert record["spec"]["intensity"] == "clahe"
    assert record["spec"]["modality"] == "cxr"  # the default preset's, sealed
    config = record["training"]["config"]
    assert config["ema_decay"] == 0.9 and config["balanced"] is True
    assert config["intensity"] == "clahe" and config["backbone_lr_scale"] == 0.5
    # 3 epochs × 7 batches = 21 steps ≥ the horizon 1 / (1 − 0.9) = 10: the EMA ran
    assert record["training"]["ema"] == {"decay": 0.9, "steps": 21, "horizon": 10, "applied": True}
    assert all("val_loss" in row for row in record["training"]["history"])  # the EMA validated

    common = ("evaluate", bundle, cxr_parts["test"], "--bootstrap", "0", "--device", "cpu")
    plain = json_out(*common, "--json")
    tta = json_out(*common, "--tta", "--json")
    assert "tta" not in plain
    assert tta["tta"][0] == "identity" and "hflip" not in tta["tta"]  # CXR is never flipped
    assert len(tta["tta"]) == 6 and tta["n"] == plain["n"] > 100
    assert 0 <= tta["accuracy"] <= 1

    # the bedside: the ONNX metadata carries the CLAHE spec and the logits equal training's
    onnx_path = tmp_path / "model.onnx"
    ok("export", "onnx", bundle, "--out", onnx_path, "--val-data", cxr_parts["val"])
    _bedside_equals_training(bundle, onnx_path, cxr_parts["test"])


def _bedside_equals_training(bundle, onnx_path, folder):
    import numpy as np
    import torch

    from fedbridge_edge.preprocess import list_images, load
    from fedbridge_edge.runtime import Predictor
    from fedbridge_shared.data.tensors import load_resized, to_tensor
    from fedbridge_shared.models import model_from_bundle
    from fedbridge_shared.spec import load_bundle

    predictor = Predictor(onnx_path, backend="onnxruntime")
    assert predictor.meta.spec["intensity"] == predictor.spec.intensity == "clahe"
    loaded = load_bundle(bundle)
    model = model_from_bundle(loaded).eval()
    paths = list_images([folder])[::25]
    x_edge = np.stack([load(p, predictor.spec)[0] for p in paths])
    x_train = torch.stack([to_tensor(load_resized(p, 64), loaded.spec) for p in paths])
    np.testing.assert_array_equal(x_edge, x_train.numpy())
    with torch.no_grad():
        expected = model(x_train).numpy()
    np.testing.assert_allclose(predictor.run(x_edge)["logits"], expected, atol=1e-4)


def test_the_modality_is_sealed_inherited_and_decides_augmentation_and_tta(oct_root, tmp_path):
    """`--modality oct` at the first stage; a later stage from that bundle inherits it and its
    augmentation preset without being told; TTA flips only an OCT model."""
    base = ("--model", "test_efficientnet", "--image-size", "32", "--epochs", "1",
            "--augment-per-sample", "0", "--val-fraction", "0", "--device", "cpu",
            "--batch-size", "64", "--ema-decay", "0")  # fmt: skip
    first, second = tmp_path / "bridge", tmp_path / "target"
    ok("bridge", oct_root, "--out", first, "--init", "none", "--modality", "oct", *base)
    ok("train", oct_root, "--out", second, "--init", first, *base[2:])
    for bundle in (first, second):
        record = json.loads((bundle / "model.json").read_text())
        assert record["spec"]["modality"] == "oct", bundle
        assert record["training"]["config"]["augment"] == "oct", bundle
    tta = json_out("evaluate", second, oct_root, "--bootstrap", "0", "--tta", "--json",
                   "--device", "cpu")  # fmt: skip
    assert "hflip" in tta["tta"]
    result = fedbridge("train", oct_root, "--out", tmp_path / "x", "--modality", "mri", *base)
    assert result.returncode != 0 and "mri" in result.stderr


def test_bad_recipe_options_are_one_line_errors(cxr_parts, tmp_path):
    base = ("train", cxr_parts["train"], "--out", tmp_path / "m", "--init", "none",
            "--model", "test_efficientnet", "--image-size", "32", "--device", "cpu")  # fmt: skip
    assert_one_line_error(fedbridge(*base, "--ema-decay", "1.0"), "--ema-decay 1.0")
    assert_one_line_error(fedbridge(*base, "--backbone-lr-scale", "0"), "--backbone-lr-scale 0")
    result = fedbridge(*base, "--intensity", "gamma")
    assert result.returncode != 0 and "gamma" in result.stderr
    assert not (tmp_path / "m").exists()


def test_the_default_ema_is_not_applied_to_a_stage_shorter_than_its_horizon(cxr_parts, tmp_path):
    """`train` defaults to --ema-decay 0.99 (horizon 100 steps); 1 epoch of 8 batches keeps the
    raw weights, says so, and records it."""
    bundle = tmp_path / "m"
    result = ok(
        "train", cxr_parts["train"], "--out", bundle, "--init", "none",
        "--model", "test_efficientnet", "--image-size", "32", "--epochs", "1",
        "--batch-size", "36", "--augment-per-sample", "0", "--val-fraction", "0.2",
        "--device", "cpu",
    )  # fmt: skip
    training = json.loads((bundle / "model.json").read_text())["training"]
    assert training["config"]["ema_decay"] == 0.99
    ema = training["ema"]
    assert (ema["horizon"], ema["applied"]) == (100, False) and 0 < ema["steps"] < 100
    assert "--ema-decay 0.99 not applied" in " ".join(result.stderr.split())
