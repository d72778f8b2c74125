"""Issue #30: model files that are not what they claim — FIFOs, /dev/zero, huge sparse weights,
an ONNX graph re-sealed with another model's record — each refused in one line, nothing read."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import onnx
import pytest
from cli import assert_one_line_error, fedbridge

from fedbridge_edge.modelfile import KEY_EDGE, KEY_RECORD, seal
from fedbridge_edge.preprocess import list_images


@pytest.fixture(scope="module")
def image(cxr_parts) -> Path:
    return list_images([cxr_parts["test"]])[0]


def predict(model: Path, image: Path, out: Path):
    return fedbridge("edge", "predict", model, image, "--out", out, timeout=300)


def test_a_fifo_or_dev_zero_model_is_refused_unread(image, tmp_path):
    fifo = tmp_path / "fifo.onnx"
    os.mkfifo(fifo)
    assert_one_line_error(predict(fifo, image, tmp_path / "o1"), str(fifo), "not a regular file")
    zero = tmp_path / "zero.onnx"
    zero.symlink_to("/dev/zero")
    assert_one_line_error(predict(zero, image, tmp_path / "o2"), str(zero), "not a regular file")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_a_huge_sparse_weights_file_is_refused_before_it_is_read(cxr_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(cxr_bundle, bundle)
    weights = bundle / "model.safetensors"
    weights.unlink()
    with open(weights, "wb") as fh:
        fh.truncate(int(2.5 * 2**30))  # sparse: no disk, 2.5 GiB to anyone who reads it
    result = fedbridge("export", "onnx", bundle, "--out", tmp_path / "m.onnx", timeout=600)
    assert_one_line_error(result, str(weights), "over the", "FEDBRIDGE_MAX_MODEL_BYTES")
    assert not (tmp_path / "m.onnx").exists()


def _reseal(source: Path, out: Path, edit) -> Path:
    model = onnx.load(str(source))
    props = {p.key: p.value for p in model.metadata_props}
    record, edge = json.loads(props[KEY_RECORD]), json.loads(props[KEY_EDGE])
    edit(record, edge)
    out.write_bytes(seal(model, record, edge))
    return out


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("labels", "labels"),
        ("image_size", "input dimension 2"),
        ("in_chans", "input dimension 1"),
        ("threshold", "OOD threshold nan is not a finite number"),
    ],
)
def test_a_graph_resealed_with_another_record_is_refused_in_one_line(
    edge_onnx, image, tmp_path, case, needle
):
    def edit(record: dict, edge: dict) -> None:
        spec = record["spec"]
        if case == "labels":
            spec["labels"] = [*spec["labels"], "EXTRA"]
            codes = edge.get("label_codes")
            if isinstance(codes, dict):
                codes["EXTRA"] = next(iter(codes.values()))
        elif case == "image_size":
            spec["image_size"] = spec["image_size"] * 2
        elif case == "in_chans":
            spec["in_chans"] = 1 if spec.get("in_chans", 3) == 3 else 3
        else:
            edge["ood"]["threshold"] = float("nan")

    model = _reseal(edge_onnx, tmp_path / f"{case}.onnx", edit)
    result = predict(model, image, tmp_path / "out")
    line = assert_one_line_error(result, str(model), "does not match its embedded record", needle)
    if case == "labels":  # the fixture's graph has n classes, the edited record n + 1 labels
        n = int(line.split("logits has ")[1].split()[0])
        assert f"the record lists {n + 1} labels" in line
    assert not (tmp_path / "out").exists()
