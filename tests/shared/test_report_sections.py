"""The report's lineage: the init chain of a real retargeted bundle, oldest step first."""

from __future__ import annotations

from fedbridge_shared.models import init_model, retarget
from fedbridge_shared.report_sections import lineage_steps
from fedbridge_shared.spec import load_bundle, save_bundle


def test_lineage_walks_random_init_bridge_bundle_retarget_to_this_bundle(tmp_path):
    model, spec = init_model("none", ("NORMAL", "PNEUMONIA"), "test_efficientnet", 32)
    training = {"stage": "bridge", "data": "/data/kermany", "counts": {"train": {"NORMAL": 7}}}
    bridge = load_bundle(save_bundle(tmp_path / "bridge", spec, model.state_dict(), training))
    _, target = retarget(bridge, ("COVID19", "NORMAL"))
    steps = lineage_steps(target, {"stage": "train", "history": [{"epoch": 1}]}, "f" * 64)
    assert [s["step"] for s in steps] == ["random initialisation", "bridge bundle",
                                          "this bundle (train)"]  # fmt: skip
    middle = steps[1]["detail"]
    assert bridge.sha256 in middle and "data /data/kermany" in middle and "train 7" in middle
    assert "classifier mapped: from NORMAL, PNEUMONIA to COVID19 new, NORMAL ← NORMAL" in middle
    assert steps[2]["detail"] == "stage train; 1 epoch(s); weights sha256 " + "f" * 64
    # the bridge bundle moved away or replaced: only what model.json recorded is shown
    (tmp_path / "bridge" / "model.json").unlink()
    again = lineage_steps(target, {"stage": "train"}, "f" * 64)[1]["detail"]
    assert bridge.sha256 in again and "/data/kermany" not in again


def test_lineage_names_the_imagenet_weights_file_or_hub():
    from types import SimpleNamespace

    file_init = {"kind": "imagenet", "source": "/w/x.safetensors", "sha256": "ab",
                 "description": "timm/x.in1k"}  # fmt: skip
    hub_init = {"kind": "imagenet", "source": "timm hub: timm/x.in1k"}
    for init, detail in ((file_init, "timm/x.in1k (/w/x.safetensors); sha256 ab"),
                         (hub_init, "timm hub: timm/x.in1k")):  # fmt: skip
        first = lineage_steps(SimpleNamespace(init=init), {"stage": "bridge"}, "c")[0]
        assert first == {"step": "ImageNet weights", "detail": detail}
