"""The CLI as a new site admin meets it (issue #15): help, refusals, modes, noise, --json."""

from __future__ import annotations

import json
import os
import re
import stat

import click
import pytest
import typer.main
from badinputs import make_class_tree
from cli import assert_one_line_error, fedbridge, ok

from fedbridge.cli import app
from fedbridge.cli.aliases import RENAMED, rewrite

WIDE = {"COLUMNS": "250"}  # rich wraps help at the terminal width; keep each text on one line
NOISE = (
    "No pretrained configuration specified",  # timm, once per model build
    "DEPRECATED FEATURE",  # Flower's run_simulation
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO",  # Ray's FutureWarning
    "FutureWarning",
    "DeprecationWarning",
)


def _commands(group: click.Group, path: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


COMMANDS = dict(_commands(typer.main.get_command(app)))


def _flat(text: str) -> str:
    """Help text without rich's box characters and line breaks."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_help_shows_each_positional_arguments_help_and_only_new_option_names(path):
    arguments = [p for p in COMMANDS[path].params if isinstance(p, click.Argument)]
    result = ok(*path, "--help", env=WIDE)
    shown = _flat(result.stdout)
    for argument in arguments:
        assert argument.help, f"{' '.join(path)} {argument.name}: no help text"
        assert _flat(argument.help) in shown, (argument.name, shown)
    for old, new in RENAMED.get(path, {}).items():
        assert re.search(rf"{re.escape(old)}(?![\w-])", shown) is None, old
        assert new in shown, new


def test_every_command_has_been_seen():
    assert {"train", "bridge", "evaluate", "explain", "demo"} <= {p[0] for p in COMMANDS}
    assert {("edge", "predict"), ("export", "onnx"), ("federate", "simulate")} <= set(COMMANDS)


def test_choice_lists_match_the_layers_that_use_them():
    from fedbridge.cli.options import Augment, Strategy
    from fedbridge_server.config import STRATEGIES
    from fedbridge_shared.defaults import AUGMENT_PRESETS

    assert tuple(Strategy) == STRATEGIES
    assert tuple(Augment) == AUGMENT_PRESETS


REFUSALS = {
    "strategy": (
        ["federate", "simulate", "--init", "{t}/b", "--site", "{t}/s", "--out", "{t}/o",
         "--strategy", "fedavgg"],
        ["'--strategy'", "'fedavgg'", "'fedavg', 'fedprox', 'fedadam'"],
    ),
    "server strategy": (
        ["server", "start", "--init", "{t}/b", "--out", "{t}/o", "--strategy", "fedavgg"],
        ["'fedavg', 'fedprox', 'fedadam'"],
    ),
    "demo augment": (
        ["demo", "--quick", "--out", "{t}/demo", "--augment", "octt"],
        ["'--augment'", "'octt'", "'cxr', 'oct', 'none'"],
    ),
    "federate augment": (
        ["federate", "simulate", "--init", "{t}/b", "--site", "{t}/s", "--out", "{t}/o",
         "--augment", "ct"],
        ["'cxr', 'oct', 'none'"],
    ),
    "train augment": (["train", "{t}/d", "--out", "{t}/o", "--augment", "x"], ["'cxr', 'oct'"]),
    "device": (
        ["train", "{t}/d", "--out", "{t}/o", "--device", "gpu"],
        ["'--device'", "'gpu'", "'auto', 'cpu', 'cuda', 'cuda:N'"],
    ),
    "int8 calibration": (
        ["export", "onnx", "{t}/b", "--out", "{t}/m.onnx", "--int8-calibration", "max"],
        ["'percentile', 'entropy', 'minmax'"],
    ),
    "explain method": (
        ["explain", "{t}/b", "{t}/i.png", "--out", "{t}/o", "--method", "lime"],
        ["'saliency', 'shap', 'ig', 'gradcam', 'cam'"],
    ),
    "edge backend": (
        ["edge", "predict", "{t}/m.onnx", "{t}/i.png", "--out", "{t}/o", "--backend", "tvm"],
        ["'auto', 'tensorrt', 'onnxruntime'"],
    ),
    "engine precision": (
        ["edge", "build", "{t}/m.onnx", "--precision", "fp64"],
        ["'fp32', 'fp16', 'int8'"],
    ),
    "demo model": (  # not a typer choice: checked by the demo before any phantom image
        ["demo", "--quick", "--out", "{t}/demo", "--model", "no_such_net", "--init", "none"],
        ["--model 'no_such_net'"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_bad_choice_is_refused_listing_the_values_and_nothing_is_written(tmp_path, case):
    args, needles = REFUSALS[case]
    result = fedbridge(*[a.format(t=tmp_path) for a in args])
    assert result.returncode == 2, result.stderr
    assert_one_line_error(result, *needles)
    assert list(tmp_path.iterdir()) == []  # no phantom set, no output folder, no probe file


def test_old_option_names_are_rewritten_with_a_note():
    notes: list[str] = []
    argv = ["--debug", "export", "onnx", "b", "--val", "v", "--batch=4", "--val", "w"]
    assert rewrite(argv, note=notes.append) == [
        "--debug", "export", "onnx", "b", "--val-data", "v", "--batch-size=4", "--val-data", "w",
    ]  # fmt: skip
    assert notes == [
        "--val is now --val-data (the old name goes in a later release)",
        "--batch is now --batch-size (the old name goes in a later release)",
    ]
    untouched = ["train", "d", "--val-fraction", "0.2", "--out", "o"]
    assert rewrite(untouched, note=notes.append) == untouched
    after_dashes = ["server", "certs", "--out", "c", "--", "--host"]
    assert rewrite(after_dashes, note=notes.append) == after_dashes


def test_atomic_write_follows_the_umask_and_keeps_private_modes(tmp_path):
    from fedbridge_shared.files import atomic_write, current_umask

    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        assert _mode(atomic_write(tmp_path / "a.json", b"{}")) == 0o640
        os.umask(0o022)
        assert _mode(atomic_write(tmp_path / "b.json", b"{}")) == 0o644
        assert _mode(atomic_write(tmp_path / "k.key", b"k", mode=0o600)) == 0o600
        assert _mode(atomic_write(tmp_path / "k.key", b"k2")) == 0o600  # kept on replace
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_train_json_group_readable_bundle_honest_bar_and_no_timm_warning(cxr_root, tmp_path):
    data = make_class_tree(tmp_path / "data", cxr_root, per_class=5)  # 20 images
    out = tmp_path / "bundle"
    result = fedbridge(
        "train", data, "--out", out, "--json", "--model", "mobilenetv1_025", "--init", "none",
        "--image-size", "48", "--epochs", "2", "--batch-size", "8", "--augment-per-sample", "0",
        "--val-fraction", "0", umask=0o027,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)  # the document alone on stdout
    assert record == {"bundle": str(out.resolve()), "validation": None}
    assert _mode(out) == 0o750
    assert {p.name: _mode(p) for p in out.iterdir()} == {
        "model.json": 0o640,
        "model.safetensors": 0o640,
    }
    # 20 images in batches of 8, the last partial batch dropped: the bar counts 16, not 20
    assert "train epoch 2/2" in result.stderr and "16/16" in result.stderr, result.stderr
    assert "16/20" not in result.stderr
    for noise in NOISE:
        assert noise not in result.stderr, noise


def test_data_check_json(cxr_root, tmp_path):
    report = json.loads(ok("data", "check", cxr_root, "--json").stdout)
    assert report["images"] == 581 and report["ok"] is True and report["errors"] == 0
    assert sorted(report["classes"]) == ["BACTERIAL_PNEUMONIA", "COVID19", "NORMAL",
                                         "VIRAL_PNEUMONIA"]  # fmt: skip
    assert sum(c["images"] for c in report["classes"].values()) == 581
    bad = make_class_tree(tmp_path / "bad", cxr_root, per_class=2, bad=True)
    result = fedbridge("data", "check", bad, "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["errors"] == len(
        [f for f in report["findings"] if f["level"] == "error"]
    )
    assert any("bad_" in (f["path"] or "") for f in report["findings"])


def test_federate_simulate_json_old_names_and_no_third_party_noise(fed, tmp_path):
    root, split = fed
    out = tmp_path / "fed"
    result = fedbridge(
        "federate", "simulate", "--init", root / "bridge", "--site", split / "site-1",
        "--site", split / "site-2", "--out", out, "--rounds", "1", "--local-epochs", "1",
        "--augment-per-sample", "0", "--test", split / "test", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["bundle"] == str(out.resolve()) and summary["best_round"] == 1
    assert [h["round"] for h in summary["history"]] == [1]
    assert summary["test"]["n"] > 0 and 0 <= summary["test"]["accuracy"] <= 1
    assert "note: --test is now --test-data" in result.stderr
    for noise in NOISE:
        assert noise not in result.stderr, noise


def test_explain_json_sanity_progress_and_force(fed, tmp_path):
    root, split = fed
    images = sorted((split / "test" / "NORMAL").iterdir())[:2]
    out = tmp_path / "maps"
    args = ("explain", root / "bridge", *images, "--out", out, "--sanity", "--sanity-images", "2")
    result = ok(*args, "--json")
    record = json.loads(result.stdout)
    assert record["n_images"] == 2 and record["sanity"]["n_images"] == 2
    assert "sanity check on 2 image(s)" in result.stderr and "3/3" in result.stderr
    again = fedbridge(*args)
    assert_one_line_error(again, "earlier explain run", "--force")
    assert json.loads((out / "explain.json").read_text())["seconds"] == record["seconds"]
    ok(*args, "--force")


def test_export_progress_modes_and_edge_predict_json(cxr_bundle, cxr_parts, tmp_path):
    model = tmp_path / "model.onnx"
    result = ok("export", "onnx", cxr_bundle, "--out", model, "--val-data", cxr_parts["val"])
    assert "export done" in result.stderr and "6/6" in result.stderr, result.stderr
    assert _mode(model) & stat.S_IRGRP
    again = fedbridge("export", "onnx", cxr_bundle, "--out", model, "--val-data", cxr_parts["val"])
    assert_one_line_error(again, "exists", "--force")
    images = sorted((cxr_parts["test"] / "COVID19").iterdir())[:2]
    out = tmp_path / "pred"
    result = ok("edge", "predict", model, *images, "--out", out, "--json")
    record = json.loads(result.stdout)
    assert [p["image"] for p in record["predictions"]] == [str(p) for p in images]
    for p in record["predictions"]:
        assert abs(sum(p["scores"].values()) - 1) < 1e-4
    assert record["failed"] == 0 and "2 predictions in" in result.stderr
    again = fedbridge("edge", "predict", model, *images, "--out", out)
    assert_one_line_error(again, "earlier run's predictions", "--force")
    ok("edge", "predict", model, *images, "--out", out, "--force")
