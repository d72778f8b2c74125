"""Patient-level stratified splits: disjoint, deterministic, atomic, and readable back."""

import csv
from collections import Counter
from pathlib import Path

import pytest

from fedbridge_shared.data import split as split_module
from fedbridge_shared.data.samples import Sample, scan_folder
from fedbridge_shared.data.split import assign_parts, split_folder, split_weights
from fedbridge_shared.errors import ConfigError

LABELS = ("BACTERIAL_PNEUMONIA", "COVID19", "NORMAL", "VIRAL_PNEUMONIA")


def _samples(n_patients: int, labels=("A", "B"), per_patient: int = 1) -> list[Sample]:
    return [
        Sample(Path(f"/d/{label}/{label}{p:03d}_{k}.png"), label, f"{label}-{p}")
        for label in labels
        for p in range(n_patients)
        for k in range(per_patient)
    ]


def _patients(samples) -> set[str]:
    return {s.patient_id for s in samples}


def test_assign_parts_is_patient_level_proportional_and_deterministic():
    samples = _samples(20, per_patient=2)
    weights = {"x": 0.5, "y": 0.3, "z": 0.2, "never": 0.0}
    parts = assign_parts(samples, weights, seed=3)
    assert list(parts) == ["x", "y", "z", "never"]
    assert parts["never"] == []
    for members in parts.values():
        assert [s.path for s in members] == sorted(s.path for s in members)
    # Largest remainder per class: 20 patients -> 10 / 6 / 4, two images each, in both classes.
    for name, n in (("x", 10), ("y", 6), ("z", 4)):
        assert Counter(s.label for s in parts[name]) == {"A": 2 * n, "B": 2 * n}
        assert len(_patients(parts[name])) == 2 * n
    assert sum(len(p) for p in parts.values()) == len(samples)
    assert _patients(parts["x"]).isdisjoint(_patients(parts["y"]) | _patients(parts["z"]))
    assert assign_parts(list(reversed(samples)), weights, seed=3) == parts
    assert assign_parts(samples, weights, seed=4) != parts


def test_patient_stratum_is_its_most_common_label_ties_alphabetical():
    def sample(name, label, patient):
        return Sample(Path(f"/d/{label}/{name}.png"), label, patient)

    samples = [
        sample("t1", "B", "tie"),  # 1 B + 1 A: tie -> stratum A
        sample("t2", "A", "tie"),
        sample("a1", "A", "a-only"),
        sample("m1", "B", "mostly-b"),  # 2 B + 1 A -> stratum B
        sample("m2", "B", "mostly-b"),
        sample("m3", "A", "mostly-b"),
        sample("b1", "B", "b-only"),
    ]
    # Two equal parts: a stratum of exactly two patients always sends one to each part.
    for seed in range(20):
        parts = assign_parts(samples, {"p": 1.0, "q": 1.0}, seed=seed)
        part_of = {s.patient_id: name for name, members in parts.items() for s in members}
        assert part_of["tie"] != part_of["a-only"]
        assert part_of["mostly-b"] != part_of["b-only"]
        assert sum(len(m) for m in parts.values()) == len(samples)


def test_largest_remainder_spreads_ties_between_equal_parts():
    # 3 classes x 1 patient, three equal sites: every site should get someone over many seeds.
    samples = _samples(1, labels=("A", "B", "C"))
    winners = Counter()
    for seed in range(30):
        parts = assign_parts(samples, {"s1": 1, "s2": 1, "s3": 1}, seed=seed)
        winners.update(name for name, members in parts.items() if members)
    assert set(winners) == {"s1", "s2", "s3"}


@pytest.mark.parametrize(
    "args, words",
    [
        ((0, 0.1, 0.2), "sites"),
        ((2, 1.0, 0.0), "bridge fraction"),
        ((2, 0.0, -0.1), "test fraction"),
        ((2, 0.5, 0.5), "< 1"),
        ((2, float("nan"), 0.1), "bridge fraction"),
    ],
)
def test_bad_split_arguments(args, words):
    with pytest.raises(ConfigError, match=words):
        split_weights(*args)


def test_split_weights():
    assert split_weights(2, 0.0, 0.2) == {"site-1": 0.4, "site-2": 0.4, "test": 0.2}
    assert list(split_weights(3, 0.1, 0.2)) == ["bridge", "site-1", "site-2", "site-3", "test"]


