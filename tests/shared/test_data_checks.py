"""check_folder: decodes everything, reports every problem, never stops at the first."""

import shutil

import pytest
from badinputs import BAD_KEYS, make_class_tree

from fedbridge_shared.data.checks import check_folder
from fedbridge_shared.errors import DataError


def _messages(report, level):
    return [str(f) for f in report.findings if f.level == level]


def test_real_cxr_passes_with_leakage_warnings(cxr_root):
    calls = []
    report = check_folder(cxr_root, progress=lambda done, total: calls.append((done, total)))
    assert report.ok and report.errors == []
    assert len(calls) == 581 and calls[-1] == (581, 581)
    # 9 real patients have films in two classes (e.g. COVID-19 follow-ups labelled "No Finding").
    warnings = _messages(report, "warning")
    assert len(warnings) == 9
    assert all("has images in several classes" in w for w in warnings)
    assert any("ieee8023-325" in w and "COVID19, NORMAL" in w for w in warnings)
    assert report.images_per_patient == {
        "patients": 542,
        "min": 1,
        "median": 1,
        "max": 5,
        "mean": pytest.approx(581 / 542),
    }
    assert report.sizes["width"]["max"] == 512 and report.sizes["height"]["min"] >= 8


def test_bad_tree_lists_every_problem(cxr_root, tmp_path):
    root = make_class_tree(tmp_path / "data", cxr_root, per_class=2, bad=True, empty_class="EMPTY")
    (root / "NORMAL" / "readme.txt").write_text("not an image")
    report = check_folder(root)
    assert not report.ok
    errors = {f.path.name: f.message for f in report.errors}
    for key, words in BAD_KEYS.items():
        name = next(n for n in errors if n.startswith(f"bad_{key}"))
        assert words in errors[name], (key, errors[name])
        assert str(root) not in errors[name]  # the path is in Finding.path, not repeated
    assert errors["EMPTY"] == "empty class folder (no images)"
    assert len(report.errors) == len(BAD_KEYS) + 1
    assert [f.path.name for f in report.warnings] == ["readme.txt"]
    assert str(report.warnings[0]).startswith(f"warning: {root.resolve()}/NORMAL/readme.txt: ")


def test_duplicates_same_class_warn_and_across_classes_error(cxr_root, tmp_path):
    root = make_class_tree(tmp_path / "data", cxr_root, per_class=2)
    covid = sorted((root / "COVID19").iterdir())[0]
    shutil.copy(covid, root / "COVID19" / "copy.jpg")
    normal = sorted((root / "NORMAL").iterdir())[0]
    shutil.copy(normal, root / "VIRAL_PNEUMONIA" / "mislabelled.jpg")
    report = check_folder(root, manifest=None)
    warnings, errors = _messages(report, "warning"), _messages(report, "error")
    assert any("duplicate" in w and "copy.jpg" in w and covid.name in w for w in warnings)
    assert len(errors) == 1
    assert "conflicting labels" in errors[0]
    assert "mislabelled.jpg" in errors[0] and normal.name in errors[0]
    assert "NORMAL" in errors[0] and "VIRAL_PNEUMONIA" in errors[0]


def test_patient_in_two_classes_warns_and_label_mismatch_is_an_error(cxr_root, tmp_path):
    root = make_class_tree(tmp_path / "data", cxr_root, per_class=1)
    a = next((root / "COVID19").iterdir())
    b = next((root / "NORMAL").iterdir())
    (root / "MANIFEST.csv").write_text(
        f"path,label,patient_id\nCOVID19/{a.name},COVID19,p1\nNORMAL/{b.name},COVID19,p1\n"
    )
    report = check_folder(root)
    assert not report.ok  # issue #30: a manifest contradicting a folder is refused ...
    assert any("1 of 4 images have another label" in e for e in _messages(report, "error"))
    assert any(b.name in i and "gives label 'COVID19'" in i for i in _messages(report, "info"))
    report = check_folder(root, allow={"manifest-conflict"})  # ... unless the user allows it
    assert report.ok
    warnings = _messages(report, "warning")
    assert any("patient p1 has images in several classes: COVID19, NORMAL" in w for w in warnings)
    assert any(
        "another label" in w and "allowed by --allow-manifest-conflict" in w for w in warnings
    )
    assert any("2 of 4 images are not listed in manifest" in w for w in warnings)


def test_one_class_is_an_error_and_missing_root_raises(cxr_root, tmp_path):
    root = tmp_path / "data"
    (root / "NORMAL").mkdir(parents=True)
    shutil.copy(next((cxr_root / "NORMAL").iterdir()), root / "NORMAL" / "x.jpg")
    report = check_folder(root)
    assert [f.message for f in report.errors] == [
        "1 class folder(s) with images; a classifier needs at least 2"
    ]
    with pytest.raises(DataError, match="does not exist"):
        check_folder(tmp_path / "nope")
