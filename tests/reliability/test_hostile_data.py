"""Hostile and unlucky datasets (issue #30, data part): one validation shared by data check,
data split, train/bridge and evaluate; images read as viewers show them; temp folders removed
on SIGTERM/SIGINT; a console that cannot encode UTF-8.

Every image comes from ../shared/data, transformed by the test (tests/badinputs.py).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from badinputs import (
    make_class_tree,
    write_12bit_png,
    write_exif_rotated_png,
    write_multiframe_dicom,
    write_wide_png,
)
from cli import as_foreground, assert_one_line_error, fedbridge
from inproc import run

from fedbridge_shared.data.images import read_image
from fedbridge_shared.errors import DataError

TINY = ["--model", "test_efficientnet", "--init", "none", "--image-size", "48", "--epochs", "1"]
RLO = "\u202e"


@pytest.fixture
def tree(cxr_root, tmp_path):
    return make_class_tree(tmp_path / "data", cxr_root, per_class=3)


def _no_leftovers(out: Path) -> None:
    assert not out.exists(), f"partial output at {out}"
    hidden = [p.name for p in out.parent.iterdir() if p.name.startswith(".")]
    assert hidden == [], f"temp leftovers beside {out}: {hidden}"


def _work(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    return work


def _refused_everywhere(capsys, tree: Path, work: Path, *needles: str) -> None:
    """data check lists it as an error; train and data split refuse it in one line and write
    nothing."""
    check = run(capsys, "data", "check", tree)
    text = check.stdout + check.stderr
    assert check.returncode == 1 and "Traceback" not in text
    assert any(all(n in ln for n in needles) and ln.startswith("error") for ln in text.splitlines())
    for args, out in (
        (("train", tree, "--out", work / "bundle", *TINY), work / "bundle"),
        (("data", "split", tree, "--out", work / "split", "--sites", "2"), work / "split"),
    ):
        assert_one_line_error(run(capsys, *args), *needles)
        _no_leftovers(out)


# ------------------------------------------------------------------ one dataset validation


def test_class_folder_linked_to_another_is_refused_unless_allowed(tree, tmp_path, capsys):
    os.symlink("NORMAL", tree / "PNEUMONIA")  # one set of files under two labels
    work = _work(tmp_path)
    _refused_everywhere(capsys, tree, work, "same folder", "--allow-shared-files")
    # allowed: the split runs and never puts the same content on both sides
    split = work / "split"
    result = run(
        capsys, "data", "split", tree, "--out", split, "--sites", "1",
        "--test-fraction", "0.3", "--allow-shared-files",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "warning" in result.stderr and "same folder" in result.stderr
    _one_part_per_content(split)


def test_one_file_reached_twice_through_links_is_refused(tree, tmp_path, capsys):
    real = sorted((tree / "NORMAL").iterdir())[0]
    os.link(real, tree / "COVID19" / "hardlinked.jpg")
    _refused_everywhere(capsys, tree, _work(tmp_path), "reached 2 times", "--allow-shared-files")


@pytest.mark.parametrize(
    ("twin", "needle"),
    [
        ("NORMAL ", "whitespace"),
        ("NORMAL\u200b", "U+200B (ZERO WIDTH SPACE)"),  # invisible: never waivable
        (unicodedata.normalize("NFD", "NORMÁL"), "differ only by"),
    ],
    ids=["trailing-space", "zero-width-space", "nfd"],
)
def test_labels_that_print_alike_are_refused(tree, tmp_path, capsys, twin, needle):
    base = unicodedata.normalize("NFC", twin.strip().replace("\u200b", ""))
    if base != "NORMAL":
        os.rename(tree / "NORMAL", tree / base)  # the NFC spelling beside its NFD twin
    shutil.copytree(tree / "COVID19", tree / twin)
    for f in (tree / twin).iterdir():  # other content, so only the names collide
        f.write_bytes(f.read_bytes() + b"\0")
    _refused_everywhere(capsys, tree, _work(tmp_path), needle)
    allowed = run(capsys, "data", "check", tree, "--allow-similar-labels")
    if "U+" not in needle:
        assert "allowed by --allow-similar-labels" in allowed.stdout, allowed.stdout


def test_a_right_to_left_override_is_never_written_raw(tree, tmp_path, capsys):
    os.rename(tree / "COVID19", tree / f"COVID19{RLO}gnp.exe")
    work = _work(tmp_path)
    _refused_everywhere(capsys, tree, work, "U+202E", "RIGHT-TO-LEFT OVERRIDE")
    as_json = run(capsys, "data", "check", tree, "--json")
    assert RLO not in as_json.stdout + as_json.stderr
    assert json.loads(as_json.stdout)["ok"] is False
    # the report's escaping, for names that reach it from elsewhere (a bundle's labels)
    from fedbridge_shared.report_sections import esc

    assert RLO not in esc(f"a{RLO}b") and "\\u202e" in esc(f"a{RLO}b")


def test_a_bidi_control_in_a_file_name_is_refused(tree, tmp_path, capsys):
    real = sorted((tree / "NORMAL").iterdir())[0]
    real.rename(real.with_name(f"scan{RLO}gpj.png"))
    _refused_everywhere(capsys, tree, _work(tmp_path), "U+202E", "rename it")


def _one_part_per_content(split: Path) -> None:
    parts: dict[str, set[str]] = {}
    with (split / "split.csv").open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            digest = hashlib.sha256((split / row["path"]).read_bytes()).hexdigest()
            parts.setdefault(digest, set()).add(row["part"])
    assert parts and all(len(p) == 1 for p in parts.values()), parts


def test_split_keeps_byte_identical_copies_in_one_part(cxr_root, tmp_path, capsys):
    tree = make_class_tree(tmp_path / "data", cxr_root, per_class=6)
    for label in ("NORMAL", "COVID19"):  # each image also under a new name: 12 copies a class
        for f in sorted((tree / label).iterdir()):
            shutil.copy(f, f.with_name(f"copy-of-{f.name}"))
    split = tmp_path / "split"
    result = run(capsys, "data", "split", tree, "--out", split, "--sites", "2", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert "byte-identical copies" in result.stderr
    _one_part_per_content(split)


def test_a_manifest_that_contradicts_the_folders_is_refused_by_train(tree, tmp_path, capsys):
    from badinputs import write_manifest

    rows = []
    for label, other in (("NORMAL", "COVID19"), ("COVID19", "NORMAL")):
        for f in sorted((tree / label).iterdir()):
            rows.append((f"{label}/{f.name}", other, f"p-{f.stem}"))
    write_manifest(tree, rows)
    _refused_everywhere(capsys, tree, _work(tmp_path), "another label in manifest")
    allowed = run(capsys, "data", "check", tree, "--allow-manifest-conflict")
    assert allowed.returncode == 0, allowed.stdout


def test_class_folder_symlink_loop_and_fifo_are_named_for_what_they_are(tree, tmp_path, capsys):
    os.mkfifo(tree / "NORMAL" / "pipe.png")
    os.symlink("loop.png", tree / "NORMAL" / "loop.png")
    check = run(capsys, "data", "check", tree)
    lines = check.stdout.splitlines()
    assert any("pipe.png" in ln and "FIFO" in ln for ln in lines), check.stdout
    assert any("loop.png" in ln and "symlink loop" in ln for ln in lines), check.stdout
    assert not any("suffix" in ln for ln in lines)
    os.symlink("CLASSLOOP", tree / "CLASSLOOP")  # a class folder that loops: not skipped
    _refused_everywhere(capsys, tree, _work(tmp_path), "CLASSLOOP", "symlink loop")


def test_evaluate_on_the_bundles_own_training_folder_warns_loudly(cxr_bundle, cxr_parts, tmp_path):
    out = tmp_path / "report"
    result = fedbridge(
        "evaluate", cxr_bundle, cxr_parts["train"], "--bootstrap", "0", "--device", "cpu",
        "--out", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "WARNING" in result.stderr and "own training data" in result.stderr
    assert "own training data" in json.loads((out / "metrics.json").read_text())["warnings"][0]
    html = (out / "report.html").read_text()
    assert "<b>WARNING</b>" in html and "own training data" in html


# ------------------------------------------------------------------ images as viewers show them


def test_exif_orientation_is_applied(tmp_path):
    upright = read_image(write_exif_rotated_png(tmp_path / "upright.png", orientation=1))
    notes: list[str] = []
    rotated = read_image(write_exif_rotated_png(tmp_path / "r.png", orientation=6), notes=notes)
    assert rotated.shape == upright.shape and np.array_equal(rotated, upright)
    assert notes == ["EXIF orientation 6 applied (rotated 90°)"]


@pytest.mark.parametrize("sbit", [12, None], ids=["sbit", "data-range"])
def test_12bit_png_in_16_bits_is_scaled_by_its_real_depth(tmp_path, capsys, cxr_root, sbit):
    path, grey = write_12bit_png(tmp_path / "twelve.png", sbit=sbit)
    notes: list[str] = []
    arr = read_image(path, notes=notes)
    assert np.abs(arr.astype(int) - grey.astype(int)).max() <= 1  # not 0..16 of 255
    source = "sBIT" if sbit else "data range"
    assert notes == [f"16-bit PNG with 12 significant bits ({source}): 0..4095 read as 0..255"]
    tree = make_class_tree(tmp_path / "data", cxr_root, per_class=2)
    shutil.move(path, tree / "NORMAL" / path.name)
    check = run(capsys, "data", "check", tree)
    assert check.returncode == 0 and "12 significant bits" in check.stdout


def test_multiframe_dicom_is_refused_in_one_line(tmp_path, capsys, cxr_root):
    path = write_multiframe_dicom(tmp_path / "cine.dcm", frames=3)
    with pytest.raises(DataError, match="multi-frame DICOM \\(3 frames\\)"):
        read_image(path)
    tree = make_class_tree(tmp_path / "data", cxr_root, per_class=2)
    shutil.move(path, tree / "NORMAL" / path.name)
    out = _work(tmp_path) / "bundle"
    assert_one_line_error(run(capsys, "train", tree, "--out", out, *TINY), "cine.dcm", "3 frames")
    _no_leftovers(out)


def test_extreme_aspect_ratio_is_warned_about(tmp_path, capsys, cxr_root):
    path = write_wide_png(tmp_path / "strip.png", size=(20000, 8))
    notes: list[str] = []
    assert read_image(path, notes=notes).shape == (8, 20000)
    assert notes and "extreme aspect ratio 2.5e+03:1" in notes[0]
    tree = make_class_tree(tmp_path / "data", cxr_root, per_class=2)
    shutil.move(path, tree / "NORMAL" / path.name)
    check = run(capsys, "data", "check", tree)
    assert any(
        ln.startswith("warning") and "strip.png" in ln and "aspect ratio" in ln
        for ln in check.stdout.splitlines()
    ), check.stdout


# ------------------------------------------------------------------ stopped mid-run


def _many_files(root: Path, cxr_root: Path, per_class: int) -> Path:
    """``per_class`` distinct small files a class (one real JPEG plus a counter at its end:
    split never decodes them, but each is its own content)."""
    base = sorted((cxr_root / "NORMAL").glob("*.jp*g"))[0].read_bytes()[:2048]
    for label in ("NORMAL", "COVID19"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            (root / label / f"{i:05d}.jpg").write_bytes(base + label.encode() + i.to_bytes(4))
    return root


def _stop_when(proc: subprocess.Popen, parent: Path, prefix: str, sig: int) -> None:
    """Send ``sig`` once a temp folder ``prefix…`` holds a file (at most 200000 looks: a loaded
    machine can take minutes to start the command and scan its inputs)."""
    for _ in range(200_000):
        temps = [p for p in parent.iterdir() if p.name.startswith(prefix)]
        if temps and any(p.is_file() for p in temps[0].rglob("*")):
            proc.send_signal(sig)
            return
        assert proc.poll() is None, "the command finished before it could be stopped"
        time.sleep(0.005)
    pytest.fail(f"no temp folder {prefix}… appeared")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_data_split_stopped_mid_copy_leaves_nothing(tmp_path, cxr_root, sig):
    data = _many_files(tmp_path / "data", cxr_root, per_class=1500)
    work = _work(tmp_path)
    split = work / "split"
    cmd = [sys.executable, "-m", "fedbridge", "data", "split", str(data), "--out", str(split)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=as_foreground)  # fmt: skip
    try:
        _stop_when(proc, work, ".split.tmp-", sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0 and "Traceback" not in err, err
    _no_leftovers(split)


def test_evaluate_out_stopped_mid_report_leaves_nothing(cxr_bundle, cxr_parts, tmp_path):
    work = _work(tmp_path)
    out = work / "report"
    cmd = [sys.executable, "-m", "fedbridge", "evaluate", str(cxr_bundle), str(cxr_parts["test"]),
           "--bootstrap", "0", "--device", "cpu", "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _stop_when(proc, work, ".report.tmp-", signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    _no_leftovers(out)


def test_a_temp_folder_of_a_killed_run_is_removed_by_the_next(tmp_path):
    from fedbridge_shared.files import atomic_dir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    stale = tmp_path / f".out.tmp-{int(dead.stdout)}-abcdef"
    (stale / "part").mkdir(parents=True)
    mine = tmp_path / f".out.tmp-{os.getpid()}-abcdef"  # a live process's: kept
    mine.mkdir()
    other = tmp_path / ".out.keep"  # not fedbridge's name: kept
    other.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("x")
    assert not stale.exists() and mine.is_dir() and other.is_dir()


# ------------------------------------------------------------------ an ASCII console


@pytest.mark.parametrize(
    "env",
    [{"PYTHONIOENCODING": "ascii"}, {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0"}],
    ids=["PYTHONIOENCODING=ascii", "LC_ALL=C,PYTHONUTF8=0"],
)
def test_data_check_on_an_ascii_console(cxr_root, tmp_path, env):
    tree = make_class_tree(tmp_path / "data", cxr_root, per_class=2)
    real = sorted((tree / "NORMAL").iterdir())[0]
    real.rename(real.with_name("Röntgen—Thorax.jpg"))  # valid UTF-8
    result = fedbridge("data", "check", tree, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "not valid UTF-8" not in result.stdout
    assert "0 errors" in result.stdout
    split = fedbridge("data", "split", tree, "--out", tmp_path / "split", "--sites", "1",
                      "--test-fraction", "0.5", env=env)  # fmt: skip
    assert split.returncode == 0, split.stderr
    rows = (tmp_path / "split" / "split.csv").read_text(encoding="utf-8").splitlines()
    assert any("/NORMAL/Röntgen—Thorax.jpg,NORMAL," in row for row in rows), rows


def test_a_failed_first_round_leaves_no_rounds_folder(tmp_path):
    """No site ever joins (a fake Grid with no nodes): round 1 fails on the quorum, and the
    OUT-rounds folder this run created (with its live.json) is removed: nothing to resume."""
    from types import SimpleNamespace

    from rich.console import Console

    from fedbridge_server.config import FederationConfig
    from fedbridge_server.federation import run_federation
    from fedbridge_server.quorum import QuorumError
    from fedbridge_shared.models import init_model
    from fedbridge_shared.spec import save_bundle

    model, spec = init_model("none", ["COVID19", "NORMAL"], "test_efficientnet", 48)
    init = save_bundle(tmp_path / "init", spec, model.state_dict(), {"stage": "bridge"})
    out = tmp_path / "fed" / "model"
    cfg = FederationConfig.from_flat(
        {"init": str(init), "out": str(out), "join-timeout": 0.2, "num-server-rounds": 1}
    )
    grid = SimpleNamespace(get_node_ids=lambda: [])
    with pytest.raises(QuorumError, match="fewer than the quorum"):
        run_federation(grid, cfg, Console(quiet=True))
    assert sorted(p.name for p in out.parent.iterdir()) == []
