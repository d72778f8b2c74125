"""Bad input: `data check` lists each broken file; `train`/`bridge` refuse, write nothing."""

import pytest
from badinputs import BAD_KEYS, make_class_tree
from cli import assert_one_line_error, fedbridge

TINY = ["--model", "test_efficientnet", "--init", "none", "--image-size", "64", "--epochs", "1"]


@pytest.fixture
def bad_tree(cxr_root, tmp_path):
    return make_class_tree(tmp_path / "data", cxr_root, per_class=3, bad=True, empty_class="EMPTY")


def test_check_lists_each_bad_file_and_fails(bad_tree):
    result = fedbridge("data", "check", bad_tree)
    assert result.returncode == 1, result.stderr
    for key in BAD_KEYS:
        assert f"bad_{key}" in result.stdout, key
    assert "EMPTY" in result.stdout and "empty class folder" in result.stdout


def test_check_passes_on_clean_real_data(cxr_root):
    result = fedbridge("data", "check", cxr_root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "581 images" in result.stdout and "0 errors" in result.stdout


@pytest.mark.parametrize("command", ["train", "bridge"])
@pytest.mark.parametrize("key", sorted(BAD_KEYS))
def test_training_refuses_a_bad_file_in_one_line(cxr_root, tmp_path, command, key):
    data = make_class_tree(tmp_path / "data", cxr_root, per_class=3)
    make_class_tree(tmp_path / "bad", cxr_root, per_class=0, bad=True)
    name = next((tmp_path / "bad").rglob(f"bad_{key}*"))
    target = data / name.parent.name / name.name
    name.rename(target)
    out = tmp_path / "bundle"
    result = fedbridge(command, data, "--out", out, *TINY)
    assert_one_line_error(result, name.name)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_training_refuses_an_empty_class_folder(cxr_root, tmp_path):
    data = make_class_tree(tmp_path / "data", cxr_root, per_class=3, empty_class="EMPTY")
    out = tmp_path / "bundle"
    assert_one_line_error(fedbridge("train", data, "--out", out, *TINY), "EMPTY", "empty class")
    assert not out.exists()


def test_missing_folder_and_bad_option_values(tmp_path):
    assert_one_line_error(fedbridge("data", "check", tmp_path / "nope"), "nope")
    result = fedbridge("train", tmp_path, "--out", tmp_path / "b", "--lr", "-1")
    assert result.returncode != 0 and "Traceback" not in result.stderr
