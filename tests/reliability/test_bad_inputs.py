"""The bad-input corpus at the command line: one line naming the file and the reason, exit ≠ 0,
no traceback, no partial output. Valid-but-unusual files are read, not refused.

Kinds already covered elsewhere (see RELIABILITY.md) are not repeated here; this file adds the
decompression bomb, the compressed DICOM, non-UTF-8 names, symlinks out of the data folder,
``../`` manifest rows, broken bundles at every command that loads one, and malformed run-config
values at the two commands that take ``--set``.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from badinputs import (
    BAD_NPZ,
    MORE_BAD_KEYS,
    UNUSUAL_KEYS,
    add_outside_symlink,
    make_bad_inputs,
    make_class_tree,
    make_more_bad_inputs,
    write_bad_npz,
    write_manifest,
)
from cli import assert_one_line_error, fedbridge
from inproc import run
from safetensors.torch import load_file, save_file

from fedbridge_shared.spec import SPEC_FILE, WEIGHTS_FILE, load_bundle, save_bundle

TINY = ["--model", "test_efficientnet", "--init", "none", "--image-size", "48", "--epochs", "1"]


def _shown(path: Path) -> str:
    """How an error line shows a name that may not be UTF-8."""
    return os.fsencode(path.name).decode("utf-8", "backslashreplace")


def _no_leftovers(out: Path) -> None:
    """Nothing at ``out`` and no hidden temp file or folder beside it."""
    assert not out.exists(), f"partial output at {out}"
    assert not out.with_name(out.name + "-rounds").exists()
    hidden = [p.name for p in out.parent.iterdir() if p.name.startswith(".")]
    assert hidden == [], f"temp leftovers beside {out}: {hidden}"


@pytest.fixture
def tree(cxr_root, tmp_path):
    return make_class_tree(tmp_path / "data", cxr_root, per_class=3)


@pytest.mark.parametrize("key", sorted(MORE_BAD_KEYS))
def test_more_bad_files_are_listed_by_check_and_refused_by_train(tree, tmp_path, capsys, key):
    files = make_more_bad_inputs(tmp_path / "inputs")
    target = tree / "NORMAL" / files[key].name
    shutil.move(files[key], target)
    shutil.rmtree(tmp_path / "inputs")
    reason = MORE_BAD_KEYS[key]

    check = run(capsys, "data", "check", tree)
    assert check.returncode != 0 and "Traceback" not in check.stdout + check.stderr
    assert _shown(target) in check.stdout + check.stderr and reason in check.stdout + check.stderr

    work = tmp_path / "work"
    work.mkdir()
    out = work / "bundle"
    train = fedbridge if key == "nonutf8_name" else lambda *a: run(capsys, *a)  # one real process
    assert_one_line_error(train("train", tree, "--out", out, *TINY), _shown(target), reason)
    _no_leftovers(out)
    split = work / "split"
    result = run(capsys, "data", "split", tree, "--out", split, "--sites", "2")
    if key == "nonutf8_name":  # split reads names only; every other kind is caught later
        assert_one_line_error(result, _shown(target), reason)
        _no_leftovers(split)


def test_manifest_with_dotdot_path_is_refused_by_every_reader(tree, tmp_path, capsys):
    write_manifest(tree, [("NORMAL/x.jpg", "NORMAL", "p1"), ("../secret.jpg", "NORMAL", "p2")])
    out = tmp_path / "work" / "bundle"
    out.parent.mkdir()
    for args in (("data", "check", tree), ("train", tree, "--out", out, *TINY)):
        assert_one_line_error(run(capsys, *args), "MANIFEST.csv", "line 3", "'..'")
    _no_leftovers(out)


def test_symlinks_out_of_the_data_folder_are_flagged_and_still_checked(tree, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    real = next((tree / "NORMAL").iterdir())
    good_link = add_outside_symlink(tree, shutil.copy(real, outside / "elsewhere.jpg"), "COVID19")
    (outside / "passwd.png").write_text("root:x:0:0:root:/root:/bin/bash\n")
    bad_link = add_outside_symlink(tree, outside / "passwd.png")

    check = run(capsys, "data", "check", tree)
    assert check.returncode == 1 and "Traceback" not in check.stdout + check.stderr
    lines = check.stdout.splitlines()
    assert any(
        str(good_link) in ln and "outside the data folder" in ln and ln.startswith("warning")
        for ln in lines
    ), check.stdout
    assert any(str(bad_link) in ln and "not a readable image" in ln for ln in lines)
    out = tmp_path / "work" / "bundle"
    out.parent.mkdir()
    result = run(capsys, "train", tree, "--out", out, *TINY)
    assert_one_line_error(result, bad_link.name, "not a readable image")
    _no_leftovers(out)


def test_unusual_but_valid_files_are_read_not_refused(tree, tmp_path, capsys):
    files = make_bad_inputs(tmp_path / "inputs")
    for key in UNUSUAL_KEYS:
        shutil.move(files[key], tree / "NORMAL" / f"unusual_{files[key].name}")
    shutil.rmtree(tmp_path / "inputs")
    check = run(capsys, "data", "check", tree)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "0 errors" in check.stdout
    out = tmp_path / "bundle"
    result = run(capsys, "train", tree, "--out", out, *TINY)
    assert result.returncode == 0, result.stderr
    assert load_bundle(out).training  # a verified bundle, trained on the unusual files too


# ---------------------------------------------------------------- broken bundles, every reader


def _nan_bundle(src: Path, dst: Path) -> Path:
    good = load_bundle(src)
    state = dict(good.state_dict)
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("nan")
    return save_bundle(dst, good.spec, state, good.training, good.metrics)  # hash matches


def _modified_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    state = load_file(str(dst / WEIGHTS_FILE))
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name] + 0.01
    save_file(state, str(dst / WEIGHTS_FILE))  # model.json still holds the old sha256
    return dst


def _no_json_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / SPEC_FILE).unlink()
    return dst


def _relabelled_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    record = json.loads((dst / SPEC_FILE).read_text())
    record["spec"]["labels"] = list(reversed(record["spec"]["labels"]))
    (dst / SPEC_FILE).write_text(json.dumps(record))  # weights untouched: their hash still fits
    return dst


BROKEN = {
    "nan_weights": (_nan_bundle, WEIGHTS_FILE, "NaN or Inf"),
    "swapped_labels": (_relabelled_bundle, SPEC_FILE, "seal mismatch"),
    "modified_weights": (_modified_bundle, WEIGHTS_FILE, "does not match model.json"),
    "no_model_json": (_no_json_bundle, SPEC_FILE, "missing"),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_every_command_that_loads_a_bundle_refuses_a_broken_one(fed, tmp_path, capsys, kind):
    root, split = fed
    make, file_name, reason = BROKEN[kind]
    bundle = make(root / "bridge", tmp_path / "broken")
    image = next((split / "test" / "NORMAL").iterdir())
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    commands = {
        "evaluate": ("evaluate", bundle, split / "test", "--out", out),
        "explain": ("explain", bundle, image, "--out", out),
        "export onnx": ("export", "onnx", bundle, "--out", out),
        "train --init": ("train", split / "site-1", "--out", out, "--init", bundle,
                         "--epochs", "1", "--image-size", "48"),
        "federate simulate": ("federate", "simulate", "--init", bundle, "--site", split / "site-1",
                              "--out", out),
        "server start": ("server", "start", "--init", bundle, "--out", out, "--insecure"),
    }  # fmt: skip
    for name, args in commands.items():
        result = run(capsys, *args)
        if name == "train --init" and kind == "no_model_json":  # names the folder instead
            assert_one_line_error(result, str(bundle), "must be a bundle folder")
        else:
            assert_one_line_error(result, str(bundle / file_name), reason)
        _no_leftovers(out)
        assert not (work / "out-superlink").exists(), name


def test_debug_shows_the_traceback(fed, tmp_path):
    root, _ = fed
    bundle = _no_json_bundle(root / "bridge", tmp_path / "broken")
    result = fedbridge("--debug", "export", "onnx", bundle, "--out", tmp_path / "x.onnx")
    assert (
        result.returncode != 0 and "Traceback" in result.stderr and "BundleError" in result.stderr
    )


# ---------------------------------------------------------------- malformed run-config values


@pytest.mark.parametrize(
    "pair, needle",
    [
        ("round-timeout=abc", "'round-timeout' must be float"),
        ("lr=nan", "invalid value for 'lr'"),
        ("min-train-sites=1.5", "'min-train-sites' must be int"),
        ("dp.enabled=maybe", "'dp.enabled' must be bool"),
        ("no-such-key=1", "unknown key 'no-such-key'"),
        ("rounds", "expected KEY=VALUE"),
    ],
)
def test_malformed_run_config_values_are_refused_before_anything_starts(
    fed, tmp_path, capsys, pair, needle
):
    root, split = fed
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    sim = run(
        capsys,
        "federate", "simulate", "--init", root / "bridge", "--site", split / "site-1",
        "--out", out, "--set", pair,
    )  # fmt: skip
    assert_one_line_error(sim, needle)
    _no_leftovers(out)
    if pair.startswith(("round-timeout", "lr")):  # the same parser; one deployment check is enough
        srv = run(
            capsys,
            "server", "start", "--init", root / "bridge", "--out", out, "--insecure",
            "--set", pair,
        )  # fmt: skip
        assert_one_line_error(srv, needle)
        _no_leftovers(out)
        assert not (out.parent / "out-superlink").exists()


# ---------------------------------------------------------------- options checked before work


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "{site}", "--out", "{out}", "--image-size", "0"], "--image-size 0"),
        (["train", "{site}", "--out", "{out}", "--image-size", "100000"], "--image-size 100000"),
        (["bridge", "{site}", "--out", "{out}", "--lr", "inf"], "--lr inf"),
        (["train", "{site}", "--out", "{out}", "--val-fraction", "0.99"], "--val-fraction 0.99"),
        (["train", "{site}", "--out", "{out}", "--seed", "-1"], "--seed -1"),
        (["train", "{site}", "--out", "{out}", "--device", "cuda:7"], "--device 'cuda:7'"),
        (["train", "{site}", "--out", "{out}", "--device", "tpu"],
         "'--device': 'tpu' is not one of 'auto', 'cpu', 'cuda', 'cuda:N'"),
        (["evaluate", "{bundle}", "{test}", "--bootstrap", "-5"], "--bootstrap -5"),
        (["export", "onnx", "{bundle}", "--out", "{out}", "--opset", "5"], "--opset 5"),
        (["edge", "serve", "{out}", "--port", "70000"], "--port 70000"),
        (["federate", "simulate", "--init", "{bundle}", "--site", "{site}", "--out", "{out}",
          "--set", "batch-size=0"], "'batch-size' (0)"),
        (["federate", "simulate", "--init", "{bundle}", "--site", "{site}", "--out", "{out}",
          "--set", "augment=bogus"], "'augment' ('bogus')"),
        (["federate", "simulate", "--init", "{bundle}", "--site", "{site}", "--site", "{site}",
          "--out", "{out}"], "given twice"),
        (["data", "split", "{site}", "--out", "{out}", "--sites", "1000"], "would get no patients"),
        (["data", "split", "{site}", "--out", "{out}", "--sites", "99999999999999999999"],
         "--sites must be a whole number in [1, 1000]"),
        (["export", "onnx", "{bundle}", "--out", "{out}", "--batch-size", "100000"],
         "--batch-size 100000"),
        (["edge", "predict", "{out}", "{site}", "--out", "{out}", "--threads", "100000"],
         "--threads"),
        (["edge", "predict", "{out}", "{site}", "--out", "{out}", "--threads", "abc"],
         "Invalid value for '--threads'"),
        (["evaluate", "{bundle}", "{test}", "--out", "{test}/report"], "inside the data folder"),
        (["federate", "simulate", "--init", "{bundle}", "--site", "{site}", "--out", "{out}",
          "--rounds", "99999999999999999999"], "'num-server-rounds'"),
        (["evalute"], "Did you mean 'evaluate'? (see"),
    ],
)  # fmt: skip
def test_bad_options_are_refused_in_one_line_before_any_work(fed, tmp_path, capsys, args, needle):
    root, split = fed
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    where = {
        "site": split / "site-1",
        "out": out,
        "bundle": root / "bridge",
        "test": split / "test",
    }
    result = run(capsys, *[a.format(**{k: str(v) for k, v in where.items()}) for a in args])
    assert_one_line_error(result, needle)
    _no_leftovers(out)
    assert not (work / "out-superlink").exists()


def test_a_split_that_leaves_a_site_without_a_class_is_refused(tree, tmp_path, capsys):
    for image in sorted((tree / "COVID19").iterdir())[1:]:
        image.unlink()  # one COVID19 patient cannot reach two sites and a test part
    out = tmp_path / "work" / "split"
    out.parent.mkdir()
    result = run(capsys, "data", "split", tree, "--out", out, "--sites", "2")
    assert_one_line_error(result, "would get no images of class COVID19", "--sites")
    _no_leftovers(out)


def test_an_existing_bundle_is_replaced_only_with_force_and_keeps_other_files(
    tree, tmp_path, capsys
):
    out = tmp_path / "work" / "bundle"
    assert run(capsys, "train", tree, "--out", out, *TINY).returncode == 0
    (out / "NOTES.txt").write_text("the site admin's notes\n")
    first = load_bundle(out).sha256
    again = run(capsys, "train", tree, "--out", out, *TINY, "--seed", "1")
    assert_one_line_error(again, str(out), "--force")
    assert load_bundle(out).sha256 == first
    forced = run(capsys, "train", tree, "--out", out, *TINY, "--seed", "1", "--force")
    assert forced.returncode == 0, forced.stderr
    assert load_bundle(out).sha256 != first
    assert (out / "NOTES.txt").read_text() == "the site admin's notes\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["bundle"]


def test_an_out_under_a_regular_file_fails_before_training(tree, tmp_path, capsys):
    blocker = tmp_path / "work" / "a-file"
    blocker.parent.mkdir()
    blocker.write_text("not a folder\n")
    result = run(capsys, "train", tree, "--out", blocker / "bundle", *TINY)
    assert_one_line_error(result, str(blocker), "not a folder")
    assert "epoch 1" not in result.stderr  # refused before any training
    assert blocker.read_text() == "not a folder\n"


@pytest.fixture
def full_disk(tmp_path):
    """A 300 kB tmpfs (root can mount one here), unmounted afterwards."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_during_evaluate_leaves_no_partial_report(fed, full_disk, capsys):
    root, split = fed
    out = full_disk / "report"
    args = ("evaluate", root / "bridge", split / "test", "--out", out, "--bootstrap", "0")
    # 300 kB: the plots and metrics.json fit, report.html (~300 kB with its saliency grid) not
    assert_one_line_error(run(capsys, *args), str(out), "No space left on device")
    assert list(full_disk.iterdir()) == []
    # Almost full: refused by the probe before any data is read (the data folder here does
    # not even exist, which would be the error if the images were read first)
    filler = full_disk / "filler.bin"
    st = os.statvfs(full_disk)
    filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 24_000))
    result = run(capsys, "evaluate", root / "bridge", split / "no-such-folder", "--out", out)
    assert_one_line_error(result, str(out), "No space left on device")
    assert [p.name for p in full_disk.iterdir()] == ["filler.bin"]


