"""Check a class-folder dataset: unreadable files, empty classes, duplicates and patient leakage."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fedbridge_shared.data.images import IMAGE_SUFFIXES, file_sha256, read_image
from fedbridge_shared.data.samples import FolderIndex, Sample, entry_kind, scan_folder
from fedbridge_shared.data.validate import Problem, allow_set, dataset_problems
from fedbridge_shared.errors import DataError

MAX_LISTED = 5  # how many paths one summary finding names


@dataclass
class Finding:
    """One problem: the file or folder it concerns (if one) and a one-line message."""

    level: Literal["error", "warning", "info"]
    path: Path | None
    message: str  # does not repeat ``path``; print as ``f"{path}: {message}"``

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path is not None else ""
        return f"{self.level}: {where}{self.message}"


@dataclass
class CheckReport:
    """The folder index, all findings, and summary statistics of the readable images."""

    index: FolderIndex
    findings: list[Finding] = field(default_factory=list)
    images_per_patient: dict[str, float] = field(default_factory=dict)  # min, median, max, mean
    sizes: dict[str, dict[str, float]] = field(default_factory=dict)  # width/height: min/median/max

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    @property
    def ok(self) -> bool:
        """True when there are no errors (warnings allowed)."""
        return not self.errors


def check_folder(
    root: Path,
    manifest: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    *,
    allow: Iterable[str] = (),
) -> CheckReport:
    """Decode every image under ``root/<label>/`` and report all problems (never stops early).

    The shared dataset validation (:mod:`~fedbridge_shared.data.validate`) adds its problems:
    errors, or warnings for the kinds waived in ``allow``.
    """
    index = scan_folder(root, manifest)
    allowed = allow_set(allow)
    findings: list[Finding] = [
        Finding("warning" if p.kind in allowed else "error", p.path, _with_hatch(p, allowed))
        for p in dataset_problems(index)
    ]
    shapes: list[tuple[int, int]] = []
    by_hash: dict[str, list[Sample]] = defaultdict(list)
    total = len(index.samples)
    for done, sample in enumerate(index.samples, start=1):
        notes: list[str] = []
        try:
            by_hash[file_sha256(sample.path)].append(sample)
            shapes.append(read_image(sample.path, notes=notes).shape)
        except DataError as e:
            message = str(e).removeprefix(f"{sample.path}: ")
            findings.append(Finding("error", sample.path, message))
        for note in notes:
            level: Literal["warning", "info"] = (
                "warning" if note.startswith("extreme aspect") else "info"
            )
            findings.append(Finding(level, sample.path, note))
        if progress is not None:
            progress(done, total)

    findings += _class_findings(index)
    findings += _symlink_findings(index)
    findings += _duplicate_findings(by_hash)
    findings += _patient_findings(index)
    findings += _manifest_findings(index)
    return CheckReport(
        index=index,
        findings=findings,
        images_per_patient=_images_per_patient(index.samples),
        sizes=_size_summary(shapes),
    )


def _with_hatch(problem: Problem, allowed: frozenset[str]) -> str:
    if problem.kind is None:
        return problem.message
    if problem.kind in allowed:
        return f"{problem.message} (allowed by --allow-{problem.kind})"
    return f"{problem.message} (--allow-{problem.kind} to use it anyway)"


def _class_findings(index: FolderIndex) -> list[Finding]:
    findings = [
        Finding("error", index.root / label, "empty class folder (no images)")
        for label in index.empty_classes
    ]
    non_empty = len(index.labels) - len(index.empty_classes)
    if non_empty < 2:
        message = f"{non_empty} class folder(s) with images; a classifier needs at least 2"
        findings.append(Finding("error", index.root, message))
    suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
    for path in index.skipped:
        kind = entry_kind(path)
        if kind == "folder":
            message = "skipped: sub-folder inside a class folder (only direct files are read)"
        elif kind == "file":
            message = f"skipped: not an image file (suffix not one of {suffixes})"
        else:
            message = f"skipped: a {kind}, not an image file"
        findings.append(Finding("warning", path, message))
    return findings


def _symlink_findings(index: FolderIndex) -> list[Finding]:
    """Warn about images that are symlinks to files outside the data folder."""
    findings = []
    for sample in index.samples:
        if sample.path.is_symlink():
            target = sample.path.resolve()
            if not target.is_relative_to(index.root):
                message = f"symlink to {target}, outside the data folder {index.root}"
                findings.append(Finding("warning", sample.path, message))
    return findings


def _duplicate_findings(by_hash: dict[str, list[Sample]]) -> list[Finding]:
    findings = []
    for group in by_hash.values():
        if len(group) < 2:
            continue
        first, others = group[0], group[1:]
        if all(s.label == first.label for s in others):
            names = ", ".join(str(s.path) for s in others)
            message = f"duplicate: identical to {names} (same class {first.label})"
            findings.append(Finding("warning", first.path, message))
        else:
            names = ", ".join(f"{s.path} ({s.label})" for s in others)
            message = f"identical files with conflicting labels: {first.label} here, {names}"
            findings.append(Finding("error", first.path, message))
    return findings


def _patient_findings(index: FolderIndex) -> list[Finding]:
    classes: dict[str, set[str]] = defaultdict(set)
    for sample in index.samples:
        classes[sample.patient_id].add(sample.label)
    return [
        Finding(
            "warning",
            None,
            f"patient {patient} has images in several classes: {', '.join(sorted(labels))} "
            "(a patient-level split keeps them in one part)",
        )
        for patient, labels in sorted(classes.items())
        if len(labels) > 1
    ]


def _manifest_findings(index: FolderIndex) -> list[Finding]:
    findings = [
        Finding(
            "info",
            path,
            f"manifest {index.manifest} gives label {listed!r}; the folder's {folder!r} is used",
        )
        for path, folder, listed in index.label_mismatches[:MAX_LISTED]
    ]
    if index.unlisted:
        examples = ", ".join(p.name for p in index.unlisted[:MAX_LISTED])
        more = ", ..." if len(index.unlisted) > MAX_LISTED else ""
        findings.append(
            Finding(
                "warning",
                None,
                f"{len(index.unlisted)} of {len(index.samples)} images are not listed in manifest "
                f"{index.manifest} with a patient id; each is treated as its own patient "
                f"({examples}{more})",
            )
        )
    return findings


def _images_per_patient(samples: tuple[Sample, ...]) -> dict[str, float]:
    counts = list(Counter(s.patient_id for s in samples).values())
    if not counts:
        return {"patients": 0, "min": 0, "median": 0, "max": 0, "mean": 0.0}
    return {
        "patients": len(counts),
        "min": min(counts),
        "median": statistics.median(counts),
        "max": max(counts),
        "mean": sum(counts) / len(counts),
    }


def _size_summary(shapes: list[tuple[int, int]]) -> dict[str, dict[str, float]]:
    if not shapes:
        return {}
    heights, widths = zip(*shapes, strict=True)
    return {
        name: {"min": min(values), "median": statistics.median(values), "max": max(values)}
        for name, values in (("width", widths), ("height", heights))
    }
