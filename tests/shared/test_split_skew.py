"""`data split --skew ALPHA`: Dirichlet label skew across sites, on real chest X-rays."""

import csv
from collections import Counter, defaultdict

import numpy as np
import pytest

from fedbridge_shared.data.split import split_folder
from fedbridge_shared.errors import ConfigError

LABELS = ("BACTERIAL_PNEUMONIA", "COVID19", "NORMAL", "VIRAL_PNEUMONIA")


def _rows(out):
    with (out / "split.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _site_proportions(rows) -> np.ndarray:
    counts: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        if r["part"].startswith("site-"):
            counts[r["part"]][r["label"]] += 1
    sites = sorted(counts)
    table = np.array([[counts[s][lab] for lab in LABELS] for s in sites], dtype=float)
    return table / table.sum(1, keepdims=True)


def _patients_by_part(rows) -> dict[str, set[str]]:
    parts: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        parts[r["part"]].add(r["patient_id"])
    return parts


def test_skewed_sites_differ_from_iid_and_stay_patient_disjoint(cxr_root, tmp_path):
    # Prepare: the same seed, IID and skewed (alpha 0.5), over 3 sites
    kwargs = dict(sites=3, bridge_fraction=0.5, test_fraction=0.2, seed=0)
    iid = split_folder(cxr_root, tmp_path / "iid", **kwargs)
    skew = split_folder(cxr_root, tmp_path / "skew", skew=0.5, **kwargs)
    iid_rows, skew_rows = _rows(iid.out), _rows(skew.out)

    # Execute: per-site class proportions, distance from the pooled class mix
    pooled = [r["label"] for r in iid_rows if r["part"].startswith("site-")]
    overall = np.array([pooled.count(lab) for lab in LABELS])
    overall = overall / overall.sum()
    tv_iid = 0.5 * np.abs(_site_proportions(iid_rows) - overall).sum(1)
    tv_skew = 0.5 * np.abs(_site_proportions(skew_rows) - overall).sum(1)

    # Assert: IID sites mirror the pool; skewed sites differ measurably
    assert tv_iid.max() < 0.06, tv_iid
    assert tv_skew.mean() > 0.15, tv_skew
    assert tv_skew.mean() > 4 * tv_iid.mean()
    # every patient in exactly one part, in both splits
    for rows in (iid_rows, skew_rows):
        parts = _patients_by_part(rows)
        names = sorted(parts)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                assert not parts[a] & parts[b], (a, b)
    # bridge and test are untouched by the skew; the sites pool the same patients
    iid_parts, skew_parts = _patients_by_part(iid_rows), _patients_by_part(skew_rows)
    assert iid_parts["bridge"] == skew_parts["bridge"]
    assert iid_parts["test"] == skew_parts["test"]
    pool = set().union(*(v for k, v in iid_parts.items() if k.startswith("site-")))
    assert pool == set().union(*(v for k, v in skew_parts.items() if k.startswith("site-")))
    # every site keeps at least one patient of every class (all classes have >= 3 patients)
    for site in ("site-1", "site-2", "site-3"):
        labels = {r["label"] for r in skew_rows if r["part"] == site}
        assert labels == set(LABELS), (site, labels)


def test_skew_is_deterministic_per_seed_and_validated(cxr_root, tmp_path):
    kwargs = dict(sites=3, bridge_fraction=0.6, test_fraction=0.2, skew=0.5)
    a = _rows(split_folder(cxr_root, tmp_path / "a", seed=1, **kwargs).out)
    b = _rows(split_folder(cxr_root, tmp_path / "b", seed=1, **kwargs).out)
    c = _rows(split_folder(cxr_root, tmp_path / "c", seed=2, **kwargs).out)
    assert a == b
    assert [r["part"] for r in a] != [r["part"] for r in c]
    with pytest.raises(ConfigError, match="alpha"):
        split_folder(cxr_root, tmp_path / "d", sites=3, bridge_fraction=0.5, test_fraction=0.2,
                     seed=0, skew=0.0)  # fmt: skip