def test_an_existing_report_is_replaced_only_with_force(fed, tmp_path, capsys):
    root, split = fed
    out = tmp_path / "report"
    args = ("evaluate", root / "bridge", split / "test", "--out", out, "--bootstrap", "0")
    assert run(capsys, *args).returncode == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "confusion_matrix.png", "metrics.json", "report.html", "roc.png"
    ]  # fmt: skip
    (out / "NOTES.txt").write_text("reviewed by the site admin\n")
    (out / "metrics.json").write_text("{}\n")  # stands for an earlier report
    assert_one_line_error(run(capsys, *args), str(out), "--force")
    assert (out / "metrics.json").read_text() == "{}\n"
    assert run(capsys, *args, "--force").returncode == 0
    assert json.loads((out / "metrics.json").read_text())["n"] > 0
    assert (out / "NOTES.txt").read_text() == "reviewed by the site admin\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no temp or .old left


def test_a_full_disk_is_one_line_naming_the_output_and_leaves_nothing(tree, full_disk, capsys):
    out = full_disk / "bundle"
    # test_efficientnet's weights (~1.5 MB) cannot fit in 300 kB
    result = run(capsys, "train", tree, "--out", out, *TINY)
    assert_one_line_error(result, str(out), "No space left on device")
    assert list(full_disk.iterdir()) == []  # no partial bundle, no temp folder


