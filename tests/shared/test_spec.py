"""Bundle save/load: round trip, integrity check, atomic writes."""

import json

import pytest
import torch

from fedbridge_shared.errors import BundleError
from fedbridge_shared.spec import ModelSpec, load_bundle, save_bundle

SPEC = ModelSpec(arch="test_efficientnet", labels=("A", "B"), image_size=64)


def _state():
    return {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "n": torch.tensor(3)}


def test_round_trip_keeps_spec_weights_and_records(tmp_path):
    # Prepare / Execute
    out = save_bundle(tmp_path / "b", SPEC, _state(), {"stage": "x"}, {"val": {"accuracy": 0.5}})
    bundle = load_bundle(out)
    # Assert
    assert bundle.spec == SPEC
    assert torch.equal(bundle.state_dict["w"], _state()["w"])
    assert bundle.training == {"stage": "x"}
    assert bundle.metrics["val"]["accuracy"] == 0.5
    record = json.loads((out / "model.json").read_text())
    assert record["weights_sha256"] == bundle.sha256 and len(bundle.sha256) == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temp folders left


def test_modified_weights_are_refused(tmp_path):
    out = save_bundle(tmp_path / "b", SPEC, _state())
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256.*does not match"):
        load_bundle(out)


def test_missing_model_json_and_nan_weights_are_refused(tmp_path):
    out = save_bundle(tmp_path / "b", SPEC, _state())
    (out / "model.json").unlink()
    with pytest.raises(BundleError, match="model.json: missing"):
        load_bundle(out)
    bad = save_bundle(tmp_path / "nan", SPEC, {"w": torch.tensor([1.0, float("nan")])})
    with pytest.raises(BundleError, match="tensor w contains NaN"):
        load_bundle(bad)


def test_overwrite_replaces_a_bundle_but_not_another_folder(tmp_path):
    save_bundle(tmp_path / "b", SPEC, _state())
    save_bundle(tmp_path / "b", SPEC, {"w": torch.zeros(1)})
    assert list(load_bundle(tmp_path / "b").state_dict) == ["w"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(BundleError, match="not a fedbridge bundle"):
        save_bundle(other, SPEC, _state())
    assert (other / "keep.txt").read_text() == "x"


def test_unknown_spec_keys_are_refused():
    d = SPEC.to_dict() | {"colour": "red"}
    with pytest.raises(BundleError, match="unknown keys: colour"):
        ModelSpec.from_dict(d)


def test_loaded_weights_do_not_change_when_the_file_is_edited_afterwards(tmp_path):
    """The hash is checked on the very bytes the tensors come from (no memory map of the file)."""
    save_bundle(tmp_path / "b", SPEC, _state())
    loaded = load_bundle(tmp_path / "b")
    before = {k: v.clone() for k, v in loaded.state_dict.items()}
    weights = tmp_path / "b" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))  # in place: same inode
    assert all(torch.equal(before[k], loaded.state_dict[k]) for k in before)
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(tmp_path / "b")


def test_protocol_round_trips_through_plain_config_and_metrics():
    from fedbridge_shared.protocol import (
        NUM_EXAMPLES,
        SERVER_ROUND,
        SPEC_JSON,
        EvalReply,
        LocalSettings,
        RoundTask,
        TrainReply,
    )

    task = RoundTask({"arch": "x", "labels": ["A", "B"]}, LocalSettings(lr=0.1), 2, 5)
    config = task.to_config()
    assert config[SERVER_ROUND] == 2 and isinstance(config[SPEC_JSON], str) and config["lr"] == 0.1
    assert RoundTask.from_config(config) == task
    reply = TrainReply(num_examples=7, train_loss=0.5, train_accuracy=0.75, seconds=1.0)
    metrics = reply.to_metrics()
    assert metrics[NUM_EXAMPLES] == 7 and isinstance(metrics[NUM_EXAMPLES], int)
    assert TrainReply.from_metrics(metrics) == reply
    assert EvalReply.from_metrics({"num-examples": 3, "val-loss": 0.2}).val_loss == 0.2
    counted = EvalReply(num_examples=5, val_accuracy=0.6, class_counts=(2, 3))
    assert counted.to_metrics()["class-count-1"] == 3
    back = EvalReply.from_metrics(counted.to_metrics())
    assert back == counted and back.counts_by_label(("A", "B")) == {"A": 2, "B": 3}
    assert back.counts_by_label(("A", "B", "C")) == {}  # a count per label, or none
    hits = EvalReply(num_examples=5, class_counts=(2, 3), class_correct=(1, 3))
    assert hits.to_metrics()["class-correct-0"] == 1
    back = EvalReply.from_metrics(hits.to_metrics())
    assert back == hits and back.correct_by_label(("A", "B")) == {"A": 1, "B": 3}
    assert TrainReply.from_metrics(hits.to_metrics()).class_counts == (2, 3)


def _edit_record(out, change):
    path = out / "model.json"
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


