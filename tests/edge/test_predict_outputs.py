"""`edge predict` outputs never collide or overwrite: names unique by construction, --out
inside the inputs refused, --force replaces the earlier run whole and keeps a person's files,
a failed run leaves the earlier folder as it was."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cli import assert_one_line_error, fedbridge, ok

from fedbridge_edge.outputs import MARKER, encode, output_names
from fedbridge_edge.preprocess import list_images


@pytest.fixture(scope="module")
def two_images(cxr_parts) -> list[Path]:
    return list_images([cxr_parts["test"]])[:2]


def _folder(root: Path, images: list[Path]) -> Path:
    """``a.png``, ``a-2.png`` and ``sub/a.png``: the names that used to collide."""
    (root / "sub").mkdir(parents=True)
    shutil.copy(images[0], root / "a.png")
    shutil.copy(images[1], root / "a-2.png")
    shutil.copy(images[1], root / "sub" / "a.png")
    return root


def test_names_are_unique_by_construction(tmp_path):
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    for rel in ("a.png", "a-2.png", "sub/a.png", "100%.png"):
        (root / rel).write_bytes(b"x")
    images = sorted(p for p in root.rglob("*.png"))
    names = output_names(images, [root])
    assert sorted(names) == ["100%25", "a", "a-2", "sub%2Fa"]
    assert encode(Path("sub/a")) == "sub%2Fa"
    (root / "a.jpg").write_bytes(b"x")  # differs from a.png by the suffix alone: refused
    with pytest.raises(Exception, match=r"a\.png.*a\.jpg|a\.jpg.*a\.png"):
        output_names([root / "a.png", root / "a.jpg"], [root])


def test_each_image_gets_its_own_record(edge_onnx, two_images, tmp_path):
    root = _folder(tmp_path / "in", two_images)
    out = tmp_path / "out"
    ok("edge", "predict", edge_onnx, root, "--out", out)
    records = {p.name: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert set(records) == {"a.json", "a-2.json", "sub%2Fa.json"}
    assert records["sub%2Fa.json"]["image"] == str(root / "sub" / "a.png")
    assert records["a-2.json"]["image"] == str(root / "a-2.png")
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 3 and (out / "sub%2Fa.overlay.png").is_file()


def test_out_inside_the_inputs_is_refused_and_nothing_is_touched(edge_onnx, two_images, tmp_path):
    root = _folder(tmp_path / "in", two_images)
    (root / "p.json").write_text("a person's file")
    result = fedbridge("edge", "predict", edge_onnx, root, "--out", root)
    assert_one_line_error(result, "--out", "inside the input folder")
    result = fedbridge("edge", "predict", edge_onnx, root, "--out", root / "results")
    assert_one_line_error(result, "--out", "inside the input folder")
    assert (root / "p.json").read_text() == "a person's file" and not (root / "results").exists()


def test_force_replaces_the_earlier_run_whole_and_keeps_a_persons_file(
    edge_onnx, two_images, tmp_path
):
    first, second = tmp_path / "first", tmp_path / "second"
    _folder(first, two_images)
    second.mkdir()
    shutil.copy(two_images[0], second / "b.png")
    out = tmp_path / "out"
    ok("edge", "predict", edge_onnx, first, "--out", out)
    (out / "NOTES.txt").write_text("radiologist's notes")
    assert_one_line_error(fedbridge("edge", "predict", edge_onnx, second, "--out", out), "--force")
    ok("edge", "predict", edge_onnx, second, "--out", out, "--force")
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([
        MARKER, "NOTES.txt", "b.json", "b.overlay.png", "predictions.csv", "predictions.jsonl",
    ])  # fmt: skip
    assert (out / "NOTES.txt").read_text() == "radiologist's notes"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "x.txt").write_text("x")
    result = fedbridge("edge", "predict", edge_onnx, second, "--out", mine, "--force")
    assert_one_line_error(result, "--out", "did not write")
    assert sorted(p.name for p in mine.iterdir()) == ["x.txt"]


def test_a_full_disk_leaves_the_earlier_run_as_it_was(edge_onnx, two_images, tmp_path):
    """--out on a 1 MB tmpfs: the second run cannot fit and fails; the first run's files are
    all there, unchanged, and no temp folder is left."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        out = mount / "out"
        ok("edge", "predict", edge_onnx, two_images[0], "--out", out)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        many = tmp_path / "many"
        many.mkdir()
        for i in range(40):  # ~40 overlays of ~40-100 KB: more than the 1 MB left
            shutil.copy(two_images[i % 2], many / f"img-{i:02d}.png")
        result = fedbridge("edge", "predict", edge_onnx, many, "--out", out, "--force")
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        assert [p.name for p in mount.iterdir()] == ["out"]  # no temp folder left
    finally:
        subprocess.run(["umount", str(mount)], check=True)
