"""Patient-level, class-stratified splits of a class-folder dataset into bridge / site-N / test."""

from __future__ import annotations

import csv
import math
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedbridge_shared.data.images import file_sha256
from fedbridge_shared.data.samples import Sample, scan_folder
from fedbridge_shared.data.validate import validate_index
from fedbridge_shared.errors import ConfigError, DataError
from fedbridge_shared.files import atomic_dir

SPLIT_COLUMNS = ("path", "label", "patient_id", "part", "source")
MAX_SITES = 1000


@dataclass
class SplitResult:
    """The output folder and, per part, the samples written there (paths inside ``out``)."""

    out: Path
    parts: dict[str, list[Sample]]
    copies: int = 0  # files with a byte-identical copy elsewhere, kept in the copy's part
    warnings: tuple[str, ...] = ()  # problems the user allowed


def assign_parts(
    samples: Sequence[Sample],
    weights: Mapping[str, float],
    seed: int,
    *,
    group_of: Mapping[Path, str] | None = None,
) -> dict[str, list[Sample]]:
    """Share patients between parts in proportion to ``weights``, stratified by class.

    A patient's stratum is its most common label (ties: alphabetical first); all images of a
    patient go to the same part. ``group_of`` (path -> group, see :func:`copy_groups`) joins
    patients whose files are byte-identical copies into one group. Deterministic for a seed;
    each list is sorted by path.
    """
    _check_weights(weights)
    names = list(weights)
    by_patient: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        key = group_of.get(sample.path, sample.patient_id) if group_of else sample.patient_id
        by_patient[key].append(sample)
    strata: dict[str, list[str]] = defaultdict(list)
    for patient in sorted(by_patient):
        counts = Counter(s.label for s in by_patient[patient])
        label = min(counts, key=lambda lab: (-counts[lab], lab))
        strata[label].append(patient)

    rng = np.random.default_rng(seed)
    parts: dict[str, list[Sample]] = {name: [] for name in names}
    for label in sorted(strata):
        patients = [strata[label][i] for i in rng.permutation(len(strata[label]))]
        quotas = _largest_remainder(len(patients), [weights[n] for n in names], rng)
        start = 0
        for name, quota in zip(names, quotas, strict=True):
            for patient in patients[start : start + quota]:
                parts[name].extend(by_patient[patient])
            start += quota
    return {name: sorted(members, key=lambda s: s.path) for name, members in parts.items()}