@pytest.mark.parametrize(
    "change",
    [
        lambda r: r["spec"].update(labels=["B", "A"]),  # diagnoses silently relabelled
        lambda r: r["spec"].update(image_size=96),
        lambda r: r["spec"].update(mean=[0.4, 0.5, 0.5]),
        lambda r: r["spec"].update(arch="resnet18"),
    ],
    ids=["labels-swapped", "image-size", "mean", "arch"],
)
def test_a_changed_spec_is_refused_like_a_changed_weight(tmp_path, change):
    out = save_bundle(tmp_path / "b", SPEC, _state())
    _edit_record(out, change)
    with pytest.raises(BundleError, match="seal mismatch"):
        load_bundle(out)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda r: r["spec"].update(labels=["A", "A"]), "distinct"),
        (lambda r: r["spec"].update(image_size=0), "image_size 0"),
        (lambda r: r["spec"].update(image_size=-3), "image_size -3"),
        (lambda r: r["spec"].update(std=[0.0, 0.5, 0.5]), "std"),
        (lambda r: r["spec"].update(mean=[float("nan")] * 3), "finite"),
        (lambda r: r["spec"].update(timm_kwargs={"checkpoint_path": "/etc/passwd"}), "not allowed"),
        (lambda r: r["spec"].update(timm_kwargs={"pretrained": True}), "not allowed"),
        (lambda r: r.update(spec=None), "'spec' must be an object"),
        (lambda r: r["spec"].update(labels="AB"), "list of labels"),
    ],
)
def test_a_malformed_spec_is_refused_by_name(tmp_path, change, needle):
    out = save_bundle(tmp_path / "b", SPEC, _state())
    _edit_record(out, change)
    with pytest.raises(BundleError, match=needle):
        load_bundle(out)


def test_deeply_nested_json_is_refused_not_a_crash(tmp_path):
    out = save_bundle(tmp_path / "b", SPEC, _state())
    (out / "model.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BundleError, match="unreadable JSON"):
        load_bundle(out)


def test_format_1_bundles_are_refused_with_a_reason(tmp_path):
    out = save_bundle(tmp_path / "b", SPEC, _state())
    _edit_record(out, lambda r: r.update(format="fedbridge-bundle/1"))
    with pytest.raises(BundleError, match="not sealed; retrain"):
        load_bundle(out)


def test_rewriting_a_bundle_keeps_files_it_did_not_write(tmp_path):
    out = save_bundle(tmp_path / "b", SPEC, _state())
    (out / "NOTES.txt").write_text("site admin's notes\n")
    (out / "report").mkdir()
    (out / "report" / "report.html").write_text("<html></html>")
    state = {k: v + 1 for k, v in _state().items()}
    save_bundle(out, SPEC, state)
    assert (out / "NOTES.txt").read_text() == "site admin's notes\n"
    assert (out / "report" / "report.html").exists()
    assert torch.equal(load_bundle(out).state_dict["w"], state["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # nothing left beside it


def test_a_swap_killed_between_its_renames_is_repaired_on_the_next_write(tmp_path):
    out = save_bundle(tmp_path / "b", SPEC, _state())
    (out / "NOTES.txt").write_text("keep me\n")
    # the state a SIGKILL leaves after `out` was moved aside and before the new one arrived
    (tmp_path / "b").rename(tmp_path / ".b.old")
    from fedbridge_shared.files import recover_dir

    recover_dir(tmp_path / "b")
    assert load_bundle(out).sha256 and (out / "NOTES.txt").exists()
    # and the state after the new one arrived, before the old one's other files came back
    save_bundle(tmp_path / "new", SPEC, {k: v * 2 for k, v in _state().items()})
    (tmp_path / "b").rename(tmp_path / ".b.old")
    (tmp_path / "new").rename(tmp_path / "b")
    save_bundle(out, SPEC, {k: v * 2 for k, v in _state().items()})
    assert (out / "NOTES.txt").read_text() == "keep me\n"
    assert not (tmp_path / ".b.old").exists()


def test_a_nan_in_the_record_is_refused_by_name_and_nothing_is_written(tmp_path):
    from fedbridge_shared.errors import FedbridgeError

    history = [{"round": 1, "train_loss": 0.5}, {"round": 2, "train_loss": float("nan")}]
    out = tmp_path / "b"
    with pytest.raises(
        FedbridgeError, match=r"b/model.json: training.history\[1\].train_loss is nan"
    ):
        save_bundle(out, SPEC, _state(), {"history": history})
    assert list(tmp_path.iterdir()) == []


def test_modality_is_sealed_and_older_bundles_read_unchanged():
    from fedbridge_shared.modality import modality_for_stage
    from fedbridge_shared.spec import ModelSpec, seal_of

    plain = ModelSpec(arch="resnet18", labels=("A", "B"), image_size=64)
    assert plain.modality == "other" and "modality" not in plain.to_dict()  # old seals hold
    oct_spec = ModelSpec.from_dict({**plain.to_dict(), "modality": "oct"})
    assert oct_spec.modality == "oct" and oct_spec.to_dict()["modality"] == "oct"
    assert seal_of(oct_spec, "0" * 64) != seal_of(plain, "0" * 64)
    with pytest.raises(BundleError, match="modality 'mri'"):
        ModelSpec.from_dict({**plain.to_dict(), "modality": "mri"})
    assert modality_for_stage(requested="oct", inherited="cxr", augment="cxr") == "oct"
    assert modality_for_stage(requested=None, inherited="oct", augment="cxr") == "oct"
    assert modality_for_stage(requested=None, inherited="other", augment="none") == "other"
    assert modality_for_stage(requested=None, inherited="other", augment="") == "cxr"
