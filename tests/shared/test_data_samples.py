"""scan_folder: class folders, image files and patient ids from a manifest (or none)."""

from pathlib import Path

import pytest

from fedbridge_shared.data.samples import Sample, scan_folder
from fedbridge_shared.errors import DataError


def _tree(root: Path, files: dict[str, bytes | None]) -> Path:
    """Create ``root`` with files (``None`` content makes a directory)."""
    for name, content in files.items():
        path = root / name
        if content is None:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
    return root


def _manifest(path: Path, rows: list[tuple[str, str, str]], header="path,label,patient_id"):
    lines = [header] + [",".join(row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_real_cxr_folder(cxr_root):
    index = scan_folder(cxr_root)
    assert index.root == cxr_root.resolve()
    assert index.labels == ("BACTERIAL_PNEUMONIA", "COVID19", "NORMAL", "VIRAL_PNEUMONIA")
    assert len(index.samples) == 581
    assert index.counts() == {
        "BACTERIAL_PNEUMONIA": 151,
        "COVID19": 150,
        "NORMAL": 139,
        "VIRAL_PNEUMONIA": 141,
    }
    assert [s.path for s in index.samples] == sorted(s.path for s in index.samples)
    assert index.patient_source == f"manifest {cxr_root.parent.resolve() / 'MANIFEST.csv'}"
    assert index.unlisted == () and index.label_mismatches == () and index.skipped == ()
    ids = {s.patient_id for s in index.samples}
    assert len(ids) == 542
    assert all(i.startswith(("ieee8023-", "kermany-cxr-")) for i in ids)
    assert any(i.startswith("ieee8023-") for i in ids) and any("kermany-cxr-" in i for i in ids)
    covid = index.by_label("COVID19")
    assert len(covid) == 150 and all(s.label == "COVID19" for s in covid)
    first = index.samples[0]
    assert first == Sample(
        cxr_root.resolve() / "BACTERIAL_PNEUMONIA" / "ieee8023_000001-19.jpg",
        "BACTERIAL_PNEUMONIA",
        "ieee8023-284",
    )


def test_without_manifest_each_file_is_its_own_patient(tmp_path):
    root = _tree(
        tmp_path / "data",
        {
            "B/b1.PNG": b"x",
            "B/notes.txt": b"x",
            "B/.DS_Store": b"x",
            "B/nested": None,
            "A/a2.jpeg": b"x",
            "A/a1.dcm": b"x",
            "EMPTY": None,
            ".hidden/h.png": b"x",
            "loose.png": b"x",
        },
    )
    index = scan_folder(root)
    assert index.labels == ("A", "B", "EMPTY")
    assert [(s.path.name, s.label, s.patient_id) for s in index.samples] == [
        ("a1.dcm", "A", "file:A/a1.dcm"),
        ("a2.jpeg", "A", "file:A/a2.jpeg"),
        ("b1.PNG", "B", "file:B/b1.PNG"),
    ]
    assert index.patient_source == "none: each file is its own patient"
    assert index.manifest is None and index.unlisted == ()
    assert index.empty_classes == ("EMPTY",)
    assert index.counts() == {"A": 2, "B": 1, "EMPTY": 0}
    assert [p.name for p in index.skipped] == ["nested", "notes.txt"]
    with pytest.raises(KeyError, match="NOPE"):
        index.by_label("NOPE")


def test_manifest_search_order_and_explicit_manifest(tmp_path):
    root = _tree(tmp_path / "set" / "data", {"A/a.png": b"x", "B/b.png": b"x"})
    _manifest(tmp_path / "set" / "split.csv", [("data/A/a.png", "A", "from-parent-split")])
    assert scan_folder(root).samples[0].patient_id == "from-parent-split"
    _manifest(tmp_path / "set" / "MANIFEST.csv", [("data/A/a.png", "A", "from-parent")])
    assert scan_folder(root).samples[0].patient_id == "from-parent"
    _manifest(root / "split.csv", [("A/a.png", "A", "from-root-split")])
    assert scan_folder(root).samples[0].patient_id == "from-root-split"
    _manifest(root / "MANIFEST.csv", [("A/a.png", "A", "from-root")])
    index = scan_folder(root)
    assert index.samples[0].patient_id == "from-root"
    assert index.patient_source == f"manifest {root.resolve() / 'MANIFEST.csv'}"
    other = _manifest(tmp_path / "other.csv", [("set/data/A/a.png", "A", "explicit")])
    assert scan_folder(root, other).samples[0].patient_id == "explicit"


def test_unlisted_files_and_label_mismatch(tmp_path):
    root = _tree(tmp_path / "data", {"A/a.png": b"x", "A/extra.png": b"x", "B/b.png": b"x"})
    _manifest(
        root / "MANIFEST.csv",
        [
            ("A/a.png", "A", "p1"),
            ("./B/b.png", "A", "p1"),  # wrong label; "./" is fine
            ("A/gone.png", "A", "p9"),  # listed but absent: ignored
        ],
        header="path,label,patient_id,extra",
    )
    index = scan_folder(root)
    ids = {s.path.name: (s.label, s.patient_id) for s in index.samples}
    assert ids == {
        "a.png": ("A", "p1"),
        "extra.png": ("A", "file:A/extra.png"),
        "b.png": ("B", "p1"),
    }
    assert [p.name for p in index.unlisted] == ["extra.png"]
    assert [(p.name, folder, listed) for p, folder, listed in index.label_mismatches] == [
        ("b.png", "B", "A")
    ]


@pytest.mark.parametrize(
    "bad_path", ["../data/A/a.png", "A/../A/a.png", "/etc/passwd", "C:\\x\\a.png", "A\\..\\a.png"]
)
def test_manifest_path_traversal_is_refused(tmp_path, bad_path):
    root = _tree(tmp_path / "data", {"A/a.png": b"x", "B/b.png": b"x"})
    manifest = _manifest(root / "MANIFEST.csv", [("A/a.png", "A", "p1"), (bad_path, "A", "p2")])
    with pytest.raises(DataError) as info:
        scan_folder(root)
    assert str(manifest.resolve()) in str(info.value) and "line 3" in str(info.value)


def test_bad_manifests(tmp_path):
    root = _tree(tmp_path / "data", {"A/a.png": b"x", "B/b.png": b"x"})
    manifest = _manifest(root / "MANIFEST.csv", [("A/a.png", "A")], header="path,label")
    with pytest.raises(DataError, match="lacks column.*patient_id"):
        scan_folder(root)
    _manifest(manifest, [("A/a.png", "A", "p1"), ("A/a.png", "A", "p2")])
    with pytest.raises(DataError, match="lines 2 and 3"):
        scan_folder(root)
    with pytest.raises(DataError, match="missing.csv"):
        scan_folder(root, tmp_path / "missing.csv")


def test_bad_roots(tmp_path):
    with pytest.raises(DataError, match="nope: data folder does not exist"):
        scan_folder(tmp_path / "nope")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DataError, match="not a folder"):
        scan_folder(tmp_path / "file.png")
    with pytest.raises(DataError, match="no class folders.*1 images directly"):
        scan_folder(tmp_path)