def copy_groups(samples: Sequence[Sample]) -> tuple[dict[Path, str], int]:
    """Join the patients of byte-identical files (sha256 of the content) into one group, so a
    split never puts a copy on both sides. Returns path -> group and how many files have a
    copy; a group is named by its alphabetically first patient id."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    by_hash: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_hash[file_sha256(sample.path)].append(sample)
    copies = 0
    for group in by_hash.values():
        if len(group) > 1:
            copies += len(group)
            roots = sorted({find(s.patient_id) for s in group})
            for other in roots[1:]:
                parent[other] = roots[0]
    return {s.path: find(s.patient_id) for s in samples}, copies


def skew_sites(
    parts: Mapping[str, list[Sample]],
    alpha: float,
    seed: int,
    *,
    group_of: Mapping[Path, str] | None = None,
) -> dict[str, list[Sample]]:
    """Redistribute the patients of the ``site-*`` parts with Dirichlet label skew.

    The pooled site patients are dealt out again: each site draws its class proportions
    ``q_i ~ Dirichlet(alpha, ..., alpha)`` over the K classes, and each class's patients are
    shared between the sites in proportion to ``q_ic`` (largest remainder). Every site first
    gets one patient of each class that has at least as many patients as there are sites, so
    no site lacks a class its model must know. Other parts (bridge, test) are unchanged, so a
    skewed split and the IID split with the same seed pool exactly the same site patients.
    Small ``alpha`` (0.1) is strong skew; large (100) approaches the IID split.
    """
    if not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"skew (Dirichlet alpha) must be > 0, got {alpha}")
    site_names = [n for n in parts if n.startswith("site-")]
    if not site_names:
        return {n: list(v) for n, v in parts.items()}
    by_patient: dict[str, list[Sample]] = defaultdict(list)
    for name in site_names:
        for sample in parts[name]:
            key = group_of.get(sample.path, sample.patient_id) if group_of else sample.patient_id
            by_patient[key].append(sample)
    strata: dict[str, list[str]] = defaultdict(list)
    for patient in sorted(by_patient):
        counts = Counter(s.label for s in by_patient[patient])
        strata[min(counts, key=lambda lab: (-counts[lab], lab))].append(patient)
    labels = sorted(strata)
    rng = np.random.default_rng([seed, 0x5E3])  # independent of the IID assignment's stream
    q = rng.dirichlet([alpha] * len(labels), size=len(site_names))  # (sites, classes)
    new: dict[str, list[Sample]] = {n: [] for n in site_names}
    for c, label in enumerate(labels):
        patients = [strata[label][i] for i in rng.permutation(len(strata[label]))]
        reserve = 1 if len(patients) >= len(site_names) else 0
        rest = len(patients) - reserve * len(site_names)
        weights = [float(q[i, c]) + 1e-12 for i in range(len(site_names))]
        quotas = [reserve + k for k in _largest_remainder(rest, weights, rng)]
        start = 0
        for name, quota in zip(site_names, quotas, strict=True):
            for patient in patients[start : start + quota]:
                new[name].extend(by_patient[patient])
            start += quota
    out = {n: list(v) for n, v in parts.items()}
    for name in site_names:
        out[name] = sorted(new[name], key=lambda s: s.path)
    return out


def _check_weights(weights: Mapping[str, float]) -> None:
    if not weights:
        raise ConfigError("split weights are empty: give at least one part")
    for name, weight in weights.items():
        if not (math.isfinite(weight) and weight >= 0):
            raise ConfigError(f"split weight of part {name!r} must be >= 0, got {weight}")
    if sum(weights.values()) <= 0:
        raise ConfigError("split weights sum to 0: at least one part needs a positive weight")


def _largest_remainder(n: int, weights: list[float], rng: np.random.Generator) -> list[int]:
    """Integer counts summing to ``n`` in proportion to ``weights`` (Hamilton's method).

    Ties between equal remainders are broken at random so no part is always favoured.
    """
    total = sum(weights)
    exact = [n * w / total for w in weights]
    counts = [math.floor(x) for x in exact]
    remainders = [x - c if w > 0 else -1.0 for x, c, w in zip(exact, counts, weights, strict=True)]
    tiebreak = rng.permutation(len(weights))
    order = sorted(range(len(weights)), key=lambda i: (-round(remainders[i], 9), tiebreak[i]))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def split_weights(sites: int, bridge_fraction: float, test_fraction: float) -> dict[str, float]:
    """Part weights: ``bridge`` and ``test`` (each omitted at 0) and sites sharing the rest."""
    if isinstance(sites, bool) or not isinstance(sites, int) or not 1 <= sites <= MAX_SITES:
        raise ConfigError(f"--sites must be a whole number in [1, {MAX_SITES}], got {sites!r}")
    for name, value in (("bridge fraction", bridge_fraction), ("test fraction", test_fraction)):
        if not (math.isfinite(value) and 0 <= value < 1):
            raise ConfigError(f"{name} must be in [0, 1), got {value}")
    rest = 1.0 - bridge_fraction - test_fraction
    if rest <= 0:
        raise ConfigError(
            f"bridge fraction + test fraction must be < 1 so the sites get data, "
            f"got {bridge_fraction} + {test_fraction}"
        )
    weights = {"bridge": bridge_fraction} if bridge_fraction > 0 else {}
    weights |= {f"site-{i}": rest / sites for i in range(1, sites + 1)}
    if test_fraction > 0:
        weights["test"] = test_fraction
    return weights


def split_folder(
    root: Path,
    out: Path,
    sites: int,
    bridge_fraction: float,
    test_fraction: float,
    seed: int,
    manifest: Path | None = None,
    skew: float | None = None,
    *,
    allow: Iterable[str] = (),
) -> SplitResult:
    """Split ``root/<label>/`` by patient into ``out/<part>/<label>/`` plus ``out/split.csv``.

    With ``skew`` (a Dirichlet concentration α) the site parts are label-skewed: see
    :func:`skew_sites`; bridge and test stay exactly those of the IID split with the same seed.
    Files are copied (never hard-linked: an edit to a split file must not reach the source
    data). ``out`` appears complete or not at all. The dataset is validated first
    (:func:`~fedbridge_shared.data.validate.validate_index`, ``allow`` waives kinds), and
    byte-identical copies are kept in one part with their original.
    """
    weights = split_weights(sites, bridge_fraction, test_fraction)
    if skew is not None and not (math.isfinite(skew) and skew > 0):
        raise ConfigError(f"skew (Dirichlet alpha) must be > 0, got {skew}")
    out = Path(out)
    index = scan_folder(root, manifest)
    warnings = validate_index(index, allow=allow)
    if not index.samples:
        raise DataError(f"{index.root}: no images to split")
    if out.resolve().is_relative_to(index.root):
        raise ConfigError(f"{out}: the output folder must not be inside the data folder {root}")
    group_of, copies = copy_groups(index.samples)
    parts = assign_parts(index.samples, weights, seed, group_of=group_of)
    if skew is not None:
        parts = skew_sites(parts, skew, seed, group_of=group_of)
    empty = [name for name, members in parts.items() if not members]
    if empty:
        patients = len({s.patient_id for s in index.samples})
        raise ConfigError(
            f"{index.root}: part {empty[0]} would get no patients ({patients} patients for "
            f"{len(parts)} parts); use fewer --sites or other fractions"
        )
    _refuse_missing_classes(parts, index.labels, index.samples)
    final = out.resolve()
    result: dict[str, list[Sample]] = {}
    refuse_non_empty(out)
    with atomic_dir(out) as tmp:
        rows = []
        for part, members in parts.items():
            for label in index.labels:
                (tmp / part / label).mkdir(parents=True)
            result[part] = []
            for sample in members:
                relative = Path(part, sample.label, sample.path.name)
                shutil.copy2(sample.path, tmp / relative)
                result[part].append(Sample(final / relative, sample.label, sample.patient_id))
                rows.append(
                    (relative.as_posix(), sample.label, sample.patient_id, part, sample.path)
                )
        with (tmp / "split.csv").open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(SPLIT_COLUMNS)
            writer.writerows(rows)
    return SplitResult(out=out, parts=result, copies=copies, warnings=tuple(warnings))


def _refuse_missing_classes(
    parts: Mapping[str, list[Sample]], labels: Sequence[str], samples: Sequence[Sample]
) -> None:
    """Every part must hold every class: a site without one cannot train, a test part
    without one cannot measure its sensitivity or AUC."""
    for name, members in parts.items():
        present = {s.label for s in members}
        missing = [label for label in labels if label not in present]
        if missing:
            patients = len({s.patient_id for s in samples if s.label == missing[0]})
            raise ConfigError(
                f"part {name} would get no images of class {missing[0]} ({patients} patients "
                f"of that class for {len(parts)} parts); use fewer --sites, other fractions "
                "or a weaker --skew"
            )


def refuse_non_empty(out: Path) -> None:
    """A new output folder must not exist yet, or be empty: fedbridge never overwrites data."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out}: output folder exists and is not empty; choose a new folder")
