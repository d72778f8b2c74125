"""Index a class-folder dataset (``root/<label>/<image>``); attach patient ids from a manifest."""

from __future__ import annotations

import csv
import errno
import os
import stat
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from fedbridge_shared.data.images import IMAGE_SUFFIXES
from fedbridge_shared.errors import DataError

MANIFEST_NAMES = ("MANIFEST.csv", "split.csv")
REQUIRED_COLUMNS = ("path", "patient_id")  # `label` is used when present


@dataclass(frozen=True)
class Sample:
    """One image file with its class label (the folder name) and patient id."""

    path: Path
    label: str
    patient_id: str


@dataclass(frozen=True)
class FolderIndex:
    """What ``scan_folder`` found: labels, samples and where the patient ids came from."""

    root: Path
    labels: tuple[str, ...]
    samples: tuple[Sample, ...]
    patient_source: str
    empty_classes: tuple[str, ...] = ()
    skipped: tuple[Path, ...] = ()  # non-image files and sub-folders inside class folders
    label_mismatches: tuple[tuple[Path, str, str], ...] = ()  # (path, folder, manifest label)
    manifest: Path | None = None
    unlisted: tuple[Path, ...] = ()  # images missing from the manifest: each is its own patient
    unusable: tuple[tuple[Path, str], ...] = ()  # entries of root that cannot be class folders
    # every manifest row by resolved path, all its columns (sources read them: no second read)
    manifest_rows: Mapping[Path, Mapping[str, str]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def counts(self) -> dict[str, int]:
        """Number of images per label, in label order (empty classes included)."""
        counts = Counter(s.label for s in self.samples)
        return {label: counts.get(label, 0) for label in self.labels}

    def by_label(self, label: str) -> tuple[Sample, ...]:
        """Samples of one label, sorted by path."""
        if label not in self.labels:
            raise KeyError(f"unknown label {label!r}; labels are {', '.join(self.labels)}")
        return tuple(s for s in self.samples if s.label == label)


@dataclass(frozen=True)
class _ManifestRow:
    line: int
    label: str | None
    patient_id: str


def scan_folder(root: Path, manifest: Path | None = None) -> FolderIndex:
    """List the images in ``root/<label>/`` (no decoding) and attach patient ids.

    Patient ids come from ``manifest`` or else the first of MANIFEST.csv / split.csv found in
    ``root`` and then in ``root.parent``; images it does not list are their own patient.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: data folder does not exist")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (expected one sub-folder per class)")
    root = root.resolve()
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    class_dirs = [p for p in entries if p.is_dir()]
    unusable = [
        (p, kind)
        for p in entries
        if p.is_symlink() and (kind := entry_kind(p)) in ("symlink loop", "broken symlink")
    ]
    if not class_dirs:
        loose = [p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
        hint = f"; it holds {len(loose)} images directly: give its parent" if loose else ""
        raise DataError(f"{root}: no class folders (one sub-folder per label expected){hint}")

    files: list[tuple[Path, str]] = []
    skipped: list[Path] = []
    for class_dir in class_dirs:
        _check_name(class_dir)
        for entry in class_dir.iterdir():
            if entry.name.startswith("."):
                continue
            _check_name(entry)
            if entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES:
                files.append((entry, class_dir.name))
            else:
                skipped.append(entry)
    files.sort()

    manifest_path = Path(manifest) if manifest is not None else find_manifest(root)
    rows, records = read_manifest_rows(manifest_path) if manifest_path is not None else ({}, {})

    samples: list[Sample] = []
    mismatches: list[tuple[Path, str, str]] = []
    unlisted: list[Path] = []
    for path, label in files:
        row = rows.get(path.resolve()) if rows else None
        if row is None:
            samples.append(Sample(path, label, f"file:{label}/{path.name}"))
            unlisted.append(path)
            continue
        samples.append(Sample(path, label, row.patient_id))
        if row.label is not None and row.label != label:
            mismatches.append((path, label, row.label))

    labels = tuple(p.name for p in class_dirs)
    present = {s.label for s in samples}
    if manifest_path is None:
        source = "none: each file is its own patient"
    else:
        source = f"manifest {manifest_path}"
    return FolderIndex(
        root=root,
        labels=labels,
        samples=tuple(samples),
        patient_source=source,
        empty_classes=tuple(label for label in labels if label not in present),
        skipped=tuple(sorted(skipped)),
        label_mismatches=tuple(mismatches),
        manifest=manifest_path,
        unlisted=tuple(unlisted) if manifest_path is not None else (),
        unusable=tuple(unusable),
        manifest_rows=records,
    )


def entry_kind(path: Path) -> str:
    """What a directory entry is, in words: file, folder, symlink loop, broken symlink, FIFO,
    socket, device (so a report never calls a FIFO or a link loop a "bad suffix")."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop"
        if path.is_symlink():
            return "broken symlink"
        return f"unreadable ({e.strerror})"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISFIFO(mode):
        return "FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"


def _check_name(path: Path) -> None:
    """Refuse a file or folder name that is not valid UTF-8: no manifest can list it."""
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise DataError(
            f"{shown}: file name is not valid UTF-8 (a manifest cannot list it); rename it"
        ) from None


def find_manifest(root: Path) -> Path | None:
    """Return the first MANIFEST.csv or split.csv in ``root``, then in ``root.parent``."""
    for folder in (root, root.parent):
        for name in MANIFEST_NAMES:
            candidate = folder / name
            if candidate.is_file():
                return candidate
    return None


def read_manifest(manifest: Path) -> dict[Path, _ManifestRow]:
    """Read a manifest CSV into resolved absolute path -> row; reject unsafe or conflicting rows."""
    return read_manifest_rows(manifest)[0]


def read_manifest_rows(
    manifest: Path,
) -> tuple[dict[Path, _ManifestRow], dict[Path, dict[str, str]]]:
    """:func:`read_manifest` and, from the same read, every row's columns by resolved path."""
    manifest = Path(manifest)
    base = manifest.resolve().parent
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            missing = [c for c in REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise DataError(
                    f"{manifest}: manifest lacks column(s) {', '.join(missing)} "
                    f"(has: {', '.join(columns) or 'nothing'})"
                )
            rows: dict[Path, _ManifestRow] = {}
            records: dict[Path, dict[str, str]] = {}
            for record in reader:
                line = reader.line_num
                relative = _safe_relative(manifest, line, (record.get("path") or "").strip())
                key = (base / relative).resolve()
                records.setdefault(key, record)
                patient = (record.get("patient_id") or "").strip()
                if not patient:
                    continue  # no id: the file is treated as its own patient
                label = (record.get("label") or "").strip() or None
                row = _ManifestRow(line, label, patient)
                previous = rows.setdefault(key, row)
                if (previous.label, previous.patient_id) != (label, patient):
                    raise DataError(
                        f"{manifest}: lines {previous.line} and {line} list {relative} "
                        "with different labels or patient ids"
                    )
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{manifest}: cannot read manifest ({e})") from e
    return rows, records


def _safe_relative(manifest: Path, line: int, text: str) -> Path:
    """Check that a manifest path is relative and stays inside the manifest's folder."""
    if not text:
        raise DataError(f"{manifest}: line {line} has an empty path")
    if "\0" in text or any(ord(c) < 32 for c in text):
        raise DataError(f"{manifest}: line {line} path {text!r} contains control characters")
    if PureWindowsPath(text).anchor:  # "/x", "\\x", "C:x", "C:\\x", "\\\\server\\share"
        raise DataError(
            f"{manifest}: line {line} has an absolute path {text!r}; use a relative one"
        )
    parts = PureWindowsPath(text).parts  # splits on both / and \
    if ".." in parts:
        raise DataError(
            f"{manifest}: line {line} path {text!r} contains '..' (paths must stay inside "
            "the manifest's folder)"
        )
    return Path(*PurePosixPath(text.replace("\\", "/")).parts)


def check_labels(
    index: FolderIndex, labels: Sequence[str], *, where: object, exact: bool = False
) -> None:
    """Refuse class folders the model does not know (DataError naming ``where``).

    With ``exact`` the class folders must be the model's labels, no more and no fewer: a site
    that lacks a class or adds one cannot train the shared head.
    """
    if exact and set(index.labels) != set(labels):
        raise DataError(
            f"{where}: class folders {list(index.labels)} differ from the model's labels "
            f"{list(labels)}"
        )
    unknown = [c for c in index.labels if c not in labels]
    if unknown:
        raise DataError(
            f"{where}: class folders {unknown} are not among the model's labels {list(labels)}"
        )
