"""Model factory and the --init rules, with the real ImageNet weights in ../shared/weights."""

import pytest
import torch
from safetensors.torch import load_file

from fedbridge_shared.errors import ConfigError
from fedbridge_shared.models import build_model, find_local_imagenet_weights, init_model
from fedbridge_shared.spec import save_bundle

LABELS = ("A", "B", "C")


def test_init_none_uses_timm_defaults():
    model, spec = init_model("none", LABELS, "test_efficientnet", 64)
    assert spec.init == {"kind": "none"} and spec.image_size == 64
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 3)


def test_init_from_local_weights_file_loads_backbone_and_new_head(weights_root):
    path = weights_root / "mobilenetv1_025_tfslim_quant_in1k_128.safetensors"
    model, spec = init_model(str(path), LABELS)
    # the sidecar JSON decides arch, kwargs, input size and mean/std
    assert spec.arch == "mobilenetv1_025" and spec.timm_kwargs == {"pad_type": "same"}
    assert spec.image_size == 128 and spec.mean == (0.5, 0.5, 0.5)
    assert spec.init["kind"] == "imagenet" and len(spec.init["sha256"]) == 64
    source = load_file(str(path))
    own = model.state_dict()
    assert torch.equal(own["conv_stem.weight"], source["conv_stem.weight"])
    assert own["classifier.weight"].shape == (3, 256)  # new head for 3 classes


def test_imagenet_init_finds_local_weights_through_env(weights_root, monkeypatch):
    monkeypatch.setenv("FEDBRIDGE_WEIGHTS_DIR", str(weights_root))
    assert find_local_imagenet_weights("mobilenetv2_100").name.startswith("mobilenetv2_100")
    assert find_local_imagenet_weights("resnet50") is None
    _, spec = init_model("imagenet", LABELS, "mobilenetv1_025")
    assert spec.init["kind"] == "imagenet" and spec.init["source"].endswith(".safetensors")


def test_weights_for_another_arch_are_refused(weights_root):
    path = weights_root / "mobilenetv1_025_tfslim_quant_in1k_128.safetensors"
    with pytest.raises(ConfigError, match="holds 'mobilenetv1_025' weights"):
        init_model(str(path), LABELS, arch="mobilenetv2_100")


def test_init_from_bundle_keeps_head_for_same_labels_and_replaces_it_otherwise(tmp_path):
    model, spec = init_model("none", LABELS, "test_efficientnet", 64)
    bundle = save_bundle(tmp_path / "b", spec, model.state_dict())
    same, same_spec = init_model(str(bundle), LABELS)
    assert same_spec.init["head"] == "kept" and same_spec.image_size == 64
    for k, v in model.state_dict().items():
        assert torch.equal(same.state_dict()[k], v), k
    other, other_spec = init_model(str(bundle), ("X", "Y"))
    assert other_spec.init["head"] == "new"
    assert other.state_dict()["classifier.weight"].shape[0] == 2
    assert torch.equal(
        other.state_dict()["conv_stem.weight"], model.state_dict()["conv_stem.weight"]
    )


def test_bad_init_values_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="not 'none', 'imagenet'"):
        init_model("missing-thing", LABELS)
    with pytest.raises(ConfigError, match="weights file not found"):
        init_model(str(tmp_path / "w.safetensors"), LABELS)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        init_model("none", ("A",))
    with pytest.raises(ConfigError, match="unknown timm model"):
        init_model("none", LABELS, "no_such_net")


def test_build_model_matches_spec():
    model, spec = init_model("none", LABELS, "test_resnet", 64)
    rebuilt = build_model(spec)
    assert rebuilt.get_classifier().out_features == len(LABELS) == spec.num_classes
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }  # the spec alone rebuilds the same architecture, tensor for tensor
    x = torch.zeros(2, spec.in_chans, spec.image_size, spec.image_size)
    assert rebuilt.eval()(x).shape == (2, len(LABELS))


def test_weights_of_the_wrong_shape_are_refused_naming_the_tensor(tmp_path):
    # a bundle whose safetensors was replaced (and re-hashed, re-sealed) with a 3-class head
    from fedbridge_shared.errors import BundleError
    from fedbridge_shared.models import build_model, init_model, model_from_bundle
    from fedbridge_shared.spec import ModelSpec, load_bundle, save_bundle

    model, spec = init_model("none", ("A", "B"), "test_efficientnet", 32)
    three = build_model(ModelSpec(**{**spec.__dict__, "labels": ("A", "B", "C")}))
    out = save_bundle(tmp_path / "b", spec, three.state_dict())
    with pytest.raises(BundleError, match=r"tensor classifier\.(weight|bias) has shape \(3,"):
        model_from_bundle(load_bundle(out))
    assert model_from_bundle(load_bundle(save_bundle(tmp_path / "ok", spec, model.state_dict())))