# ---------------------------------------------------------------- bad pixels at every image reader

PIXEL_KEYS = sorted(set(MORE_BAD_KEYS) - {"nonutf8_name"})  # names: covered by scan_folder above


@pytest.fixture(scope="module")
def bad_pixel_files(tmp_path_factory):
    return make_more_bad_inputs(tmp_path_factory.mktemp("bad-pixels"))


@pytest.fixture(scope="module")
def fed_onnx(edge_onnx):
    """The real CXR edge model (the 1-epoch bridge bundle of ``fed`` labels no better than
    chance, and export refuses to calibrate such a model's OOD test)."""
    return edge_onnx


@pytest.mark.parametrize("key", PIXEL_KEYS)
def test_bad_pixels_are_refused_by_evaluate_explain_predict_and_serve(
    fed, fed_onnx, bad_pixel_files, tmp_path, capsys, key
):
    root, split = fed
    bad, reason = bad_pixel_files[key], MORE_BAD_KEYS[key]
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"

    explain = run(capsys, "explain", root / "bridge", bad, "--out", out)
    assert_one_line_error(explain, bad.name, reason)
    _no_leftovers(out)
    predict = run(capsys, "edge", "predict", fed_onnx, bad, "--out", out)
    assert_one_line_error(predict, bad.name, reason)
    _no_leftovers(out)

    test = shutil.copytree(split / "test", tmp_path / "test")
    shutil.copy(bad, test / "NORMAL" / bad.name)
    evaluate = run(capsys, "evaluate", root / "bridge", test, "--out", out)
    assert_one_line_error(evaluate, bad.name, reason)
    _no_leftovers(out)

    from fedbridge_edge.runtime import Predictor
    from fedbridge_edge.serve import make_server

    server = make_server(Predictor(fed_onnx, "onnxruntime", 1), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.server_port}/predict", data=bad.read_bytes()
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        assert refused.value.code == 400
        assert reason in json.loads(refused.value.read())["error"]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_serve_on_an_address_it_cannot_use_and_export_over_existing_files(
    fed, fed_onnx, tmp_path, capsys
):
    root, _ = fed
    serve = run(capsys, "edge", "serve", fed_onnx, "--host", "999.1.1.1", "--port", "0")
    assert_one_line_error(serve, "--host 999.1.1.1", "cannot listen there")
    kept = tmp_path / "model.onnx"
    kept.write_text("keep")
    again = run(capsys, "export", "onnx", root / "bridge", "--out", kept)
    assert_one_line_error(again, str(kept), "--force")
    assert kept.read_text() == "keep"
    folder = tmp_path / "a-folder"
    folder.mkdir()
    assert_one_line_error(
        run(capsys, "export", "onnx", root / "bridge", "--out", folder), str(folder), "is a folder"
    )
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("kind", sorted(BAD_NPZ))
def test_malformed_npz_archives_are_refused_by_name(tmp_path, capsys, kind):
    npz = write_bad_npz(tmp_path / f"{kind}.npz", kind)
    out = tmp_path / "work" / "imported"
    out.parent.mkdir()
    result = run(capsys, "data", "import-npz", npz, "--out", out)
    assert_one_line_error(result, str(npz), BAD_NPZ[kind])
    _no_leftovers(out)


def test_manifest_control_characters_and_markup_in_names(tree, tmp_path, capsys):
    write_manifest(tree, [("NORMAL/x\0y.jpg", "NORMAL", "p1")])
    assert_one_line_error(
        run(capsys, "data", "check", tree), "MANIFEST.csv", "line 2", "control characters"
    )
    image = next((tree / "NORMAL").iterdir())
    write_manifest(tree, [(f"NORMAL/{image.name}", "[/nope]", "p1")])  # a label that is markup
    check = run(capsys, "data", "check", tree)
    assert "Traceback" not in check.stdout + check.stderr
    assert "[/nope]" in check.stdout  # shown as written, not parsed as rich markup
    marked = tree / "NORMAL" / "[bold]bad.jpg"
    marked.write_text("not an image")
    (tree / "MANIFEST.csv").unlink()
    check = run(capsys, "data", "check", tree)
    assert "[bold]bad.jpg" in check.stdout and "not a readable image" in check.stdout
