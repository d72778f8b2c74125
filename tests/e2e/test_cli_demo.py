"""`fedbridge demo` end to end on the generated SYNTHETIC phantom set (tiny model)."""

import json

from cli import assert_one_line_error, fedbridge, ok


def test_demo_on_phantom_data_says_synthetic_everywhere(tmp_path):
    out = tmp_path / "demo"
    result = ok("demo", "--quick", "--out", out, "--model", "test_efficientnet", "--init", "none")
    assert "SYNTHETIC" in result.stdout
    summary = json.loads((out / "demo.json").read_text())
    assert summary["synthetic"] is True
    assert [r["model"] for r in summary["test"]] == ["bridge only", "bridge → target"]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["n"] > 0 for r in summary["test"])
    report = json.loads((out / "report-target" / "metrics.json").read_text())
    assert report["synthetic"] is True and report["n"] == summary["test"][1]["n"]
    assert (out / "report-target" / "confusion_matrix.png").is_file()
    assert "README.txt" in {p.name for p in (out / "phantom-data").iterdir()}


def test_demo_refuses_to_overwrite_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    result = fedbridge("demo", "--quick", "--out", tmp_path, "--init", "none")
    assert_one_line_error(result, str(tmp_path), "not a demo folder")
    assert (tmp_path / "mine.txt").read_text() == "keep"
