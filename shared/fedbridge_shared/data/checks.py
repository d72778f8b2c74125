"""Check a class-folder dataset: unreadable files, empty classes, duplicates and patient leakage."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fedbridge_shared.data.images import file_sha256, read_image
from fedbridge_shared.data.samples import FolderIndex, Sample, scan_folder
from fedbridge_shared.errors import DataError

MAX_LISTED = 5  # how many paths one summary finding names


@dataclass
class Finding:
    """One problem; ``message`` is a complete one-line sentence that names the file(s)."""

    level: Literal["error", "warning"]
    path: Path | None
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.message}"


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
) -> CheckReport:
    """Decode every image under ``root/<label>/`` and report all problems (never stops early)."""
    index = scan_folder(root, manifest)
    findings: list[Finding] = []
    shapes: list[tuple[int, int]] = []
    by_hash: dict[str, list[Sample]] = defaultdict(list)
    total = len(index.samples)
    for done, sample in enumerate(index.samples, start=1):
        try:
            by_hash[file_sha256(sample.path)].append(sample)
            shapes.append(read_image(sample.path).shape)
        except DataError as e:
            findings.append(Finding("error", sample.path, str(e)))
        if progress is not None:
            progress(done, total)

    findings += _class_findings(index)
    findings += _duplicate_findings(by_hash)
    findings += _patient_findings(index)
    findings += _manifest_findings(index)
    return CheckReport(
        index=index,
        findings=findings,
        images_per_patient=_images_per_patient(index.samples),
        sizes=_size_summary(shapes),
    )


def _class_findings(index: FolderIndex) -> list[Finding]:
    findings = [
        Finding("error", index.root / label, f"{index.root / label}: class folder has no images")
        for label in index.empty_classes
    ]
    non_empty = len(index.labels) - len(index.empty_classes)
    if non_empty < 2:
        findings.append(
            Finding(
                "error",
                index.root,
                f"{index.root}: {non_empty} class folder(s) with images; a classifier needs at "
                "least 2",
            )
        )
    for path in index.skipped:
        what = "sub-folder (not scanned)" if path.is_dir() else "not an image file (by suffix)"
        findings.append(Finding("warning", path, f"{path}: skipped, {what}"))
    return findings


def _duplicate_findings(by_hash: dict[str, list[Sample]]) -> list[Finding]:
    findings = []
    for group in by_hash.values():
        if len(group) < 2:
            continue
        labels = sorted({s.label for s in group})
        if len(labels) == 1:
            names = ", ".join(str(s.path) for s in group)
            message = f"identical files in class {labels[0]}: {names}"
            findings.append(Finding("warning", group[0].path, message))
        else:
            names = ", ".join(f"{s.path} ({s.label})" for s in group)
            message = f"identical files with conflicting labels: {names}"
            findings.append(Finding("error", group[0].path, message))
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
            "warning",
            path,
            f"{path}: manifest {index.manifest} says label {listed!r}, folder says {folder!r} "
            "(the folder is used)",
        )
        for path, folder, listed in index.label_mismatches
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
    heights, widths = zip(*shapes)
    return {
        name: {"min": min(values), "median": statistics.median(values), "max": max(values)}
        for name, values in (("width", widths), ("height", heights))
    }
