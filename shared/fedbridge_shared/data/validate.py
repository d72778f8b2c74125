"""One dataset validation for every command that reads a class-folder tree.

``data check`` lists the problems; ``data split``, ``bridge``, ``train``, ``evaluate`` and a
federated site refuse the first one, except where the user waived its kind (``--allow-…``):

- ``shared-files``: one file reached more than once (a class folder linked to another, a file
  linked or hard-linked into two classes) — the same image under two labels or counted twice;
- ``similar-labels``: class folders whose names differ only by whitespace, Unicode
  normalisation (NFC vs NFD) or invisible characters — labels that print alike;
- ``manifest-conflict``: a manifest that gives another label than the image's folder.

Never waivable: a class-folder symlink loop or broken link, and invisible or bidirectional
control characters in a class folder's name or bidi controls in a file name (they would reach
report.html, the CSV and the JSON and reorder what a reader sees).
"""

from __future__ import annotations

import os
import unicodedata
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fedbridge_shared.data.samples import FolderIndex, Sample
from fedbridge_shared.errors import ConfigError, DataError

ALLOW_KINDS = ("shared-files", "similar-labels", "manifest-conflict")
BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)
MAX_NAMED = 3  # files one message names


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset; ``kind`` is the ``--allow-KIND`` that waives it (None:
    never waivable)."""

    kind: str | None
    path: Path | None
    message: str  # does not repeat ``path``

    def __str__(self) -> str:
        hatch = f" (--allow-{self.kind} to use it anyway)" if self.kind else ""
        where = f"{self.path}: " if self.path is not None else ""
        return f"{where}{self.message}{hatch}"


def allow_set(kinds: Iterable[str]) -> frozenset[str]:
    """Check the names of waived kinds."""
    kinds = frozenset(kinds)
    unknown = sorted(kinds - set(ALLOW_KINDS))
    if unknown:
        raise ConfigError(f"unknown --allow kind {unknown[0]!r}; one of {', '.join(ALLOW_KINDS)}")
    return kinds


def dataset_problems(index: FolderIndex) -> list[Problem]:
    """Every structural problem of a scanned dataset (no image is decoded)."""
    return [
        *_unusable_entries(index),
        *_label_names(index),
        *_file_names(index),
        *_shared_files(index),
        *_manifest_conflicts(index),
    ]


def validate_index(index: FolderIndex, *, allow: Iterable[str] = ()) -> list[str]:
    """Refuse the first problem not waived in ``allow`` (DataError, one line); return the
    waived ones as warning texts for the console."""
    allowed = allow_set(allow)
    problems = dataset_problems(index)
    for problem in problems:
        if problem.kind not in allowed:
            raise DataError(str(problem))
    return [f"{p.path}: {p.message} (allowed)" if p.path else p.message for p in problems]


def label_key(label: str) -> str:
    """A label as a reader sees it: NFKC, invisible characters dropped, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", label)
    text = "".join(c for c in text if unicodedata.category(c) != "Cf")
    return " ".join(text.split())


def _invisible(text: str) -> list[str]:
    return [c for c in text if unicodedata.category(c) in ("Cf", "Cc", "Co", "Cs")]


def _code(c: str) -> str:
    return f"U+{ord(c):04X} ({unicodedata.name(c, 'unnamed')})"


def _unusable_entries(index: FolderIndex) -> list[Problem]:
    return [
        Problem(None, path, f"a {kind} where a class folder was expected; remove or fix it")
        for path, kind in index.unusable
    ]


def _label_names(index: FolderIndex) -> list[Problem]:
    problems = []
    for label in index.labels:
        hidden = _invisible(label)
        if hidden:
            message = (
                f"class folder name {ascii(label)} contains the invisible or bidirectional "
                f"control character {_code(hidden[0])}; rename the folder"
            )
            problems.append(Problem(None, index.root / _safe(label), message))
        elif label != label.strip():
            message = f"class folder name {ascii(label)} has leading or trailing whitespace"
            problems.append(Problem("similar-labels", index.root / label, message))
    groups: dict[str, list[str]] = defaultdict(list)
    for label in index.labels:
        groups[label_key(label)].append(label)
    for key, labels in groups.items():
        if len(labels) > 1:
            names = " and ".join(ascii(label) for label in labels)
            message = (
                f"class folders {names} differ only by whitespace, Unicode normalisation or "
                f"invisible characters: two labels that print alike as {key!r}"
            )
            problems.append(Problem("similar-labels", index.root, message))
    return problems


def _safe(name: str) -> str:
    """A name with its invisible characters written as escapes (never raw in a message)."""
    return "".join(c if not _invisible(c) else f"\\u{ord(c):04x}" for c in name)


def _file_names(index: FolderIndex) -> list[Problem]:
    problems = []
    for sample in index.samples:
        bidi = [c for c in sample.path.name if c in BIDI_CONTROLS]
        if bidi:
            shown = index.root / _safe(sample.label) / _safe(sample.path.name)
            message = (
                f"file name contains the bidirectional control character {_code(bidi[0])} "
                "(it reorders the name on screen); rename it"
            )
            problems.append(Problem(None, shown, message))
    return problems


def _shared_files(index: FolderIndex) -> list[Problem]:
    problems = []
    folders: dict[Path, list[str]] = defaultdict(list)
    for label in index.labels:
        folders[(index.root / label).resolve()].append(label)
    linked = {}
    for target, labels in folders.items():
        if len(labels) > 1:
            for label in labels:
                linked[label] = labels
            message = (
                f"class folders {', '.join(map(ascii, labels))} are the same folder "
                f"({target}): one set of files under {len(labels)} labels"
            )
            problems.append(Problem("shared-files", index.root, message))
    reached: dict[tuple[int, int], list[Sample]] = defaultdict(list)
    for sample in index.samples:
        if sample.label in linked:
            continue  # already said, once for the whole folder
        try:
            st = os.stat(sample.path)
        except OSError:
            continue  # the image reader names it
        reached[(st.st_dev, st.st_ino)].append(sample)
    for group in reached.values():
        if len(group) > 1:
            names = ", ".join(f"{s.path} ({s.label})" for s in group[:MAX_NAMED])
            more = f" and {len(group) - MAX_NAMED} more" if len(group) > MAX_NAMED else ""
            message = f"one file reached {len(group)} times (links): {names}{more}"
            problems.append(Problem("shared-files", group[0].path, message))
    return problems


def _manifest_conflicts(index: FolderIndex) -> list[Problem]:
    if not index.label_mismatches:
        return []
    path, folder, listed = index.label_mismatches[0]
    message = (
        f"{len(index.label_mismatches)} of {len(index.samples)} images have another label in "
        f"manifest {index.manifest} than their folder (first: {path}: folder {folder!r}, "
        f"manifest {listed!r})"
    )
    return [Problem("manifest-conflict", None, message)]
