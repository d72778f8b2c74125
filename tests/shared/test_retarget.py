"""Bridge → target across label sets: classifier rows carried by label name (an oracle test)."""

from __future__ import annotations

import json

import torch

from fedbridge_shared.models import init_model
from fedbridge_shared.spec import load_bundle, save_bundle

BRIDGE = ("NORMAL", "BACTERIAL_PNEUMONIA", "VIRAL_PNEUMONIA")  # Kermany: no COVID19
TARGET = ("BACTERIAL_PNEUMONIA", "COVID19", "NORMAL", "VIRAL_PNEUMONIA")


def _bridge_bundle(tmp_path, labels=BRIDGE):
    torch.manual_seed(0)
    model, spec = init_model("none", labels, "test_efficientnet", 64)
    with torch.no_grad():
        for p in model.get_classifier().parameters():
            p.normal_()  # a trained-looking head: every row distinct and non-zero
    return save_bundle(tmp_path / "bridge", spec, model.state_dict())


def test_carried_rows_equal_the_source_rows_and_new_rows_are_fresh(tmp_path):
    bundle = load_bundle(_bridge_bundle(tmp_path))
    model, spec = init_model(str(bundle.path), TARGET)
    head = model.get_classifier()
    src_w, src_b = bundle.state_dict["classifier.weight"], bundle.state_dict["classifier.bias"]
    for row, label in enumerate(TARGET):
        if label in BRIDGE:
            torch.testing.assert_close(head.weight[row], src_w[BRIDGE.index(label)])
            torch.testing.assert_close(head.bias[row], src_b[BRIDGE.index(label)])
        else:
            assert not head.weight[row].any() and head.bias[row] == 0
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    for key, value in backbone.items():
        torch.testing.assert_close(value, bundle.state_dict[key])
    assert spec.labels == TARGET and spec.init["head"] == "mapped"
    assert spec.init["label_map"] == {
        "BACTERIAL_PNEUMONIA": "BACTERIAL_PNEUMONIA",
        "COVID19": None,
        "NORMAL": "NORMAL",
        "VIRAL_PNEUMONIA": "VIRAL_PNEUMONIA",
    }


def test_same_labels_in_another_order_are_permuted_not_copied_by_position(tmp_path):
    bundle = load_bundle(_bridge_bundle(tmp_path))
    order = tuple(reversed(BRIDGE))
    model, spec = init_model(str(bundle.path), order)
    w = bundle.state_dict["classifier.weight"]
    for row, label in enumerate(order):
        torch.testing.assert_close(model.get_classifier().weight[row], w[BRIDGE.index(label)])
    x = torch.randn(2, 3, 64, 64)
    source, _ = init_model(str(bundle.path), BRIDGE)
    source.eval(), model.eval()
    with torch.no_grad():  # the same predictions, per label name
        torch.testing.assert_close(model(x), source(x)[:, [BRIDGE.index(k) for k in order]])
    assert spec.init["head"] == "mapped"


def test_no_shared_label_gives_a_new_head_and_the_mapping_reaches_model_json(tmp_path):
    bundle = _bridge_bundle(tmp_path, labels=("CNV", "DME"))
    model, spec = init_model(str(bundle), TARGET)
    assert spec.init["head"] == "new" and not any(spec.init["label_map"].values())
    assert not model.get_classifier().weight.any()
    saved = save_bundle(tmp_path / "target", spec, model.state_dict())
    record = json.loads((saved / "model.json").read_text())
    assert record["spec"]["init"]["label_map"]["COVID19"] is None
    assert record["spec"]["init"]["source_labels"] == ["CNV", "DME"]