@pytest.fixture(scope="module")
def real_split(cxr_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("split") / "out"
    return split_folder(cxr_root, out, sites=3, bridge_fraction=0.1, test_fraction=0.2, seed=7)


def test_real_split_is_patient_disjoint_stratified_and_complete(real_split, cxr_root):
    out, parts = real_split.out, real_split.parts
    assert list(parts) == ["bridge", "site-1", "site-2", "site-3", "test"]
    owner = {}
    for name, members in parts.items():
        for pid in _patients(members):
            assert owner.setdefault(pid, name) == name, f"patient {pid} in {owner[pid]} and {name}"
        assert set(Counter(s.label for s in members)) == set(LABELS), name  # every class
        for label in LABELS:
            assert (out / name / label).is_dir()
        for sample in members:
            assert sample.path == out.resolve() / name / sample.label / sample.path.name
    assert sum(len(m) for m in parts.values()) == 581
    sizes = {name: len(_patients(m)) for name, m in parts.items()}
    assert 40 <= sizes["bridge"] <= 70 and 95 <= sizes["test"] <= 125, sizes
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_split_csv_and_files(real_split, cxr_root):
    out = real_split.out
    with (out / "split.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["path", "label", "patient_id", "part", "source"]
        rows = list(reader)
    assert len(rows) == 581
    originals = {s.path: s for s in scan_folder(cxr_root).samples}
    for row in rows:
        source = Path(row["source"])
        assert source in originals and originals[source].patient_id == row["patient_id"]
        copy = out / row["path"]
        assert copy.relative_to(out).parts[:2] == (row["part"], row["label"])
        assert copy.read_bytes() == source.read_bytes()


def test_scanning_a_part_recovers_patient_ids_from_split_csv(real_split):
    out = real_split.out
    index = scan_folder(out / "site-1")
    assert index.patient_source == f"manifest {out.resolve() / 'split.csv'}"
    assert index.unlisted == ()
    assert sorted(index.samples, key=lambda s: s.path) == real_split.parts["site-1"]


def test_split_is_deterministic_and_seed_dependent(cxr_root, tmp_path, real_split):
    again = split_folder(cxr_root, tmp_path / "a", 3, 0.1, 0.2, seed=7)
    other = split_folder(cxr_root, tmp_path / "b", 3, 0.1, 0.2, seed=8)
    text = (real_split.out / "split.csv").read_text()
    assert (again.out / "split.csv").read_text() == text
    assert (other.out / "split.csv").read_text() != text


def test_zero_bridge_fraction_omits_bridge(cxr_root, tmp_path):
    result = split_folder(cxr_root, tmp_path / "s", 2, 0.0, 0.2, seed=0)
    assert list(result.parts) == ["site-1", "site-2", "test"]
    assert sorted(p.name for p in result.out.iterdir()) == ["site-1", "site-2", "split.csv", "test"]


def test_output_folder_rules(cxr_root, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("keep me")
    with pytest.raises(ConfigError, match="full: output folder exists and is not empty"):
        split_folder(cxr_root, full, 2, 0.0, 0.2, seed=0)
    assert (full / "x").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert split_folder(cxr_root, empty, 2, 0.0, 0.2, seed=0).out == empty
    assert (empty / "split.csv").is_file()


def test_output_inside_data_folder_is_refused(cxr_root, tmp_path):
    data = tmp_path / "data"
    for label in ("A", "B"):
        (data / label).mkdir(parents=True)
        (data / label / "x.png").write_bytes(b"x")
    with pytest.raises(ConfigError, match="must not be inside the data folder"):
        split_folder(data, data / "split", 1, 0.0, 0.5, seed=0)


def test_failure_leaves_nothing_behind(cxr_root, tmp_path, monkeypatch):
    calls = []

    def failing_copy(source, target):
        calls.append(source)
        if len(calls) == 10:
            raise OSError("disk full")
        target.write_bytes(b"")

    monkeypatch.setattr(split_module.shutil, "copy2", failing_copy)
    with pytest.raises(OSError, match="disk full"):
        split_folder(cxr_root, tmp_path / "out", 2, 0.0, 0.2, seed=0)
    assert list(tmp_path.iterdir()) == []


def test_split_files_are_copies_not_links_to_the_source(cxr_root, tmp_path):
    result = split_folder(cxr_root, tmp_path / "out", 1, 0.0, 0.2, seed=0)
    sample = result.parts["test"][0]
    assert sample.path.stat().st_nlink == 1


def test_a_part_without_a_class_is_refused(cxr_root, tmp_path):
    """Two COVID19 patients cannot cover three sites and a test part: refused, nothing written."""
    data = tmp_path / "data"
    for label in LABELS:
        (data / label).mkdir(parents=True)
        keep = 2 if label == "COVID19" else 12
        for image in sorted((cxr_root / label).iterdir())[:keep]:
            (data / label / image.name).write_bytes(image.read_bytes())
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"part \S+ would get no images of class COVID19"):
        split_folder(data, out, 3, 0.0, 0.2, seed=0)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
